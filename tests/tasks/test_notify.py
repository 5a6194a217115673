"""Tests for tasks/notify.py: the batch summary POSTed to a loopback server that fails first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from avatarflow.tasks import notify
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.notify import notify_batch
from avatarflow.tasks.records import BatchOutcome, RowResult


class WebHook:
    """A webhook on 127.0.0.1 that answers the first `failures` POSTs with 503, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[Any] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.bodies.append(body)
                self.send_response(503 if len(hook.bodies) <= hook.failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0/B0/secret-path"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebHook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    sleeps: list[float] = []
    monkeypatch.setattr(notify.time, "sleep", sleeps.append)
    return sleeps


@pytest.fixture
def hook() -> Iterator[WebHook]:
    with WebHook(failures=1) as server:
        yield server


def _outcome() -> BatchOutcome:
    results = (
        RowResult("a", "published", "s3://b/a.mp4", cost_usd=0.87, run_action="rendered"),
        RowResult("b", "rejected", "s3://b/_rejected/b.mp4", cost_usd=1.5, error="QC: face"),
        RowResult("c", "failed", error="budget: $1.00 reached", run_action="skipped"),
    )
    return BatchOutcome(results, "s3://b/results.parquet", "s3://b/report.html", 3.0)


def _config(url: str, **options: Any) -> BatchConfig:
    return BatchConfig(manifest="m.parquet", target="s3://b", notify_url=url, **options)


def test_the_summary_is_posted_after_one_retry(hook: WebHook, no_sleep: list[float]) -> None:
    assert notify_batch(_outcome(), _config(hook.url))
    assert len(hook.bodies) == 2  # the 503, then the accepted retry
    doc = hook.bodies[-1]
    assert (doc["rows"], doc["published"], doc["rejected"], doc["failed"]) == (3, 1, 1, 1)
    assert doc["run_actions"] == {"rendered": 1, "reused": 0, "skipped": 1, "failed": 1}
    assert doc["cost_usd"] == pytest.approx(2.37)
    assert doc["estimated_usd"] == 3.0
    assert (doc["results_url"], doc["report_url"]) == (
        "s3://b/results.parquet",
        "s3://b/report.html",
    )
    assert doc["exit_code"] == 1
    assert [r["id"] for r in doc["not_published"]] == ["b", "c"]
    assert no_sleep == [1.0]


def test_slack_format_sends_one_text_message(hook: WebHook, no_sleep: list[float]) -> None:
    assert notify_batch(_outcome(), _config(hook.url, notify_format="slack"))
    [text] = hook.bodies[-1].values()
    assert list(hook.bodies[-1]) == ["text"]
    assert "3 rows: 1 published, 1 rejected, 1 failed" in text
    assert "paid $2.37" in text
    assert "s3://b/report.html" in text
    assert "• c failed: budget: $1.00 reached" in text


def test_a_hook_that_never_accepts_is_tried_three_times_and_never_fails_the_run(
    no_sleep: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    with WebHook(failures=99) as down:
        assert not notify_batch(_outcome(), _config(down.url))
        assert len(down.bodies) == 3
    assert no_sleep == [1.0, 2.0]
    assert "HTTP 503" in caplog.text
    assert "secret-path" not in caplog.text  # a webhook's path is its secret: host only


def test_unreachable_or_unset_urls_return_false(no_sleep: list[float]) -> None:
    assert not notify_batch(_outcome(), BatchConfig(manifest="m.parquet"))
    with WebHook(failures=0) as gone:
        url = gone.url
    assert not notify_batch(_outcome(), _config(url))  # refused: nothing listens any more
