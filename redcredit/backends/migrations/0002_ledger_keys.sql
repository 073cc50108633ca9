-- Reloading an account that Redis lost reads the idempotency keys of its
-- recent calls, so that a repeated call is not applied twice.
CREATE INDEX ledger_account_keys ON {schema}.ledger (account, server_time)
    WHERE idempotency_key IS NOT NULL;
