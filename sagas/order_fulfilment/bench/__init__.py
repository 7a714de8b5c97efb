"""`sagaworks bench`: the engine against a hand-written pipeline, on the same machine.

`command` is the CLI command (a `sagaworks.commands` entry point), `driver`
the benchmark, `worker` one engine worker process with simulated
participants, `reference` the hand-written pipeline it is measured against.
"""
