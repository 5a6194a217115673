"""The Renderer interface every backend implements, and the job it is handed.

A backend owns every decision that differs between backends: whether it renders a row at once or
chunk by chunk, whether it is paid and at what price, its frame grid, the frames and size it
returns, whether later chunks need chunk 0's video for identity, how it resumes work in flight,
and how that work is cancelled. The stages ask these questions here and never name a backend.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

from pydantic_settings import BaseSettings

from avatarflow.tasks.records import V1_GRID, Chunk, ChunkVideo, FrameGrid, RowPlan

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig
    from avatarflow.tasks.ledger import ChunkRecord, Ledger

# Nominal pixel areas of fal's and the full model's renders: 480p is 832x480 (or an
# image-audio bucket of about the same area), 720p is 1280x768 (fal may also return 1280x720).
NOMINAL_AREA = {"480p": 832 * 480, "720p": 1280 * 768}


@dataclass(frozen=True)
class RenderJob:
    """What a backend needs to render some chunks of one row."""

    plan: RowPlan
    chunks: tuple[Chunk, ...]  # in order; one for a per-chunk backend, all of a continuous one's
    chunk_audio_paths: tuple[str, ...]  # local WAV per chunk (the chunk's span of the narration)
    out_dir: str  # local folder for the rendered MP4s
    image_path: str | None = None  # local copy of the row's portrait, if any
    identity_video_path: str | None = None  # chunk 0's MP4, for backends that need_identity


class Renderer(ABC):
    """A rendering backend. Class-level answers are cheap (no model loaded, no connection made);
    `shared(config)` gives the worker process's instance that does the rendering."""

    name: ClassVar[str]
    # True: render() takes all of a row's chunks at once and continues across them (local model).
    continuous: ClassVar[bool] = False
    # True: requests cost money and outlive this process (resumed from the ledger, cancellable).
    paid: ClassVar[bool] = False
    # The backend's own settings: a pydantic-settings class (with its own env prefix), filled
    # from the environment, the flow's `backend_settings` parameter and the CLI's `--set`.
    settings_class: ClassVar[type[BaseSettings] | None] = None
    # The BatchConfig field a built-in backend keeps its settings in ("fal", "local"); None:
    # they live in BatchConfig.backend_settings.
    config_field: ClassVar[str | None] = None

    _instances: ClassVar[dict[tuple[type, str], Renderer]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    # --- what the flow, plan, verify and publish stages ask -------------------------------------

    @classmethod
    def settings_for(cls, config: BatchConfig) -> BaseSettings | None:
        """This backend's settings for config: given values, else its environment, else defaults."""
        if cls.config_field is not None:
            held: BaseSettings = getattr(config, cls.config_field)
            return held
        if cls.settings_class is None:
            return None
        return cls.settings_class(**config.backend_settings)

    @classmethod
    def check_config(cls, config: BatchConfig) -> str | None:
        """Why a run with config cannot start (one line for the user), or None when it can."""
        return None

    @classmethod
    def frame_grid(cls, config: BatchConfig) -> FrameGrid:
        """The segment grid and frame rate this backend renders at."""
        return V1_GRID

    @classmethod
    def estimate(cls, config: BatchConfig, resolution: str, video_s: float) -> tuple[float, float]:
        """(billable units, USD) expected for video_s seconds of video; free backends say 0."""
        return 0.0, 0.0

    @classmethod
    def needs_identity(cls, plan: RowPlan) -> bool:
        """True when a row's later chunks must wait for chunk 0's video (to keep the face)."""
        return False

    @classmethod
    def expected_frames(cls, plan: RowPlan, chunk: Chunk) -> int:
        """Frames a rendered chunk must have at least: every frame its segments render."""
        return chunk.num_frames

    @classmethod
    def expected_area(cls, config: BatchConfig, resolution: str) -> int | None:
        """The pixel area a render at resolution should have (None: not checked)."""
        return NOMINAL_AREA.get(resolution)

    @classmethod
    def model_name(cls, config: BatchConfig) -> str:
        """What the sidecar records as the model that rendered a row."""
        return f"LongCat-Video-Avatar ({cls.name})"

    @classmethod
    def qc_not_applicable(cls, config: BatchConfig) -> frozenset[str]:
        """QC gates that cannot judge this backend's output (they are recorded as skipped)."""
        return frozenset()

    @classmethod
    def warning(cls, config: BatchConfig) -> str | None:
        """Something every output of this run must say (the report's banner), if anything."""
        return None

    @classmethod
    def task_threads(cls, config: BatchConfig) -> int:
        """Threads the flow's task pool needs to keep this backend busy."""
        return 4

    @classmethod
    def cancel_in_flight(
        cls, ledger: Ledger, api_key: str | None = None
    ) -> list[tuple[ChunkRecord, str]]:
        """Cancel the ledger's requests still running at the service; (record, outcome) each.

        api_key: the service's key where this process's environment lacks it (a Secret block).
        """
        return []

    # --- the worker's instance ------------------------------------------------------------------

    @classmethod
    def cache_key(cls, config: BatchConfig) -> str:
        """Configs with the same key share one instance per process."""
        return config.model_dump_json()

    @classmethod
    def create(cls, config: BatchConfig) -> Self:
        """Build an instance for config (load a model, open a connection pool)."""
        return cls()

    @classmethod
    def shared(cls, config: BatchConfig) -> Self:
        """This process's instance for config, built once (under a lock: loads are not
        thread-safe, and two threads must never load one model twice)."""
        key = (cls, cls.cache_key(config))
        with cls._instances_lock:
            if key not in cls._instances:
                cls._instances[key] = cls.create(config)
            return cls._instances[key]  # type: ignore[return-value]

    @abstractmethod
    def render(self, job: RenderJob, ledger: Ledger) -> list[ChunkVideo]:
        """Render job.chunks in order, one ChunkVideo each. A paid backend records each attempt
        and request id in the ledger before waiting, and resumes what the ledger already knows."""
