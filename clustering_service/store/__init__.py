"""Bulk data in PostgreSQL and its local caches: item vectors (:mod:`.vectors`),
model artifacts (:mod:`.artifacts`), and the checksummed cache files both use
(:mod:`.cache`)."""
