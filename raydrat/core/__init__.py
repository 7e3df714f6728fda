"""The Ray-free core, layers 2 to 5 from the bottom: the model and the data blocks, the
techniques, memory, and the training loop with its setup and checkpoints (the order is
``tests/test_layers.py``'s). Nothing under ``raydrat.core`` imports ``ray`` or ``mlflow``; this package's
``__init__`` imports nothing, so importing one core module loads only what it needs."""
