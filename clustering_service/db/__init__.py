"""PostgreSQL, the system of record: schema (:mod:`.tables`), connection
(:mod:`.engine`), Alembic migrations (:mod:`.migrate`) and the queries of each
resource (:mod:`.datasets`, :mod:`.jobs`, :mod:`.models`)."""
