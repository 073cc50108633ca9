-- Moving accounts between trees: each account's count of children.
-- {schema} is replaced by the configured schema, quoted.
--
-- A 'child' entry on a parent carries how many children it has after an
-- attach, a move in or a move out under it ('children' on its ledger row);
-- the account row keeps the newest, so a parent evicted from Redis reloads
-- with its count, and a move can refuse an account that has children.
ALTER TABLE {schema}.ledger ADD COLUMN children bigint;
ALTER TABLE {schema}.diverged_entries ADD COLUMN children bigint;
ALTER TABLE {schema}.accounts ADD COLUMN children bigint;

-- Trees made before the count: every account's children as the rows stand.
-- Attaches still in the journal then are not counted: drain it first (see
-- docs/scopes.md, "Moving an account").
UPDATE {schema}.accounts AS a SET children = c.n
FROM (SELECT parent, count(*) AS n FROM {schema}.accounts
      WHERE parent IS NOT NULL GROUP BY parent) AS c
WHERE a.account = c.parent;
