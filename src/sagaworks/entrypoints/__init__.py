"""Entry points: the worker and the command line. Thin: parse, call a use case, settle."""
