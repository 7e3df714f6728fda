"""An adapter (the top layer), Ray Train: the worker (a thin wrapper around
:func:`raydrat.core.fit.fit`), the driver that builds and fits the ``TorchTrainer``, resuming
a run, and checking that a run fits the cluster."""
