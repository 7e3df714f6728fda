"""Memory: what a config will need (:mod:`.estimate`, over :mod:`.activations` and
:mod:`.states`) and what training really holds, read from PyTorch's allocator (:mod:`.peak`)."""
