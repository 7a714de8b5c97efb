"""Use cases and the ports (Protocols) they need; adapters implement the ports."""
