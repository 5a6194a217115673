"""Prefect bookkeeping a long batch run does not need, dropped as it goes (memory per row).

Prefect keeps, for the life of a flow run, about 6 KB per finished task run (tracemalloc, Prefect
3.9.1): a cancel event per task run in the thread-pool runner, and a link from every task result
(and each of its fields) to a copy of the task's final state in the flow run's context, which
Prefect reads only to infer a downstream task's upstream from an unquoted argument. Three task
runs a row made that 18 MB per 1,000 rows. The flow passes every argument quoted and gives the
lineage in wait_for (flows/produce.py::_submit), so neither is read again once a row has ended.
"""

from __future__ import annotations

from typing import Any

from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner


class LeanThreadPoolTaskRunner(ThreadPoolTaskRunner[Any]):
    """ThreadPoolTaskRunner that forgets a task run's cancel event once the run has finished
    (cancelling the flow signals the events of runs still going, which are kept)."""

    def submit(self, *args: Any, **kwargs: Any) -> PrefectConcurrentFuture[Any]:
        future: PrefectConcurrentFuture[Any] = super().submit(*args, **kwargs)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: PrefectFuture[Any]) -> None:
        self._cancel_events.pop(future.task_run_id, None)


def forget_result_links() -> None:
    """Drop the flow run's links from task results to their states (see the module's doc)."""
    context = FlowRunContext.get()
    if context is not None:
        context.run_results.clear()
