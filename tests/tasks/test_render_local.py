"""LocalRenderer on the tiny checkpoint: one continuous render per row, per-chunk MP4s, resume."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from avatarflow.tasks.backends import RenderJob
from avatarflow.tasks.backends import local as local_backend
from avatarflow.tasks.backends.local import LocalRenderer, read_wav
from avatarflow.tasks.config import BatchConfig, LocalSettings
from avatarflow.tasks.records import Chunk
from avatarflow.tasks.workdir import WorkDir
from tests.factories import make_audio, make_plan, make_row

RATE = 16_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> BatchConfig:
    work = tmp_path_factory.mktemp("work")
    local = LocalSettings(model_dir=str(tiny_checkpoint))  # the session's copy of the tiny one
    return BatchConfig(manifest=str(work / "manifest.parquet"), work_dir=str(work), local=local)


@pytest.fixture(scope="module")
def renderer(config: BatchConfig) -> LocalRenderer:
    return LocalRenderer.shared(config)


def _write_wav(path: Path, seconds: float, freq: float) -> str:
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(RATE)
        handle.writeframes(pcm.tobytes())
    return str(path)


def _job(tmp_path: Path, out: str = "out") -> RenderJob:
    chunks = (Chunk("row1", 0, 0.0, 1.0, 1), Chunk("row1", 1, 1.0, 2.25, 1))
    wavs = (_write_wav(tmp_path / "c0.wav", 1.0, 220), _write_wav(tmp_path / "c1.wav", 1.25, 330))
    info = make_audio(2.25, source=wavs[0], pcm_path=wavs[0])
    row = make_row("row1", wavs[0], prompt="a person talks")
    plan = make_plan(row, info, chunks, seed=5, billable_units=0.0, input_hash="h")
    return RenderJob(plan, chunks, wavs, out_dir=str(tmp_path / out))


def _frames(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class _Interrupted(Exception):
    pass


def test_shared_loads_the_checkpoint_once(config, renderer) -> None:
    assert LocalRenderer.shared(config) is renderer
    assert LocalRenderer.shared(config.model_copy()) is renderer
    assert renderer.name == "local"
    assert renderer.continuous


def test_tiny_by_name_is_written_into_the_work_dir_once(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Path] = []

    def write_tiny(directory: Path) -> Path:  # a copy of the session's: same files, no rebuild
        written.append(directory)
        return Path(shutil.copytree(tiny_checkpoint, directory))

    monkeypatch.setattr(local_backend, "write_tiny_checkpoint", write_tiny)
    config = BatchConfig(
        manifest="m.parquet", work_dir=str(tmp_path), local=LocalSettings(model_dir="tiny")
    )
    assert LocalRenderer.check_config(config) is None
    renderer = LocalRenderer.shared(config)
    assert LocalRenderer.shared(config) is renderer
    assert written == [WorkDir(tmp_path).tiny_checkpoint]
    assert (WorkDir(tmp_path).tiny_checkpoint / "avatarflow.json").exists()
    assert LocalRenderer.expected_area(config, "480p") is None  # renders at its own size
    assert "tiny" in LocalRenderer.model_name(config)


def test_a_local_run_needs_a_checkpoint_folder(tmp_path: Path) -> None:
    none = BatchConfig(manifest="m.parquet", work_dir=str(tmp_path))
    problem = LocalRenderer.check_config(none)
    assert problem is not None
    assert "needs a checkpoint folder" in problem
    assert "--model-dir tiny" in problem
    missing = none.model_copy(update={"local": LocalSettings(model_dir=str(tmp_path / "nope"))})
    assert LocalRenderer.check_config(missing) == f"model folder {tmp_path / 'nope'} does not exist"
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        LocalRenderer.shared(none)


def test_two_chunk_row_renders_one_mp4_per_chunk_span(renderer, tmp_path) -> None:
    videos = renderer.render(_job(tmp_path))
    assert [v.chunk_index for v in videos] == [0, 1]
    # 16 fps: chunk 0 spans 0-1 s (16 frames), chunk 1 spans 1-2.25 s (20 frames).
    assert [len(_frames(v.path)) for v in videos] == [16, 20]
    with av.open(videos[0].path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 16
        assert (stream.width, stream.height) == (32, 32)
    assert all(v.backend == "local" and v.seed == 5 and len(v.sha256) == 64 for v in videos)
    assert not (tmp_path / "out" / "row1.segments").exists()  # scratch removed once done


def test_interrupted_row_resumes_at_the_last_finished_segment(renderer, tmp_path) -> None:
    expected = [_frames(v.path) for v in renderer.render(_job(tmp_path, "uninterrupted"))]

    def interrupt(row_id: str, segment: int) -> None:
        raise _Interrupted

    job = _job(tmp_path, "resumed")
    with pytest.raises(_Interrupted):
        LocalRenderer(renderer.pipe, on_segment=interrupt).render(job)
    assert (Path(job.out_dir) / "row1.segments" / "0000.safetensors").exists()

    steps = []
    handle = renderer.pipe.transformer.register_forward_hook(lambda *args: steps.append(1))
    try:
        videos = LocalRenderer(renderer.pipe).render(job)
    finally:
        handle.remove()
    assert len(steps) == 2  # the second segment's 2 steps only; the first was not recomputed
    for video, frames in zip(videos, expected, strict=True):
        np.testing.assert_array_equal(_frames(video.path), frames)


def test_chunk_frame_spans_tile_the_row_without_gaps() -> None:
    chunks = [Chunk("r", 0, 0.0, 1.03, 1), Chunk("r", 1, 1.03, 2.01, 1)]
    assert chunks[0].frame_span(is_last=False) == (0, 16)
    assert chunks[1].frame_span(is_last=True) == (16, 33)  # 32.16 frames, rounded up


def test_read_wav_resamples_to_16k(tmp_path) -> None:
    path = tmp_path / "44k.wav"
    t = np.arange(44_100) / 44_100
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(44_100)
        stereo = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2"), 2)
        handle.writeframes(stereo.tobytes())
    audio = read_wav(path)
    assert abs(audio.size - RATE) <= 32
    assert 0.2 < np.abs(audio).max() < 0.35
