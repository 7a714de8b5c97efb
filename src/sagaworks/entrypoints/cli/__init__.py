"""The `sagaworks` command line."""
