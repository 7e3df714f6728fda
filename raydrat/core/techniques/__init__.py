"""The techniques, each one object applied to the model from outside, with per-step hooks:
recompute planners (:mod:`.recompute`, over the branch wrappers of :mod:`.wrapper`, the
gates of :mod:`.gates` and the knapsack of :mod:`.knapsack`), the slot schedule
(:mod:`.slots`), precision (:mod:`.precision`), ``torch.compile`` (:mod:`.compile`) and the
sync strategy (:mod:`.sync`). :mod:`.bundle` builds them from their config sections and
applies them in order (``build_techniques``, ``apply_techniques``).

Like every package init in the core, this one imports nothing: import from the modules."""
