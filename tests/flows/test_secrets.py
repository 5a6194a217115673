"""The fal key never leaves the process: not in any file, log line, error, result or CLI output.

Two runs against the loopback fal service with a distinctive FAL_KEY: one where fal rejects a
request (422) and one where it rejects the key itself (401). Then every byte they left behind is
searched: the target (ledger included), the work dir, Prefect's home and database, captured logs
at DEBUG for every logger, result errors and the CLI's output.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
from prefect.logging.handlers import APILogHandler
from prefect.settings import get_current_settings

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.backends.fal.client import FalQueueClient
from avatarflow.tasks.config import BatchConfig, FalSettings
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.plan import PlanError, prepare_row
from avatarflow.tasks.records import Row
from tests.cli import invoke
from tests.factories import write_manifest
from tests.fakes.fal_server import APP, FakeFal, Faults
from tests.media_factory import write_image, write_narration

# Distinctive enough that any hit is the key: a real fal key is "<key id>:<secret>".
CANARY = "c4n4ry-0f-avatarflow-9d2e"
KEY = f"key-id-7731:{CANARY}"
LOGGERS = ("", "prefect", "httpx", "httpcore", "avatarflow")


class _Capture(logging.Handler):
    """Keeps every record, message and traceback included, as formatted text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + repr(record.args))


@pytest.fixture
def captured() -> Iterator[_Capture]:
    """Every logger that matters at DEBUG, non-propagating ones (prefect) included."""
    handler = _Capture()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _manifest(folder: Path) -> str:
    write_narration(folder / "a.wav", 2.0)
    write_narration(folder / "b.wav", 2.5, seed=1)
    write_image(folder / "face.png")
    rows = [{"id": "a", "audio": "a.wav"}, {"id": "b", "audio": "b.wav", "image": "face.png"}]
    return write_manifest(folder / "m.parquet", rows)


def _files_holding(root: Path, needle: bytes) -> list[str]:
    """Every readable file under root whose bytes contain needle."""
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue  # a file another process holds or removed meanwhile
    return hits


def _prefect_database() -> Path:
    url = get_current_settings().server.database.connection_url.get_secret_value()
    return Path(urlsplit(url.replace("sqlite+aiosqlite:///", "file:///")).path).parent


