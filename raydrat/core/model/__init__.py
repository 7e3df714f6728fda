"""The model and only the model: a GPT-style decoder (:mod:`.transformer`: ``GPT``,
``KVCache``), :func:`.build.build_model` and sampling (:mod:`.generate`). Its settings are the
schema :class:`raydrat.config.model.ModelConfig`. It knows nothing of Ray, MLflow, the data
pipeline, checkpoints or the techniques applied to it from outside.

This package init imports nothing, so validating a config never imports torch."""
