"""FalQueueClient against the loopback fake fal (real HTTP) and httpx.MockTransport."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

import httpx
import pytest

from avatarflow.tasks.backends.fal.client import (
    AmbiguousSubmitError,
    FalAuthError,
    FalQueueClient,
    FalRequestError,
    FalTimeoutError,
    FalValidationError,
    SubmitResult,
    _sse_data,
)
from avatarflow.tasks.config import FalSettings
from avatarflow.tasks.stop import (
    RenderStopped,
    calling_on_stop,
    owned,
    request_stop,
    wait_unless_stopped,
)
from tests.fakes.fal_server import APP, FakeFal, Faults

AT2V = f"{APP}/audio-to-video"
AUDIO = os.urandom(40_000)  # above the inline threshold, so it goes through fal storage


FAKE_FAL_LATENCY_S = 0.1  # the conftest fixtures `fal_server` and `fake` read it


@pytest.fixture
def client(fake: FakeFal) -> Iterator[FalQueueClient]:
    with FalQueueClient(fake.settings()) as fal:
        yield fal


def submit_audio(client: FalQueueClient, **payload: object) -> SubmitResult:
    url = client.upload(AUDIO, "audio/wav", "voice.wav")
    return client.submit(AT2V, {"audio_url": url, **payload})


def test_round_trip_follows_fal_urls_and_reads_billable_units(
    fake: FakeFal, client: FalQueueClient
) -> None:
    handle = submit_audio(client, resolution="720p")
    assert handle.status_url.startswith(fake.queue_url)
    assert client.handle(handle.request_id) == handle  # resuming by id builds the same URLs
    assert client.wait(handle).status == "COMPLETED"
    result = client.result(handle)
    assert result.data["video"]["content_type"] == "video/mp4"
    assert result.billable_units == pytest.approx(93 / 16 * 4)
    assert fake.billed_units == pytest.approx(result.billable_units)
    assert fake.submissions == 1


def test_token_upload_round_trips_bytes_and_reuses_the_token(
    fake: FakeFal, client: FalQueueClient
) -> None:
    first = client.upload(AUDIO, "audio/wav", "a.wav")
    second = client.upload(AUDIO[::-1], "audio/wav", "b.wav")
    assert first.startswith(fake.cdn_url)
    assert fake.file_bytes(first) == AUDIO
    assert fake.file_bytes(second) == AUDIO[::-1]
    assert (fake.counts["token"], fake.counts["upload"]) == (1, 2)


def test_upload_falls_back_to_initiate_flow(fake: FakeFal, client: FalQueueClient) -> None:
    fake.reset(Faults(cdn_v3_unavailable=True))
    urls = [client.upload(AUDIO, "audio/wav", "a.wav"), client.upload(AUDIO, "audio/wav", "b.wav")]
    assert [fake.file_bytes(url) for url in urls] == [AUDIO, AUDIO]
    assert (fake.counts["token"], fake.counts["initiate"], fake.counts["put"]) == (1, 2, 2)


def test_tiny_files_travel_as_data_uris(fake: FakeFal, client: FalQueueClient) -> None:
    url = client.upload(b"RIFF tiny", "audio/wav", "t.wav")
    assert url.startswith("data:audio/wav;base64,")
    assert fake.file_bytes(url) == b"RIFF tiny"
    assert fake.counts["upload"] == 0


def test_429_three_times_then_one_submission(fake: FakeFal, client: FalQueueClient) -> None:
    fake.reset(Faults(submit_429=3))
    submit_audio(client)
    assert fake.counts["submit"] == 4
    assert fake.submissions == 1


def test_5xx_on_submit_is_retried(fake: FakeFal, client: FalQueueClient) -> None:
    fake.reset(Faults(submit_5xx=2))
    handle = submit_audio(client)
    assert client.wait(handle).status == "COMPLETED"
    assert (fake.counts["submit"], fake.submissions) == (3, 1)


def test_submit_gives_up_after_max_attempts(fake: FakeFal) -> None:
    fake.reset(Faults(submit_429=100))
    fal = FalQueueClient(fake.settings(max_attempts=3))
    with fal, pytest.raises(FalRequestError) as info:
        submit_audio(fal)
    assert (info.value.status, info.value.retryable) == (429, True)
    assert (fake.counts["submit"], fake.submissions) == (3, 0)


def test_ambiguous_submit_raises_and_is_not_resubmitted(fake: FakeFal) -> None:
    fake.reset(Faults(submit_hang=1, hang_s=3.0))
    fal = FalQueueClient(fake.settings(http_timeout_s=0.3))
    with fal, pytest.raises(AmbiguousSubmitError):
        submit_audio(fal)
    assert fake.counts["submit"] == 1
    assert fake.submissions == 1  # it was queued: a resubmit would have paid twice


def test_connection_refused_is_retried_and_never_ambiguous(fake: FakeFal) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again at once: nothing listens there
    settings = fake.settings(queue_url=f"http://127.0.0.1:{port}", max_attempts=4)
    sleeps: list[float] = []
    fal = FalQueueClient(settings, sleep=sleeps.append)
    with fal, pytest.raises(FalRequestError) as info:
        fal.submit(AT2V, {"audio_url": "data:audio/wav;base64,AA=="})
    assert info.value.error_type == "network_error"
    assert len(sleeps) == 3


@pytest.fixture
def mock_client(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., FalQueueClient]]:
    """Build clients on httpx.MockTransport (no waits between retries); closed after the test."""
    monkeypatch.setenv("FAL_KEY", "k-mock-secret")
    made: list[FalQueueClient] = []

    def build(
        handler: Callable[[httpx.Request], httpx.Response], **update: object
    ) -> FalQueueClient:
        settings = FalSettings(queue_url="http://127.0.0.1:9", **update)
        transport = httpx.MockTransport(handler)
        made.append(FalQueueClient(settings, transport=transport, sleep=lambda s: None))
        return made[-1]

    yield build
    for client in made:
        client.close()


def test_connect_error_before_sending_is_retried_once_sent_is_ambiguous(
    mock_client: Callable[..., FalQueueClient],
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 3:
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json={"request_id": "r-1"})

    fal = mock_client(handler, request_timeout_s=30)
    assert fal.submit(AT2V, {"audio_url": "x"}).request_id == "r-1"
    assert calls[1].headers["Authorization"] == "Key k-mock-secret"
    assert calls[1].headers["X-Fal-Request-Timeout"] == "30"
    assert json.loads(calls[1].content) == {"audio_url": "x"}
    with pytest.raises(AmbiguousSubmitError):
        fal.submit(AT2V, {"audio_url": "x"})
    assert len(calls) == 3


def test_queue_urls_on_foreign_hosts_are_not_followed(
    mock_client: Callable[..., FalQueueClient],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        elsewhere = "https://elsewhere.example/requests/r-2"
        body = {"request_id": "r-2", "status_url": f"{elsewhere}/status", "response_url": elsewhere}
        return httpx.Response(200, json=body)

    fal = mock_client(handler)
    handle = fal.submit(AT2V, {"audio_url": "x"})
    assert handle == fal.handle("r-2")  # the key only ever goes to the configured queue host
    assert handle.status_url == f"http://127.0.0.1:9/{APP}/requests/r-2/status"


def test_key_is_not_sent_to_download_hosts(
    mock_client: Callable[..., FalQueueClient], tmp_path: Path
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"mp4 bytes")

    mock_client(handler).download("http://127.0.0.1:9/cdn/files/x/out.mp4", tmp_path / "v.mp4")
    assert (tmp_path / "v.mp4").read_bytes() == b"mp4 bytes"
    assert "Authorization" not in seen[0].headers


def test_completed_with_error_surfaces_the_real_error(
    fake: FakeFal, client: FalQueueClient
) -> None:
    fake.reset(Faults(completed_error=1, completed_error_status=503))
    handle = submit_audio(client)
    with pytest.raises(FalRequestError, match="Runner disconnected") as info:
        client.wait(handle)
    assert (info.value.error_type, info.value.status) == ("runner_disconnected", 503)
    assert info.value.retryable


def test_invalid_input_names_every_field(fake: FakeFal, client: FalQueueClient) -> None:
    handle = client.submit(AT2V, {"num_segments": 0, "resolution": "1080p"})
    with pytest.raises(FalValidationError, match="audio_url: Field required") as info:
        client.wait(handle)
    assert set(info.value.fields) == {"audio_url", "num_segments", "resolution"}


def test_transient_504_on_result_is_retried(fake: FakeFal, client: FalQueueClient) -> None:
    handle = submit_audio(client)
    client.wait(handle)
    fake.reset(Faults(result_504=2))
    assert client.result(handle).data["video"]["url"].startswith(fake.cdn_url)
    assert fake.counts["result"] == 3


def test_status_5xx_is_retried(fake: FakeFal, client: FalQueueClient) -> None:
    handle = submit_audio(client)
    fake.reset(Faults(status_5xx=2))
    assert client.wait(handle).status == "COMPLETED"


def test_interrupted_download_resumes_byte_identical(
    fake: FakeFal, client: FalQueueClient, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    url = client.upload(data, "video/mp4", "v.mp4")
    fake.reset(Faults(download_cut=1))
    dest = client.download(url, tmp_path / "v.mp4")
    assert dest.read_bytes() == data
    assert (fake.counts["file"], fake.counts["file_range"]) == (2, 1)
    assert list(tmp_path.iterdir()) == [dest]  # no .part left behind


def test_wait_deadline_then_cancel_then_already_completed(
    fake: FakeFal, client: FalQueueClient
) -> None:
    fake.latency_s = 5.0
    handle = submit_audio(client)
    with pytest.raises(FalTimeoutError):
        client.wait(handle, timeout_s=0.2)
    assert client.cancel(handle) == "CANCELLATION_REQUESTED"
    with pytest.raises(FalRequestError) as info:
        client.wait(handle)
    assert info.value.error_type == "client_cancelled"
    assert client.cancel(handle) == "ALREADY_COMPLETED"


def test_wait_follows_the_status_stream_and_is_told_at_once(
    fake: FakeFal, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.latency_s = 1.5
    monkeypatch.setattr(fake, "keepalive_s", 0.2)  # comments in between do not end the wait
    with FalQueueClient(FalSettings()) as fal:  # default settings, from the environment
        handle = submit_audio(fal)
        started = time.monotonic()
        assert fal.wait(handle).metrics["inference_time"] == pytest.approx(1.5, abs=0.05)
        late_s = time.monotonic() - started - 1.5
    assert late_s < 0.3
    assert (fake.counts["stream"], fake.counts["status"]) == (1, 0)  # one request, no polls


def test_without_the_stream_wait_polls_promptly_without_hammering(fake: FakeFal) -> None:
    fake.latency_s = 1.5
    with FalQueueClient(FalSettings(status_stream=False)) as fal:
        handle = submit_audio(fal)
        started = time.monotonic()
        fal.wait(handle)
        late_s = time.monotonic() - started - 1.5
    assert late_s < 0.3
    assert fake.counts["stream"] == 0
    assert fake.counts["status"] < 25


@pytest.mark.parametrize(
    "faults", [Faults(stream_cut=1), Faults(stream_missing=True)], ids=["cut", "missing"]
)
def test_a_stream_that_ends_early_or_is_missing_hands_over_to_polls(
    fake: FakeFal, client: FalQueueClient, faults: Faults
) -> None:
    fake.latency_s = 0.5
    handle = submit_audio(client)
    fake.reset(faults)
    assert client.wait(handle).status == "COMPLETED"
    assert fake.counts["stream"] == 1
    assert fake.counts["status"] >= 1
    assert fake.submissions == 0  # counted since the reset: nothing was submitted again


def test_a_failed_completion_on_the_stream_raises_fals_real_error(
    fake: FakeFal, client: FalQueueClient
) -> None:
    fake.reset(Faults(completed_error=1, completed_error_status=422))
    handle = submit_audio(client)
    with pytest.raises(FalValidationError):
        client.wait(handle)
    assert (fake.counts["stream"], fake.counts["status"]) == (1, 0)


def test_a_runs_stop_ends_a_stream_wait_at_once(fake: FakeFal) -> None:
    fake.latency_s = 30.0
    run_id, outcome = uuid4(), []
    waiting = threading.Event()

    def wait_in_a_run() -> None:
        settings = fake.settings(poll_initial_s=5.0)  # a stop must not wait out a poll either
        with (
            owned(run_id),
            FalQueueClient(settings, sleep=wait_unless_stopped, on_stop=calling_on_stop) as fal,
        ):
            handle = submit_audio(fal)
            waiting.set()
            try:
                fal.wait(handle)
            except RenderStopped as exc:
                outcome.append(exc)

    thread = threading.Thread(target=wait_in_a_run)
    thread.start()
    assert waiting.wait(5)
    time.sleep(0.3)  # inside the stream's blocking read by now
    assert fake.counts["stream"] == 1
    stopped_at = time.monotonic()
    request_stop(run_id)
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 1.0
    assert len(outcome) == 1


def test_server_sent_events_are_read_as_the_standard_says() -> None:
    lines = [
        ": keep-alive",
        "",
        'data: {"a":',
        "data: 1}",
        "",
        "event: x",
        "data: 2",
        "",
        "data: 3",
    ]
    assert list(_sse_data(iter(lines))) == ['{"a":\n1}', "2", "3"]


def test_bad_key_raises_auth_error_without_the_key(
    fake: FakeFal, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-secret-7d41c9"
    monkeypatch.setenv("FAL_KEY", secret)
    with FalQueueClient(fake.settings()) as fal:
        with pytest.raises(FalAuthError) as info:
            fal.submit(AT2V, {"audio_url": "data:audio/wav;base64,AA=="})
        assert secret not in repr(fal.settings)
    assert fake.counts["submit"] == 1  # 401 is not retried
    for text in (str(info.value), repr(info.value), caplog.text):
        assert secret not in text
        assert fake.key not in text


def test_missing_key_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    with pytest.raises(FalAuthError, match="FAL_KEY"):
        FalQueueClient(FalSettings())


def test_settings_come_from_the_environment_and_never_hold_the_key(
    fake: FakeFal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_QUEUE_URL", fake.queue_url + "/")  # a trailing slash is dropped
    monkeypatch.setenv("FAL_APP", "fal-ai/other-app")
    settings = FalSettings()
    assert (settings.queue_url, settings.rest_url, settings.cdn_url, settings.app) == (
        fake.queue_url,
        fake.rest_url,
        fake.cdn_url,
        "fal-ai/other-app",
    )
    assert FalSettings.api_key() == fake.key
    for text in (repr(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert fake.key not in text
    monkeypatch.setenv("FAL_KEY", "rotated-key-0001")  # read when needed, not at construction
    assert settings.api_key() == "rotated-key-0001"


def test_secrets_stay_out_of_retry_logs_and_errors(
    fake: FakeFal, client: FalQueueClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.reset(Faults(submit_429=2, completed_error=1, completed_error_status=422))
    handle = submit_audio(client)
    with pytest.raises(FalValidationError) as info:
        client.wait(handle)
    assert "retry 1/" in caplog.text  # the retries were logged...
    assert fake.key not in caplog.text  # ...without the key
    assert fake.key not in str(info.value)
    assert info.value.fields == ("audio_url",)


def test_a_burst_of_concurrent_requests_through_one_client(
    fake: FakeFal, client: FalQueueClient
) -> None:
    fake.latency_s = 1.0
    start = threading.Barrier(120)

    def one(_: int) -> float | None:
        start.wait()
        handle = client.submit(AT2V, {"audio_url": "data:audio/wav;base64,AAAA"})
        client.wait(handle)
        return client.result(handle).billable_units

    with ThreadPoolExecutor(120) as pool:
        units = list(pool.map(one, range(120)))
    assert units == [93 / 16] * 120
    assert fake.submissions == 120
    assert fake.max_in_progress > 100  # the fake really served them side by side


def test_user_request_timeout_is_final_and_names_the_setting(
    mock_client: Callable[..., FalQueueClient],
) -> None:
    """A 504 carrying X-Fal-Request-Timeout-Type: the time-to-start deadline passed; no retry."""
    calls: list[tuple[str, str]] = []
    timed_out = {"detail": "Request timed out", "error_type": "request_timeout"}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.method == "POST":
            return httpx.Response(200, json={"request_id": "r-9"})
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"status": "COMPLETED", "error": "Request timed out"})
        return httpx.Response(504, json=timed_out, headers={"X-Fal-Request-Timeout-Type": "user"})

    fal = mock_client(handler, request_timeout_s=45)
    handle = fal.submit(AT2V, {"audio_url": "x"})
    for attempt in (lambda: fal.wait(handle), lambda: fal.result(handle)):
        with pytest.raises(FalRequestError) as info:
            attempt()
        assert (info.value.error_type, info.value.status) == ("request_timeout", 504)
        assert not info.value.retryable  # a resubmit would only meet the same deadline
        assert "X-Fal-Request-Timeout=45 s" in str(info.value)
        assert "request_timeout_s" in str(info.value)
        assert "k-mock-secret" not in str(info.value)
    result_fetches = [c for c in calls if c == ("GET", f"/{APP}/requests/r-9")]
    assert len(result_fetches) == 2  # once per call: never retried, unlike a gateway 504
