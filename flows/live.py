"""Live progress for `avatarflow run`: rows, chunks and spend, fed by progress events."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from avatarflow.flows.produce import run_batch
from avatarflow.tasks import progress
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.records import (
    BatchOutcome,
    ChunkRendered,
    ProgressEvent,
    RowFinished,
    RowsPlanned,
)


class _Display:
    """Turns progress events into two bars and a spend line."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.rows = bars.add_task("rows", total=None)
        self.chunks = bars.add_task("chunks", total=0)
        self.estimated_usd = 0.0
        self.spent_usd = 0.0
        self.lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self.lock:
            match event:
                case RowsPlanned():  # totals grow as rows are planned and admitted
                    self.bars.update(self.rows, total=self._total(self.rows) + event.rows)
                    self.bars.update(self.chunks, total=self._total(self.chunks) + event.chunks)
                    self.estimated_usd += event.estimated_usd
                case ChunkRendered():
                    self.spent_usd += event.cost_usd
                    self.bars.advance(self.chunks)
                case RowFinished():
                    self.bars.advance(self.rows)
            self.bars.update(
                self.rows,
                description=f"rows   spent ${self.spent_usd:.2f} of est. ${self.estimated_usd:.2f}",
            )

    def _total(self, task_id: TaskID) -> float:
        return self.bars.tasks[task_id].total or 0


def run_with_progress(config: BatchConfig, console: Console) -> BatchOutcome:
    """Run the batch flow with a live display on console (plain lines when not a terminal)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    bars = Progress(*columns, console=console, transient=False)
    with bars, progress.listening(_Display(bars)):
        return run_batch(config)
