"""Manifest stage: read a Parquet / CSV / JSON Lines manifest from any fsspec URL and validate it.

The first stage of the flow: read_manifest() → validate_manifest() → Rows to probe and plan, plus
every RowError at once so a user fixes the whole file before anything is paid for.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import posixpath
import re
import reprlib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from prefect import task
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.records import RenderParams, Row, RowError, Sidecar, json_schema
from avatarflow.tasks.redact import public_url

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # ids name output files: no separators, no dots
REQUIRED_COLUMNS = ("id", "audio")
# local paths (no scheme) are always allowed; these are the fsspec protocols the flow supports
ALLOWED_SCHEMES = frozenset(
    {"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "memory"}
)
MAX_SEGMENTS = 1000  # ~83 min of video in one request: anything longer is a typo, not a plan
SEED_MAX = 2**32 - 1
MAX_TRANSCRIPT_CHARS = 200_000  # some three hours of speech: longer is the wrong file, not a script
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# "javascript:x", "data:...", "simplecache::s3://": a scheme without "//" is still a URL, not a
# file name (one letter is left alone: it is a Windows drive)
_BARE_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
# pydantic error types → our machine-readable kinds (custom validators raise our kinds directly)
_KINDS = {
    "missing": "missing_value",
    "string_too_short": "missing_value",
    "string_pattern_mismatch": "invalid_id",
    "string_too_long": "too_long",
    "literal_error": "invalid_choice",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "finite_number": "out_of_range",
}
_CUSTOM_KINDS = frozenset({"unsupported_scheme"})
_FILE_COLUMNS = ("audio", "image")


class ManifestError(Exception):
    """The manifest as a whole cannot be used (unreadable, wrong format, missing columns)."""


def _check_location(value: str | None) -> str | None:
    """Reject URLs whose scheme the flow cannot read (local paths have no scheme)."""
    url = _SCHEME.match(value or "")
    match = url or _BARE_SCHEME.match(value or "")
    if match and (url is None or match.group(1).lower() not in ALLOWED_SCHEMES):
        allowed = ", ".join(sorted(ALLOWED_SCHEMES))
        raise PydanticCustomError(
            "unsupported_scheme",
            "unsupported URL scheme '{scheme}' (use a local path or one of: {allowed})",
            {"scheme": match.group(1), "allowed": allowed},
        )
    return value


class ManifestRow(RenderParams):
    """One manifest row as the flow accepts it (also the source of manifests/schema.json): the
    row's inputs plus the model parameters of RenderParams."""

    model_config = ConfigDict(extra="allow", title="avatarflow manifest row")

    id: str = Field(pattern=ID_PATTERN, description="Unique; names the outputs (<id>.mp4).")
    audio: str = Field(description="Narration: local path (relative to the manifest) or URL.")
    image: str | None = Field(default=None, description="Portrait → image+audio-to-video mode.")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, description="Fixed per row.")
    num_segments: int | None = Field(
        default=None, ge=1, le=MAX_SEGMENTS, description="Override; default from the audio."
    )
    transcript: str | None = Field(
        default=None,
        max_length=MAX_TRANSCRIPT_CHARS,
        description="The narration's script: captions use its exact words, timed to the speech.",
    )

    _locations = field_validator("audio", "image")(_check_location)


