"""Memory: what a config will need (:mod:`.estimate`) and what training really holds, read
from PyTorch's allocator (:mod:`.peak`)."""
