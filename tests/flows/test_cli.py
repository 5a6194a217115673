"""The avatarflow command line: exit codes, messages, and the README's demo as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.fakes.fal_server import FakeFal
from tests.media_factory import write_narration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"


def _write(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_validate_reports_every_problem_with_row_and_column_and_exits_2(tmp_path: Path) -> None:
    write_narration(tmp_path / "a.wav", 2.0)
    manifest = _write(
        tmp_path / "m.parquet",
        [
            {"id": "ok", "audio": "a.wav", "seed": 1},
            {"id": "../escape", "audio": "a.wav", "seed": 2},
            {"id": "bad-seed", "audio": "a.wav", "seed": -5},
            {"id": "ok", "audio": "a.wav", "seed": 3},
        ],
    )
    result = CliRunner().invoke(app, ["validate", manifest])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "row 1" in text
    assert "column 'id'" in text
    assert "row 2 (id=bad-seed), column 'seed'" in text
    assert "row 3 (id=ok), column 'id'" in text
    assert "duplicate" in text


def test_validate_accepts_the_shipped_examples() -> None:
    for name in ("demo.parquet", "demo.csv", "demo.jsonl", "demo_ai2v.parquet"):
        result = CliRunner().invoke(app, ["validate", str(EXAMPLES / name)])
        assert result.exit_code == 0, result.output


def test_unreadable_manifest_and_bad_options_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert CliRunner().invoke(app, ["validate", str(broken)]).exit_code == 2
    demo = str(EXAMPLES / "demo.parquet")
    result = CliRunner().invoke(app, ["run", demo, "--backend", "gpu-cloud"])
    assert result.exit_code == 2
    assert "backend" in result.output


def test_plan_prints_segments_and_cost_and_spends_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["plan", str(EXAMPLES / "demo.parquet"), "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "lesson-01" in result.output
    assert "estimated $" in result.output


def test_run_fal_without_key_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    result = CliRunner().invoke(app, ["run", str(EXAMPLES / "demo.parquet"), "--backend", "fal"])
    assert result.exit_code == 2
    assert "FAL_KEY" in result.output


@pytest.mark.usefixtures("prefect_server")
def test_run_exit_code_is_1_when_a_row_fails_and_0_when_all_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_narration(tmp_path / "a.wav", 3.0)
    rows = [{"id": "a", "audio": "a.wav"}, {"id": "b", "audio": "missing.wav"}]
    with FakeFal(latency_s=0.05) as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        args = ["--backend", "fal", "--target", str(tmp_path / "out")]
        args += ["--work-dir", str(tmp_path / "w")]
        failing = CliRunner().invoke(app, ["run", _write(tmp_path / "m1.parquet", rows), *args])
        assert failing.exit_code == 1, failing.output
        assert fake.key not in failing.output
        passing = CliRunner().invoke(app, ["run", _write(tmp_path / "m2.parquet", rows[:1]), *args])
        assert passing.exit_code == 0, passing.output
    assert (tmp_path / "out" / "a.mp4").exists()


def test_readme_demo_command_renders_the_examples_with_the_local_model(tmp_path: Path) -> None:
    """What `make demo` runs, in a fresh process with Prefect's own ephemeral server."""
    exe = Path(sys.executable).with_name("avatarflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    manifest = shutil.copytree(EXAMPLES, tmp_path / "examples") / "demo.parquet"
    proc = subprocess.run(
        [str(exe), "run", str(manifest), "--backend", "local", "--target", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    produced = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"intro.mp4", "lesson-01.mp4", "outro.mp4", "results.parquet", "report.html"} <= produced
