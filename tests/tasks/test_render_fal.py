"""FalRenderer end to end against the loopback fake fal: uploads, modes, identity, pricing."""

from __future__ import annotations

import hashlib
import io
import logging
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from flows.settings import BatchConfig, FalSettings
from tasks.fal_client import (
    AmbiguousSubmitError,
    FalAuthError,
    FalQueueClient,
    FalRequestError,
)
from tasks.records import AudioInfo, Chunk, Resolution, Row, RowPlan
from tasks.render import RenderJob
from tasks.render_fal import DEFAULT_PROMPT, FalRenderer, Submission
from tests.fakes.fal_server import APP, FakeFal, Faults

SEED = 1234


FAKE_FAL_LATENCY_S = 0.3  # the conftest fixtures `fal_server` and `fake` read it


def make_config(fake: FakeFal, max_concurrency: int = 4, **fal: object) -> BatchConfig:
    update = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "poll_initial_s": 0.05, **fal}
    settings = FalSettings.from_env(fake.env()).model_copy(update=update)
    return BatchConfig(
        manifest="m.parquet", backend="fal", max_concurrency=max_concurrency, fal=settings
    )


@pytest.fixture
def renderer(fake: FakeFal) -> Iterator[FalRenderer]:
    renderer = FalRenderer(make_config(fake))
    yield renderer
    renderer.client.close()


