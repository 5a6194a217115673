"""In-process progress events: stages emit typed events, the CLI's live display (or any other
listener) reacts to them. Events are records (avatarflow.tasks.records.ProgressEvent), never dicts.

Listeners belong to the runs started inside their `listening` block: they live in a context
variable, which Prefect copies into the run's task threads, so two runs in one process (two
threads, or one after the other) never see each other's events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from avatarflow.tasks.records import ProgressEvent

Listener = Callable[[ProgressEvent], None]

_LISTENERS: ContextVar[tuple[Listener, ...]] = ContextVar("avatarflow_listeners", default=())


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send listener the events of what runs inside the block (a flow run and its tasks)."""
    reset = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(reset)


def emit(event: ProgressEvent) -> None:
    """Tell the listeners of this run that something happened; a failing listener never fails
    the task."""
    for listener in _LISTENERS.get():
        with contextlib.suppress(Exception):  # a broken display must not fail a render
            listener(event)
