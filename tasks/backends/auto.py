"""`--backend auto`: not a renderer of its own but the run-wide answers for a hybrid run.

Each row renders on "local" or "fal" (tasks/route.py decides; rows get a config naming that
backend), so this class only answers what the flow asks of the run as a whole: can it start,
what would a row cost at most (fal's price), its frame grid, its threads, what to cancel.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.backends.base import Renderer, RenderJob
from avatarflow.tasks.records import ChunkVideo, FrameGrid

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig
    from avatarflow.tasks.ledger import ChunkRecord, Ledger


class AutoRenderer(Renderer):
    """Own GPU workers first, overflow to fal by deadline and budget (tasks/route.py)."""

    name: ClassVar[str] = "auto"

    @classmethod
    def check_config(cls, config: BatchConfig) -> str | None:
        local, fal = renderer_class("local"), renderer_class("fal")
        return cls.check_route(config) or fal.check_config(config) or local.check_config(config)

    @classmethod
    def check_route(cls, config: BatchConfig) -> str | None:
        """Why rows cannot be routed (no readable deadline, two frame grids), or None: all that
        `avatarflow plan` needs, since planning spends nothing (no fal key is needed)."""
        from avatarflow.tasks.route import DeadlineError, parse_deadline

        if not config.deadline:
            return "--backend auto needs a deadline: --deadline 06:00 (or 3h, 90m ...)"
        try:
            parse_deadline(config.deadline, datetime.now().astimezone())
        except DeadlineError as exc:
            return str(exc)
        local, fal = renderer_class("local"), renderer_class("fal")
        if local.frame_grid(config) != fal.frame_grid(config):
            return "--backend auto needs a checkpoint on fal's frame grid (LongCat 1.0, 16 fps)"
        return None

    @classmethod
    def frame_grid(cls, config: BatchConfig) -> FrameGrid:
        return renderer_class("fal").frame_grid(config)

    @classmethod
    def estimate(cls, config: BatchConfig, resolution: str, video_s: float) -> tuple[float, float]:
        return renderer_class("fal").estimate(config, resolution, video_s)  # if it overflows

    @classmethod
    def warning(cls, config: BatchConfig) -> str | None:
        return renderer_class("local").warning(config)

    @classmethod
    def task_threads(cls, config: BatchConfig) -> int:
        return renderer_class("fal").task_threads(config) + renderer_class("local").task_threads(
            config
        )

    @classmethod
    def cancel_in_flight(
        cls, ledger: Ledger, api_key: str | None = None
    ) -> list[tuple[ChunkRecord, str]]:
        return renderer_class("fal").cancel_in_flight(ledger, api_key)

    def render(self, job: RenderJob, ledger: Ledger) -> list[ChunkVideo]:
        raise RuntimeError("a routed row renders on the backend its route names, never on auto")
