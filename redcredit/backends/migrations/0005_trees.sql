-- Trees of accounts (org -> project -> user -> key) in the system of record.
-- {schema} is replaced by the configured schema, quoted.
--
-- Every ledger (and diverged) row gains where its entry's account sits on
-- the call's path, and what it did to the tree:
--   level         the account's depth on the path of the call (1 for the
--                 root), NULL for a call on an account alone
--   via           an ancestor's row: the account the call was for
--   parent, root  an 'attach' row: where the account was placed
--   cap           a 'cap' row: the cap set ('credits,messages,period', see
--                 lua/_scopes.lua), '' when removed
--   cap_window, cap_credits, cap_messages
--                 a capped level's row: its cap's window and what was
--                 charged through it in that window, after the entry
ALTER TABLE {schema}.ledger
    ADD COLUMN level        smallint,
    ADD COLUMN via          text,
    ADD COLUMN parent       text,
    ADD COLUMN root         text,
    ADD COLUMN cap          text,
    ADD COLUMN cap_window   bigint,
    ADD COLUMN cap_credits  bigint,
    ADD COLUMN cap_messages bigint;

ALTER TABLE {schema}.diverged_entries
    ADD COLUMN level        smallint,
    ADD COLUMN via          text,
    ADD COLUMN parent       text,
    ADD COLUMN root         text,
    ADD COLUMN cap          text,
    ADD COLUMN cap_window   bigint,
    ADD COLUMN cap_credits  bigint,
    ADD COLUMN cap_messages bigint;

-- Where each account sits (NULL: in no tree, or a root), its cap (NULL:
-- none) and the cap's use, as the ledger leaves them: an account evicted
-- from Redis, or lost with it, reloads in its place.
ALTER TABLE {schema}.accounts
    ADD COLUMN parent       text,
    ADD COLUMN root         text,
    ADD COLUMN cap          text,
    ADD COLUMN cap_window   bigint,
    ADD COLUMN cap_credits  bigint,
    ADD COLUMN cap_messages bigint;

-- A tree's members, for the admin's "who is under acme".
CREATE INDEX accounts_tree ON {schema}.accounts (root, parent) WHERE root IS NOT NULL;
-- Usage through a level: its own rows, and the rows of calls made below it.
CREATE INDEX ledger_via ON {schema}.ledger (via, seq) WHERE via IS NOT NULL;
