"""Prefect's per-task-run bookkeeping is dropped once runs finish, and the runs still run."""

from __future__ import annotations

import time

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

from avatarflow.tasks.lean import LeanThreadPoolTaskRunner, forget_result_links

pytestmark = pytest.mark.usefixtures("prefect_server")


@task(cache_policy=NO_CACHE)
def pair(k: int) -> list[int]:
    return [k, k + 1]


@flow(task_runner=LeanThreadPoolTaskRunner(max_workers=4))  # type: ignore[arg-type]
def twenty_pairs() -> tuple[list[list[int]], int, int, int]:
    """Returns the results, the result links before and after forgetting, and the cancel
    events left once every run has finished."""
    context = FlowRunContext.get()
    assert context is not None
    futures = [pair.submit(quote(k)) for k in range(20)]
    results = [f.result() for f in futures]
    runner = context.task_runner
    assert isinstance(runner, LeanThreadPoolTaskRunner)
    deadline = time.monotonic() + 5  # done callbacks run just after a future's waiters wake
    while runner._cancel_events and time.monotonic() < deadline:
        time.sleep(0.01)
    linked = len(context.run_results)
    forget_result_links()
    return results, linked, len(context.run_results), len(runner._cancel_events)


def test_finished_runs_keep_no_cancel_event_and_their_result_links_can_be_dropped() -> None:
    results, linked, left, events = twenty_pairs()
    assert results == [[k, k + 1] for k in range(20)]
    assert linked >= 20  # Prefect linked every result (and its items) to its state...
    assert left == 0  # ...and forgetting drops them all
    assert events == 0  # no cancel event outlives its finished run
