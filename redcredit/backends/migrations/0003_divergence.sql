-- Histories in Redis that forked from the ledger (a replica promoted without
-- entries PostgreSQL had committed, or Redis restored from an older copy),
-- and the re-base that joined each one back. {schema} is the quoted schema.

-- One row per fork: found by the syncer, then closed once Redis is re-based.
CREATE TABLE {schema}.rebases (
    account            text        NOT NULL,
    -- The fork's first entry: where Redis's history stopped being PostgreSQL's.
    fork_id            text        NOT NULL,
    fork_seq           bigint      NOT NULL,
    -- Balances and plan just before that entry, the point the fork left from.
    base_credits       bigint      NOT NULL,
    base_chat          bigint      NOT NULL,
    base_plan          text,
    -- Every entry of the account up to this stream id belongs to the fork.
    until_id           text        NOT NULL,
    detected_at        timestamptz NOT NULL DEFAULT now(),
    -- The last re-base Redis reported: what PostgreSQL held then, where
    -- Redis was, and the fork's net change (repeats left out) against what
    -- the re-base added; the difference was not collected (a clamp at zero).
    pg_seq             bigint,
    pg_credits         bigint,
    pg_chat            bigint,
    old_seq            bigint,
    repeat_credits     bigint,
    repeat_chat        bigint,
    net_credits        bigint,
    net_chat           bigint,
    applied_credits    bigint,
    applied_chat       bigint,
    -- NULL while open; 'rebased' once the ledger holds the rebase entry,
    -- 'absent' when Redis no longer had the account (it reloads from here).
    outcome            text        CHECK (outcome IN ('rebased', 'absent')),
    rebase_seq         bigint,
    rebase_id          text,
    closed_at          timestamptz,
    PRIMARY KEY (account, fork_id)
);

CREATE INDEX rebases_open ON {schema}.rebases (account) WHERE outcome IS NULL;

-- The fork's entries, kept apart: never merged into the ledger, never lost.
CREATE TABLE {schema}.diverged_entries (
    account         text        NOT NULL,
    seq             bigint      NOT NULL,
    op              text        NOT NULL,
    credit_delta    bigint      NOT NULL,
    chat_delta      bigint      NOT NULL,
    credits_after   bigint      NOT NULL,
    chat_after      bigint      NOT NULL,
    plan            text        NOT NULL,
    credits_used    bigint,
    chat_used       bigint,
    feature         text,
    idempotency_key text,
    reservation_id  text,
    hold_amount     bigint,
    server_time     timestamptz NOT NULL,
    stream_id       text        NOT NULL,
    fork_id         text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- An account's entries share one stream: a re-delivery is stored once.
    PRIMARY KEY (account, stream_id),
    FOREIGN KEY (account, fork_id) REFERENCES {schema}.rebases (account, fork_id)
);
