-- Credit buckets (grants) in the system of record, and overdrafts.
-- {schema} is replaced by the configured schema, quoted.
--
-- Every ledger (and diverged) row gains what its entry did to the account's
-- buckets:
--   bucket          the bucket the op is about (grant, void, expire,
--                   effective, refill), NULL for the others
--   bucket_changes  the buckets the entry changed, a jsonb array of objects
--                   with keys "bucket" (its id), "delta" and "after" (its
--                   remaining credits after the entry), in the order the
--                   script changed them; NULL when none.
--                   jsonb rather than a child table: the changes belong to the
--                   entry, so the one (account, seq) key keeps them applied
--                   once with their row and no second idempotency key is
--                   needed, and they stay queryable in SQL:
--                   SELECT c.bucket, sum(c.delta) FROM ledger,
--                     jsonb_to_recordset(bucket_changes)
--                     AS c(bucket text, delta bigint, after bigint)
--                   WHERE account = 'alice' GROUP BY 1;
--                   Per bucket, the deltas sum to its remaining credits.
--   grant_*         a grant's or refill's attributes, as the bucket has them
--                   after the entry (expires NULL: never)
-- Existing rows keep every value, with NULL in the new columns: they come
-- from before buckets, when every credit was in the base bucket.
ALTER TABLE {schema}.ledger
    ADD COLUMN bucket             text,
    ADD COLUMN bucket_changes     jsonb,
    ADD COLUMN grant_category     text,
    ADD COLUMN grant_priority     integer,
    ADD COLUMN grant_effective_at timestamptz,
    ADD COLUMN grant_expires_at   timestamptz,
    ADD COLUMN grant_amount       bigint,
    ADD COLUMN grant_created_at   timestamptz;

ALTER TABLE {schema}.diverged_entries
    ADD COLUMN bucket             text,
    ADD COLUMN bucket_changes     jsonb,
    ADD COLUMN grant_category     text,
    ADD COLUMN grant_priority     integer,
    ADD COLUMN grant_effective_at timestamptz,
    ADD COLUMN grant_expires_at   timestamptz,
    ADD COLUMN grant_amount       bigint,
    ADD COLUMN grant_created_at   timestamptz;

-- "What happened to this grant": the ops about one bucket of one account.
CREATE INDEX ledger_bucket ON {schema}.ledger (account, bucket) WHERE bucket IS NOT NULL;

-- A plan's overdraft takes credits below zero; chat messages never go there.
ALTER TABLE {schema}.accounts DROP CONSTRAINT IF EXISTS accounts_credits_check;
ALTER TABLE {schema}.ledger DROP CONSTRAINT IF EXISTS ledger_credits_after_check;

-- Every bucket an account has had besides its base bucket, as the ledger
-- leaves it. The base bucket has no row: it holds the rest of the account's
-- credits (accounts.credits less the live buckets' remaining), as in Redis,
-- and entries on Redis's plain path change it without naming it.
CREATE TABLE {schema}.buckets (
    account       text        NOT NULL,
    bucket        text        NOT NULL,
    category      text        NOT NULL,
    priority      integer     NOT NULL,
    effective_at  timestamptz NOT NULL,
    -- NULL: never expires.
    expires_at    timestamptz,
    granted       bigint      NOT NULL,
    remaining     bigint      NOT NULL CHECK (remaining >= 0),
    -- pending until its effective instant (its credits are not in the
    -- balance yet), then live; closed once nothing is left of it (spent,
    -- expired or voided), as Redis then drops it. A grant or refill under a
    -- closed bucket's id opens it again with its own attributes.
    status        text        NOT NULL CHECK (status IN ('pending', 'live', 'closed')),
    -- The newest ledger entry that changed the bucket.
    last_seq      bigint      NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (account, bucket)
);

-- Loading an account reads its buckets that are not closed.
CREATE INDEX buckets_open ON {schema}.buckets (account) WHERE status <> 'closed';
