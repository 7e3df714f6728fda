"""How replicas agree: DDP, local updates and DiLoCo with streaming fragments and quantized
exchange (:mod:`.strategies`), and FSDP (:mod:`.fsdp`).

This package init imports nothing: import from the modules."""
