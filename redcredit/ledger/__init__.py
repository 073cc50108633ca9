"""From Redis to PostgreSQL: the syncer, its partition leases, reconciliation and eviction."""
