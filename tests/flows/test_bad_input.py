"""Bad input, end to end: every broken row fails alone, with its column and kind, before any spend.

One mixed manifest holds the whole per-row corpus and goes through `avatarflow run` once (one
Prefect run against the loopback fal service); the valid rows beside the broken ones must publish.
Manifests that are broken as a whole exit 2 from the CLI without dispatching anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.manifest import read_manifest, validate_manifest
from avatarflow.tasks.plan import PlanError, prepare_row
from tests.cli import flat, invoke
from tests.factories import write_manifest
from tests.fakes.fal_server import FakeFal
from tests.media_factory import (
    write_corrupt_audio,
    write_empty_file,
    write_image,
    write_narration,
    write_not_audio,
    write_silence,
    write_truncated_image,
)


@dataclass(frozen=True)
class Case:
    """One manifest row and the error it must produce: at validation or when planned."""

    row: dict[str, Any]
    column: str
    kind: str
    stage: str = "validate"  # or "plan": found by probing the audio / image, still before spend


def _v(column: str, kind: str, **row: Any) -> Case:
    return Case({"id": "r", "audio": "media/ok.wav", **row}, column, kind)


def _p(column: str, kind: str, **row: Any) -> Case:
    return Case({"id": "r", "audio": "media/ok.wav", **row}, column, kind, "plan")


VALID = [
    {"id": "ok-1", "audio": "media/ok.wav", "seed": 7},
    {"id": "ok-2", "audio": "media/ok2.mp3", "image": "media/face.png"},
    {"id": "ok.3_x-Y", "audio": "media/ok.wav", "seed": 2**32 - 1, "num_segments": 2},
]
CASES = {
    # every row of an id used more than once is refused, the first one too
    "duplicate id": _v("id", "duplicate_id", id="twin"),
    "duplicate id again": _v("id", "duplicate_id", id="twin"),
    "duplicate id differing in case": _v("id", "duplicate_id", id="TWIN"),
    "parent escape": _v("id", "invalid_id", id="../x"),
    "absolute id": _v("id", "invalid_id", id="/abs"),
    "slash": _v("id", "invalid_id", id="a/b"),
    "backslash": _v("id", "invalid_id", id="a\\b"),
    "dot dot": _v("id", "invalid_id", id=".."),
    "hidden": _v("id", "invalid_id", id=".hidden"),
    "cyrillic lookalike": _v("id", "invalid_id", id="\u0430bc"),
    "fullwidth lookalike": _v("id", "invalid_id", id="\uff41bc"),
    "129 chars": _v("id", "invalid_id", id="x" * 129),
    "trailing newline": _v("id", "invalid_id", id="abc\n"),
    "null id": _v("id", "missing_value", id=None),
    "empty id": _v("id", "missing_value", id=""),
    "null audio": _v("audio", "missing_value", id="no-audio", audio=None),
    "empty audio": _v("audio", "missing_value", id="blank-audio", audio=""),
    "seed text": _v("seed", "wrong_type", id="seed-text", seed="abc"),
    "seed float": _v("seed", "wrong_type", id="seed-float", seed=1.5),
    "seed bool": _v("seed", "wrong_type", id="seed-bool", seed=True),
    "seed 2^40": _v("seed", "out_of_range", id="seed-big", seed=2**40),
    "seed 2^70": _v("seed", "out_of_range", id="seed-huge", seed=2**70),
    "seed negative": _v("seed", "out_of_range", id="seed-neg", seed=-1),
    "segments 10^6": _v("num_segments", "out_of_range", id="seg-big", num_segments=10**6),
    "segments 0": _v("num_segments", "out_of_range", id="seg-zero", num_segments=0),
    "steps 10^4": _v("num_inference_steps", "out_of_range", id="steps", num_inference_steps=10**4),
    "guidance high": _v("text_guidance_scale", "out_of_range", id="tg", text_guidance_scale=25),
    "guidance negative": _v(
        "audio_guidance_scale", "out_of_range", id="ag", audio_guidance_scale=-1
    ),
    "resolution": _v("resolution", "invalid_choice", id="res", resolution="1080p"),
    "enormous prompt": _v("prompt", "too_long", id="essay", prompt="blah " * 50_000),
    "ftp audio": _v("audio", "unsupported_scheme", id="ftp", audio="ftp://host/a.wav"),
    "javascript audio": _v("audio", "unsupported_scheme", id="js", audio="javascript:alert(1)"),
    "data audio": _v("audio", "unsupported_scheme", id="data", audio="data:audio/wav;base64,UklG"),
    "ftp image with password": _v(
        "image", "unsupported_scheme", id="ftp-img", image="ftp://me:hunter22@h/face.png"
    ),
    "file url to nothing": _v("audio", "missing", id="file-url", audio="file:///nonexistent/a.wav"),
    "missing audio": _v("audio", "missing", id="ghost", audio="media/nope.wav"),
    "empty audio file": _v("audio", "empty", id="empty", audio="media/empty.wav"),
    "audio is a directory": _v("audio", "not_a_file", id="folder", audio="media/sub"),
    "missing image": _v("image", "missing", id="no-face", image="media/nope.png"),
    "too short": _p("audio", "too_short", id="blip", audio="media/blip.wav"),
    "silent": _p("audio", "silent", id="hush", audio="media/hush.wav"),
    "corrupt": _p("audio", "corrupt", id="noise", audio="media/corrupt.wav"),
    "png as audio": _p("audio", "not_audio", id="png-audio", audio="media/picture.png"),
    "text as audio": _p("audio", "not_audio", id="txt-audio", audio="media/notes.txt"),
    "text named .png": _p("image", "not_image", id="txt-img", image="media/fake.png"),
    "truncated png": _p("image", "not_image", id="cut-img", image="media/cut.png"),
    "too few segments": _p(
        "num_segments", "too_few_segments", id="few", audio="media/long.wav", num_segments=1
    ),
}


def _media(folder: Path) -> None:
    """Every input file the corpus points at, good and bad."""
    media = folder / "media"
    (media / "sub").mkdir(parents=True)
    write_narration(media / "ok.wav", 2.0)
    write_narration(media / "ok2.mp3", 3.0, "mp3", seed=1)
    write_narration(media / "blip.wav", 0.3)
    write_narration(media / "long.wav", 8.0)
    write_silence(media / "hush.wav", 2.0)
    write_corrupt_audio(media / "corrupt.wav")
    write_not_audio(media / "picture.png")
    write_not_audio(media / "notes.txt")
    write_not_audio(media / "fake.txt").rename(media / "fake.png")
    write_empty_file(media / "empty.wav")
    write_image(media / "face.png")
    write_truncated_image(media / "cut.png")


def _corpus(folder: Path) -> tuple[str, list[dict[str, Any]], dict[int, Case]]:
    """The mixed JSONL manifest: valid rows at the start, middle and end, each case in between."""
    cases = list(CASES.values())
    rows = [
        VALID[0],
        *(c.row for c in cases[:20]),
        VALID[1],
        *(c.row for c in cases[20:]),
        VALID[2],
    ]
    expected = {i: c for i, row in enumerate(rows) for c in cases if row is c.row}
    return write_manifest(folder / "manifest.jsonl", rows), rows, expected


@pytest.mark.usefixtures("prefect_server")
def test_every_bad_row_fails_alone_with_its_column_and_kind(tmp_path: Path, fake: FakeFal) -> None:
    _media(tmp_path)
    manifest, rows, expected = _corpus(tmp_path)
    target, work = tmp_path / "out", tmp_path / "work"
    check = validate_manifest(read_manifest(manifest), manifest, check_files=True)
    found = sorted((e.row, e.column, e.kind) for e in check.errors)
    assert found == sorted(
        (i, c.column, c.kind) for i, c in expected.items() if c.stage == "validate"
    )
    errors = {e.row: str(e) for e in check.errors}
    args = ["--backend", "fal", "--target", str(target), "--work-dir", str(work)]
    result = invoke("run", manifest, *args)
    assert result.exit_code == 1, result.output
    assert fake.submissions == len(VALID)  # one chunk each: nothing paid for a broken row
    config = BatchConfig(manifest=manifest, backend="fal", work_dir=str(work))
    table = pq.read_table(target / "results.parquet").to_pylist()
    assert len(table) == len(rows)
    for i, row in enumerate(rows):
        case = expected.get(i)
        if case is None:
            assert table[i]["status"] == "published", table[i]["error"]
            assert (target / f"{row['id']}.mp4").is_file()
        elif case.stage == "validate":
            assert (table[i]["status"], table[i]["error"]) == ("failed", errors[i])
        else:
            planned = next(r for r in check.rows if r.index == i)
            with pytest.raises(PlanError) as failure:
                prepare_row.fn(planned, config)
            assert (failure.value.error.column, failure.value.error.kind) == (
                case.column,
                case.kind,
            )
            assert (table[i]["status"], table[i]["error"]) == (
                "failed",
                f"PlanError: {failure.value}",
            )
    # Nothing but the valid rows' outputs was written, inside the target or beside it.
    published = {f"{r['id']}{ext}" for r in VALID for ext in (".mp4", ".json")}
    names = {p.name for p in target.iterdir()}
    assert names == published | {"results.parquet", "report.html", ".avatarflow"}
    assert {p.name for p in tmp_path.iterdir()} == {"media", "manifest.jsonl", "out", "work"}
    assert "hunter22" not in result.output + json.dumps(table, default=str)


def test_every_row_error_names_its_row_column_and_reason(tmp_path: Path) -> None:
    _media(tmp_path)
    manifest, _, expected = _corpus(tmp_path)
    check = validate_manifest(read_manifest(manifest), manifest, check_files=True)
    for error in check.errors:
        text = str(error)
        assert text.startswith(f"row {error.row}")
        assert f"column '{expected[error.row].column}': " in text
        assert len(error.reason) > 10
        assert len(text) < 600  # an enormous prompt is quoted only in part
    assert not any("hunter22" in str(e) for e in check.errors)


@pytest.mark.parametrize(
    ("column", "values", "kinds"),
    [
        ("audio_guidance_scale", [1.5, True], [None, "wrong_type"]),  # not quietly 1.0
        ("seed", [True, 3], ["wrong_type", None]),
        ("seed", [1, 2**70], [None, "out_of_range"]),  # beyond int64: a row error, not a crash
        ("num_segments", [2**64, None], ["out_of_range", None]),
    ],
)
def test_json_values_of_the_wrong_type_fail_only_their_own_row(
    tmp_path: Path, column: str, values: list[Any], kinds: list[str | None]
) -> None:
    write_narration(tmp_path / "a.wav", 1.0)
    rows = [{"id": f"r{i}", "audio": "a.wav", column: v} for i, v in enumerate(values)]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    check = validate_manifest(read_manifest(path), path, check_files=True)
    found = {e.row: (e.column, e.kind) for e in check.errors}
    assert found == {i: (column, kind) for i, kind in enumerate(kinds) if kind}
    assert [r.index for r in check.rows] == [i for i, kind in enumerate(kinds) if not kind]


def _truncated_parquet(path: Path) -> None:
    write_manifest(path, [{"id": f"r{i}", "audio": "a.wav"} for i in range(50)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN_MANIFESTS = {
    "no-audio.parquet": (
        lambda p: write_manifest(p, [{"id": "a"}]),
        "missing required column 'audio'",
    ),
    "no-id.csv": (lambda p: p.write_text("audio\na.wav\n"), "missing required column 'id'"),
    "bool.parquet": (
        lambda p: write_manifest(p, [{"id": "a", "audio": "a.wav", "seed": True}]),
        "column 'seed' has type bool, expected integer",
    ),
    "list.parquet": (
        lambda p: write_manifest(p, [{"id": "a", "audio": ["a.wav"]}]),
        "column 'audio' has type list",
    ),
    "cut.parquet": (_truncated_parquet, "not a readable parquet manifest"),
    "garbage.csv": (lambda p: p.write_bytes(b"\xff\xfe\x00junk\x00\n\x81,\x82\n"), "garbage.csv"),
    "garbage.jsonl": (lambda p: p.write_text('{"id": "a", "audio": \n'), "not a readable jsonl"),
    "scalars.jsonl": (lambda p: p.write_text("1\n2\n"), "every JSON line must be an object"),
    "sheet.xlsx": (lambda p: p.write_bytes(b"PK\x03\x04"), "unknown manifest format"),
}


@pytest.mark.parametrize("name", list(BROKEN_MANIFESTS))
def test_structurally_broken_manifests_exit_2_from_validate_and_run(
    tmp_path: Path, name: str
) -> None:
    make, message = BROKEN_MANIFESTS[name]
    path, out = tmp_path / name, tmp_path / "out"
    make(path)
    for args in (["validate", str(path)], ["run", str(path), "--target", str(out)]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "manifest error" in result.output
        assert message in flat(result.output)
    assert not out.exists()


def test_a_manifest_without_rows_is_valid_and_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("id,audio\n")
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "the manifest has no rows: nothing to do" in flat(result.output)
    assert "ok: 0 row(s)" in result.output


def test_all_invalid_manifest_exits_2_and_validate_lists_every_row(tmp_path: Path) -> None:
    rows = [
        {"id": "../up", "audio": "a.wav", "seed": "1"},
        {"id": "b", "audio": "ftp://h/a.wav", "seed": "x"},
        {"id": "c", "audio": "a.wav", "seed": str(2**40)},
    ]
    write_manifest(tmp_path / "bad.parquet", rows)
    manifest = str(tmp_path / "bad.parquet")
    run = invoke("run", manifest, "--target", str(tmp_path / "out"))
    assert run.exit_code == 2, run.output
    assert "no valid rows" in run.output
    assert not (tmp_path / "out").exists()
    text = flat(invoke("validate", manifest).output)
    assert "row 0 (id=../up), column 'id'" in text
    assert "row 1 (id=b), column 'audio': unsupported URL scheme 'ftp'" in text
    assert "row 1 (id=b), column 'seed'" in text
    assert "row 2 (id=c), column 'seed'" in text
    assert "no valid rows" in text


def test_manifest_text_that_looks_like_markup_is_printed_verbatim(tmp_path: Path) -> None:
    rows = [{"id": "[/red]", "audio": "a.wav"}, {"id": "ok", "audio": "a.wav"}]
    write_manifest(tmp_path / "m.parquet", rows)
    result = invoke("validate", str(tmp_path / "m.parquet"))
    assert result.exit_code == 2
    assert "'[/red]'" in result.output
