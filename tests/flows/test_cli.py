"""The avatarflow command line: exit codes, messages, and the README's demo as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avatarflow.flows.cli import _interrupt_hint
from avatarflow.tasks.config import BatchConfig
from tests.cli import flat, invoke
from tests.factories import TINY_NOISE, qc_skip_args, write_manifest
from tests.fakes.fal_server import FakeFal
from tests.media_factory import write_narration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"


def test_validate_reports_every_problem_with_row_and_column_and_exits_2(tmp_path: Path) -> None:
    write_narration(tmp_path / "a.wav", 2.0)
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "ok", "audio": "a.wav", "seed": 1},
            {"id": "../escape", "audio": "a.wav", "seed": 2},
            {"id": "bad-seed", "audio": "a.wav", "seed": -5},
            {"id": "ok", "audio": "a.wav", "seed": 3},
        ],
    )
    result = invoke("validate", manifest)
    assert result.exit_code == 2
    text = flat(result.output)
    assert "row 1" in text
    assert "column 'id'" in text
    assert "row 2 (id=bad-seed), column 'seed'" in text
    assert "row 3 (id=ok), column 'id'" in text
    assert "duplicate" in text


def test_validate_accepts_the_shipped_examples() -> None:
    for name in ("demo.parquet", "demo.csv", "demo.jsonl", "demo_ai2v.parquet"):
        result = invoke("validate", str(EXAMPLES / name))
        assert result.exit_code == 0, result.output


def test_unreadable_manifest_and_bad_options_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert invoke("validate", str(broken)).exit_code == 2
    demo = str(EXAMPLES / "demo.parquet")
    result = invoke("run", demo, "--backend", "gpu-cloud")
    assert result.exit_code == 2
    assert "backend" in result.output
    assert "unknown backend 'gpu-cloud'" in flat(result.output)


def test_a_local_run_without_a_model_folder_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_narration(tmp_path / "a.wav", 1.0)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "audio": "a.wav"}])
    out, work = tmp_path / "out", tmp_path / "work"
    monkeypatch.delenv("AVATARFLOW_LOCAL_MODEL_DIR", raising=False)
    args = ["run", manifest, "--target", str(out), "--work-dir", str(work)]
    for backend in ((), ("--backend", "local")):  # local is the default backend
        result = invoke(*args, *backend)
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert "cannot run: the local backend needs a checkpoint folder: --model-dir DIR" in text
        assert "--model-dir tiny" in text  # how to ask for the demo checkpoint by name
    missing = invoke(*args, "--model-dir", str(tmp_path / "no-such-model"))
    assert missing.exit_code == 2, missing.output
    assert f"model folder {tmp_path / 'no-such-model'} does not exist" in flat(missing.output)
    assert not out.exists()  # nothing was written to the target (no ledger, no results) ...
    assert not work.exists()  # ... nor to the work dir (no tiny checkpoint)


def test_an_unknown_captions_mode_is_refused_naming_the_option(tmp_path: Path) -> None:
    result = invoke("run", str(EXAMPLES / "demo.parquet"), "--captions", "burned-in")
    assert result.exit_code == 2, result.output
    assert "invalid option captions: Input should be 'auto', 'off', 'vtt' or 'all'" in flat(
        result.output
    )


def test_captions_asked_for_where_nothing_recognises_are_refused_before_running(
    tmp_path: Path,
) -> None:
    write_narration(tmp_path / "a.wav", 1.0)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "audio": "a.wav"}])
    model = tmp_path / "model"  # a checkpoint folder without a Whisper in it
    model.mkdir()
    out = tmp_path / "out"
    args = ["run", manifest, "--model-dir", str(model), "--target", str(out), "--captions", "all"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "--captions all needs speech recognition" in flat(result.output)
    assert not out.exists()


def test_plan_prints_segments_and_cost_and_spends_nothing(tmp_path: Path) -> None:
    result = invoke("plan", str(EXAMPLES / "demo.parquet"), "--work-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "lesson-01" in result.output
    assert "estimated $" in result.output


def test_run_fal_without_key_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    result = invoke("run", str(EXAMPLES / "demo.parquet"), "--backend", "fal")
    assert result.exit_code == 2
    assert "FAL_KEY" in result.output
    assert "cannot run" in result.output


@pytest.mark.usefixtures("prefect_server")
def test_run_exit_code_is_1_when_a_row_fails_and_0_when_all_publish(
    tmp_path: Path, fake: FakeFal
) -> None:
    write_narration(tmp_path / "a.wav", 3.0)
    rows = [{"id": "a", "audio": "a.wav"}, {"id": "b", "audio": "missing.wav"}]
    args = ["--backend", "fal", "--target", str(tmp_path / "out")]
    args += ["--work-dir", str(tmp_path / "w")]
    failing = invoke("run", write_manifest(tmp_path / "m1.parquet", rows), *args)
    assert failing.exit_code == 1, failing.output
    assert fake.key not in failing.output
    passing = invoke("run", write_manifest(tmp_path / "m2.parquet", rows[:1]), *args)
    assert passing.exit_code == 0, passing.output
    assert (tmp_path / "out" / "a.mp4").exists()


# A user's Prefect project with packages of its own named like our folders.
USER_PACKAGES = {
    "flows/__init__.py": "",
    "flows/nightly.py": "NAME = 'the user flows'\n",
    "tasks/__init__.py": "OWNER = 'user'\n",
}
# The user's own code: its packages still win, and it runs our batch flow on the demo manifest.
USER_SCRIPT = """
import sys
import flows.nightly, tasks
from avatarflow.flows.produce import produce_batch

