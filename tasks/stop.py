"""Run control: every flow run owns a stop token that Ctrl-C (or its cancellation) sets.

Once set, the run starts no new paid submit and every wait on a remote service wakes up and gives
up, leaving recorded request ids in the ledger for the next run to resume. A token lives as long as
its run: the next run in the same process (a test, `prefect serve`, a long-lived worker) starts
with a fresh one. The run's tasks find their token in the context Prefect copies into its task
threads; code outside any run has none and is never stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from uuid import UUID

_RUNS: dict[UUID, threading.Event] = {}  # the runs of this process, by flow run id
_RUNS_LOCK = threading.Lock()
# What each token's stop must also do: end waits that no Event can wake (a blocked socket read).
_ON_STOP: dict[threading.Event, dict[int, Callable[[], None]]] = {}
_HOOK_IDS = itertools.count()
_TOKEN: ContextVar[threading.Event | None] = ContextVar("avatarflow_stop", default=None)


class RenderStopped(Exception):
    """The run is stopping: this chunk was left as it was (a recorded request id is kept)."""


@contextlib.contextmanager
def owned(run_id: UUID) -> Iterator[None]:
    """Give the flow run `run_id` a fresh stop token for the block (the run's body)."""
    event = threading.Event()
    with _RUNS_LOCK:
        _RUNS[run_id] = event
    reset = _TOKEN.set(event)
    try:
        yield
    finally:
        _TOKEN.reset(reset)
        with _RUNS_LOCK:
            if _RUNS.get(run_id) is event:
                del _RUNS[run_id]


def request_stop(run_id: UUID | None = None) -> None:
    """Stop the named run, or with no id every run of this process (Ctrl-C ends them all).

    A run that is not in this process (a cancel hook that runs in the worker's process) is left
    alone: its own process ends it.
    """
    with _RUNS_LOCK:
        events = list(_RUNS.values()) if run_id is None else [_RUNS.get(run_id)]
    for event in events:
        if event is not None:
            event.set()
            with _RUNS_LOCK:
                hooks = list(_ON_STOP.get(event, {}).values())
            for hook in hooks:
                hook()


def stop_requested() -> bool:
    """True once a stop was requested for the run this code belongs to."""
    event = _TOKEN.get()
    return event is not None and event.is_set()


def wait_unless_stopped(seconds: float) -> None:
    """Sleep like time.sleep, but raise RenderStopped as soon as this run is asked to stop."""
    event = _TOKEN.get()
    if event is None:
        time.sleep(seconds)
    elif event.wait(seconds):
        raise RenderStopped("stopping: a wait was interrupted; any request id is kept")


@contextlib.contextmanager
def calling_on_stop(hook: Callable[[], None]) -> Iterator[None]:
    """Call hook (from the stopping thread, or at once if already stopping) when this run is
    asked to stop during the block; outside any run, the block just runs."""
    event = _TOKEN.get()
    if event is None:
        yield
        return
    key = next(_HOOK_IDS)
    with _RUNS_LOCK:
        _ON_STOP.setdefault(event, {})[key] = hook
    try:
        if event.is_set():
            hook()
        yield
    finally:
        with _RUNS_LOCK:
            hooks = _ON_STOP.get(event, {})
            hooks.pop(key, None)
            if not hooks:
                _ON_STOP.pop(event, None)
