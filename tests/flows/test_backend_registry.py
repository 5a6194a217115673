"""The backend seam: a third backend, defined and registered only here, runs a manifest end to end
through the real flow, and its own setting reaches it from the CLI, a flow parameter and the
environment, with no edit anywhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Self

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from avatarflow.flows.produce import produce_batch, run_batch
from avatarflow.tasks.backends import (
    BackendSettingsError,
    Renderer,
    RenderJob,
    UnknownBackendError,
    register,
    renderer_class,
    with_backend_settings,
)
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.media import probe_video
from avatarflow.tasks.records import ChunkVideo
from avatarflow.tasks.storage import sha256_file
from tests.cli import flat, invoke
from tests.media_factory import write_narration

pytestmark = pytest.mark.usefixtures("prefect_server")
SIZE = 48  # renders at its own small size: no resolution area to check


class SolidSettings(BaseSettings):
    """The test backend's own settings: AVATARFLOW_SOLID_GREY_LEVEL."""

    model_config = SettingsConfigDict(env_prefix="AVATARFLOW_SOLID_", frozen=True, extra="forbid")

    grey_level: int | None = None  # None: the row's seed


class SolidRenderer(Renderer):
    """Renders each chunk as grey frames whose level is grey_level, else the row's seed; free,
    chunk by chunk."""

    name: ClassVar[str] = "solid-test"
    settings_class: ClassVar[type[SolidSettings]] = SolidSettings
    rendered: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, grey_level: int | None = None) -> None:
        self.grey_level = grey_level

    @classmethod
    def create(cls, config: BatchConfig) -> Self:
        settings = cls.settings_for(config)
        assert isinstance(settings, SolidSettings)
        return cls(settings.grey_level)

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
        level = job.plan.seed % 256 if self.grey_level is None else self.grey_level
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
    with pytest.raises(UnknownBackendError, match="expected one of auto, fal, local"):
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


def _one_row(tmp_path: Path) -> str:
    write_narration(tmp_path / "one.wav", 2.0, "wav")
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "one", "audio": "one.wav", "seed": 40}]), manifest)
    return str(manifest)


def _grey_of(video: Path) -> float:
    """The mean level of a published video's first frame."""
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0))
        return float(frame.to_ndarray(format="gray").mean())


@pytest.mark.parametrize("source", ["cli", "flow parameter", "environment"])
def test_the_backends_own_setting_arrives_from_every_source(
    solid: type[SolidRenderer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    manifest, target, work = _one_row(tmp_path), tmp_path / "out", str(tmp_path / "work")
    level = 200  # the row's seed would render 40
    if source == "cli":
        args = ["--backend", solid.name, "--target", str(target), "--work-dir", work]
        result = invoke("run", manifest, *args, "--set", f"grey_level={level}")
        assert result.exit_code == 0, result.output
    elif source == "flow parameter":
        state = produce_batch(
            manifest=manifest,
            target=str(target),
            work_dir=work,
            backend=solid.name,
            backend_settings={"grey_level": level},
            return_state=True,
        )
        assert state.is_completed(), state.message
    else:
        monkeypatch.setenv("AVATARFLOW_SOLID_GREY_LEVEL", str(level))
        config = BatchConfig(
            manifest=manifest, target=str(target), work_dir=work, backend=solid.name
        )
        assert run_batch(config).exit_code == 0
    assert abs(_grey_of(target / "one.mp4") - level) < 4  # grey 200 after a yuv420p round trip


def test_a_setting_the_backend_lacks_is_refused_naming_backend_and_setting(
    solid: type[SolidRenderer], tmp_path: Path
) -> None:
    config = BatchConfig(manifest="m.parquet", backend=solid.name, backend_settings={"grey": 1})
    with pytest.raises(BackendSettingsError, match="backend 'solid-test': no setting 'grey'"):
        with_backend_settings(config)
    bad = config.model_copy(update={"backend_settings": {"grey_level": "light"}})
    with pytest.raises(BackendSettingsError, match="setting 'grey_level': Input should be"):
        with_backend_settings(bad)
    state = produce_batch(
        manifest=_one_row(tmp_path),
        target=str(tmp_path / "out"),
        backend=solid.name,
        backend_settings={"grey": 1},
        return_state=True,
    )
    assert state.is_failed()
    assert "cannot run: backend 'solid-test': no setting 'grey'" in (state.message or "")
    assert not (tmp_path / "out").exists()  # refused before any row
    result = invoke(
        "plan", str(tmp_path / "manifest.parquet"), "--backend", solid.name, "--set", "grey=1"
    )
    assert result.exit_code == 2
    assert "invalid option --set: backend 'solid-test': no setting 'grey'" in flat(result.output)
    assert "its settings: grey_level" in flat(result.output)


def test_built_in_backends_take_their_settings_by_name_too(tmp_path: Path) -> None:
    config = BatchConfig(
        manifest="m.parquet",
        backend="local",
        backend_settings={"device": "cpu", "model_dir": "tiny"},
    )
    local = with_backend_settings(config)
    assert (local.local.device, local.local.model_dir, local.backend_settings) == (
        "cpu",
        "tiny",
        {},
    )
    fal = config.model_copy(update={"backend": "fal", "backend_settings": {"app": "me/mine"}})
    assert with_backend_settings(fal).fal.app == "me/mine"
    with pytest.raises(BackendSettingsError, match="backend 'fal': no setting 'device'"):
        with_backend_settings(config.model_copy(update={"backend": "fal"}))
