"""Layer 2, the Ray-free core: the model, the techniques, the training loop and the data
blocks. Nothing under ``raydrat.core`` imports ``ray`` or ``mlflow``; this package's
``__init__`` imports nothing, so importing one core module loads only what it needs."""
