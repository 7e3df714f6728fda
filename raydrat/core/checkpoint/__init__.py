"""What outlives a process: the checkpoint format (:mod:`.state`: files, manifest,
verification, restore), loading a trained model from a checkpoint, a run or an export
(:mod:`.load`, ``model.init_from``) and exports for transformers and safetensors
(:mod:`.export`).

Like every package init in the core, this one imports nothing: import from the modules."""
