"""The model: a GPT-style decoder (:mod:`.transformer`: ``GPT``), its settings
(:mod:`.config`: ``ModelConfig``, pydantic only) and :func:`.build.build_model`. It knows
nothing of Ray, MLflow, the data pipeline or the techniques applied to it from outside.

This package init imports nothing, so validating a config (which reads ``ModelConfig``)
never imports torch."""
