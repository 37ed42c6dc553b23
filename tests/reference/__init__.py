"""Brute-force float64 references the tests compare lag_jax against (routers,
request-level routers, shared-direction removal), written from the method, not from
lag_jax's code."""
