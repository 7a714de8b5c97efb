"""`sagaworks demo`: the order-fulfilment saga driven end to end, as a shop would run it.

`command` is the CLI command (a `sagaworks.commands` entry point), `run` the
demo itself, `participants` the participants it chooses (simulated, or fake
HTTP services), `render` its terminal output.
"""
