"""How sagaworks reports what it does: structured logs (structlog) — no metrics or traces yet."""
