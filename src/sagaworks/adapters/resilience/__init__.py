"""Timeouts, retries and circuit breakers around port calls."""
