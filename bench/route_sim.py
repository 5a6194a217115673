"""A night of hybrid routing, simulated: the real router (avatarflow.tasks.route.Router) against
simulated GPU workers and a simulated fal queue, on a simulated clock.

1,000 rows with narrations of 10 s to 10 min (seeded, uniform), cut into ~60 s chunks as the flow
cuts them, priced at fal's $0.15 per 480p video-second. For each count of local workers and
local speed it reports all-local (every row on the workers, in manifest order), all-fal (every
row on fal) and auto (the router), with cost, rows past the deadline and the finish time, and
checks the issue's bars. Scenarios: the workers as fast as the router's prior, 30 % slower than
it (the first run's prior was optimistic), and half of the workers lost 2 h into the night.
Run: .venv/bin/python bench/route_sim.py [--rows 1000] [--deadline-h 10] [--seed 7]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatarflow.tasks.config import RouteSettings  # noqa: E402
from avatarflow.tasks.plan import RunBudget  # noqa: E402
from avatarflow.tasks.records import V1_GRID  # noqa: E402
from avatarflow.tasks.route import FAL, LOCAL, Predictor, Router, RowWork, Slot  # noqa: E402

PRICE_PER_VIDEO_S = 0.15  # fal's public 480p price
CHUNK_S = 60.0  # the flow's default chunk target
TICK_S = 300.0  # how often the simulated watcher re-plans (the flow's: route.poll_s, 2 s)


@dataclass(frozen=True)
class Night:
    """What the simulated night's services really do (the router only has its priors)."""

    local_s_per_segment: float  # true seconds per segment on one worker
    local_load_s: float
    fal_s_per_segment: float
    fal_queue_s: float  # mean of an exponential wait per request
    fal_concurrency: int
    deadline_s: float
    lose_half_at_s: float | None = None  # half the workers leave at this time


def manifest(rows: int, seed: int) -> list[RowWork]:
    """Rows of 10 s to 10 min narration, chunked near CHUNK_S, with fal's price."""
    rng = random.Random(seed)
    works = []
    for i in range(rows):
        duration = rng.uniform(10, 600)
        chunks = max(1, round(duration / CHUNK_S))
        segments = tuple(V1_GRID.segments_for(duration / chunks) for _ in range(chunks))
        cost = sum(V1_GRID.video_s(s) for s in segments) * PRICE_PER_VIDEO_S
        works.append(RowWork(f"r{i}", segments, round(cost, 6)))
    return works


def jitter(rng: random.Random) -> float:
    return rng.lognormvariate(0, 0.1)


def fal_row_s(
    work: RowWork, night: Night, rng: random.Random, lanes: list[float], t: float
) -> float:
    """When a row submitted to fal at t is done: its requests on fal's concurrency lanes."""
    ends = []
    for segments in work.chunk_segments:
        start = max(t, lanes[0])
        run = rng.expovariate(1 / night.fal_queue_s) + segments * night.fal_s_per_segment * jitter(
            rng
        )
        heapq.heapreplace(lanes, start + run)
        ends.append(start + run)
    return max(ends)


def all_local(
    works: list[RowWork], workers: int, night: Night, seed: int
) -> tuple[float, int, float]:
    """Every row on the workers in manifest order: (cost, rows late, finish s)."""
    if not workers:
        return 0.0, len(works), math.inf
    rng, lanes = random.Random(seed), [night.local_load_s] * workers
    ends = []
    for work in works:
        end = lanes[0] + work.segments * night.local_s_per_segment * jitter(rng)
        heapq.heapreplace(lanes, end)
        ends.append(end)
    return 0.0, sum(e > night.deadline_s for e in ends), max(ends)