assert tasks.OWNER == "user", tasks.__file__
assert flows.nightly.NAME == "the user flows"
state = produce_batch(
    manifest=sys.argv[1], target=sys.argv[2], backend="local", model_dir="tiny",
    qc_skip=["face", "lipsync", "seams"], return_state=True,
)
assert state.is_completed(), state.message
"""


@pytest.mark.slow
def test_readme_demo_command_renders_the_examples_with_the_local_model(tmp_path: Path) -> None:
    """What `make demo` runs, in a fresh process with Prefect's own ephemeral server: the tiny
    checkpoint asked for by name, written into the work dir on first use. It runs from inside a
    user's project whose own `flows` and `tasks` packages come first on sys.path, as a data team's
    Prefect project would have them: ours are avatarflow.flows and avatarflow.tasks."""
    project = tmp_path / "project"
    for name, text in USER_PACKAGES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    exe = Path(sys.executable).with_name("avatarflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(project)
    manifest = shutil.copytree(EXAMPLES, tmp_path / "examples") / "demo.parquet"
    args = ["run", str(manifest), "--backend", "local", "--model-dir", "tiny"]
    args += qc_skip_args(TINY_NOISE)  # the tiny checkpoint renders noise, not a face
    run = {"env": env, "cwd": project, "capture_output": True, "text": True, "timeout": 600}
    proc = subprocess.run(
        [str(exe), *args, "--target", str(tmp_path / "out")], stdin=subprocess.DEVNULL, **run
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    produced = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"intro.mp4", "lesson-01.mp4", "outro.mp4", "results.parquet", "report.html"} <= produced
    tiny = tmp_path / "cache" / "avatarflow" / "work" / "tiny-checkpoint"
    assert (tiny / "avatarflow.json").exists()  # the default work dir, under XDG_CACHE_HOME

    own = tmp_path / "own-out"
    script = [sys.executable, "-c", USER_SCRIPT, str(manifest), str(own)]
    proc = subprocess.run(script, stdin=subprocess.DEVNULL, **run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"intro.mp4", "lesson-01.mp4", "outro.mp4"} <= {p.name for p in own.iterdir()}


def test_the_interrupt_hint_names_the_backend_in_use() -> None:
    paid = _interrupt_hint(BatchConfig(manifest="m.parquet", target="out", backend="fal"))
    assert paid.startswith("interrupted: in-flight fal request ids are kept in out/.avatarflow")
    assert "avatarflow cancel out" in paid
    free = _interrupt_hint(BatchConfig(manifest="m.parquet", target="out", backend="local"))
    assert "fal" not in free
    assert "request ids" not in free
    assert "rendered chunks are recorded in out/.avatarflow" in free


def test_a_server_in_the_active_prefect_profile_keeps_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean ephemeral-server settings are for the server the CLI starts; a URL that
    `prefect config set` wrote to the active profile means the user's server."""
    from avatarflow.flows.cli import _prefect_server_configured

    profiles = tmp_path / "profiles.toml"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    assert not _prefect_server_configured()  # no profiles file: a fresh machine
    profiles.write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
        "[profiles.ephemeral]\n"
    )
    assert _prefect_server_configured()
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert not _prefect_server_configured()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert _prefect_server_configured()


def test_a_run_on_the_server_the_cli_starts_sends_it_no_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """That server keeps no events nor task runs: they are dropped in the run's own process. A
    server the user configured gets every event."""
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker

    from avatarflow.flows import cli

    for key in {**cli.PREFECT_DEFAULTS, **cli.EPHEMERAL_DEFAULTS}:
        monkeypatch.delenv(key, raising=False)  # main() sets them; restored after the test
    monkeypatch.setattr(EventsWorker, "_client_override", None)  # likewise
    monkeypatch.setattr(cli, "app", lambda: None)
    monkeypatch.setattr(cli, "_prefect_server_configured", lambda: True)
    cli.main()
    assert EventsWorker._client_override is None
    monkeypatch.setattr(cli, "_prefect_server_configured", lambda: False)
    cli.main()
    assert EventsWorker._client_override == (NullEventsClient, ())


def test_leaving_at_once_stops_the_prefect_server_the_command_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second Ctrl-C/SIGTERM leaves with os._exit, which skips the atexit hook where Prefect
    stops its ephemeral server: the CLI stops it first, or it outlives the command."""
    from prefect.server.api.server import SubprocessASGIServer

    from avatarflow.flows.cli import _stop_ephemeral_server

    # This process's servers as the CLI's would be: only the one made here (the test session's
    # own server stays out of reach).
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    server = SubprocessASGIServer(port=1)  # never started: only its process is ours
    server.server_process = subprocess.Popen(["sleep", "60"])
    try:
        _stop_ephemeral_server()
        assert server.server_process.wait(timeout=10) == -15  # SIGTERM
    finally:
        server.server_process.kill()
