"""Gating HTTP: routes, problem answers, the breaker, the ASGI middleware, FastAPI."""
