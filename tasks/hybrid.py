"""The flow's side of `--backend auto`: admission routes each row (tasks/route.Router), records
the route in the ledger before the row renders, holds local rows until a GPU worker is free,
and watches the Dask scheduler for workers that leave or join.

A rerun keeps each row's first route (the ledger's) unless its backend can no longer take it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import fsspec

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.plan import Admission, RunBudget
from avatarflow.tasks.records import RowPlan, RowResult, RowRoute, Sidecar, from_json
from avatarflow.tasks.route import (
    AUTO,
    FAL,
    LOCAL,
    Predictor,
    Router,
    RowWork,
    compare,
    parse_deadline,
    utc,
)
from avatarflow.tasks.stop import stop_requested
from avatarflow.tasks.stream import Stages

log = logging.getLogger(__name__)


def admission_for(config: BatchConfig) -> Admission:
    """The run's admission: routed for `--backend auto`, else the plain one."""
    return RoutedAdmission(config) if config.backend == AUTO else Admission(config)


def row_work(plan: RowPlan) -> RowWork:
    """A planned row as the router sees it (its estimate is fal's price: auto prices rows so)."""
    segments = tuple(c.num_segments for c in plan.chunks)
    return RowWork(plan.row.id, segments, plan.estimated_cost_usd)


def load_history(config: BatchConfig) -> list[Sidecar]:
    """The newest sidecars published on the target (route.history_sidecars of them)."""
    fs, root = fsspec.core.url_to_fs(config.target)
    try:
        entries = [e for e in fs.ls(root, detail=True) if str(e["name"]).endswith(".json")]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda e: e.get("mtime") or e.get("LastModified") or 0, reverse=True)
    paths = [e["name"] for e in entries[: config.route.history_sidecars]]
    sidecars = []
    for data in fs.cat(paths, on_error="omit").values() if paths else ():
        try:
            sidecars.append(from_json(Sidecar, json.loads(data)))
        except ValueError:  # not a sidecar (or a torn one): nothing to learn from
            continue
    return sidecars


def live_workers(config: BatchConfig) -> int:
    """GPU workers that can render now: the Dask scheduler's, or this process (one render)."""
    address = config.local.dask_address
    if not address:
        return 1
    from avatarflow.tasks.backends.local import gpu_worker_count

    return gpu_worker_count(address)


def build_router(config: BatchConfig, budget: RunBudget, now: datetime | None = None) -> Router:
    """A router for the run: deadline from now, predictions from the target's history."""
    now = now or datetime.now().astimezone()
    deadline = parse_deadline(config.deadline or "", now)
    predictor = Predictor.from_history(config.route, load_history(config))
    return Router(
        predictor,
        deadline.timestamp(),
        live_workers(config),
        budget,
        margin=config.route.margin,
    )


class RoutedAdmission(Admission):
    """Admission for `--backend auto`: routes every admitted row and gives out its slot."""

    def __init__(self, config: BatchConfig) -> None:
        super().__init__(config)
        self.config = config
        self.router = build_router(config, self.budget)
        self.router.on_move = self._moved
        self._hashes: dict[str, str] = {}
        self._stop = threading.Event()
        # In the run's context, so that the watcher sees the run's stop token (tasks/stop.py).
        run_context = contextvars.copy_context()
        self._watcher = threading.Thread(
            target=run_context.run, args=(self._watch,), name="route-workers", daemon=True
        )
        self._watcher.start()

    def admit(self, plan: RowPlan) -> RowResult | None:
        published = self._published(plan)
        if published is not None:
            return published
        kept = self.ledger.route(plan.row.id, plan.input_hash)
        route = self.router.assign(row_work(plan), kept.backend if kept else None)
        held = self._reserve(_priced(plan, route.backend))
        if held is not None:
            self.router.drop(plan.row.id)
            return held
        self._hashes[plan.row.id] = plan.input_hash
        self.ledger.record_route(plan.row.id, plan.input_hash, route)
        if route.misses_deadline:  # said up front: it still runs
            log.warning("row %s will miss the deadline: %s", plan.row.id, route.reason)
        else:
            log.info("row %s: %s", plan.row.id, route.reason)
        return None

    def dispatch(self, plan: RowPlan, config: BatchConfig) -> Stages[tuple[RowPlan, BatchConfig]]:
        slot = yield self.router.slot(plan.row.id)
        route = self.router.route(plan.row.id)
        routed = dataclasses.replace(_priced(plan, slot.backend), route=route)
        return routed, config.model_copy(update={"backend": slot.backend})

    def rendered(self, plan: RowPlan, ok: bool) -> RowPlan:
        return dataclasses.replace(plan, route=self.router.finished(plan.row.id, ok))

    def close(self) -> None:
        self._stop.set()

    def _moved(self, row_id: str, route: RowRoute) -> None:
        """A row that had not started changed backend: the ledger says so before it renders."""
        self.ledger.record_route(row_id, self._hashes[row_id], route)
        log.warning("row %s: %s", row_id, route.reason)

    def _watch(self) -> None:
        """Tell the router how many GPU workers are live, every route.poll_s, until closed;
        when the run is asked to stop, let every waiting row go (its render gives up at once)."""
        while not self._stop.wait(self.config.route.poll_s):
            if stop_requested():
                self.router.stop()
                return
            try:
                self.router.set_workers(live_workers(self.config))
            except Exception as exc:  # a scheduler that does not answer: ask again later
                log.warning("cannot count GPU workers: %s: %s", type(exc).__name__, exc)


def _priced(plan: RowPlan, backend: str) -> RowPlan:
    """The plan with its estimate on backend: own GPUs cost nothing, fal its price."""
    if backend == FAL:
        return plan
    assert backend == LOCAL
    return dataclasses.replace(plan, billable_units=0.0, estimated_cost_usd=0.0)


@dataclass(frozen=True)
class Split:
    """How `--backend auto` would route a manifest now (`avatarflow plan`)."""

    deadline: datetime  # UTC
    workers: int
    routes: list[RowRoute]  # in the plans' order
    # "auto", "all-local", "all-fal": (predicted finish, UTC; None: never, cost USD)
    strategies: dict[str, tuple[datetime | None, float]]


def split_summary(plans: Sequence[RowPlan], config: BatchConfig) -> Split:
    """How `--backend auto` would split plans now, against all-local and all-fal."""
    budget = RunBudget(config.budget_usd)
    router = build_router(config, budget)
    works, routes = [row_work(plan) for plan in plans], []
    for work in works:  # as admission does: route, then reserve what fal would cost
        routes.append(router.assign(work))
        if routes[-1].backend == FAL:
            budget.take(work.fal_cost_usd)
    now = router.clock()
    alone = compare(works, router.predictor, router.workers, now)
    ends = {
        "auto": (max(router.predicted_finish()), sum(r.estimated_cost_usd for r in routes)),
        "all-local": alone[LOCAL],
        "all-fal": alone[FAL],
    }
    strategies = {
        name: (None if math.isinf(end) else utc(end), cost) for name, (end, cost) in ends.items()
    }
    return Split(utc(router.deadline), router.workers, routes, strategies)
