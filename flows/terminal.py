"""Keep a flow run alive when its terminal goes away (a killed worker, a closed ssh session).

A process worker pipes the flow run's stdout/stderr; if the worker dies, every later write raises
BrokenPipeError. Prefect's console log handler prints through rich, which turns a BrokenPipeError
into SystemExit(1): the run would end Crashed ("aborted by Python system exit call") before
publishing what it already paid for. Writes to a lost terminal are dropped instead, for
sys.stdout/sys.stderr and for every log handler already holding them; logs still reach the
Prefect server through its API handler.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from prefect.logging.handlers import PrefectConsoleHandler


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


def _proof(stream: TextIO) -> _LostTerminalProof:
    return stream if isinstance(stream, _LostTerminalProof) else _LostTerminalProof(stream)


def survive_lost_terminal() -> None:
    """Make this process's stdout and stderr, and the log handlers that already hold them
    (Prefect's console handler took sys.stderr when logging was set up), drop writes once
    their reader is gone."""
    proofs: dict[int, _LostTerminalProof] = {}
    for name in ("stdout", "stderr"):
        proof = _proof(getattr(sys, name))
        setattr(sys, name, proof)
        proofs[id(proof)] = proofs[id(proof._stream)] = proof
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # placeholders have none
            if not isinstance(handler, logging.StreamHandler):
                continue
            held = proofs.get(id(handler.stream))
            if held is None or handler.stream is held:
                continue
            handler.setStream(held)
            if isinstance(handler, PrefectConsoleHandler):
                handler.console.file = held  # type: ignore[assignment]  # rich prints here
