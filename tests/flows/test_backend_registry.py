"""The backend seam: a third backend, defined and registered only here, runs a manifest end to end
through the real flow, with no edit anywhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.backends import (
    Renderer,
    RenderJob,
    UnknownBackendError,
    register,
    renderer_class,
)
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.media import probe_video
from avatarflow.tasks.records import ChunkVideo
from avatarflow.tasks.storage import sha256_file
from tests.media_factory import write_narration

pytestmark = pytest.mark.usefixtures("prefect_server")
SIZE = 48  # renders at its own small size: no resolution area to check


class SolidRenderer(Renderer):
    """Renders each chunk as grey frames whose level is the row's seed; free, chunk by chunk."""

    name: ClassVar[str] = "solid-test"
    rendered: ClassVar[list[tuple[str, int]]] = []

    @classmethod
    def expected_area(cls, config: BatchConfig, resolution: str) -> int | None:
        return None

    @classmethod
    def model_name(cls, config: BatchConfig) -> str:
        return "solid grey (test backend)"

    @classmethod
    def qc_not_applicable(cls, config: BatchConfig) -> frozenset[str]:
        return frozenset({"face", "lipsync", "freeze"})  # a still grey picture, by design

    def render(self, job: RenderJob, ledger: Ledger) -> list[ChunkVideo]:
        [chunk] = job.chunks
        path = Path(job.out_dir) / f"{chunk.row_id}-{chunk.index}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        level = job.plan.seed % 256
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=chunk.fps)
            stream.width = stream.height = SIZE
            stream.pix_fmt = "yuv420p"
            frame = np.full((SIZE, SIZE, 3), level, np.uint8)
            for _ in range(chunk.num_frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
        self.rendered.append((chunk.row_id, chunk.index))
        return [ChunkVideo(chunk.row_id, chunk.index, str(path), sha256_file(path), self.name)]


@pytest.fixture
def solid() -> type[SolidRenderer]:
    register(SolidRenderer)
    SolidRenderer.rendered.clear()
    return SolidRenderer


def test_an_unknown_backend_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UnknownBackendError, match="expected one of fal, local"):
        renderer_class("nope")


def test_a_backend_registered_by_a_test_renders_a_manifest_through_the_flow(
    solid: type[SolidRenderer], tmp_path: Path
) -> None:
    rows = [{"id": "one", "audio": "one.wav", "seed": 40}, {"id": "two", "audio": "two.wav"}]
    for row, seconds in zip(rows, (2.0, 70.0), strict=True):  # "two" is cut into chunks
        write_narration(tmp_path / row["audio"], seconds, "wav")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    config = BatchConfig(
        manifest=str(tmp_path / "manifest.parquet"),
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        backend=solid.name,
    )

    outcome = run_batch(config)

    assert [(r.id, r.status) for r in outcome.results] == [
        ("one", "published"),
        ("two", "published"),
    ]
    assert outcome.exit_code == 0
    chunks_of_two = [k for row_id, k in solid.rendered if row_id == "two"]
    assert len(chunks_of_two) > 1
    assert sorted(chunks_of_two) == list(range(len(chunks_of_two)))
    sidecar = json.loads((tmp_path / "out" / "one.json").read_text())
    assert (sidecar["backend"], sidecar["model"]) == (solid.name, "solid grey (test backend)")
    probe = probe_video(tmp_path / "out" / "one.mp4")
    assert (probe.width, probe.codec, probe.audio_codec) == (SIZE, "h264", "aac")

    again = run_batch(config)  # the ledger works for any backend: nothing is rendered twice
    assert [(r.status, r.run_action) for r in again.results] == [("published", "skipped")] * 2
    assert len(solid.rendered) == len(chunks_of_two) + 1


def test_cheap_questions_answer_without_an_instance(solid: type[SolidRenderer]) -> None:
    config = BatchConfig(manifest="m.parquet", backend=solid.name)
    assert renderer_class(solid.name) is solid
    assert (solid.continuous, solid.paid) == (False, False)
    assert solid.estimate(config, "480p", 10.0) == (0.0, 0.0)
    assert solid.check_config(config) is None
