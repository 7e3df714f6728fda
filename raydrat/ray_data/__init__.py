"""An adapter (the top layer), Ray Data: the core data blocks (:mod:`raydrat.core.data`) run as Ray Data
pipelines (the check, val, prepare) and as the training stream inside each Ray Train worker.
This ``__init__`` imports nothing; import from the modules:

=============  ====================================================================
stream         the training stream a Train worker reads (its part of the global
               order, a thread ahead); the sampled check and val on Ray Data; the
               per-epoch :class:`DataCounter`
bundle         :class:`DatasetBundle`: a run's training source, val dataset, tokenizer,
               counts
datasets       :func:`build_datasets`: the bundle from sources or a prepared directory
prepare        ``raydrat data prepare``: shards and manifest, written on an actor pool
=============  ===================================================================="""
