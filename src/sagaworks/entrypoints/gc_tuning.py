"""Garbage-collector settings for a process that does nothing but run a worker.

Every message allocates hundreds of short-lived containers. With CPython's
default first-generation threshold (700 allocations) the cycle collector
runs several times per message; in `sagaworks bench` that was 7–10 % of the
worker's CPU per step. Reference counting frees nearly all of those objects
anyway: the collector only finds cycles, so running it far less often costs
a little memory, not correctness. `gc.freeze()` first moves what start-up
made (modules, saga definitions, connections) out of every later scan.
"""

from __future__ import annotations

import gc

__all__ = ["tune_for_throughput"]

YOUNG_THRESHOLD = 50_000
OLDER_THRESHOLDS = (20, 100)


def tune_for_throughput() -> None:
    """Call once, after start-up; not in a process that shares its interpreter (tests)."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
