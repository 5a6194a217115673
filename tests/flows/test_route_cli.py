"""`--backend auto` on the command line: a deadline it cannot read exits 2 before anything runs;
`avatarflow plan` shows each row's backend and auto against all-local and all-fal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import flat, invoke

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


@pytest.mark.parametrize(
    ("deadline", "message"),
    [(None, "needs a deadline"), ("tomorrow", "deadline 'tomorrow': expected a time of day")],
)
def test_run_auto_without_a_readable_deadline_exits_2(
    deadline: str | None, message: str, tmp_path: Path
) -> None:
    args = ["--backend", "auto", "--model-dir", "tiny", "--target", str(tmp_path / "out")]
    result = invoke(
        "run",
        str(EXAMPLES / "demo.parquet"),
        *args,
        *(["--deadline", deadline] if deadline else []),
    )
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert not (tmp_path / "out").exists()  # nothing dispatched


def test_plan_auto_prints_the_split_against_all_local_and_all_fal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)  # plan spends nothing: it needs no key
    # One worker at 100 s a segment: of the demo's rows, only what fits 5 minutes stays local.
    monkeypatch.setenv("AVATARFLOW_ROUTE_LOCAL_S_PER_SEGMENT", "100")
    monkeypatch.setenv("AVATARFLOW_ROUTE_LOCAL_LOAD_S", "0")
    args = ["--backend", "auto", "--deadline", "5m", "--model-dir", "tiny"]
    args += ["--work-dir", str(tmp_path / "w"), "--target", str(tmp_path / "out")]
    result = invoke("plan", str(EXAMPLES / "demo.parquet"), *args)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "routing (deadline" in text
    assert "1 GPU workers" in text
    assert "local: own GPUs finish by" in text
    assert "fal: own GPUs would finish at" in text
    for name in ("auto:", "all-local:", "all-fal:"):
        assert name in text
    assert "all-local: finish" in text
    assert "(misses the deadline)" in text  # all-local, on one slow worker
