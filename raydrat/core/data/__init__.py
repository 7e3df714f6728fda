"""The data blocks, free of Ray: documents → tokens → packed ``seq_len + 1`` blocks, split
train/val. One job per module (import from the module, this ``__init__`` imports nothing):

=============  ====================================================================
errors         :class:`DataError`, the one error type of the data code
sources        paths, globs, directories and ``s3://`` URIs → files; reading text
tokenizer      the byte-level BPE: train, load, hash, special tokens
demo           the embedded demo corpus (the stdlib's ``.py`` files) and its tokenizers
plan           sources → files → units of work, from metadata; the mixing rates
spec           :class:`PackSpec`: what a worker needs to turn a unit into blocks
read           a unit's documents, decoded, counted and split train/val
split          the keyed-hash train/val rule
pack           tokenize a packing group and cut it into ``seq_len + 1`` blocks
blocks         a unit's blocks with their ids and mixing copies; ``iter_blocks_local``
check          the up-front corpus check: counts of the sampled units, refusals
prepared       the prepared format without Ray: manifest, shard tables, reading blocks
sample         documents sampled over the corpus; training a tokenizer on them
=============  ====================================================================

The Ray Data streaming of these blocks and ``raydrat data prepare`` live in
:mod:`raydrat.ray_data`."""
