"""Hybrid routing (`--backend auto`): each row goes to the run's own GPU workers while their
predicted finish stays before the deadline, else to fal within the budget; re-planned as rows
finish and workers come and go. docs/routing.md describes the rules.

Router is the pure core, with an injected clock: the flow drives it through RoutedAdmission
(tasks/plan.Admission's hooks), and bench/route_sim.py with simulated workers and fal queue.
"""

from __future__ import annotations

import heapq
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from avatarflow.tasks.config import RouteSettings
from avatarflow.tasks.records import RowResult, RowRoute, Sidecar

AUTO, LOCAL, FAL = "auto", "local", "fal"
_SPAN = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


class DeadlineError(ValueError):
    """A deadline the router cannot read."""


def parse_deadline(text: str, now: datetime) -> datetime:
    """The deadline text as an aware time: "06:00" is the next 06:00 of now's time zone,
    "3h", "90m", "1h30m", "45s" count from now, an ISO 8601 time is itself."""
    text = text.strip()
    if match := _CLOCK.fullmatch(text):
        hour, minute = int(match[1]), int(match[2])
        if hour > 23 or minute > 59:
            raise DeadlineError(f"deadline {text!r}: no such time of day")
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return at if at > now else at + timedelta(days=1)
    span = _SPAN.fullmatch(text)
    if span and any(span.groups()):
        hours, minutes, seconds = (float(g or 0) for g in span.groups())
        return now + timedelta(hours=hours, minutes=minutes, seconds=seconds)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise DeadlineError(
            f"deadline {text!r}: expected a time of day (06:00), a span from now (3h, 90m, "
            "1h30m, 45s) or an ISO 8601 time"
        ) from None
    return at if at.tzinfo else at.astimezone()  # a naive time is this machine's local time


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _hhmm(epoch_s: float) -> str:
    return "never" if math.isinf(epoch_s) else f"{utc(epoch_s):%H:%M:%S}Z"


@dataclass
class Rate:
    """Seconds per segment: a prior that measurements outweigh as the segments they cover grow."""

    prior_s: float
    prior_segments: float
    seconds: float = 0.0
    segments: float = 0.0
    per_segment: float = field(init=False)  # kept up to date: the router asks per chunk

    def __post_init__(self) -> None:
        self.per_segment = self.prior_s

    def add(self, seconds: float, segments: float) -> None:
        self.seconds += max(seconds, 0.0)
        self.segments += segments
        weight = self.prior_segments
        self.per_segment = (self.prior_s * weight + self.seconds) / (weight + self.segments)


@dataclass
class Predictor:
    """How long a row takes on each backend, from the priors and what was measured."""

    local: Rate
    local_load_s: float
    fal: Rate  # render seconds per segment of one request (a chunk)
    fal_queue_s: float
    fal_concurrency: int

    @classmethod
    def from_history(cls, settings: RouteSettings, sidecars: Iterable[Sidecar]) -> Predictor:
        """Priors from settings, then every earlier sidecar's measured times on top."""
        weight = settings.prior_segments
        local = Rate(settings.local_s_per_segment, weight)
        fal = Rate(settings.fal_s_per_segment, weight)
        queue_s, requests = settings.fal_queue_s * weight, weight
        for sidecar in sidecars:
            if not sidecar.chunks:
                continue
            if sidecar.backend == LOCAL:
                local.add(_local_seconds(sidecar), sidecar.segments)
            elif sidecar.backend == FAL:
                for chunk in sidecar.chunks:
                    fal.add(chunk.timings.run_s, chunk.num_segments)
                    queue_s, requests = queue_s + chunk.timings.queue_s, requests + 1
        return cls(local, settings.local_load_s, fal, queue_s / requests, settings.fal_concurrency)

    def local_s(self, segments: int) -> float:
        return segments * self.local.per_segment

    def fal_chunk_s(self, segments: int) -> float:
        return self.fal_queue_s + segments * self.fal.per_segment


def _local_seconds(sidecar: Sidecar) -> float:
    """A local row's render seconds: its routed start to finish, else the renderer's own time
    (every chunk of a continuous render carries the row's render_s, plus its own encode)."""
    route = sidecar.route
    if route and route.started_at and route.finished_at:
        return (route.finished_at - route.started_at).total_seconds()
    return sidecar.chunks[0].timings.render_s + sum(c.timings.encode_s for c in sidecar.chunks)


