"""Run control: a process-wide stop flag that Ctrl-C (or a cancelled flow run) sets.

Once set, no new paid submit starts and every wait on a remote service wakes up and gives up,
leaving recorded request ids in the ledger for the next run to resume.
"""

from __future__ import annotations

import threading

_STOP = threading.Event()


class RenderStopped(Exception):
    """The run is stopping: this chunk was left as it was (a recorded request id is kept)."""


def request_stop() -> None:
    """Stop dispatching paid work in this process and wake every waiting poll."""
    _STOP.set()


def clear_stop() -> None:
    """Allow dispatching again (a new run in a long-lived worker process)."""
    _STOP.clear()


def stop_requested() -> bool:
    """True once request_stop() was called."""
    return _STOP.is_set()


def wait_unless_stopped(seconds: float) -> None:
    """Sleep like time.sleep, but raise RenderStopped as soon as a stop is requested."""
    if _STOP.wait(seconds):
        raise RenderStopped("stopping: a wait was interrupted; any request id is kept")
