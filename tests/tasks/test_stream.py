"""The streaming driver: a window of rows planning, in-order admission, waits on futures that
finish in other threads, and a row's own handling of failed futures."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from avatarflow.tasks.stream import IN_ORDER, Stages, Stream


class FakeFuture:
    """A future finished by the test (from any thread), counting the driver's waits on it."""

    def __init__(self, value: Any = None, error: str | None = None) -> None:
        self.value, self.error = value, error
        self.waits = 0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> None:
        self.waits += 1
        assert self._done.wait(timeout if timeout is not None else 10)

    def done(self) -> bool:
        return self._done.is_set()

    def finish(self) -> FakeFuture:
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        return self

    def finish_after(self, other: FakeFuture) -> FakeFuture:
        """Finish in another thread, once other has finished."""
        threading.Thread(target=lambda: (other._done.wait(10), self.finish()), daemon=True).start()
        return self


def test_no_more_than_window_rows_are_planning_at_once() -> None:
    planning, most = 0, 0

    def stages(item: int) -> Stages[int]:
        nonlocal planning, most
        planning += 1
        most = max(most, planning)
        yield FakeFuture(item).finish()
        planning -= 1
        yield IN_ORDER
        rendered = yield FakeFuture(item * 10).finish()
        return int(rendered.value)

    results = Stream[int, int](3, in_order=True).run(list(range(8)), stages)

    assert results == [i * 10 for i in range(8)]
    assert most == 3


@pytest.mark.parametrize("in_order", [True, False])
def test_rows_pass_in_order_in_the_items_order_though_planned_last_first(in_order: bool) -> None:
    count = 5
    futures: list[FakeFuture] = []  # row k's planning finishes after row k+1's
    for _ in range(count):
        futures.insert(0, FakeFuture() if not futures else FakeFuture().finish_after(futures[0]))
    futures[-1].finish()
    planned: list[int] = []
    admitted: list[int] = []

    def stages(item: int) -> Stages[int]:
        yield futures[item]
        planned.append(item)
        yield IN_ORDER
        admitted.append(item)
        return item

    results = Stream[int, int](count, in_order).run(list(range(count)), stages)

    assert results == list(range(count))
    assert planned == list(reversed(range(count)))
    assert admitted == (list(range(count)) if in_order else planned)


def test_a_row_that_ends_before_in_order_lets_later_rows_pass() -> None:
    admitted: list[int] = []

    def stages(item: int) -> Stages[str]:
        planned = yield FakeFuture(error="no audio" if item == 0 else None).finish()
        if planned.error:
            return f"failed: {planned.error}"
        yield IN_ORDER
        admitted.append(item)
        return "ok"

    results = Stream[int, str](2, in_order=True).run([0, 1, 2], stages)

    assert results == ["failed: no audio", "ok", "ok"]
    assert admitted == [1, 2]


def test_later_futures_are_submitted_only_once_the_first_has_finished() -> None:
    seen: list[bool] = []

    def stages(item: int) -> Stages[list[Any]]:
        first = FakeFuture("face")
        first.finish_after(FakeFuture().finish())  # finishes in another thread
        [done] = yield [first]
        seen.append(done.done())
        later = [FakeFuture(f"{done.value}+{k}").finish() for k in (1, 2)]
        rest = yield later
        return [done.value, *(f.value for f in rest)]

    [result] = Stream[int, list[Any]](1, in_order=False).run([0], stages)

    assert seen == [True]
    assert result == ["face", "face+1", "face+2"]


def test_a_failed_future_reaches_its_row_with_the_others() -> None:
    def stages(item: int) -> Stages[str]:
        good, bad = FakeFuture("video"), FakeFuture(error="FalError: 500")
        threading.Thread(target=lambda: (good.finish(), bad.finish()), daemon=True).start()
        futures = yield [good, bad]
        assert all(f.done() for f in futures)
        return next(f.error for f in futures if f.error)

    assert Stream[int, str](1, in_order=False).run([0], stages) == ["FalError: 500"]


def test_each_finished_future_is_waited_on_once() -> None:
    futures = [FakeFuture(k) for k in range(2000)]

    def stages(item: int) -> Stages[int]:
        threading.Thread(target=lambda: [f.finish() for f in futures], daemon=True).start()
        done = yield futures
        return sum(f.value for f in done)

    assert Stream[int, int](1, in_order=False).run([0], stages) == [sum(range(2000))]
    assert {f.waits for f in futures} == {1}


def test_a_stage_that_raises_ends_the_run() -> None:
    def stages(item: int) -> Stages[int]:
        yield FakeFuture().finish()
        raise RuntimeError(f"bug in row {item}")

    with pytest.raises(RuntimeError, match="bug in row 0"):
        Stream[int, int](1, in_order=False).run([0, 1], stages)