def write_wav(path: Path, seconds: float = 1.0, rate_hz: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes(pcm.tobytes())
    return path


def make_job(
    tmp_path: Path,
    *,
    index: int = 0,
    segments: int = 1,
    image: Path | None = None,
    identity: str | None = None,
    resolution: Resolution = "480p",
) -> RenderJob:
    tmp_path.mkdir(parents=True, exist_ok=True)
    wav = write_wav(tmp_path / f"chunk{index}.wav")
    image_path = str(image) if image else None
    row = Row(index=0, id="row-1", audio=str(wav), image=image_path, resolution=resolution)
    audio = AudioInfo(str(wav), "0" * 64, 1.0, 16_000, 1, "pcm_s16le", str(wav))
    chunk = Chunk(row_id=row.id, index=index, start_s=0.0, end_s=1.0, num_segments=segments)
    plan = RowPlan(row, audio, (chunk,), SEED, chunk.video_s, 0.0, input_hash="hash-1")
    return RenderJob(
        plan=plan,
        chunks=(chunk,),
        chunk_audio_paths=(str(wav),),
        out_dir=str(tmp_path / "out"),
        image_path=image_path,
        identity_video_path=identity,
    )


def decode(path: str) -> tuple[int, tuple[int, int], np.ndarray, bool]:
    """Frame count, (width, height), last RGB frame, and whether there is an AAC track."""
    with av.open(path) as container:
        count, last = 0, None
        for frame in container.decode(video=0):
            count, last = count + 1, frame
        has_aac = any(s.codec_context.name == "aac" for s in container.streams.audio)
    assert last is not None
    return count, (last.width, last.height), last.to_ndarray(format="rgb24"), has_aac


def test_at2v_chunk_has_exact_frames_price_and_seed(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    [video] = renderer.render(make_job(tmp_path, segments=2))
    path = Path(video.path)
    assert path.name == "row-1.chunk0.mp4"
    assert video.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    frames, size, _, has_aac = decode(video.path)
    assert (frames, size, has_aac) == (93 + 80, (832, 480), True)
    assert video.billable_units == pytest.approx(173 / 16)  # from x-fal-billable-units
    assert video.cost_usd == pytest.approx(173 / 16 * 0.15)
    assert (video.seed, video.backend) == (SEED, "fal")
    assert set(video.timings_s) == {"upload_s", "queue_s", "run_s", "download_s"}
    assert video.timings_s["run_s"] == pytest.approx(0.3, abs=0.05)
    assert fake.counts["audio-to-video"] == 1
    [payload] = fake.payloads
    assert payload["num_segments"] == 2
    assert "prompt" not in payload  # unset fields are left to fal's defaults
    assert "negative_prompt" not in payload


def test_ai2v_uses_row_image_and_default_prompt(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    portrait = tmp_path / "face.png"
    Image.new("RGB", (300, 400), (200, 150, 120)).save(portrait)
    [video] = renderer.render(make_job(tmp_path, image=portrait))
    assert decode(video.path)[1] == (480, 832)  # the portrait bucket
    [payload] = fake.payloads
    assert payload["prompt"] == DEFAULT_PROMPT
    assert fake.file_bytes(payload["image_url"]) == portrait.read_bytes()
    assert fake.counts["image-audio-to-video"] == 1


def test_later_chunk_takes_identity_from_last_frame_of_chunk0(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    [first] = renderer.render(make_job(tmp_path))
    [second] = renderer.render(make_job(tmp_path, index=1, identity=first.path))
    assert Path(second.path).name == "row-1.chunk1.mp4"
    identity_png = fake.file_bytes(fake.payloads[1]["image_url"])
    assert identity_png is not None
    sent = np.asarray(Image.open(io.BytesIO(identity_png)).convert("RGB"))
    assert np.array_equal(sent, decode(first.path)[2])
    assert fake.counts["image-audio-to-video"] == 1


def test_later_chunk_without_any_identity_is_refused(renderer: FalRenderer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identity frame"):
        renderer.render(make_job(tmp_path, index=1))


def test_on_submitted_runs_before_the_wait_completes(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    seen: list[tuple[Submission, str]] = []

    def hook(submission: Submission) -> None:
        seen.append((submission, fake.state(submission.request_id)))

    [video] = renderer.render(make_job(tmp_path), on_submitted=hook)
    [(submission, state_then)] = seen
    assert state_then != "COMPLETED"
    assert submission == Submission("row-1", "hash-1", 0, video.request_id, f"{APP}/audio-to-video")


def test_ambiguous_submit_propagates_without_a_hook_call_or_resubmit(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(submit_hang=1, hang_s=2.0))
    seen: list[Submission] = []
    renderer = FalRenderer(make_config(fake, http_timeout_s=0.3), on_submitted=seen.append)
    with pytest.raises(AmbiguousSubmitError):
        renderer.render(make_job(tmp_path))
    assert seen == []
    assert (fake.counts["submit"], fake.submissions) == (1, 1)


def test_units_are_estimated_when_fal_omits_the_header(fake: FakeFal, tmp_path: Path) -> None:
    fake.reset(Faults(omit_billable_units=True))
    [video] = FalRenderer(make_config(fake)).render(make_job(tmp_path, resolution="720p"))
    assert video.billable_units == pytest.approx(93 / 16 * 4)
    assert video.cost_usd == pytest.approx(93 / 16 * 0.30)


def test_resume_fetches_a_known_request_without_resubmitting(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    client = renderer.client
    audio_url = client.upload(write_wav(tmp_path / "a.wav"), "audio/wav")
    handle = client.submit(f"{APP}/audio-to-video", {"audio_url": audio_url, "seed": SEED})
    [video] = renderer.resume(handle.request_id, make_job(tmp_path))
    assert video.request_id == handle.request_id
    assert decode(video.path)[0] == 93
    assert fake.submissions == 1


def test_in_flight_requests_are_bounded_by_max_concurrency(fake: FakeFal, tmp_path: Path) -> None:
    renderer = FalRenderer(make_config(fake, max_concurrency=2))
    jobs = [make_job(tmp_path / str(i)) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        videos = [v for vs in pool.map(renderer.render, jobs) for v in vs]
    assert len({v.request_id for v in videos}) == 5
    assert fake.max_in_progress == 2


def test_random_faults_are_absorbed_without_double_submits(fake: FakeFal, tmp_path: Path) -> None:
    # per-attempt submit failure 0.3: all 6 attempts of one request fail with p = 0.07 %
    rates = {"submit_429": 0.2, "submit_5xx": 0.1, "status_5xx": 0.2, "result_504": 0.3}
    fake.reset(Faults(rates={**rates, "download_cut": 0.3}, seed=7))
    renderer = FalRenderer(make_config(fake))
    jobs = [make_job(tmp_path / str(i)) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        videos = [v for vs in pool.map(renderer.render, jobs) for v in vs]
    assert all(decode(v.path)[0] == 93 for v in videos)
    assert fake.submissions == 4
    assert sum(n for name, n in fake.counts.items() if name.startswith("fault:")) >= 3


def test_shared_renderer_is_one_per_config(fake: FakeFal) -> None:
    config = make_config(fake)
    assert FalRenderer.shared(config) is FalRenderer.shared(config.model_copy())
    assert FalRenderer.shared(config) is not FalRenderer.shared(make_config(fake, 3))


def test_multi_chunk_jobs_are_refused(renderer: FalRenderer, tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with pytest.raises(ValueError, match="one chunk per job"):
        renderer.render(RenderJob(job.plan, job.chunks * 2, job.chunk_audio_paths * 2, job.out_dir))


def test_failures_keep_secrets_out_of_errors_and_logs(
    fake: FakeFal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.reset(Faults(submit_429=1, completed_error=1))
    with pytest.raises(FalRequestError) as failed:
        FalRenderer(make_config(fake)).render(make_job(tmp_path))
    bad_key = make_config(fake).model_copy(
        update={"fal": FalSettings.from_env({**fake.env(), "FAL_KEY": "bad-key-93be"})}
    )
    with pytest.raises(FalAuthError) as refused:
        FalRenderer(bad_key, client=FalQueueClient(bad_key.fal)).render(make_job(tmp_path))
    for text in (str(failed.value), str(refused.value), repr(bad_key), caplog.text):
        assert fake.key not in text
        assert "bad-key-93be" not in text
