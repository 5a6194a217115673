"""Tests for tasks/manifest.py: reading every format, every validation class, path resolution."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avatarflow.tasks.manifest import (
    ManifestError,
    manifest_json_schema,
    read_manifest,
    resolve_location,
    validate_manifest,
    write_schema,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"


def _table(**columns: list) -> pa.Table:
    base = {"id": ["r0"], "audio": ["a.wav"]}
    return pa.table({**base, **columns})


def _errors(table: pa.Table) -> list[tuple[int | None, str | None, str]]:
    return [(e.row, e.column, e.kind) for e in validate_manifest(table, "/m/x.parquet").errors]


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [
        ("id", "../x", "invalid_id"),
        ("id", "/abs", "invalid_id"),
        ("id", "a/b", "invalid_id"),
        ("id", "a\\b", "invalid_id"),
        ("id", ".hidden", "invalid_id"),
        ("id", "x" * 129, "invalid_id"),
        ("id", "", "missing_value"),
        ("id", None, "missing_value"),
        ("audio", "", "missing_value"),
        ("audio", None, "missing_value"),
        ("audio", "ftp://host/a.wav", "unsupported_scheme"),
        ("image", "javascript://alert", "unsupported_scheme"),
        ("resolution", "1080p", "invalid_choice"),
        ("seed", "abc", "wrong_type"),
        ("seed", "-1", "out_of_range"),
        ("seed", str(2**32), "out_of_range"),
        ("num_segments", "0", "out_of_range"),
        ("num_segments", "1001", "out_of_range"),
        ("num_inference_steps", "0", "out_of_range"),
        ("num_inference_steps", "201", "out_of_range"),
        ("text_guidance_scale", "inf", "out_of_range"),
        ("audio_guidance_scale", "-0.5", "out_of_range"),
        ("audio_guidance_scale", "20.5", "out_of_range"),
        ("prompt", "p" * 2001, "too_long"),
        ("negative_prompt", "n" * 2001, "too_long"),
        ("transcript", "t" * 200_001, "too_long"),
    ],
)
def test_each_problem_is_reported_with_its_kind_and_column(
    column: str, value: object, kind: str
) -> None:
    table = _table(**{column: pa.array([value], pa.string())})
    assert _errors(table) == [(0, column, kind)]


@pytest.mark.parametrize(
    ("column", "array"),
    [
        ("seed", pa.array([1.5])),
        ("num_segments", pa.array([2.25])),
        ("text_guidance_scale", pa.array(["lots"])),
    ],
)
def test_values_that_cannot_become_numbers_are_wrong_type(column: str, array: pa.Array) -> None:
    assert _errors(_table(**{column: array})) == [(0, column, "wrong_type")]


def test_valid_values_at_the_bounds_are_accepted() -> None:
    table = _table(
        seed=pa.array([2**32 - 1], pa.uint32()),
        num_segments=pa.array([1000]),
        num_inference_steps=pa.array([1]),
        text_guidance_scale=pa.array([0.0]),
        audio_guidance_scale=pa.array([20]),
        resolution=["720p"],
        prompt=["p" * 2000],
    )
    check = validate_manifest(table, "/m/x.parquet")
    assert check.errors == []
    row = check.rows[0]
    assert (row.seed, row.num_segments, row.params.audio_guidance_scale) == (2**32 - 1, 1000, 20.0)
    assert row.params.num_inference_steps == 1
    assert row.params.text_guidance_scale == 0.0
    assert row.params.prompt == "p" * 2000
    assert row.resolution == row.params.resolution == "720p"


def test_missing_cells_take_defaults_and_pandas_nan_counts_as_missing() -> None:
    table = pa.table(
        {
            "id": ["a", "b"],
            "audio": ["a.wav", "b.wav"],
            "seed": pa.array([float("nan"), 3.0]),
            "resolution": [None, ""],
            "prompt": ["", None],
        }
    )
    rows = validate_manifest(table, "/m/x.parquet").rows
    assert [(r.seed, r.resolution, r.params.prompt) for r in rows] == [
        (None, "480p", None),
        (3, "480p", None),
    ]


def test_all_problems_are_reported_at_once() -> None:
    table = pa.table(
        {
            "id": ["ok", "bad/id", "ok", "fine", None],
            "audio": ["a.wav", "b.wav", "c.wav", "gopher://x", "e.wav"],
            "seed": pa.array(["1", "2", "x", "4", "-5"]),
            "resolution": ["480p", "4k", None, None, None],
        }
    )
    check = validate_manifest(table, "/m/x.parquet")
    found = {(e.row, e.column, e.kind) for e in check.errors}
    assert found == {
        (0, "id", "duplicate_id"),
        (1, "id", "invalid_id"),
        (1, "resolution", "invalid_choice"),
        (2, "seed", "wrong_type"),
        (2, "id", "duplicate_id"),
        (3, "audio", "unsupported_scheme"),
        (4, "id", "missing_value"),
        (4, "seed", "out_of_range"),
    }
    assert check.rows == []  # "ok" is used twice: neither row is rendered
    assert all(e.reason for e in check.errors)
    assert not check.ok


def test_every_row_of_a_duplicate_id_is_refused_naming_all_its_rows() -> None:
    table = pa.table({"id": ["a", "b", "a", "a"], "audio": ["1.wav", "2.wav", "3.wav", "4.wav"]})
    check = validate_manifest(table, "/m/x.parquet")
    assert [(e.row, e.kind) for e in check.errors] == [
        (0, "duplicate_id"),
        (2, "duplicate_id"),
        (3, "duplicate_id"),
    ]
    assert all("rows 0, 2, 3" in e.reason for e in check.errors)
    assert [r.index for r in check.rows] == [1]


def test_ids_that_differ_only_in_case_are_duplicates() -> None:
    table = pa.table({"id": ["Intro", "outro", "intro"], "audio": ["1.wav", "2.wav", "3.wav"]})
    check = validate_manifest(table, "/m/x.parquet")
    assert [(e.row, e.id, e.kind) for e in check.errors] == [
        (0, "Intro", "duplicate_id"),
        (2, "intro", "duplicate_id"),
    ]
    assert all("rows 0, 2" in e.reason and "case" in e.reason for e in check.errors)
    assert [r.id for r in check.rows] == ["outro"]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("m.csv", b"id,audio,course\n"),
        ("m.jsonl", b""),
        ("m.parquet", None),
    ],
)
def test_a_manifest_without_rows_is_valid_and_empty(
    tmp_path: Path, name: str, content: bytes | None
) -> None:
    path = tmp_path / name
    if content is None:
        pq.write_table(
            pa.table({"id": pa.array([], pa.string()), "audio": pa.array([], pa.string())}), path
        )
    else:
        path.write_bytes(content)
    check = validate_manifest(read_manifest(str(path)), str(path), check_files=True)
    assert (check.rows, check.errors) == ([], [])
    assert check.ok


def test_passthrough_columns_keep_values_and_arrow_types() -> None:
    extra_types = {
        "course": pa.string(),
        "lesson": pa.int16(),
        "weight": pa.float32(),
        "tags": pa.list_(pa.string()),
        "meta": pa.struct([("lang", pa.string())]),
    }
    table = pa.table(
        {
            "id": ["a"],
            "audio": ["a.wav"],
            "course": pa.array(["c1"], extra_types["course"]),
            "lesson": pa.array([7], extra_types["lesson"]),
            "weight": pa.array([0.5], extra_types["weight"]),
            "tags": pa.array([["x", "y"]], extra_types["tags"]),
            "meta": pa.array([{"lang": "de"}], extra_types["meta"]),
        }
    )
    check = validate_manifest(table, "/m/x.parquet")
    assert {f.name: f.type for f in check.passthrough_schema} == extra_types
    assert check.rows[0].extra == {
        "course": "c1",
        "lesson": 7,
        "weight": 0.5,
        "tags": ["x", "y"],
        "meta": {"lang": "de"},
    }


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_examples_match_parquet(fmt: str) -> None:
    def rows(name: str) -> list:
        url = str(EXAMPLES / name)
        return validate_manifest(read_manifest(url), url).rows

    expected = rows("demo.parquet")
    assert len(expected) == 3
    assert rows(f"demo.{fmt}") == expected


def test_example_manifests_validate_and_point_at_existing_files() -> None:
    for name in ("demo.parquet", "demo_ai2v.parquet"):
        url = str(EXAMPLES / name)
        check = validate_manifest(read_manifest(url), url)
        assert check.ok, check.errors
        for row in check.rows:
            assert Path(row.audio).is_file()
            assert row.image is None or Path(row.image).is_file()


def test_csv_ids_stay_text_and_bad_cells_are_row_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,audio,seed,extra\n007,a.wav,5,1\n008,b.wav,five,2\n")
    check = validate_manifest(read_manifest(str(path)), str(path))
    assert [r.id for r in check.rows] == ["007"]
    assert [(e.row, e.column, e.kind) for e in check.errors] == [(1, "seed", "wrong_type")]


def test_jsonl_with_mixed_types_reports_each_bad_cell(tmp_path: Path) -> None:
    path = tmp_path / "m.ndjson"
    lines = [{"id": "a", "audio": "a.wav", "seed": 1}, {"id": "b", "audio": "b.wav", "seed": "x"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    check = validate_manifest(read_manifest(str(path)), str(path))
    assert [r.seed for r in check.rows] == [1]
    assert [(e.row, e.column, e.kind) for e in check.errors] == [(1, "seed", "wrong_type")]


def test_gzipped_csv_and_json_array_manifests_are_read(tmp_path: Path) -> None:
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(b"id,audio\na,a.wav\n"))
    (tmp_path / "m.json").write_text(json.dumps([{"id": "a", "audio": "a.wav"}]))
    for name in ("m.csv.gz", "m.json"):
        url = str(tmp_path / name)
        assert [r.audio for r in validate_manifest(read_manifest(url), url).rows] == [
            str(tmp_path / "a.wav")
        ]


def test_manifest_is_read_from_an_fsspec_url_and_paths_resolve_beside_it() -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/batches/b1/m.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a"], "audio": ["../audio/a.wav"]}), f)
    url = "memory://batches/b1/m.parquet"
    check = validate_manifest(read_manifest(url), url)
    assert check.rows[0].audio == "memory://batches/audio/a.wav"


@pytest.mark.parametrize(
    ("value", "manifest", "expected"),
    [
        ("a.wav", "/data/m.parquet", "/data/a.wav"),
        ("sub/../b.wav", "file:///data/m.csv", "/data/b.wav"),
        ("/abs/c.wav", "s3://bucket/m.parquet", "/abs/c.wav"),
        ("c.wav", "s3://bucket/dir/m.parquet", "s3://bucket/dir/c.wav"),
        ("../c.wav", "gs://bucket/dir/m.parquet", "gs://bucket/c.wav"),
        ("c.wav", "https://host/x/m.jsonl?sig=1", "https://host/x/c.wav"),
        ("s3://other/d.wav", "/data/m.parquet", "s3://other/d.wav"),
    ],
)
def test_relative_paths_resolve_against_the_manifest_folder(
    value: str, manifest: str, expected: str
) -> None:
    assert resolve_location(value, manifest) == expected


def test_relative_local_manifest_resolves_to_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_location("a.wav", "sub/m.parquet") == str(tmp_path / "sub" / "a.wav")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.parquet", None, "not a readable parquet manifest"),
        ("m.csv", b"id,seed\na,1\n", "missing required column 'audio'"),
        ("m.xlsx", b"PK", "unknown manifest format"),
        ("m.jsonl", b'{"id": "a", "audio": "x"}\n{broken\n', "line 2"),
        ("missing.parquet", b"", "not found"),
    ],
)
def test_unusable_manifests_raise_manifest_error(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is None:  # a Parquet file cut off half way
        pq.write_table(pa.table({"id": ["a"] * 50, "audio": ["x.wav"] * 50}), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif name != "missing.parquet":
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_columns_of_uncoercible_types_raise_manifest_error(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["a"],
            "audio": [["a.wav"]],
            "seed": pa.array([True]),
            "text_guidance_scale": pa.array([{"x": 1.0}]),
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    for column in ("audio", "seed", "text_guidance_scale"):
        assert f"column '{column}'" in str(info.value)


def test_integer_ids_are_accepted_as_text() -> None:
    check = validate_manifest(pa.table({"id": [1, 2], "audio": ["a", "b"]}), "/m/x.parquet")
    assert [r.id for r in check.rows] == ["1", "2"]


def test_committed_schema_matches_the_generated_one(tmp_path: Path) -> None:
    committed = json.loads((ROOT / "manifests" / "schema.json").read_text())
    assert committed == manifest_json_schema()
    write_schema(tmp_path / "schema.json")
    assert (tmp_path / "schema.json").read_text() == (ROOT / "manifests/schema.json").read_text()


def test_schema_describes_the_contract() -> None:
    schema = manifest_json_schema()
    assert schema["required"] == ["id", "audio"]
    assert schema["additionalProperties"] is True
    seed = next(s for s in schema["properties"]["seed"]["anyOf"] if s["type"] == "integer")
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    assert math.isclose(schema["properties"]["text_guidance_scale"]["anyOf"][0]["maximum"], 20.0)


def test_transcripts_reach_their_rows_and_blank_ones_count_as_absent() -> None:
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "audio": ["a.wav", "b.wav", "c.wav"],
            "transcript": ["Hello, world.", None, "   "],
        }
    )
    check = validate_manifest(table, "/m/x.parquet")
    assert check.ok
    assert check.transcript_column
    assert [r.transcript for r in check.rows] == ["Hello, world.", None, None]
    assert "transcript" not in check.passthrough_schema.names  # a known column, not passthrough
    assert not validate_manifest(_table(), "/m/x.parquet").transcript_column


def test_a_transcript_column_that_is_no_text_is_refused_naming_the_column() -> None:
    table = pa.table({"id": ["a"], "audio": ["a.wav"], "transcript": [{"text": "hi"}]})
    with pytest.raises(ManifestError, match="column 'transcript' has type struct"):
        validate_manifest(table, "/m/x.parquet")