def _value_kind(annotation: Any) -> str:
    """What a column's cells must be, read from its ManifestRow annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = set(typing.get_args(annotation) if union else (annotation,)) - {type(None)}
    if any(a is str or typing.get_origin(a) is Literal for a in args):
        return "string"
    return "integer" if int in args else "number"


# Column → "string" | "integer" | "number": derived, so a new column is one field above.
_COLUMN_KINDS = {name: _value_kind(f.annotation) for name, f in ManifestRow.model_fields.items()}


@dataclass(frozen=True)
class ManifestCheck:
    """What validation found: the valid rows, every error, and the passthrough columns' schema."""

    rows: list[Row]
    errors: list[RowError]
    passthrough_schema: pa.Schema
    passthrough: list[dict[str, Any]] = dataclasses.field(
        default_factory=list
    )  # per row index, every row
    transcript_column: bool = False  # the manifest has one: captions default on

    def extras(self, index: int) -> dict[str, Any]:
        """The passthrough values of row `index` (also for rows that failed validation)."""
        return self.passthrough[index] if index < len(self.passthrough) else {}

    @property
    def ok(self) -> bool:
        """True when no row has a problem."""
        return not self.errors


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a manifest (Parquet, CSV or JSON Lines by extension; any fsspec URL) into a table."""
    name = url[:-3] if url.endswith(".gz") else url
    fmt = _EXTENSIONS.get(posixpath.splitext(name.split("?", 1)[0])[1].lower())
    if fmt is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise ManifestError(f"{url}: unknown manifest format (expected one of {known})")
    try:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ManifestError(f"{url}: manifest not found") from exc
    except OSError as exc:
        raise ManifestError(f"{url}: cannot read manifest ({exc})") from exc
    try:
        table = _PARSERS[fmt](data)
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{url}: not a readable {fmt} manifest ({exc})") from exc
    _check_columns(table, url)
    return table


def _parse_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def _parse_csv(data: bytes) -> pa.Table:
    # known text columns stay text ("007" is an id, not 7); empty cells become nulls
    convert = pa_csv.ConvertOptions(
        column_types={n: pa.string() for n, kind in _COLUMN_KINDS.items() if kind == "string"},
        strings_can_be_null=True,
    )
    return pa_csv.read_csv(io.BytesIO(data), convert_options=convert)


def _parse_jsonl(data: bytes) -> pa.Table:
    """Parse JSON Lines (or one JSON array); a column with mixed value types becomes text."""
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {number}: {exc}") from exc
    if not all(isinstance(r, dict) for r in records):
        raise ValueError("every JSON line must be an object")
    if not records:  # an empty file is an empty manifest, not one without columns
        return pa.table({name: pa.array([], pa.string()) for name in REQUIRED_COLUMNS})
    names = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({n: _json_column([r.get(n) for r in records]) for n in names})


def _json_column(values: list[Any]) -> pa.Array:
    bools = {isinstance(v, bool) for v in values if v is not None}
    if len(bools) < 2:  # Arrow would quietly turn `true` into 1.0 beside floats
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # mixed types or ints beyond int64: each bad cell is reported by validation
    return pa.array([None if v is None else _as_text(v) for v in values], pa.string())


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


_PARSERS = {"parquet": _parse_parquet, "csv": _parse_csv, "jsonl": _parse_jsonl}


def _check_columns(table: pa.Table, url: str) -> None:
    """Raise ManifestError for missing required columns or types no value could be coerced from."""
    problems = [
        f"missing required column '{c}'" for c in REQUIRED_COLUMNS if c not in table.schema.names
    ]
    if len(set(table.schema.names)) != len(table.schema.names):
        problems.append("duplicate column names")
    for field in table.schema:
        expected = _COLUMN_KINDS.get(field.name)
        if expected and not _coercible(field.type, expected):
            problems.append(f"column '{field.name}' has type {field.type}, expected {expected}")
    if problems:
        raise ManifestError(f"{url}: " + "; ".join(problems))


def _coercible(arrow_type: pa.DataType, expected: str) -> bool:
    """Whether values of arrow_type can become `expected` (per-value failures are row errors)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    textual = pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if pa.types.is_null(arrow_type) or textual or pa.types.is_integer(arrow_type):
        return True
    return expected != "string" and pa.types.is_floating(arrow_type)


def validate_manifest(
    table: pa.Table, manifest_url: str, *, check_files: bool = False
) -> ManifestCheck:
    """Check every row against the manifest contract; report all problems at once.

    A manifest without rows is valid (nothing to do). With check_files, local audio/image files
    must exist and be non-empty regular files (a cheap stat per row; remote URLs are not fetched
    here, probing does that).
    """
    _check_columns(table, manifest_url)
    known = [n for n in table.schema.names if n in ManifestRow.model_fields]
    extras = [n for n in table.schema.names if n not in ManifestRow.model_fields]
    values = {n: _column_values(table, n) for n in known}
    passthrough = {n: table.column(n).to_pylist() for n in extras}
    rows: list[Row] = []
    errors: list[RowError] = []
    ids = [v if isinstance(v, str) else None for v in values["id"]]
    duplicates = _duplicates(ids)
    for i in range(table.num_rows):
        record = {n: values[n][i] for n in known}
        row_id = ids[i]
        valid, row_errors = _validate_record(i, row_id, record)
        row_errors += [duplicates[i]] if i in duplicates else []
        if valid is not None and not row_errors:
            row = _make_row(i, valid, {n: passthrough[n][i] for n in extras}, manifest_url)
            row_errors = _file_errors(row) if check_files else []
            rows += [] if row_errors else [row]
        errors.extend(row_errors)
    schema = pa.schema([table.schema.field(n) for n in extras])
    per_row = [{n: passthrough[n][i] for n in extras} for i in range(table.num_rows)]
    return ManifestCheck(rows, errors, schema, per_row, "transcript" in table.schema.names)


def _duplicates(ids: list[str | None]) -> dict[int, RowError]:
    """An error for every row whose id another row also uses: none of them is rendered, since
    which one was meant cannot be known. Ids must differ beyond case: Intro.mp4 and intro.mp4
    collide on macOS and Windows disks."""
    uses: dict[str, list[int]] = {}
    for index, row_id in enumerate(ids):
        if row_id is not None:
            uses.setdefault(row_id.casefold(), []).append(index)
    errors = {}
    for rows in uses.values():
        if len(rows) < 2:
            continue
        spellings = list(dict.fromkeys(ids[i] for i in rows))
        case = " (ids compare case-insensitively)" if len(spellings) > 1 else ""
        listed = ", ".join(str(i) for i in rows)
        for index in rows:
            reason = f"duplicate id '{ids[index]}': used by rows {listed}{case}; none is rendered"
            errors[index] = RowError(index, ids[index], "id", reason, "duplicate_id")
    return errors


