"""Recomputation: which activations a step stores and which its backward recomputes.

Read in the order costs → plan → apply:

* costs: :mod:`.record` (the one op recorder), :mod:`.branch_costs` (per branch),
  :mod:`.op_costs` and :mod:`.op_measure` (per op call), :mod:`.measure` (whole-pass figures);
* plan: :mod:`.knapsack` (the exact budget optimum), :mod:`.gates` (the learnable gates),
  :mod:`.op_plan` (op-level plans), :mod:`.plan_cache` (budget plans kept between runs);
* apply: :mod:`.wrapper` (the checkpoint wrapper, per branch or per block),
  :mod:`.op_apply` (op-level plans through selective checkpointing);
* :mod:`.granularity` puts each granularity (branch, op) behind one interface, and
  :mod:`.planners` holds the technique: one planner per ``recompute.mode``.

This package init imports nothing: import from the modules."""
