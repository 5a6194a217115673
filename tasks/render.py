"""Render stage: the Renderer protocol both backends implement, and get_renderer(name).

A backend turns a RenderJob (one row, one or more of its chunks, local input files) into one local
MP4 per chunk plus metadata. The flow never knows which backend it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from tasks.records import Chunk, ChunkVideo, RowPlan

if TYPE_CHECKING:
    from flows.settings import BatchConfig


@dataclass(frozen=True)
class RenderJob:
    """What a backend needs to render some chunks of one row."""

    plan: RowPlan
    chunks: tuple[Chunk, ...]  # in order; one for fal, all of the row's for local
    chunk_audio_paths: tuple[str, ...]  # local WAV per chunk (the chunk's span of the narration)
    out_dir: str  # local folder for the rendered MP4s
    image_path: str | None = None  # local copy of the row's portrait, if any
    identity_video_path: str | None = None  # chunk 0's MP4: later fal chunks take a frame from it


class Renderer(Protocol):
    """A rendering backend."""

    name: ClassVar[str]
    # True: render() takes all of a row's chunks at once and continues across them in latent space.
    continuous: ClassVar[bool]

    def render(self, job: RenderJob) -> list[ChunkVideo]:
        """Render job.chunks in order, returning one ChunkVideo per chunk."""
        ...


def get_renderer(config: BatchConfig) -> Renderer:
    """Return the backend named by config.backend, built once per worker process."""
    if config.backend == "fal":
        from tasks.render_fal import FalRenderer

        return FalRenderer.shared(config)
    if config.backend == "local":
        from tasks.render_local import LocalRenderer

        return LocalRenderer.shared(config)
    raise ValueError(f"unknown backend {config.backend!r}: expected 'local' or 'fal'")