@dataclass(frozen=True)
class RowWork:
    """What the router needs of a row: its chunks' segments and what fal would charge."""

    row_id: str
    chunk_segments: tuple[int, ...]
    fal_cost_usd: float

    @property
    def segments(self) -> int:
        return sum(self.chunk_segments)


class Budget(Protocol):
    """What is left of the run's budget (tasks/plan.RunBudget)."""

    remaining_usd: float | None

    def take(self, usd: float) -> bool: ...

    def give(self, usd: float) -> None: ...


class Slot:
    """What a routed row waits on before it renders: done once a worker (or a fal slot) is its.
    A Waitable for tasks/stream.py; `backend` may change until then."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._event = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def done(self) -> bool:
        return self._event.is_set()

    def grant(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


@dataclass
class _Routed:
    work: RowWork
    route: RowRoute
    slot: Slot
    pinned: bool = False  # kept from an earlier run: moves only if its backend cannot take it
    started_at: float | None = None
    predicted_s: float = 0.0

    @property
    def backend(self) -> str:
        return self.slot.backend


@dataclass
class Router:
    """Assigns rows to own GPU workers or fal, and hands out their slots as capacity frees.

    Local rows wait here (not inside Dask) until a worker is free, so a row that has not
    started can still move to fal when a worker is lost or slower than predicted; fal rows wait
    for the account's concurrency, so one not yet submitted can still come back to a worker
    that turned out fast. Every call may come from any thread.
    """

    predictor: Predictor
    deadline: float  # epoch seconds
    workers: int
    budget: Budget
    margin: float = 0.1
    clock: Callable[[], float] = time.time
    on_move: Callable[[str, RowRoute], None] | None = None  # a queued row changed backend
    rows: dict[str, _Routed] = field(default_factory=dict)
    _queue: list[str] = field(default_factory=list)  # assigned, not started, in order
    _loaded: bool = False  # a local row has finished: the workers hold the model
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _window: float = 0.0  # seconds from the router's start to the deadline
    _version: int = 0  # bumped by every change but an assign: the lanes below are stale then
    _assigning: tuple[tuple[float, int], list[float], list[float]] | None = None
    _held: tuple[tuple[float, int], bool] | None = None  # _hold_fal's answer, while it holds

    def __post_init__(self) -> None:
        self._window = max(self.deadline - self.clock(), 0.0)

    # --- the rows' life -------------------------------------------------------------------------

    def assign(self, work: RowWork, kept: str | None = None) -> RowRoute:
        """Route one row (in manifest order); kept: its backend in an earlier run, if any."""
        with self._lock:
            now = self.clock()
            local_end, fal_end = self._finish_if_added(work)
            limit = self._limit(now)
            fits = self._fits(work.fal_cost_usd)
            if kept == FAL or (kept == LOCAL and self.workers > 0):
                backend, why = kept, f"kept from the earlier run ({kept})"
            elif local_end <= limit:
                backend = LOCAL
                why = f"own GPUs finish by {_hhmm(local_end)}, before the deadline"
            elif fits and (fal_end <= self.deadline or fal_end < local_end or not self.workers):
                backend = FAL
                why = f"own GPUs would finish at {_hhmm(local_end)}, past the deadline"
            elif self.workers:
                backend = LOCAL
                why = "late on fal too" if fits else "past the deadline, but fal is over the budget"
            else:
                backend, why = FAL, "no GPU worker; fal over the budget"
            end = local_end if backend == LOCAL else fal_end
            route = self._route(work, backend, why, end, local_end, fal_end)
            self.rows[work.row_id] = _Routed(work, route, Slot(backend), pinned=kept is not None)
            self._queue.append(work.row_id)
            assert self._assigning is not None
            _, local, fal = self._assigning
            if backend == LOCAL:
                self._place(local, self._local_s(work))
            else:
                self._place_chunks(fal, work)
            return route

    def slot(self, row_id: str) -> Slot:
        """What the row waits on; dispatches whatever capacity is free."""
        with self._lock:
            self._dispatch()
            return self.rows[row_id].slot

    def route(self, row_id: str) -> RowRoute:
        return self.rows[row_id].route

    def drop(self, row_id: str) -> None:
        """Forget a row that will not render (held by the budget)."""
        with self._lock:
            self._version += 1
            self.rows.pop(row_id, None)
            if row_id in self._queue:
                self._queue.remove(row_id)
            self._dispatch()

    def finished(self, row_id: str, ok: bool = True) -> RowRoute:
        """A row's render ended: learn from it, free its slot, re-plan; its route with times."""
        with self._lock:
            now, routed = self.clock(), self.rows[row_id]
            started = routed.started_at if routed.started_at is not None else now
            if ok:
                self._measure(routed, now - started)
            routed.route = replace(routed.route, finished_at=utc(now))
            routed.started_at = None
            del self.rows[row_id]
            self.replan()
            return routed.route

    def stop(self) -> None:
        """The run is stopping: every row still waiting gets its slot now, as it is."""
        with self._lock:
            self._version += 1
            for row_id in self._queue:
                routed = self.rows[row_id]
                routed.started_at = self.clock()
                routed.slot.grant()
            self._queue.clear()

    def set_workers(self, workers: int) -> None:
        """The live GPU workers now (asked every few seconds): re-plan the rows not started."""
        with self._lock:
            self.workers = workers
            self.replan()

    # --- planning -------------------------------------------------------------------------------

    def replan(self) -> None:
        """Move rows that have not started: local ones whose predicted finish passed the deadline
        go to fal (budget allowing), fal ones a worker can now finish in time come back."""
        with self._lock:
            self._version += 1
            now = self.clock()
            limit = self._limit(now)
            local, fal = self._lanes(LOCAL, now), self._lanes(FAL, now)
            for row_id in self._queue:
                routed = self.rows[row_id]
                work = routed.work
                if routed.backend == LOCAL:
                    local_end = self._place(local, self._local_s(work))
                    movable = not routed.pinned or not self.workers
                    if local_end > limit and movable and self._fits(work.fal_cost_usd):
                        fal_end = self._place_chunks(fal, work, dry=True)
                        if fal_end < local_end or not self.workers:
                            self._unplace(local, local_end, self._local_s(work))
                            self._place_chunks(fal, work)
                            self.budget.take(work.fal_cost_usd)
                            self._move(routed, FAL, "moved: own GPUs now", local_end, fal_end)
                elif (
                    not routed.pinned
                    and self.workers
                    and (local_end := self._place(local, self._local_s(work), dry=True)) <= limit
                ):
                    self._place(local, self._local_s(work))
                    self.budget.give(work.fal_cost_usd)
                    self._move(routed, LOCAL, "moved back: own GPUs now", local_end, math.inf)
                else:
                    self._place_chunks(fal, work)
            hold = self.workers > 0 and max(fal, default=now) < self._hold_until()
            self._held = ((now, self._version), hold)  # what _dispatch asks next
            self._dispatch()

    def predicted_finish(self) -> tuple[float, float]:
        """When the local and the fal work assigned so far is predicted to end (epoch s)."""
        with self._lock:
            now = self.clock()
            local, fal = self._queued_lanes(now)
            return max(local, default=now), max(fal, default=now)

    # --- internals ------------------------------------------------------------------------------

    def _limit(self, now: float) -> float:
        """The latest predicted local finish accepted: the deadline less the margin."""
        return self.deadline - self.margin * max(self.deadline - now, 0.0)

    def _fits(self, usd: float) -> bool:
        left = self.budget.remaining_usd
        return left is None or usd <= left + 1e-9

    def _local_s(self, work: RowWork) -> float:
        return self.predictor.local_s(work.segments)

    def _queued_lanes(self, now: float) -> tuple[list[float], list[float]]:
        """The local and fal lanes once every assigned row is placed, in order."""
        local, fal = self._lanes(LOCAL, now), self._lanes(FAL, now)
        for row_id in self._queue:
            routed = self.rows[row_id]
            if routed.backend == LOCAL:
                self._place(local, self._local_s(routed.work))
            else:
                self._place_chunks(fal, routed.work)
        return local, fal

    def _finish_if_added(self, work: RowWork) -> tuple[float, float]:
        """(local, fal) predicted finish of work, queued after everything assigned so far.

        Rows admitted at one instant (a manifest admitted at once) extend the same lanes."""
        now = self.clock()
        if self._assigning is None or self._assigning[0] != (now, self._version):
            self._assigning = ((now, self._version), *self._queued_lanes(now))
        _, local, fal = self._assigning
        return self._place(local, self._local_s(work), dry=True), self._place_chunks(
            fal, work, dry=True
        )

    def _lanes(self, backend: str, now: float) -> list[float]:
        """A heap of when each worker (or fal request slot) is next free, after the rows that
        have started; a worker's first row also loads the model."""
        count = self.workers if backend == LOCAL else self.predictor.fal_concurrency
        if count <= 0:
            return []
        load = 0.0 if self._loaded or backend == FAL else self.predictor.local_load_s
        ends = sorted(
            now + max(r.started_at + r.predicted_s - now, 0.1 * r.predicted_s)  # overdue: a bit
            for r in self.rows.values()
            if r.started_at is not None and r.backend == backend
            for _ in (r.work.chunk_segments if backend == FAL else (0,))  # fal: per request
        )
        lanes = ends[:count] + [now + load] * max(count - len(ends), 0)
        heapq.heapify(lanes)
        for end in ends[count:]:  # more started than lanes (a worker was lost): they wait
            self._place(lanes, end - now)
        return lanes

    @staticmethod
    def _place(lanes: list[float], seconds: float, dry: bool = False) -> float:
        """Put seconds of work on the lane free first; when it ends (inf: no lanes)."""
        if not lanes:
            return math.inf
        end = lanes[0] + seconds
        if not dry:
            heapq.heapreplace(lanes, end)
        return end

    @staticmethod
    def _unplace(lanes: list[float], end: float, seconds: float) -> None:
        """Take back a placement (the lane ending at end is free seconds earlier again)."""
        index = lanes.index(end)
        lanes[index] = end - seconds
        heapq.heapify(lanes)

    def _place_chunks(self, lanes: list[float], work: RowWork, dry: bool = False) -> float:
        """Place a row's fal requests (its chunks, in parallel); when the last ends."""
        trial = list(lanes) if dry else lanes
        ends = [self._place(trial, self.predictor.fal_chunk_s(s)) for s in work.chunk_segments]
        return max(ends, default=math.inf)

    def _route(
        self, work: RowWork, backend: str, why: str, end: float, local_end: float, fal_end: float
    ) -> RowRoute:
        late = end > self.deadline
        cost = work.fal_cost_usd if backend == FAL else 0.0
        reason = (
            f"{backend}: {why} (predicted finish: own GPUs {_hhmm(local_end)}, fal "
            f"{_hhmm(fal_end)} at ${work.fal_cost_usd:.2f}; deadline {_hhmm(self.deadline)})"
        )
        at = utc(min(end, 4e9))  # inf: no lane at all (no worker, nothing to compare)
        return RowRoute(backend, reason, at, utc(self.deadline), cost, late, work.fal_cost_usd)

    def _move(
        self, routed: _Routed, backend: str, why: str, local_end: float, fal_end: float
    ) -> None:
        routed.slot.backend = backend
        end = local_end if backend == LOCAL else fal_end
        routed.route = self._route(routed.work, backend, why, end, local_end, fal_end)
        if self.on_move is not None:
            self.on_move(routed.work.row_id, routed.route)

    def _dispatch(self) -> None:
        """Start queued rows while workers (and fal request slots) are free, in order."""
        running = [self.rows[r] for r in self.rows if self.rows[r].started_at is not None]
        busy = sum(r.backend == LOCAL for r in running)
        hold = self._hold_fal()
        requests = sum(len(r.work.chunk_segments) for r in running if r.backend == FAL)
        for row_id in list(self._queue):
            routed = self.rows[row_id]
            if routed.backend == LOCAL:
                if busy >= self.workers:
                    continue
                busy += 1
                predicted = self._local_s(routed.work)
                if not self._loaded:
                    predicted += self.predictor.local_load_s
            else:
                chunks = len(routed.work.chunk_segments)
                # Twice the account's concurrency in flight: fal's own queue never runs dry.
                if hold or requests and requests + chunks > 2 * self.predictor.fal_concurrency:
                    continue
                requests += chunks
                predicted = max(map(self.predictor.fal_chunk_s, routed.work.chunk_segments))
            self._queue.remove(row_id)
            self._version += 1
            routed.started_at, routed.predicted_s = self.clock(), predicted
            routed.route = replace(routed.route, started_at=utc(routed.started_at))
            routed.slot.grant()

    def _hold_until(self) -> float:
        """fal rows may wait while all of them would still end before this."""
        return self.deadline - 2 * self.margin * self._window

    def _hold_fal(self) -> bool:
        """Whether fal rows may wait: while all of them could start later and still end before
        the deadline, less twice the margin of the whole night (fal's queue is less certain
        than own GPUs), a worker that turns out faster than predicted can take some back."""
        if not self.workers:
            return False
        now = self.clock()
        if self._held is not None and self._held[0] == (now, self._version):
            return self._held[1]
        lanes, end = self._lanes(FAL, now), now
        for row_id in self._queue:
            if self.rows[row_id].backend == FAL:
                end = max(end, self._place_chunks(lanes, self.rows[row_id].work))
        hold = end < self._hold_until()
        self._held = ((now, self._version), hold)
        return hold

    def _measure(self, routed: _Routed, seconds: float) -> None:
        """Learn from a finished row (its first on a fresh worker also loaded the model)."""
        work = routed.work
        if routed.backend == LOCAL:
            if not self._loaded:
                seconds -= min(self.predictor.local_load_s, seconds / 2)
            self.predictor.local.add(seconds, work.segments)
            self._loaded = True
        else:
            longest = max(work.chunk_segments)
            self.predictor.fal.add(seconds - self.predictor.fal_queue_s, longest)


