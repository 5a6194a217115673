"""In-process progress events: stages emit typed events, the CLI's live display (or any other
listener) reacts to them. Events are records (tasks.records.ProgressEvent), never dicts."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from tasks.records import ProgressEvent

Listener = Callable[[ProgressEvent], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Register a listener; returns a function that unregisters it."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(event: ProgressEvent) -> None:
    """Tell every listener that something happened; a failing listener never fails the task."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        with contextlib.suppress(Exception):  # a broken display must not fail a render
            listener(event)
