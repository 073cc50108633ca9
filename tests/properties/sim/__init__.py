"""A seeded simulation that drives real servers under load while it injects faults.

``python -m tests.properties.sim --seed 7 --duration 600`` runs it for as long as asked;
``tests/properties/test_faults.py`` runs a short version in the suite. Many concurrent
clients spend, chat, reserve and settle, grant, correct and change plans,
grant credit buckets that expire within the run (some starting later) and
void them, and spend and reserve on the paths of a small tree with a capped
user (:mod:`tests.properties.sim.trees`), against a real Redis (behind a
loopback proxy that can stall) with syncer processes writing to a real
PostgreSQL, while the injector kills, flushes, stalls and restarts things. Every call that may or may not have applied is
retried with its idempotency key. After a drain, :mod:`tests.properties.sim.checks`
proves the invariants of the design on every account.

The seed fixes the workload each client draws and the schedule of faults;
the interleaving is the machine's own, so a failing seed is a strong
reproducer, not a bit-exact replay.
"""
