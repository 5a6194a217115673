"""A paid render is never thrown away by a later error: whichever stage after rendering raises
(master audio, chunk verification, concat, QC, thumbnail, publish), the joined video is kept under
_rejected/ with its sidecar, cost and reason, or before there is one the row says its chunks are
kept in the ledger; and the next run publishes it without paying again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks import finish
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.finish import CHUNKS_KEPT
from tests.factories import narrated_manifest
from tests.fakes.fal_server import FakeFal

pytestmark = pytest.mark.usefixtures("prefect_server")

ROW = "intro"
ONE_SEGMENT_USD = 93 / 16 * 0.15  # a 3 s narration is one 93-frame segment at 480p


class _Broken:
    """A stage that raises, in place of the plain function finish_row calls."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"injected {self.stage} failure")


# The stage as finish_row names it, the name it is called by in tasks/finish.py, and whether a
# joined video exists by then (kept under _rejected/) or only the chunks (kept in the ledger).
STAGES = [
    ("master audio", "prepare_master_audio", False),
    ("chunk verification", "verify_chunks", False),
    ("concat", "concat_chunks", False),
    ("qc", "verify_video", True),
    ("thumbnail", "save_thumbnail", True),
    ("publish", "publish_row", True),
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return narrated_manifest(tmp_path_factory.mktemp("post-render"), {ROW: 3.0})


def _table(out: Path) -> dict[str, Any]:
    [row] = pq.read_table(out / "results.parquet").to_pylist()
    return row


@pytest.mark.parametrize(("stage", "name", "video_kept"), STAGES)
def test_an_error_after_rendering_keeps_the_paid_render_and_the_rerun_publishes_it_free(
    fake: FakeFal,
    tmp_path: Path,
    manifest: str,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
    name: str,
    video_kept: bool,
) -> None:
    out = tmp_path / "out"
    config = BatchConfig(
        manifest=manifest,
        target=str(out),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
    )
    reason = f"{stage} error: RuntimeError: injected {stage} failure"

    with monkeypatch.context() as patch:
        patch.setattr(finish, name, _Broken(stage))
        outcome = run_batch(config)

    [result] = outcome.results
    assert fake.submissions == 1
    assert result.cost_usd == pytest.approx(ONE_SEGMENT_USD)  # paid, and counted
    table = _table(out)
    assert table["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
    assert not (out / f"{ROW}.mp4").exists()
    report = (out / "report.html").read_text()
    if video_kept:
        assert (result.status, result.error) == ("rejected", reason)
        assert (table["status"], table["error"]) == ("rejected", reason)
        assert table["video_url"].endswith(f"/out/_rejected/{ROW}.mp4")
        assert (out / "_rejected" / f"{ROW}.mp4").stat().st_size > 0
        sidecar = json.loads((out / "_rejected" / f"{ROW}.json").read_text())
        assert sidecar["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
        assert sidecar["qc"]["passed"] is False
        assert sidecar["qc"]["reasons"][-1] == reason
    else:
        assert result.status == "failed"
        assert result.error == f"{reason}; {CHUNKS_KEPT}"
        assert table["error"] == result.error
        assert not (out / "_rejected").exists()
        assert len(list((out / ".avatarflow" / "rows" / ROW).glob("*/chunk-0.done.json"))) == 1
    assert CHUNKS_KEPT in report if not video_kept else reason in report

    # Without the fault, the next run re-checks what was paid for and publishes it: no submit.
    again = run_batch(config)

    [result] = again.results
    assert (result.status, result.run_action, result.error) == ("published", "reused", None)
    assert fake.submissions == 1
    assert (out / f"{ROW}.mp4").stat().st_size > 0
    table = _table(out)
    assert (table["status"], table["cost_usd"]) == ("published", pytest.approx(ONE_SEGMENT_USD))
