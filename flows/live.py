"""Live progress for `avatarflow run`: rows, chunks and spend, fed by tasks.progress events."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.produce import BatchOutcome, run_batch
from flows.settings import BatchConfig
from tasks import progress


class _Display:
    """Turns progress events into two bars and a spend line."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.rows = bars.add_task("rows", total=None)
        self.chunks = bars.add_task("chunks", total=0)
        self.estimated_usd = 0.0
        self.spent_usd = 0.0
        self.lock = threading.Lock()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self.lock:
            if event == "rows_planned":
                self.bars.update(self.rows, total=fields["rows"])
                self.bars.update(self.chunks, total=fields["chunks"])
                self.estimated_usd = fields["estimated_usd"]
            elif event == "chunk_rendered":
                self.spent_usd += fields.get("cost_usd", 0.0)
                self.bars.advance(self.chunks)
            elif event == "row_finished":
                self.bars.advance(self.rows)
            self.bars.update(
                self.rows,
                description=f"rows   spent ${self.spent_usd:.2f} of est. ${self.estimated_usd:.2f}",
            )


def run_with_progress(config: BatchConfig, console: Console) -> BatchOutcome:
    """Run the batch flow with a live display on console (plain lines when not a terminal)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        display = _Display(bars)
        unsubscribe = progress.subscribe(display)
        try:
            return run_batch(config)
        finally:
            unsubscribe()