def _file_errors(row: Row) -> list[RowError]:
    """Missing, empty or non-file local inputs of a valid row (remote URLs are left to probing)."""
    errors = []
    for column in _FILE_COLUMNS:
        location = getattr(row, column)
        match = _SCHEME.match(location or "")
        if not location or (match and match.group(1).lower() != "file"):
            continue
        path = Path(location[match.end() :] if match else location)
        if not path.exists():
            problem = (f"{location}: not found", "missing")
        elif not path.is_file():
            problem = (f"{location}: is a directory or special file, not a file", "not_a_file")
        elif path.stat().st_size == 0:
            problem = (f"{location}: file is empty (0 bytes)", "empty")
        else:
            continue
        errors.append(RowError(row.index, row.id, column, *problem))
    return errors


def _column_values(table: pa.Table, name: str) -> list[Any]:
    """Python values of a known column; integers become text in text columns."""
    column = table.column(name)
    if _COLUMN_KINDS[name] == "string" and pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    values: list[Any] = column.to_pylist()
    return values


def _present(record: dict[str, Any]) -> dict[str, Any]:
    """Drop missing cells (None, NaN as pandas writes it, empty text) so defaults apply."""
    return {
        k: v
        for k, v in record.items()
        if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))
    }


def _validate_record(
    index: int, row_id: str | None, record: dict[str, Any]
) -> tuple[ManifestRow | None, list[RowError]]:
    try:
        return ManifestRow.model_validate(_present(record)), []
    except ValidationError as exc:
        return None, [_to_row_error(index, row_id, e) for e in exc.errors()]


def _to_row_error(index: int, row_id: str | None, error: Any) -> RowError:
    """Turn one pydantic error into a RowError with our kind and a reason naming the value."""
    column = str(error["loc"][0]) if error["loc"] else None
    kind = _KINDS.get(error["type"], error["type"])
    if kind not in _KINDS.values() and kind not in _CUSTOM_KINDS:
        kind = "wrong_type"  # int_parsing, float_type, int_from_float, string_type, ...
    value = error.get("input")
    got = reprlib.repr(public_url(value) if column in _FILE_COLUMNS else value)
    if kind == "missing_value":
        reason = "required value is missing or empty"
    elif kind == "invalid_id":
        reason = f"id must match {ID_PATTERN} because it names output files (got {got})"
    else:
        reason = f"{error['msg']} (got {got})"
    return RowError(index, row_id, column, reason, kind)


def _make_row(index: int, valid: ManifestRow, extra: dict[str, Any], manifest_url: str) -> Row:
    return Row(
        index=index,
        id=valid.id,
        audio=resolve_location(valid.audio, manifest_url),
        params=RenderParams(**valid.model_dump(include=set(RenderParams.model_fields))),
        image=resolve_location(valid.image, manifest_url) if valid.image else None,
        seed=valid.seed,
        num_segments=valid.num_segments,
        extra=extra,
        transcript=valid.transcript if valid.transcript and valid.transcript.strip() else None,
    )


def resolve_location(value: str, manifest_url: str) -> str:
    """Resolve a relative local path against the manifest's folder (local or remote manifest)."""
    if _SCHEME.match(value) or os.path.isabs(value):
        return value
    match = _SCHEME.match(manifest_url)
    if match is None or match.group(1).lower() == "file":
        local = manifest_url[len("file://") :] if match else manifest_url
        return os.path.normpath(os.path.join(Path(local).resolve().parent, value))
    if match.group(1).lower() in ("http", "https"):
        return urljoin(manifest_url, value)
    parent = posixpath.dirname(manifest_url[match.end() :])
    return f"{match.group(1)}://{posixpath.normpath(posixpath.join(parent, value))}"


def manifest_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of one manifest row (what manifests/schema.json holds)."""
    schema = ManifestRow.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def write_schema(path: str | Path, schema: dict[str, Any] | None = None) -> None:
    """Write a JSON Schema (default: the manifest row's) to path as stable, indented JSON."""
    schema = manifest_json_schema() if schema is None else schema
    Path(path).write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")


@task(name="load-manifest")
def load_rows(config: BatchConfig) -> ManifestCheck:
    """Read and validate the run's manifest (a ManifestError fails the whole run)."""
    return validate_manifest(read_manifest(config.manifest), config.manifest, check_files=True)


def _main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m avatarflow.tasks.manifest", description=__doc__
    )
    parser.add_argument("--write-schema", metavar="PATH", help="write the manifest row schema")
    parser.add_argument("--write-sidecar-schema", metavar="PATH", help="write the sidecar schema")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.write_schema:
        write_schema(args.write_schema)
    if args.write_sidecar_schema:
        write_schema(args.write_sidecar_schema, json_schema(Sidecar))


if __name__ == "__main__":
    _main()
