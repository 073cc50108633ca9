-- Accounts (the balances of record) and the append-only ledger of every
-- journal entry. {schema} is replaced by the configured schema, quoted.

CREATE TABLE {schema}.accounts (
    account       text        PRIMARY KEY,
    -- NULL only in rows imported from an older system; read as 0.
    credits       bigint      CHECK (credits >= 0),
    chat_messages bigint      CHECK (chat_messages >= 0),
    plan          text,
    -- The newest journal entry applied: older ones never overwrite it.
    last_seq      bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.ledger (
    account         text        NOT NULL,
    seq             bigint      NOT NULL CHECK (seq > 0),
    op              text        NOT NULL,
    credit_delta    bigint      NOT NULL,
    chat_delta      bigint      NOT NULL,
    credits_after   bigint      NOT NULL CHECK (credits_after >= 0),
    chat_after      bigint      NOT NULL CHECK (chat_after >= 0),
    plan            text        NOT NULL,
    credits_used    bigint,
    chat_used       bigint,
    feature         text,
    idempotency_key text,
    reservation_id  text,
    hold_amount     bigint,
    server_time     timestamptz NOT NULL,
    stream_id       text        NOT NULL,
    -- An entry delivered twice is stored once.
    PRIMARY KEY (account, seq)
);

-- "Usage by feature over time"; the primary key serves "history of one account".
CREATE INDEX ledger_feature_time ON {schema}.ledger (feature, server_time)
    WHERE feature IS NOT NULL;
CREATE INDEX ledger_time ON {schema}.ledger (server_time);
