"""Test factories: rows, audio infos and row plans as the stages hand them on, and manifests.

Media (narrations, images, broken files) come from tests/media_factory.py; this module builds the
records and manifest files around them, so a change of a record's shape is one edit here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from avatarflow.tasks.records import (
    V1_GRID,
    AudioInfo,
    Chunk,
    FrameGrid,
    RenderParams,
    Row,
    RowPlan,
)
from tests.media_factory import write_audio, write_narration

if TYPE_CHECKING:
    from distributed import LocalCluster

HASH = "h" * 64
# QC gates that the tiny checkpoint's renders cannot pass: it renders noise, so there is no face
# to find and no lips to follow, and every frame jumps from the one before, which the seams gate
# reads as a cut. (The fake fal renders a talking face: fal-path tests run every gate.)
TINY_NOISE = frozenset({"face", "lipsync", "seams"})


def qc_skip_args(gates: frozenset[str]) -> tuple[str, ...]:
    """The CLI options that skip gates (`avatarflow run --qc-skip a,b`)."""
    return ("--qc-skip", ",".join(sorted(gates)))


_PARAMS = set(RenderParams.model_fields)


# --- records --------------------------------------------------------------------------------------


def make_row(
    id: str = "row-1",
    audio: str = "a.wav",
    *,
    index: int = 0,
    image: str | None = None,
    seed: int | None = None,
    num_segments: int | None = None,
    extra: dict[str, Any] | None = None,
    **params: Any,
) -> Row:
    """A validated row; keyword arguments named like RenderParams fields become its params."""
    unknown = set(params) - _PARAMS
    if unknown:
        raise TypeError(f"not a row field or render parameter: {sorted(unknown)}")
    return Row(
        index=index,
        id=id,
        audio=audio,
        params=RenderParams(**params),
        image=image,
        seed=seed,
        num_segments=num_segments,
        extra=extra or {},
    )


def with_params(row: Row, **changes: Any) -> Row:
    """The row with some render parameters changed."""
    return dataclasses.replace(row, params=row.params.model_copy(update=changes))


def make_audio(
    duration_s: float = 2.0,
    *,
    source: str = "a.wav",
    sha256: str = "0" * 64,
    sample_rate_hz: int = 16_000,
    channels: int = 1,
    codec: str = "pcm_s16le",
    pcm_path: str = "/nonexistent.wav",
) -> AudioInfo:
    """What probing a narration found (plan_row reads pcm_path only when it must cut)."""
    return AudioInfo(source, sha256, duration_s, sample_rate_hz, channels, codec, pcm_path)


def make_chunks(
    row_id: str, bounds: Sequence[float], grid: FrameGrid = V1_GRID, segments: int | None = None
) -> tuple[Chunk, ...]:
    """Chunks between consecutive bounds, each with the segments its span needs (or `segments`)."""
    return tuple(
        Chunk(row_id, i, start, end, segments or grid.segments_for(end - start), grid.fps)
        for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
    )


def make_plan(
    row: Row | None = None,
    audio: AudioInfo | None = None,
    chunks: Sequence[Chunk] | None = None,
    *,
    seed: int = 7,
    billable_units: float | None = None,
    estimated_cost_usd: float = 0.0,
    input_hash: str = HASH,
    image_path: str | None = None,
    image_sha256: str | None = None,
) -> RowPlan:
    """A row plan; by default one chunk covering the audio, billed per video-second."""
    row = row or make_row()
    audio = audio or make_audio(source=row.audio)
    chunks = tuple(chunks or make_chunks(row.id, (0.0, audio.duration_s)))
    units = sum(c.video_s for c in chunks) if billable_units is None else billable_units
    return RowPlan(
        row=row,
        audio=audio,
        chunks=chunks,
        seed=seed,
        billable_units=units,
        estimated_cost_usd=estimated_cost_usd,
        input_hash=input_hash,
        image_path=image_path,
        image_sha256=image_sha256,
    )


# --- media ----------------------------------------------------------------------------------------


def write_tone(
    path: Path | str, seconds: float = 1.0, freq_hz: float = 220.0, rate_hz: int = 16_000
) -> Path:
    """A 16-bit mono WAV of a sine tone (a chunk's narration as planning cuts it)."""
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    return write_audio(path, (0.3 * np.sin(2 * np.pi * freq_hz * t)), rate_hz, "wav")


# --- manifests ------------------------------------------------------------------------------------


def write_manifest(path: Path | str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write rows as a manifest: Parquet, or one JSON object per line for .jsonl."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist([dict(row) for row in rows]), path)
    return str(path)


def write_narrations(
    folder: Path, lengths: Mapping[str, float | tuple[float, str]], subdir: str = "media"
) -> list[dict[str, Any]]:
    """One speech-like narration per row id (seconds, or (seconds, format); seeded by position)
    under folder/subdir; returns the manifest rows pointing at them (relative paths)."""
    media = folder / subdir if subdir else folder
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed, (row_id, length) in enumerate(lengths.items()):
        seconds, fmt = length if isinstance(length, tuple) else (length, "wav")
        name = f"{row_id}.{fmt}"
        write_narration(media / name, seconds, fmt, seed=seed)
        rows.append({"id": row_id, "audio": f"{subdir}/{name}" if subdir else name})
    return rows


def copied_narration_manifest(folder: Path, rows: int, seconds: float) -> str:
    """A manifest of `rows` rows (row00000, ...), each with its own copy of one narration: every
    row's file is fetched and probed, as in a real batch, without synthesising each one."""
    write_narration(folder / "n.wav", seconds, seed=1)
    audio = (folder / "n.wav").read_bytes()
    records = []
    for i in range(rows):
        (folder / f"n{i}.wav").write_bytes(audio)
        records.append({"id": f"row{i:05d}", "audio": f"n{i}.wav"})
    return write_manifest(folder / "manifest.parquet", records)


def narrated_manifest(
    folder: Path,
    lengths: Mapping[str, float | tuple[float, str]],
    subdir: str = "media",
    name: str = "manifest.parquet",
) -> str:
    """A manifest in folder with one narration per row id (see write_narrations)."""
    return write_manifest(folder / name, write_narrations(folder, lengths, subdir))


@contextlib.contextmanager
def gpu_cluster(workers: int, threads: int = 1) -> Iterator[LocalCluster]:
    """Dask worker processes each offering one GPU, as `dask worker --resources GPU=1` starts
    them (distributed is imported only by the tests that start one)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        resources={"GPU": 1},
        dashboard_address=":0",
    ) as cluster:
        yield cluster
