"""The router's rules on a fake clock: own GPUs while they finish before the deadline, fal for the
overflow within the budget, re-planned when workers go or turn out faster than predicted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from avatarflow.tasks.config import RouteSettings
from avatarflow.tasks.plan import RunBudget
from avatarflow.tasks.publish import build_sidecar
from avatarflow.tasks.records import (
    Chunk,
    ChunkVideo,
    QCReport,
    RowResult,
    RowRoute,
    Sidecar,
    Timings,
)
from avatarflow.tasks.route import (
    FAL,
    LOCAL,
    DeadlineError,
    Predictor,
    Rate,
    Router,
    RowWork,
    compare,
    parse_deadline,
    split_outcome,
)
from tests.factories import make_audio, make_plan, make_row

NOW = datetime(2026, 12, 7, 22, 30, tzinfo=timezone(timedelta(hours=1)))


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _predictor(
    local_s: float = 10.0, fal_s: float = 10.0, concurrency: int = 4, prior_segments: float = 10
) -> Predictor:
    settings = RouteSettings(
        prior_segments=prior_segments,
        local_s_per_segment=local_s,
        local_load_s=0.0,
        fal_s_per_segment=fal_s,
        fal_queue_s=0.0,
        fal_concurrency=concurrency,
    )
    return Predictor.from_history(settings, [])


def _router(
    clock: Clock, deadline_s: float, workers: int = 2, budget: float | None = None, **kw: float
) -> Router:
    return Router(
        _predictor(**kw),  # type: ignore[arg-type]
        clock() + deadline_s,
        workers,
        RunBudget(budget),
        margin=0.0,
        clock=clock,
    )


def _work(row_id: str, segments: int = 2, chunks: int = 1) -> RowWork:
    return RowWork(row_id, (segments,) * chunks, 1.5 * segments * chunks)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("06:00", datetime(2026, 12, 8, 6, 0, tzinfo=NOW.tzinfo)),  # tomorrow morning
        ("23:15", datetime(2026, 12, 7, 23, 15, tzinfo=NOW.tzinfo)),  # later tonight
        ("3h", NOW + timedelta(hours=3)),
        ("90m", NOW + timedelta(minutes=90)),
        ("1h30m", NOW + timedelta(minutes=90)),
        ("45s", NOW + timedelta(seconds=45)),
        ("2026-12-08T05:00:00+00:00", datetime(2026, 12, 8, 5, 0, tzinfo=UTC)),
    ],
)
def test_deadlines_read_as_times_of_day_spans_or_iso_times(text: str, expected: datetime) -> None:
    assert parse_deadline(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "tomorrow", "25:00", "6pm", "3d"])
def test_an_unreadable_deadline_says_what_is_accepted(text: str) -> None:
    with pytest.raises(DeadlineError, match="deadline"):
        parse_deadline(text, NOW)


def test_measurements_outweigh_the_prior_as_they_accumulate() -> None:
    rate = Rate(prior_s=100.0, prior_segments=10)
    assert rate.per_segment == 100.0
    rate.add(200.0, 10)  # 20 s a segment measured over as many segments as the prior counts
    assert rate.per_segment == pytest.approx(60.0)
    rate.add(1800.0, 90)
    assert rate.per_segment == pytest.approx(2000 / 110 + 1000 / 110)


def test_rows_go_local_while_the_workers_finish_before_the_deadline_then_to_fal() -> None:
    clock = Clock()
    # 2 workers, 20 s a row: 4 rows take 40 s; a deadline in 45 s fits 4, not 6.
    router = _router(clock, deadline_s=45)
    routes = [router.assign(_work(f"r{i}")) for i in range(6)]
    assert [r.backend for r in routes] == [LOCAL] * 4 + [FAL] * 2
    assert not any(r.misses_deadline for r in routes)
    assert routes[0].estimated_cost_usd == 0.0
    assert routes[4].estimated_cost_usd == 3.0
    assert "past the deadline" in routes[4].reason
    # A smaller later row still fits in the workers' time left.
    assert router.assign(RowWork("small", (0,), 0.0)).backend == LOCAL


def test_over_the_budget_a_late_row_stays_local_and_says_it_will_miss() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=25, budget=3.0)
    routes = []
    for i in range(4):
        routes.append(router.assign(_work(f"r{i}")))
        if routes[-1].backend == FAL:
            router.budget.take(3.0)  # as admission reserves it
    assert [r.backend for r in routes[:3]] == [LOCAL, LOCAL, FAL]  # fal fits the $3 budget once
    assert routes[3].backend == LOCAL
    assert routes[3].misses_deadline
    assert "over the budget" in routes[3].reason


def test_local_rows_wait_for_a_free_worker_and_fal_rows_until_the_deadline_needs_them() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=45, concurrency=1)
    for i in range(6):
        router.assign(_work(f"r{i}"))
    slots = {f"r{i}": router.slot(f"r{i}") for i in range(6)}
    # r4 and r5 take fal's one slot 20 s each: started later they still end by the deadline.
    assert [rid for rid, s in slots.items() if s.done()] == ["r0", "r1"]
    clock.t += 6
    router.set_workers(2)  # the watcher's tick: now they would end at 46 s
    assert slots["r4"].done()
    assert slots["r5"].done()  # twice the account's concurrency in flight
    clock.t += 14
    router.finished("r0")
    assert slots["r2"].done()
    assert not slots["r3"].done()
    route = router.finished("r4")
    assert route.started_at is not None
    assert route.finished_at is not None
    assert (route.finished_at - route.started_at).total_seconds() == 14


def test_a_lost_worker_moves_rows_that_have_not_started_to_fal() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=45, budget=100.0)
    moved: list[str] = []
    router.on_move = lambda row_id, route: moved.append(f"{row_id}:{route.backend}")
    for i in range(4):
        router.assign(_work(f"r{i}"))
    slots = [router.slot(f"r{i}") for i in range(4)]
    assert [s.done() for s in slots] == [True, True, False, False]
    router.set_workers(1)  # r0 and r1 run on (Dask reschedules one); r2, r3 would end at 60, 80 s
    assert moved == ["r2:fal", "r3:fal"]
    assert slots[2].backend == slots[3].backend == FAL
    assert router.budget.remaining_usd == pytest.approx(100 - 6)


def test_a_fast_worker_takes_back_fal_rows_not_yet_submitted() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=45, budget=100.0, concurrency=1, prior_segments=1)
    for i in range(6):
        router.assign(_work(f"r{i}"))
    slots = [router.slot(f"r{i}") for i in range(6)]
    router.budget.take(6.0)
    assert [s.backend for s in slots] == [LOCAL] * 4 + [FAL] * 2
    assert [s.done() for s in slots] == [True, True, False, False, False, False]
    clock.t += 2
    router.finished("r0")  # 2 s for 2 segments: 4 s a segment with the prior, not 10
    assert [s.backend for s in slots[2:]] == [LOCAL] * 4
    assert slots[2].done()
    assert router.budget.remaining_usd == pytest.approx(100.0)  # fal reservations given back


def test_a_rerun_keeps_each_rows_first_backend_unless_it_cannot_take_it() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=1, workers=2, budget=100.0)
    assert router.assign(_work("a"), kept=LOCAL).backend == LOCAL  # late, but kept
    assert router.assign(_work("b"), kept=FAL).backend == FAL
    gone = _router(clock, deadline_s=1000, workers=0, budget=100.0)
    route = gone.assign(_work("c"), kept=LOCAL)  # no GPU worker left to take it
    assert route.backend == FAL


def test_all_local_and_all_fal_are_predicted_for_the_plan() -> None:
    works = [_work(f"r{i}", chunks=2) for i in range(4)]
    alone = compare(works, _predictor(local_s=10, fal_s=5, concurrency=4), 2, now=0.0)
    assert alone[LOCAL] == (80.0, 0.0)  # 4 rows of 40 s on 2 workers
    assert alone[FAL] == (20.0, 24.0)  # 8 requests of 10 s on 4 slots


def test_the_split_counts_rows_per_backend_the_saving_and_the_late_rows() -> None:
    deadline = datetime(2026, 12, 8, 6, 0, tzinfo=UTC)

    def result(row_id: str, backend: str, finished: datetime) -> RowResult:
        cost = 4.0 if backend == FAL else 0.0
        route = RowRoute(backend, "why", deadline, deadline, cost, False, 4.0, None, finished)
        return RowResult(row_id, "published", route=route)

    early, late = deadline - timedelta(minutes=5), deadline + timedelta(minutes=5)
    results = [
        result("a", LOCAL, early),
        result("b", LOCAL, late),
        result("c", FAL, early),
        RowResult("d", "failed"),  # never routed (invalid)
    ]
    split = split_outcome(results)
    assert split is not None
    assert split.rows == {LOCAL: 2, FAL: 1}
    assert split.lines() == [
        "rows: 1 on fal, 2 on local",
        "saved $8.00 (67%) against all-fal ($12.00)",
        "past the deadline: 1 row(s): b",
    ]
    assert split_outcome([RowResult("x", "published")]) is None  # not a routed run


def test_a_stopping_run_lets_every_waiting_row_go() -> None:
    clock = Clock()
    router = _router(clock, deadline_s=45)
    for i in range(6):
        router.assign(_work(f"r{i}"))
    slots = [router.slot(f"r{i}") for i in range(6)]
    assert not all(s.done() for s in slots)
    router.stop()
    assert all(s.done() for s in slots)  # their renders see the stop and give up at once
    for i in range(6):
        router.finished(f"r{i}", ok=False)
    assert not router.rows


def _sidecar(backend: str, timings: Timings, segments: int = 2) -> Sidecar:
    """A published row's sidecar whose chunks (one segment each) took `timings` each."""
    row = make_row("r", "r.wav")
    chunks = tuple(Chunk("r", k, 5.0 * k, 5.0 * k + 5.0, 1) for k in range(segments))
    plan = make_plan(row, make_audio(5.0 * segments), chunks)
    videos = [
        ChunkVideo("r", k, f"{k}.mp4", "0" * 64, backend, timings=timings) for k in range(segments)
    ]
    checks = [QCReport(True)] * segments
    return build_sidecar(plan, videos, checks, QCReport(True), backend, "m")


def test_earlier_sidecars_on_the_target_outweigh_the_priors() -> None:
    settings = RouteSettings(
        local_s_per_segment=100, fal_s_per_segment=100, fal_queue_s=100, prior_segments=1
    )
    history = [
        _sidecar(LOCAL, Timings(render_s=8.0, encode_s=1.0)),  # the row's 8 s, + 1 s per chunk
        _sidecar(FAL, Timings(queue_s=4.0, run_s=10.0)),
    ]
    predictor = Predictor.from_history(settings, history)
    assert predictor.local.per_segment == pytest.approx((100 + 10) / 3)
    assert predictor.fal.per_segment == pytest.approx((100 + 20) / 3)
    assert predictor.fal_queue_s == pytest.approx((100 + 8) / 3)