@dataclass(frozen=True)
class SplitOutcome:
    """How a routed run's rows split, and what that saved against sending all of them to fal."""

    rows: dict[str, int]  # backend → rows
    all_fal_usd: float  # fal's estimate for every routed row
    fal_usd: float  # fal's estimate for the rows that went there
    late: tuple[str, ...]  # rows that ended (or are predicted to end) past the deadline

    def lines(self) -> list[str]:
        """The split in a few lines, for the report and the summary artifact."""
        saved = self.all_fal_usd - self.fal_usd
        share = saved / self.all_fal_usd if self.all_fal_usd else 0.0
        split = ", ".join(f"{n} on {backend}" for backend, n in sorted(self.rows.items()))
        late = ", ".join(self.late[:20]) + (" …" if len(self.late) > 20 else "")
        return [
            f"rows: {split}",
            f"saved ${saved:.2f} ({share:.0%}) against all-fal (${self.all_fal_usd:.2f})",
            f"past the deadline: {len(self.late)} row(s){': ' + late if self.late else ''}",
        ]


def split_outcome(results: Sequence[RowResult]) -> SplitOutcome | None:
    """The split of the results that carry a route (None when none does: not a routed run)."""
    routed = [r for r in results if r.route is not None]
    if not routed:
        return None
    rows: dict[str, int] = {}
    late = []
    for result in routed:
        route = result.route
        assert route is not None
        rows[route.backend] = rows.get(route.backend, 0) + 1
        ended = route.finished_at or route.predicted_finish_at
        if ended > route.deadline_at:
            late.append(result.id)
    fal = sum(r.route.estimated_cost_usd for r in routed if r.route)
    all_fal = sum(r.route.fal_cost_usd for r in routed if r.route)
    return SplitOutcome(rows, round(all_fal, 6), round(fal, 6), tuple(late))


def compare(
    works: Sequence[RowWork], predictor: Predictor, workers: int, now: float
) -> dict[str, tuple[float, float]]:
    """(predicted finish, cost) of all-local and all-fal for works (for `avatarflow plan`)."""
    local = [now + predictor.local_load_s] * workers
    fal = [now] * predictor.fal_concurrency
    heapq.heapify(local)
    heapq.heapify(fal)
    local_end = fal_end = now
    for work in works:
        local_end = max(local_end, Router._place(local, predictor.local_s(work.segments)))
        for segments in work.chunk_segments:
            fal_end = max(fal_end, Router._place(fal, predictor.fal_chunk_s(segments)))
    cost = sum(w.fal_cost_usd for w in works)
    return {LOCAL: (local_end if workers or not works else math.inf, 0.0), FAL: (fal_end, cost)}
