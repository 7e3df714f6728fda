"""The data blocks and their global order, free of Ray: documents → pieces → chunks →
tokens → packed ``seq_len + 1`` blocks, split train/val, read in an order any worker group
continues from a position. One job per module (import from the module, this ``__init__``
imports nothing):

=============  ====================================================================
errors         :class:`DataError`, the one error type of the data code
sources        paths, globs, directories and ``s3://`` URIs → files and filesystems
text           text files as decoded slices: byte order marks, encodings, gzip members
tokenizer      the byte-level BPE: train, load, hash, special tokens
demo           the embedded demo corpus (the stdlib's ``.py`` files) and its tokenizers
plan           sources → files → units of work, from metadata; the mixing rates
spec           :class:`PackSpec`: what a worker needs to turn a unit into blocks
read           a unit's documents as bounded, labelled pieces, from any mark
split          the keyed-hash train/val rule
pack           pieces → chunks → tokens → ``seq_len + 1`` blocks
blocks         a unit's blocks with their ids and mixing copies; ``iter_blocks_local``
mixing         weighted mixing's rates and the sources' measured sizes and shares
check          the up-front corpus check: counts of the sampled units, refusals
order          the global order: units per epoch, streams, windows, readers
position       :class:`DataPosition` and the slice a worker reads from it
stream         the order read from a position by one stream and by one worker
prepared       the prepared format without Ray: manifest, shard tables, reading blocks
sample         documents sampled over the corpus; training a tokenizer on them
=============  ====================================================================

The check and val split on Ray Data, the training stream a Train worker reads, and
``raydrat data prepare`` live in :mod:`raydrat.ray_data`."""
