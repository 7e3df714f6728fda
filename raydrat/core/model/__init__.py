"""The model: a GPT-style decoder (:mod:`.transformer`: ``GPT``, ``KVCache``), its settings
(:mod:`.config`: ``ModelConfig``, pydantic only), :func:`.build.build_model` (with
``model.init_from``), sampling (:mod:`.generate`), export for transformers and safetensors
(:mod:`.export`) and loading a trained model from a checkpoint, run or export
(:mod:`.load`). It knows nothing of Ray, MLflow, the data pipeline or the techniques
applied to it from outside.

This package init imports nothing, so validating a config (which reads ``ModelConfig``)
never imports torch."""
