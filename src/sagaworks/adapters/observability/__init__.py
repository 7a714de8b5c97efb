"""Logging, metrics and traces: how sagaworks reports what it does."""
