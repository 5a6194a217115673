"""render_chunk's decisions against the loopback fake fal: reuse, resume, ambiguous, expired,
failed-completion retry and Ctrl-C — never a paid request twice unless the user says so."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from avatarflow.tasks import stop
from avatarflow.tasks.backends.fal.client import FalQueueClient, FalRequestError, FalValidationError
from avatarflow.tasks.backends.fal.renderer import AmbiguousChunkError
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import RowPlan
from avatarflow.tasks.render import render_chunk
from avatarflow.tasks.stop import RenderStopped
from avatarflow.tasks.workdir import WorkDir
from tests.factories import make_plan as plan_of
from tests.fakes.fal_server import APP, FakeFal, Faults
from tests.media_factory import write_narration

HASH = "c" * 64


FAKE_FAL_LATENCY_S = 0.1  # the conftest fixtures `fal_server` and `fake` read it


def make_config(fake: FakeFal, tmp_path: Path, **options: object) -> BatchConfig:
    return BatchConfig(
        manifest="m.parquet",
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        backend="fal",
        **{"fal": fake.settings(), **options},
    )


def make_plan(config: BatchConfig) -> RowPlan:
    """A one-chunk row whose chunk WAV is where prepare_row would have cut it."""
    plan = plan_of(input_hash=HASH)
    write_narration(WorkDir(config.work_path).chunk_wav(plan.row.id, HASH, 0), 2.0)
    return plan


def submit_directly(fake: FakeFal) -> str:
    """Queue a request as an earlier run would have; return its id."""
    with FalQueueClient(fake.settings()) as client:
        url = client.upload(b"RIFF" + b"\0" * 64, "audio/wav")
        return client.submit(f"{APP}/audio-to-video", {"audio_url": url, "seed": 1}).request_id


def test_a_rendered_chunk_is_reused_without_any_request(fake: FakeFal, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path)
    plan = make_plan(config)
    first = render_chunk.fn(plan, 0, config)
    assert fake.submissions == 1
    fake.reset()
    again = render_chunk.fn(plan, 0, config)
    assert (again.sha256, again.request_id) == (first.sha256, first.request_id)
    assert sum(fake.counts.values()) == 0


def test_a_known_request_is_polled_not_resubmitted(fake: FakeFal, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path)
    plan = make_plan(config)
    ledger = Ledger(config.state_url)
    request_id = submit_directly(fake)
    ledger.record_attempt("row-1", HASH, 0, f"{APP}/audio-to-video")
    ledger.record_request("row-1", HASH, 0, request_id, f"{APP}/audio-to-video")
    video = render_chunk.fn(plan, 0, config)
    assert video.request_id == request_id
    assert fake.submissions == 1
    assert ledger.chunk("row-1", HASH, 0).done


def test_an_attempt_without_request_fails_as_ambiguous_until_forced(
    fake: FakeFal, tmp_path: Path
) -> None:
    config = make_config(fake, tmp_path)
    plan = make_plan(config)
    ledger = Ledger(config.state_url)
    ledger.record_attempt("row-1", HASH, 0, f"{APP}/audio-to-video")
    with pytest.raises(AmbiguousChunkError) as refused:
        render_chunk.fn(plan, 0, config)
    message = str(refused.value)
    assert "ambiguous submit" in message
    assert "dashboard" in message
    assert "avatarflow run ... --resubmit-ambiguous" in message
    assert fake.counts["submit"] == 0

    fal = config.fal.model_copy(update={"resubmit_ambiguous": True})
    forced = config.model_copy(update={"fal": fal})
    video = render_chunk.fn(plan, 0, forced)
    assert fake.submissions == 1
    request = ledger.request("row-1", HASH, 0)
    assert request is not None
    assert (request.request_id, request.attempt) == (video.request_id, 2)


def test_a_live_ambiguous_submit_is_recorded_and_never_retried(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(submit_hang=1, hang_s=2.0))
    config = make_config(fake, tmp_path)
    config = config.model_copy(update={"fal": fake.settings(http_timeout_s=0.3)})
    plan = make_plan(config)
    with pytest.raises(AmbiguousChunkError, match="--resubmit-ambiguous"):
        render_chunk.fn(plan, 0, config)
    assert Ledger(config.state_url).chunk("row-1", HASH, 0).ambiguous
    with pytest.raises(AmbiguousChunkError, match="earlier run"):
        render_chunk.fn(plan, 0, config)
    assert (fake.counts["submit"], fake.submissions) == (1, 1)


def test_an_expired_request_is_reported_and_resubmitted_once(
    fake: FakeFal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(fake, tmp_path)
    plan = make_plan(config)
    ledger = Ledger(config.state_url)
    old = submit_directly(fake)
    ledger.record_request("row-1", HASH, 0, old, f"{APP}/audio-to-video")
    fake.expire(old)
    with caplog.at_level(logging.WARNING, logger="avatarflow.tasks.backends.fal.renderer"):
        video = render_chunk.fn(plan, 0, config)
    assert old in caplog.text
    assert "expired" in caplog.text
    assert fake.submissions == 2
    request = ledger.request("row-1", HASH, 0)
    assert request is not None
    assert (request.request_id, request.replaced) == (video.request_id, (old,))
    assert video.request_id != old


def test_a_result_that_expires_after_completion_is_resubmitted(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(result_expired=1))
    config = make_config(fake, tmp_path)
    video = render_chunk.fn(make_plan(config), 0, config)
    assert fake.submissions == 2
    assert video.request_id == fake.request_ids[1]


def test_failed_completions_are_resubmitted_a_bounded_number_of_times(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(completed_error=2))  # 503 runner_disconnected: not billed by fal
    config = make_config(fake, tmp_path)
    plan = make_plan(config)
    video = render_chunk.fn(plan, 0, config)
    assert fake.submissions == 3
    request = Ledger(config.state_url).request("row-1", HASH, 0)
    assert request is not None
    assert request.replaced == tuple(fake.request_ids[:2])
    assert video.request_id == fake.request_ids[2]

    fake.reset(Faults(completed_error=2))
    once = make_config(fake, tmp_path / "again", fal=fake.settings(failed_retries=1))
    with pytest.raises(FalRequestError, match="runner_disconnected"):
        render_chunk.fn(make_plan(once), 0, once)
    assert fake.submissions == 2


def test_a_rejected_input_fails_with_the_field_and_is_not_resubmitted(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(completed_error=1, completed_error_status=422))
    config = make_config(fake, tmp_path)
    with pytest.raises(FalValidationError, match="audio_url: Audio has no speech"):
        render_chunk.fn(make_plan(config), 0, config)
    assert fake.submissions == 1


def test_a_stop_request_submits_nothing(fake: FakeFal, tmp_path: Path) -> None:
    run_id = uuid.uuid4()
    config = make_config(fake, tmp_path)
    with stop.owned(run_id):
        stop.request_stop(run_id)
        with pytest.raises(RenderStopped):
            render_chunk.fn(make_plan(config), 0, config)
    assert fake.counts["submit"] == 0
