"""How replicas agree, one module per job: the step protocol and plain training
(:mod:`.strategy`), DDP (:mod:`.ddp`), local updates and DiLoCo (:mod:`.local`) with
Streaming DiLoCo's fragments and delayed exchange (:mod:`.fragments`), FSDP (:mod:`.fsdp`),
the communication accounting (:mod:`.comm`) and the quantized exchange (:mod:`.codec`);
:mod:`.build` picks the strategy for ``sync.mode``.

This package init imports nothing: import from the modules."""
