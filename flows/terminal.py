"""Keep a flow run alive when its terminal goes away (a killed worker, a closed ssh session).

A process worker pipes the flow run's stdout/stderr; if the worker dies, every later write raises
BrokenPipeError and the run would crash before publishing what it already paid for. Writes to a
lost terminal are dropped instead; logs still reach the Prefect server through its API handler.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class _LostTerminalProof:
    """A text stream proxy whose writes and flushes never raise OSError (EPIPE, EIO ...)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lost = False

    def write(self, text: str) -> int:
        if not self._lost:
            try:
                return self._stream.write(text)
            except OSError:
                self._lost = True
        return len(text)

    def flush(self) -> None:
        if not self._lost:
            try:
                self._stream.flush()
            except OSError:
                self._lost = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_lost_terminal() -> None:
    """Make this process's stdout and stderr drop writes once their reader is gone."""
    if not isinstance(sys.stdout, _LostTerminalProof):
        sys.stdout = _LostTerminalProof(sys.stdout)
    if not isinstance(sys.stderr, _LostTerminalProof):
        sys.stderr = _LostTerminalProof(sys.stderr)