def all_fal(works: list[RowWork], night: Night, seed: int) -> tuple[float, int, float]:
    """Every row on fal, submitted at once: (cost, rows late, finish s)."""
    rng, lanes = random.Random(seed), [0.0] * night.fal_concurrency
    ends = [fal_row_s(work, night, rng, lanes, 0.0) for work in works]
    cost = sum(w.fal_cost_usd for w in works)
    return cost, sum(e > night.deadline_s for e in ends), max(ends)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def auto(
    works: list[RowWork], workers: int, night: Night, prior: RouteSettings, seed: int
) -> tuple[float, int, float]:
    """The router: rows admitted in order at t=0, each starting when it is given its slot."""
    rng, clock = random.Random(seed), Clock()
    budget = RunBudget(None)
    router = Router(
        Predictor.from_history(prior, []), night.deadline_s, workers, budget, prior.margin, clock
    )
    events: list[tuple[float, int, str]] = []  # (time, order, row id) of renders that end
    fal_lanes = [0.0] * night.fal_concurrency
    free_workers = list(range(workers))  # the simulated Dask: which worker renders a row
    loaded: set[int] = set()
    on_worker: dict[str, int] = {}
    waiting_for_dask: list[str] = []  # started rows whose worker left: Dask runs them again
    seq = 0

    def start(row_id: str, slot: Slot) -> None:
        nonlocal seq
        work = by_id[row_id]
        if slot.backend == FAL:
            end = fal_row_s(work, night, rng, fal_lanes, clock.t)
        elif free_workers:
            worker = free_workers.pop()
            on_worker[row_id] = worker
            load = 0.0 if worker in loaded else night.local_load_s
            loaded.add(worker)
            end = clock.t + load + work.segments * night.local_s_per_segment * jitter(rng)
        else:
            waiting_for_dask.append(row_id)
            return
        seq += 1
        heapq.heappush(events, (end, seq, row_id))

    by_id = {w.row_id: w for w in works}
    slots: dict[str, Slot] = {}
    for work in works:
        route = router.assign(work)
        if route.backend == FAL:
            budget.take(work.fal_cost_usd)
    for work in works:
        slots[work.row_id] = slot = router.slot(work.row_id)
        slot.add_done_callback(lambda s, row_id=work.row_id: start(row_id, s))

    ends: dict[str, float] = {}
    lost = night.lose_half_at_s
    cancelled: set[int] = set()
    tick = 0.0
    while events or len(ends) < len(works):
        assert tick < 10 * night.deadline_s, "rows never started"
        next_event = events[0][0] if events else math.inf
        if next_event > tick + TICK_S and (lost is None or tick + TICK_S < lost):
            tick += TICK_S  # the flow's watcher asks for the workers every few seconds
            clock.t = tick
            router.set_workers(len(free_workers) + len(on_worker))
            continue
        if lost is not None and next_event > lost:
            clock.t, lost = lost, None
            gone = list(range(workers // 2, workers))
            for row_id, worker in list(on_worker.items()):
                if worker in gone:  # its render is lost with it: Dask runs it again elsewhere
                    cancelled.update(s for _, s, r in events if r == row_id)
                    del on_worker[row_id]
                    waiting_for_dask.append(row_id)
            free_workers[:] = [w for w in free_workers if w not in gone]
            router.set_workers(workers - len(gone))
            continue
        t, order, row_id = heapq.heappop(events)
        if order in cancelled:
            continue
        clock.t = t
        ends[row_id] = t
        if row_id in on_worker:
            free_workers.append(on_worker.pop(row_id))
        router.finished(row_id)
        while waiting_for_dask and free_workers:
            start(waiting_for_dask.pop(0), slots[row_id])  # a local slot, as it had
    backends = {row_id: slots[row_id].backend for row_id in ends}
    cost = sum(by_id[r].fal_cost_usd for r, b in backends.items() if b == FAL)
    late = sum(e > night.deadline_s for e in ends.values()) + len(works) - len(ends)
    assert all(b in (LOCAL, FAL) for b in backends.values())
    return cost, late, max(ends.values(), default=0.0)


def local_share(workers: int, night: Night, segments: int) -> float:
    """The share of the night's segments the workers could render before the deadline."""
    worker_s = workers * (night.deadline_s - night.local_load_s)
    if night.lose_half_at_s is not None:
        worker_s -= workers // 2 * (night.deadline_s - night.lose_half_at_s)
    return min(1.0, worker_s / (segments * night.local_s_per_segment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--deadline-h", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    works = manifest(args.rows, args.seed)
    segments = sum(w.segments for w in works)
    prior_fal = {"fal_s_per_segment": 12.0, "fal_queue_s": 30.0, "fal_concurrency": 32}
    total = sum(w.fal_cost_usd for w in works)
    print(
        f"{len(works)} rows, {segments} segments, all-fal ${total:,.0f}; "
        f"deadline {args.deadline_h:g} h; fal {prior_fal}"
    )
    header = (
        "| scenario | workers | local s/seg | local share | all-local $ / late / finish h "
        "| all-fal $ / late / finish h | auto $ / late / finish h | saved vs all-fal | bars |"
    )
    print(header)
    print("|" + " --- |" * 9)
    failures = 0
    started = time.monotonic()
    scenarios = [
        ("as predicted", 1.0, None),
        ("30% slower", 1.3, None),
        ("half lost at 2 h", 1.0, 7200.0),
    ]
    for name, slower, lose_at in scenarios:
        for local_s in (380.0, 60.0, 20.0, 8.0, 4.0):
            for workers in (0, 1, 2, 4, 8):
                if (lose_at is not None or slower != 1.0) and (workers < 2 or local_s != 8.0):
                    continue
                if workers == 0 and local_s != 380.0:  # no workers: the same night at any speed
                    continue
                if local_s == 380.0 and 0 < workers < 8:  # the full model's prior: ~1 % a worker
                    continue
                night = Night(
                    local_s * slower,
                    120.0,
                    deadline_s=args.deadline_h * 3600,
                    lose_half_at_s=lose_at,
                    **{k: v for k, v in prior_fal.items()},  # type: ignore[arg-type]
                )
                prior = RouteSettings(local_s_per_segment=local_s, local_load_s=120.0, **prior_fal)  # type: ignore[arg-type]
                share = local_share(workers, night, segments)
                results = [
                    all_local(works, workers, night, args.seed),
                    all_fal(works, night, args.seed),
                    auto(works, workers, night, prior, args.seed),
                ]
                (_, _, _), (fal_cost, fal_late, _), (auto_cost, auto_late, _) = results
                saved = 1 - auto_cost / fal_cost
                bars = []
                if auto_late > fal_late:
                    bars.append("FAIL: auto late where all-fal is not")
                if share >= 0.3 and saved < 0.3:
                    bars.append("FAIL: saved < 30%")
                failures += bool(bars)
                cells = [
                    f"${c:,.0f} / {late} / {'never' if math.isinf(f) else f'{f / 3600:.1f}'}"
                    for c, late, f in results
                ]
                verdict = "; ".join(bars) or ("pass" if share >= 0.3 else "pass (no-miss bar)")
                print(
                    f"| {name} | {workers} | {local_s:g} | {share:.0%} | {' | '.join(cells)} "
                    f"| {saved:.0%} | {verdict} |"
                )
    print(f"\n{failures} scenario(s) fail a bar; simulated in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
