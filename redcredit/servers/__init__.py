"""Real Redis and PostgreSQL servers on loopback, for the demo, the tests and the benchmarks."""
