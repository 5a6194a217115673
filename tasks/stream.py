"""The streaming driver behind the batch flow: runs every row's stages from the flow's thread.

A row is a generator that yields what it waits on: a future, a list of futures (resumed with
them once all are done) or IN_ORDER (resumed once every earlier row has got that far). At most
`window` rows run before IN_ORDER (being planned); a row past it starts the next one. Finished
futures arrive through one queue, so each costs O(1) however many are in flight, and a task is
only submitted once its inputs exist: no worker thread sits blocked on another task's future.
Knows nothing about backends or rows; see flows/produce.py::row_stages for the stages.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from prefect.futures import PrefectFuture

T = TypeVar("T")
R = TypeVar("R")


class Waitable(Protocol):
    """What a row may wait on (a PrefectFuture is one)."""

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    def wait(self, timeout: float | None = None) -> None: ...


class _InOrder:
    def __repr__(self) -> str:
        return "IN_ORDER"


IN_ORDER = _InOrder()  # yielded by a row: go on only after every earlier row has yielded it
Wait = Waitable | Sequence[Waitable] | _InOrder
Stages = Generator[Wait, Any, R]


def first_error(futures: Sequence[PrefectFuture[Any]]) -> str:
    """The message of the earliest failed future (later stages only report NotReady)."""
    for future in futures:
        state = future.state
        if state.is_failed() or state.is_crashed():
            try:
                state.result()
            except Exception as exc:  # the stage's own exception, e.g. AudioError or FalError
                return f"{type(exc).__name__}: {exc}"
            return state.message or state.name or "failed"
    return "did not finish"


@dataclass
class _Running(Generic[R]):
    position: int  # in the input's order
    stages: Stages[R]
    waiting: int = 0  # futures of the current wait not done yet
    sent: Any = None  # what the row is resumed with once they are
    ordered: bool = False  # past IN_ORDER (or finished): no longer counts against the window


class Stream(Generic[T, R]):
    """Runs a row's stages for every item, `window` of them before IN_ORDER at a time; with
    `in_order`, rows pass IN_ORDER in the items' order, else each as soon as it gets there.
    A stage that raises ends the run with its exception: a row reports its own failures."""

    def __init__(self, window: int, in_order: bool) -> None:
        self.window, self.in_order = window, in_order
        self._done: queue.SimpleQueue[tuple[_Running[R], Waitable]] = queue.SimpleQueue()
        self._results: dict[int, R] = {}
        self._at_turn: set[int] = set()  # past IN_ORDER, not yet counted into the frontier
        self._parked: dict[int, _Running[R]] = {}  # at IN_ORDER, waiting for earlier rows
        self._frontier = 0  # every row before it has passed IN_ORDER
        self._before_turn = self._pending = 0

    def run(self, items: Sequence[T], stages: Callable[[T], Stages[R]]) -> list[R]:
        """Every item's result (what its stages return), in the items' order."""
        upcoming = ((k, stages(item)) for k, item in enumerate(items))  # started lazily
        self._start_more(upcoming)
        while self._pending:
            row, future = self._done.get()
            self._pending -= 1
            future.wait()  # a PrefectFuture's final state, set locally (else .state asks the API)
            row.waiting -= 1
            if not row.waiting:
                self._resume(row, row.sent)
            self._start_more(upcoming)
        return [self._results[k] for k in range(len(items))]

    def _start_more(self, upcoming: Iterator[tuple[int, Stages[R]]]) -> None:
        while self._before_turn < self.window:
            started = next(upcoming, None)
            if started is None:
                return
            self._before_turn += 1
            self._resume(_Running(*started), None)

    def _resume(self, row: _Running[R], value: Any) -> None:
        """Run the row to its next wait (or its end) and register what it waits on."""
        try:
            wait = row.stages.send(value)
        except StopIteration as end:
            self._results[row.position] = end.value
            self._pass_turn(row)
            return
        if isinstance(wait, _InOrder):
            self._park(row)
            return
        futures: Sequence[Waitable] = wait if isinstance(wait, Sequence) else [wait]
        row.waiting, row.sent = len(futures), wait
        if not futures:
            self._resume(row, wait)
        for future in futures:
            self._pending += 1
            future.add_done_callback(partial(self._arrived, row))

    def _arrived(self, row: _Running[R], future: Waitable) -> None:
        self._done.put((row, future))  # in a worker thread: the flow's thread handles it

    def _park(self, row: _Running[R]) -> None:
        if not self.in_order:
            self._pass_turn(row)
            self._resume(row, None)
            return
        self._parked[row.position] = row
        self._pass_turn(row)

    def _pass_turn(self, row: _Running[R]) -> None:
        """Count row as past IN_ORDER, then resume the parked rows whose turn that makes."""
        if row.ordered:
            return
        row.ordered = True
        self._before_turn -= 1
        self._at_turn.add(row.position)
        while self._frontier in self._at_turn:
            self._at_turn.discard(self._frontier)
            parked = self._parked.pop(self._frontier, None)
            self._frontier += 1
            if parked is not None:
                self._resume(parked, None)
