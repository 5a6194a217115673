"""FalRenderer end to end against the loopback fake fal: uploads, modes, identity, pricing."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from avatarflow.tasks.backends import RenderJob
from avatarflow.tasks.backends.fal.client import (
    AmbiguousSubmitError,
    FalAuthError,
    FalQueueClient,
    FalRequestError,
)
from avatarflow.tasks.backends.fal.renderer import DEFAULT_PROMPT, AmbiguousChunkError, FalRenderer
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import ChunkVideo, Resolution
from tests.factories import make_audio, make_chunks, make_plan, make_row, write_tone
from tests.fakes.fal_server import APP, FakeFal, Faults

SEED = 1234
AT2V = f"{APP}/audio-to-video"


FAKE_FAL_LATENCY_S = 0.3  # the conftest fixtures `fal_server` and `fake` read it


def make_config(fake: FakeFal, max_concurrency: int = 4, **fal: object) -> BatchConfig:
    return BatchConfig(
        manifest="m.parquet",
        backend="fal",
        max_concurrency=max_concurrency,
        fal=fake.settings(**fal),
    )


@pytest.fixture
def new_renderer(fake: FakeFal) -> Iterator[Callable[..., FalRenderer]]:
    """Build FalRenderers (make_config's options) whose connection pools close after the test."""
    made: list[FalRenderer] = []

    def build(**options: Any) -> FalRenderer:
        made.append(FalRenderer(make_config(fake, **options)))
        return made[-1]

    yield build
    for renderer in made:
        renderer.client.close()


@pytest.fixture
def renderer(new_renderer: Callable[..., FalRenderer]) -> FalRenderer:
    return new_renderer()


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
    wav = str(write_tone(tmp_path / f"chunk{index}.wav"))
    image_path = str(image) if image else None
    row = make_row("row-1", wav, image=image_path, resolution=resolution)
    [chunk] = make_chunks(row.id, (0.0, 1.0), segments=segments)
    chunk = dataclasses.replace(chunk, index=index)
    plan = make_plan(row, make_audio(1.0, source=wav, pcm_path=wav), (chunk,), seed=SEED)
    plan = dataclasses.replace(plan, input_hash="hash-1")
    return RenderJob(
        plan=plan,
        chunks=(chunk,),
        chunk_audio_paths=(wav,),
        out_dir=str(tmp_path / "out"),
        image_path=image_path,
        identity_video_path=identity,
    )


def ledger_for(job: RenderJob) -> Ledger:
    """The run ledger beside a job's out dir (one per job folder)."""
    return Ledger(str(Path(job.out_dir).parent / "state"))


def render(renderer: FalRenderer, job: RenderJob) -> list[ChunkVideo]:
    return renderer.render(job, ledger_for(job))


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
    [video] = render(renderer, make_job(tmp_path, segments=2))
    path = Path(video.path)
    assert path.name == "row-1.chunk0.mp4"
    assert video.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    frames, size, _, has_aac = decode(video.path)
    assert (frames, size, has_aac) == (93 + 80, (832, 480), True)
    assert video.billable_units == pytest.approx(173 / 16)  # from x-fal-billable-units
    assert video.cost_usd == pytest.approx(173 / 16 * 0.15)
    assert (video.seed, video.backend) == (SEED, "fal")
    timings = video.timings  # fal's phases; nothing rendered or encoded here
    assert min(timings.upload_s, timings.download_s) > 0.0
    assert timings.queue_s >= 0.0
    assert (timings.render_s, timings.encode_s) == (0.0, 0.0)
    assert timings.run_s == pytest.approx(0.3, abs=0.05)
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
    [video] = render(renderer, make_job(tmp_path, image=portrait))
    assert decode(video.path)[1] == (480, 832)  # the portrait bucket
    [payload] = fake.payloads
    assert payload["prompt"] == DEFAULT_PROMPT
    assert fake.file_bytes(payload["image_url"]) == portrait.read_bytes()
    assert fake.counts["image-audio-to-video"] == 1


def test_later_chunk_takes_identity_from_last_frame_of_chunk0(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    [first] = render(renderer, make_job(tmp_path))
    [second] = render(renderer, make_job(tmp_path, index=1, identity=first.path))
    assert Path(second.path).name == "row-1.chunk1.mp4"
    identity_png = fake.file_bytes(fake.payloads[1]["image_url"])
    assert identity_png is not None
    sent = np.asarray(Image.open(io.BytesIO(identity_png)).convert("RGB"))
    assert np.array_equal(sent, decode(first.path)[2])
    assert fake.counts["image-audio-to-video"] == 1


def test_later_chunk_without_any_identity_is_refused(renderer: FalRenderer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identity frame"):
        render(renderer, make_job(tmp_path, index=1))


def test_attempt_and_request_id_are_recorded_around_the_submit_before_the_wait(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    seen: list[tuple[str, object]] = []

    class Watched(Ledger):
        def record_attempt(self, *args: object) -> int:
            seen.append(("attempt", (args, fake.counts["submit"])))
            return super().record_attempt(*args)

        def record_request(self, *args: object) -> None:
            request_id = args[3]
            assert isinstance(request_id, str)
            seen.append(("request", (args, fake.state(request_id))))
            super().record_request(*args)

    job = make_job(tmp_path)
    ledger = Watched(ledger_for(job).url)
    [video] = renderer.render(job, ledger)
    [(first, (attempt, submits_then)), (second, (request, state_then))] = seen
    assert (first, second) == ("attempt", "request")
    assert (attempt, submits_then) == (("row-1", "hash-1", 0, AT2V), 0)  # before the POST
    assert request == ("row-1", "hash-1", 0, video.request_id, AT2V)
    assert state_then != "COMPLETED"  # recorded before the wait, not after it
    recorded = ledger.request("row-1", "hash-1", 0)
    assert recorded is not None
    assert (recorded.request_id, recorded.attempt, recorded.endpoint) == (video.request_id, 1, AT2V)


def test_ambiguous_submit_is_left_unanswered_in_the_ledger_and_not_resubmitted(
    fake: FakeFal, new_renderer: Callable[..., FalRenderer], tmp_path: Path
) -> None:
    fake.reset(Faults(submit_hang=1, hang_s=2.0))
    renderer = new_renderer(http_timeout_s=0.3)
    job = make_job(tmp_path)
    with pytest.raises(AmbiguousChunkError) as refused:
        render(renderer, job)
    assert isinstance(refused.value.__cause__, AmbiguousSubmitError)
    record = ledger_for(job).chunk("row-1", "hash-1", 0)
    assert (record.ambiguous, record.request) == (True, None)
    assert (fake.counts["submit"], fake.submissions) == (1, 1)


def test_units_are_estimated_when_fal_omits_the_header(
    fake: FakeFal, new_renderer: Callable[..., FalRenderer], tmp_path: Path
) -> None:
    fake.reset(Faults(omit_billable_units=True))
    [video] = render(new_renderer(), make_job(tmp_path, resolution="720p"))
    assert video.billable_units == pytest.approx(93 / 16 * 4)
    assert video.cost_usd == pytest.approx(93 / 16 * 0.30)


def test_resume_fetches_a_known_request_without_resubmitting(
    fake: FakeFal, renderer: FalRenderer, tmp_path: Path
) -> None:
    client = renderer.client
    audio_url = client.upload(write_tone(tmp_path / "a.wav"), "audio/wav")
    handle = client.submit(AT2V, {"audio_url": audio_url, "seed": SEED})
    job = make_job(tmp_path)
    ledger_for(job).record_request("row-1", "hash-1", 0, handle.request_id, AT2V)
    [video] = render(renderer, job)
    assert video.request_id == handle.request_id
    assert decode(video.path)[0] == 93
    assert fake.submissions == 1


def test_in_flight_requests_are_bounded_by_max_concurrency(
    fake: FakeFal, new_renderer: Callable[..., FalRenderer], tmp_path: Path
) -> None:
    renderer = new_renderer(max_concurrency=2)
    jobs = [make_job(tmp_path / str(i)) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        videos = [v for vs in pool.map(lambda job: render(renderer, job), jobs) for v in vs]
    assert len({v.request_id for v in videos}) == 5
    assert fake.max_in_progress == 2


def test_random_faults_are_absorbed_without_double_submits(
    fake: FakeFal, new_renderer: Callable[..., FalRenderer], tmp_path: Path
) -> None:
    # per-attempt submit failure 0.3: all 6 attempts of one request fail with p = 0.07 %
    rates = {"submit_429": 0.2, "submit_5xx": 0.1, "status_5xx": 0.2, "result_504": 0.3}
    fake.reset(Faults(rates={**rates, "download_cut": 0.3}, seed=7))
    renderer = new_renderer()
    jobs = [make_job(tmp_path / str(i)) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        videos = [v for vs in pool.map(lambda job: render(renderer, job), jobs) for v in vs]
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
        render(
            renderer,
            dataclasses.replace(
                job, chunks=job.chunks * 2, chunk_audio_paths=job.chunk_audio_paths * 2
            ),
        )


def test_failures_keep_secrets_out_of_errors_and_logs(
    fake: FakeFal,
    new_renderer: Callable[..., FalRenderer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.reset(Faults(submit_429=1, completed_error=1))
    renderer = new_renderer(failed_retries=0)  # the 503 surfaces instead of a resubmit
    with pytest.raises(FalRequestError) as failed:
        render(renderer, make_job(tmp_path / "failed"))
    monkeypatch.setenv("FAL_KEY", "bad-key-93be")
    bad_key = make_config(fake)
    with pytest.raises(FalAuthError) as refused, FalQueueClient(bad_key.fal) as client:
        render(FalRenderer(bad_key, client=client), make_job(tmp_path / "refused"))
    for text in (str(failed.value), str(refused.value), repr(bad_key), caplog.text):
        assert fake.key not in text
        assert "bad-key-93be" not in text
