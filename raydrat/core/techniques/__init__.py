"""The techniques, each one object applied to the model from outside, with per-step hooks
(:mod:`.base`): recomputation (:mod:`.recompute`), the slot schedule (:mod:`.slots`),
precision (:mod:`.precision`), ``torch.compile`` (:mod:`.compile`) and the sync strategy
(:mod:`.sync`: DDP, local updates and DiLoCo, FSDP). :mod:`.bundle` builds them from their
config sections and applies them in order (``build_techniques``, ``apply_techniques``).

Like every package init in the core, this one imports nothing: import from the modules."""
