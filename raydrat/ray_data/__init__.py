"""An adapter (the top layer), Ray Data: the core data blocks (:mod:`raydrat.core.data`) run as Ray Data
pipelines. This ``__init__`` imports nothing; import from the modules:

=============  ====================================================================
stream         units → blocks on Ray Data: the tokenizer actor pool, the per-epoch
               :class:`DataCounter`, the sampled check
bundle         :class:`DatasetBundle`: a run's train/val datasets, tokenizer, counts
datasets       :func:`build_datasets`: the bundle from sources or a prepared directory
prepare        ``raydrat data prepare``: shards and manifest, written on an actor pool
=============  ===================================================================="""
