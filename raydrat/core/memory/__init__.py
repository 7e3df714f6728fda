"""Memory: what a config will need (:mod:`.estimate`) and what training really holds
(:mod:`.measure`)."""
