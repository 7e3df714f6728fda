"""Recomputation: which activations a step stores and which its backward recomputes. The
planners (:mod:`.planners`: none, full, budget, gated; branch or op granularity) over the
branch wrappers (:mod:`.wrapper`), branch costs (:mod:`.measure`), op-level plans
(:mod:`.selective`), the knapsack (:mod:`.knapsack`) and the learnable gates (:mod:`.gates`).

This package init imports nothing: import from the modules."""