@pytest.mark.usefixtures("prefect_server")
def test_the_fal_key_is_in_no_file_log_error_or_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: _Capture
) -> None:
    manifest = _manifest(tmp_path)
    monkeypatch.setenv("FAL_KEY", KEY)
    faults = Faults(completed_error=1, completed_error_status=422)
    with FakeFal(latency_s=0.02, key=KEY, faults=faults) as fal:
        for name, value in fal.env().items():
            monkeypatch.setenv(name, value)
        args = ["--backend", "fal", "--target", str(tmp_path / "out-422")]
        cli = invoke("run", manifest, *args, "--work-dir", str(tmp_path / "w1"))
        assert cli.exit_code == 1, cli.output  # one row published, one rejected by fal
        assert fal.submissions == 2
    with FakeFal(latency_s=0.02, key="the-right-key") as fal:
        for name, value in {**fal.env(), "FAL_KEY": KEY}.items():
            monkeypatch.setenv(name, value)
        config = BatchConfig(
            manifest=manifest,
            target=str(tmp_path / "out-401"),
            backend="fal",
            work_dir=str(tmp_path / "w2"),
        )
        outcome = run_batch(config)
        assert fal.submissions == 0
    assert [r.status for r in outcome.results] == ["failed", "failed"]
    assert all("401" in r.error or "key" in r.error.lower() for r in outcome.results), (
        outcome.results
    )
    APILogHandler().flush()  # the run's logs are in Prefect's database before it is searched

    assert config.fal.api_key() == KEY  # the run did have the key ...
    texts = {
        "repr(config)": repr(config),
        "str(config)": str(config),
        "model_dump_json": config.model_dump_json(),
        "model_dump": str(config.model_dump()),
        "cli output": cli.output,
        "results": repr(outcome.results),
        "logs": "\n".join(captured.lines),
    }
    # positive controls: the capture saw fal traffic, and the database holds the run's parameters
    assert any(line.startswith("httpx ") and "POST" in line for line in captured.lines)
    assert _files_holding(_prefect_database(), str(tmp_path / "out-401").encode())
    assert [name for name, text in texts.items() if CANARY in text] == []
    needle = CANARY.encode()
    roots = [tmp_path, Path(os.environ["PREFECT_HOME"]), _prefect_database()]
    assert [hit for root in roots for hit in _files_holding(root, needle)] == []
    published = {p.name for p in (tmp_path / "out-422").iterdir()}
    assert {"results.parquet", "report.html", ".avatarflow"} <= published  # ... all were searched


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers 404 under /absent/ and 403 (an expired signature) for everything else."""

    def do_GET(self) -> None:
        self.send_error(404 if self.path.startswith("/absent/") else 403)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""


@pytest.fixture
def refusing_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "column"), [("/absent/a.wav", "audio"), ("/gone/a.wav", "audio"), ("/f.png", "image")]
)
def test_signed_input_urls_are_masked_in_row_errors(
    tmp_path: Path, refusing_url: str, path: str, column: str
) -> None:
    write_narration(tmp_path / "a.wav", 1.0)
    host = refusing_url.replace("http://", f"http://user:{CANARY}@")
    signed = f"{host}{path}?X-Amz-Credential=AKIA&X-Amz-Signature={CANARY}"
    audio, image = (signed, None) if column == "audio" else (str(tmp_path / "a.wav"), signed)
    row = Row(index=0, id="signed", audio=audio, image=image)
    config = BatchConfig(manifest=str(tmp_path / "m.parquet"), work_dir=str(tmp_path / "w"))
    with pytest.raises(PlanError) as failure:
        prepare_row.fn(row, config)
    assert failure.value.error.column == column
    assert failure.value.error.kind in ("missing", "fetch_failed")
    assert "X-Amz-Signature=***" in str(failure.value)
    assert CANARY not in str(failure.value)


@pytest.mark.usefixtures("prefect_server")
def test_the_cancel_hook_uses_the_runs_secret_block_where_fal_key_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect runs on_cancellation hooks where it likes (a process worker: a subprocess with the
    worker's environment); without FAL_KEY there, the run's Secret block gives the key."""
    from prefect.blocks.system import Secret
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Cancelling

    from avatarflow.flows.produce import _cancel_paid_requests, produce_batch

    with FakeFal(latency_s=60.0, key=KEY) as fal:
        for name, value in fal.env().items():
            monkeypatch.setenv(name, value)
        with FalQueueClient(FalSettings(), key=KEY) as client:
            url = client.upload(b"RIFF" + b"\0" * 64, "audio/wav")
            ids = [client.submit(f"{APP}/audio-to-video", {"audio_url": url}).request_id]
        target = tmp_path / "out"
        ledger = Ledger(str(target / ".avatarflow"))
        ledger.record_attempt("row-1", "h" * 64, 0, f"{APP}/audio-to-video")
        ledger.record_request("row-1", "h" * 64, 0, ids[0], f"{APP}/audio-to-video")
        Secret(value=KEY).save("fal-key-hook-test", overwrite=True)
        monkeypatch.delenv("FAL_KEY", raising=False)
        parameters = {"manifest": "m.parquet", "target": str(target), "backend": "fal"}
        parameters |= {"work_dir": str(tmp_path / "work"), "fal_key_secret": "fal-key-hook-test"}
        flow_run = FlowRun(flow_id=uuid4(), parameters=parameters)
        _cancel_paid_requests(produce_batch, flow_run, Cancelling())  # type: ignore[arg-type]
        assert fal.counts["cancel"] == 1
        assert fal.state(ids[0]) == "COMPLETED"  # cancelled: it ends, unbilled
        assert "FAL_KEY" not in os.environ  # the key went to the client, not the environment
