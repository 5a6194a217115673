"""CPU-bound media work (decoding, encoding, QC) runs a few at a time per process.

A batch keeps many rows in flight so that renders overlap, and each row's finishing work runs in
its own thread. Python threads beyond the cores only contend for the GIL and the caches: measured
on 2 cores, 16 threads checking videos at once spent twice the CPU per video of one thread
(bench/RESULTS.md). Waiting for a slot costs nothing; the rows' renders still overlap.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_SLOTS = threading.BoundedSemaphore(_cores())


@contextmanager
def cpu_slot() -> Iterator[None]:
    """Hold one of the process's CPU slots (one per usable core) for the block."""
    with _SLOTS:
        yield
