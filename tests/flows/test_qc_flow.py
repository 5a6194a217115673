"""QC in the flow against the loopback fal: faceless renders (Faults(faceless=True)) are rejected
but kept (and paid for), re-rendered once when asked, and results.parquet remembers every row's
status and cost on reruns; the manifest edge cases (duplicate ids, no rows) at the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.plan import derive_seed
from avatarflow.tasks.publish import RESULTS_SCHEMA
from avatarflow.tasks.rerender import rerender_seed
from tests.cli import flat, invoke
from tests.factories import narrated_manifest, write_manifest, write_narrations
from tests.fakes.fal_server import FakeFal, Faults
from tests.tasks.test_notify import WebHook

pytestmark = pytest.mark.usefixtures("prefect_server")

USD_PER_S = 0.15  # fal's 480p price; one 93-frame segment is 5.8125 s
ONE_SEGMENT_USD = 93 / 16 * USD_PER_S


def _config(tmp_path: Path, manifest: str, fake: FakeFal, **options: object) -> BatchConfig:
    return BatchConfig(
        manifest=manifest,
        target=str(tmp_path / "out"),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
        **options,
    )


def _table(tmp_path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}


def test_faceless_renders_are_rejected_kept_under_rejected_and_their_cost_recorded(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(faceless=True))
    manifest = narrated_manifest(tmp_path, {"intro": 3.0, "outro": 4.0})
    config = _config(tmp_path, manifest, fake)

    outcome = run_batch(config)

    out = tmp_path / "out"
    assert outcome.exit_code == 1
    assert [(r.id, r.status, r.run_action) for r in outcome.results] == [
        ("intro", "rejected", "rendered"),
        ("outro", "rejected", "rendered"),
    ]
    assert fake.submissions == 2
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "report.html",
        "results.parquet",
    ]
    assert sorted(p.name for p in (out / "_rejected").iterdir()) == [
        "intro.json", "intro.mp4", "outro.json", "outro.mp4",
    ]  # fmt: skip
    sidecar = json.loads((out / "_rejected" / "intro.json").read_text())
    assert sidecar["qc"]["passed"] is False
    assert sidecar["qc"]["reasons"] == ["qc face: a face in 0 of 3 sampled frames"]
    gates = {g["name"]: g for g in sidecar["qc"]["gates"]}
    assert (gates["face"]["status"], gates["face"]["value"], gates["face"]["threshold"]) == (
        "failed", 0.0, 0.8,
    )  # fmt: skip
    assert gates["duration"]["status"] == "passed"
    assert sidecar["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
    table = _table(tmp_path)
    assert set(RESULTS_SCHEMA.names) <= set(next(iter(table.values())))
    for row_id in ("intro", "outro"):
        row = table[row_id]
        assert row["status"] == "rejected"
        assert row["video_url"].endswith(f"/out/_rejected/{row_id}.mp4")
        assert row["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
        assert row["billable_units"] == pytest.approx(93 / 16)
        assert (row["qc_passed"], row["qc_face_status"], row["qc_face_value"]) == (
            False, "failed", 0.0,
        )  # fmt: skip
        assert row["first_published_at"] is None
        assert "qc face" in row["error"]
    report = (out / "report.html").read_text()
    assert 'src="_rejected/intro.mp4"' in report
    assert 'data-status="rejected" data-id="outro"' in report

    # A rerun judges the kept chunks again and pays nothing: still rejected, same cost.
    fake.reset()
    again = run_batch(config)
    assert fake.submissions == 0
    assert [(r.status, r.run_action) for r in again.results] == [("rejected", "reused")] * 2
    assert _table(tmp_path)["outro"]["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)


def test_a_rerun_keeps_every_rows_status_url_qc_and_cost(fake: FakeFal, tmp_path: Path) -> None:
    rows = write_narrations(tmp_path, {"intro": 3.0, "outro": 3.5})
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = _config(tmp_path, manifest, fake)

    first = run_batch(config)
    assert first.exit_code == 0, first.results
    before = _table(tmp_path)
    assert [before[i]["run_action"] for i in ("intro", "outro")] == ["rendered", "rendered"]
    assert before["intro"]["qc_face_status"] == "passed"
    assert before["intro"]["qc_seams_status"] == "passed"
    assert before["intro"]["first_published_at"] is not None
    assert before["intro"]["video_url"].endswith("/out/intro.mp4")

    fake.reset()
    again = run_batch(config)
    assert fake.submissions == 0
    assert again.exit_code == 0
    after = _table(tmp_path)
    for row_id in ("intro", "outro"):
        assert after[row_id]["run_action"] == "skipped"
        changed = {k for k in before[row_id] if before[row_id][k] != after[row_id][k]}
        assert changed == {"run_action"}, changed  # status, URLs, QC, first publish, cost kept

    # The narration of intro changes and the budget allows nothing: intro is failed (held back,
    # not rendered) yet still shows what its first render cost; outro stays published.
    rows[0]["audio"] = write_narrations(tmp_path, {"intro-v2": 3.2})[0]["audio"]
    write_manifest(tmp_path / "m.parquet", rows)
    held = run_batch(config.model_copy(update={"budget_usd": 0.0}))
    assert fake.submissions == 0
    assert held.exit_code == 1
    now = _table(tmp_path)
    assert (now["intro"]["status"], now["intro"]["run_action"]) == ("failed", "skipped")
    assert now["intro"]["error"].startswith("budget:")
    assert now["intro"]["cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
    assert now["intro"]["first_published_at"] == before["intro"]["first_published_at"]
    assert (now["outro"]["status"], now["outro"]["run_action"]) == ("published", "skipped")


def test_rerender_on_qc_fail_renders_once_more_with_a_derived_seed_and_never_repays(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.reset(Faults(faceless=True))
    manifest = narrated_manifest(tmp_path, {"intro": 3.0})
    config = _config(tmp_path, manifest, fake, rerender_on_qc_fail=True)

    outcome = run_batch(config)

    assert fake.submissions == 2  # the first render and one re-render, both faceless
    seeds = [p["seed"] for p in fake.payloads]
    assert seeds == [derive_seed("intro"), rerender_seed("intro", derive_seed("intro"))]
    [result] = outcome.results
    assert (result.status, result.run_action) == ("rejected", "rendered")
    sidecar = json.loads((tmp_path / "out" / "_rejected" / "intro.json").read_text())
    assert sidecar["seed"] == seeds[1]
    assert sidecar["rerender"]["first_seed"] == seeds[0]
    assert sidecar["rerender"]["first_failed"] == ["face"]
    assert sidecar["rerender"]["first_cost_usd"] == pytest.approx(ONE_SEGMENT_USD)
    assert _table(tmp_path)["intro"]["cost_usd"] == pytest.approx(2 * ONE_SEGMENT_USD)

    fake.reset()
    again = run_batch(config)
    assert fake.submissions == 0  # both renders come from the ledger
    assert (again.results[0].status, again.results[0].run_action) == ("rejected", "reused")
    assert _table(tmp_path)["intro"]["cost_usd"] == pytest.approx(2 * ONE_SEGMENT_USD)


def test_a_rerender_the_budget_cannot_pay_for_is_not_made(fake: FakeFal, tmp_path: Path) -> None:
    fake.reset(Faults(faceless=True))
    manifest = narrated_manifest(tmp_path, {"intro": 3.0})
    budget = round(ONE_SEGMENT_USD, 4) + 0.01  # the first render fits, a second does not
    config = _config(tmp_path, manifest, fake, rerender_on_qc_fail=True, budget_usd=budget)

    [result] = run_batch(config).results

    assert fake.submissions == 1
    assert result.status == "rejected"
    assert "not re-rendered: its estimate $0.87 is more than the budget has left" in result.error
    assert (tmp_path / "out" / "_rejected" / "intro.mp4").exists()


def test_cli_run_with_qc_skip_publishes_and_rejects_unknown_gates(
    fake: FakeFal, tmp_path: Path
) -> None:
    manifest = narrated_manifest(tmp_path, {"intro": 3.0})
    args = [
        "--backend",
        "fal",
        "--target",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    bad = invoke("run", manifest, *args, "--qc-skip", "face,smile")
    assert bad.exit_code == 2
    assert "unknown QC gate(s) smile" in flat(bad.output)
    assert fake.submissions == 0

    good = invoke("run", manifest, *args, "--qc-skip", "face, lipsync")
    assert good.exit_code == 0, good.output
    assert (tmp_path / "out" / "intro.mp4").exists()
    assert _table(tmp_path)["intro"]["qc_lipsync_status"] == "skipped"


def test_cli_refuses_every_row_of_a_duplicate_id_and_runs_the_rest(
    fake: FakeFal, tmp_path: Path
) -> None:
    rows = write_narrations(tmp_path, {"a": 3.0, "b": 3.0, "c": 3.0})
    rows[2]["id"] = "A"  # the same file name as "a" on macOS and Windows disks
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    checked = invoke("validate", manifest)
    assert checked.exit_code == 2
    assert flat(checked.output).count("used by rows 0, 2") == 2

    args = [
        "--backend",
        "fal",
        "--target",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    ran = invoke("run", manifest, *args)
    assert ran.exit_code == 1, ran.output
    assert fake.submissions == 1  # b only
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in table] == [
        ("a", "failed"), ("b", "published"), ("A", "failed"),
    ]  # fmt: skip
    assert "duplicate id" in table[0]["error"]


def test_cli_an_empty_manifest_is_a_clean_no_op_and_still_notifies(
    fake: FakeFal, tmp_path: Path
) -> None:
    manifest = tmp_path / "empty.csv"
    manifest.write_text("id,audio,course\n")
    checked = invoke("validate", str(manifest))
    assert checked.exit_code == 0, checked.output
    assert "no rows: nothing to do" in flat(checked.output)

    args = [
        "--backend",
        "fal",
        "--target",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    with WebHook(failures=1) as hook:  # refuses the first POST: the run retries, then it lands
        ran = invoke("run", str(manifest), *args, "--notify", hook.url)
    assert ran.exit_code == 0, ran.output
    assert len(hook.bodies) == 2
    assert (hook.bodies[-1]["rows"], hook.bodies[-1]["exit_code"]) == (0, 0)
    assert hook.bodies[-1]["results_url"].endswith("/out/results.parquet")
    assert "no rows: nothing to do" in flat(ran.output)
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.num_rows == 0
    assert table.schema.names[: len(RESULTS_SCHEMA)] == RESULTS_SCHEMA.names
    assert "<b>0</b>rows" in (tmp_path / "out" / "report.html").read_text()
    assert fake.submissions == 0
