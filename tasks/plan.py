"""Plan stage: segments, chunks, seed, cost and idempotency key per row, then the budget gate.

Sits after audio probing and before rendering; everything here is a pure function of its inputs
(plan_row reads the row's decoded PCM only when the narration is long enough to need cutting).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from prefect import task

from tasks import progress
from tasks.audio import (
    AudioError,
    chunk_span_s,
    fetch_file,
    find_cut_points,
    load_pcm,
    probe_audio,
    write_chunk_wav,
)
from tasks.ledger import Ledger
from tasks.manifest import display_location
from tasks.records import (
    CONTINUATION_FRAMES,
    FIRST_SEGMENT_FRAMES,
    FPS,
    AudioInfo,
    Chunk,
    Row,
    RowError,
    RowPlan,
    RowResult,
)

if TYPE_CHECKING:
    from flows.settings import BatchConfig


class PlanError(ValueError):
    """A row cannot be planned as asked; `error` is the RowError to record for it."""

    def __init__(self, error: RowError) -> None:
        super().__init__(str(error))
        self.error = error


def segments_for_duration(duration_s: float, fps: int = FPS) -> int:
    """Segments needed to cover duration_s: 1 + ceil(max(0, D − 93/fps) / (80/fps)), in frames."""
    # counted in frames, rounded to a millionth of a frame (far below one audio sample), so float
    # noise never adds a segment: 5.8125 s is exactly 93 frames at 16 fps and stays 1 segment
    extra_frames = max(0.0, round(duration_s * fps - FIRST_SEGMENT_FRAMES, 6))
    return 1 + math.ceil(extra_frames / CONTINUATION_FRAMES)


def video_s_for_segments(num_segments: int, fps: int = FPS) -> float:
    """Seconds of video that num_segments segments render: (93 + 80(n − 1)) / fps."""
    return (FIRST_SEGMENT_FRAMES + CONTINUATION_FRAMES * (num_segments - 1)) / fps


def derive_seed(row_id: str) -> int:
    """A stable seed in 0 … 2^32−1 from the row id, for rows that give none."""
    return int.from_bytes(hashlib.sha256(f"avatarflow-seed:{row_id}".encode()).digest()[:4], "big")


def plan_row(
    row: Row, audio: AudioInfo, config: BatchConfig, image_sha256: str | None = None
) -> RowPlan:
    """Plan one row: its chunks and segments, seed, billable units, cost and input hash."""
    fps = render_fps(config)
    if row.num_segments is not None:
        chunks = (_override_chunk(row, audio, row.num_segments, fps),)
    else:
        cuts: list[float] = []
        if audio.duration_s > chunk_span_s(config.chunk_target_s, fps):  # else no PCM read
            samples, rate = load_pcm(audio.pcm_path)
            cuts = find_cut_points(
                samples,
                rate,
                config.chunk_target_s,
                config.chunk_window_s,
                config.chunk_min_s,
                fps=fps,
            )
        bounds = [0.0, *cuts, audio.duration_s]
        chunks = tuple(
            Chunk(row.id, i, start, end, segments_for_duration(end - start, fps), fps)
            for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
        )
    seed = row.seed if row.seed is not None else derive_seed(row.id)
    video_s = sum(c.video_s for c in chunks)
    paid = config.backend == "fal"
    return RowPlan(
        row=row,
        audio=audio,
        chunks=chunks,
        seed=seed,
        # Only fal bills; the local backend runs on the user's own GPUs.
        billable_units=video_s * config.units_per_video_s[row.resolution] if paid else 0.0,
        estimated_cost_usd=video_s * config.price_per_video_s[row.resolution] if paid else 0.0,
        input_hash=input_hash(row, audio, chunks, seed, image_sha256),
    )


def render_fps(config: BatchConfig) -> int:
    """The frame rate the backend renders at: 16 (v1.0, fal), or 25 for a local v1.5 model."""
    if config.backend != "local" or config.local.model_dir is None:
        return FPS  # fal serves v1.0; the tiny demo checkpoint is v1.0 too
    from model.loading import checkpoint_fps  # torch-heavy, needed only here

    return checkpoint_fps(config.local.model_dir)


def _override_chunk(row: Row, audio: AudioInfo, n: int, fps: int) -> Chunk:
    """One chunk of the row's n = num_segments, if that covers all of the audio."""
    needed = segments_for_duration(audio.duration_s, fps)
    if n < needed:
        reason = (
            f"num_segments={n} renders {video_s_for_segments(n, fps):.3f} s of video but the "
            f"audio is {audio.duration_s:.3f} s long; it needs at least {needed}"
        )
        raise PlanError(RowError(row.index, row.id, "num_segments", reason, "too_few_segments"))
    return Chunk(row.id, 0, 0.0, audio.duration_s, n, fps)


def input_hash(
    row: Row,
    audio: AudioInfo,
    chunks: Sequence[Chunk],
    seed: int,
    image_sha256: str | None = None,
) -> str:
    """sha256 over everything that changes the rendered video (not the backend or the row id)."""
    key: dict[str, Any] = {
        "audio_sha256": audio.sha256,
        "image": image_sha256 or row.image,
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "resolution": row.resolution,
        "seed": seed,
        "num_inference_steps": row.num_inference_steps,
        "text_guidance_scale": row.text_guidance_scale,
        "audio_guidance_scale": row.audio_guidance_scale,
        "chunks": [[c.start_s, c.end_s, c.num_segments, c.fps] for c in chunks],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def apply_budget(
    plans: Sequence[RowPlan], budget_usd: float | None
) -> tuple[list[RowPlan], list[tuple[RowPlan, str]]]:
    """Split plans, in manifest order, into those to dispatch and those skipped (with why).

    Dispatch stops at the first row whose estimate would take the total over the budget: later
    rows are skipped too, even cheaper ones, so what runs is always a prefix of the manifest.
    """
    if budget_usd is None:
        return list(plans), []
    to_dispatch: list[RowPlan] = []
    skipped: list[tuple[RowPlan, str]] = []
    total = 0.0
    for plan in plans:
        if skipped or total + plan.estimated_cost_usd > budget_usd + 1e-9:
            reason = (
                f"budget: ${budget_usd:.2f} reached (${total:.2f} planned before this row, "
                f"which is estimated at ${plan.estimated_cost_usd:.2f})"
            )
            skipped.append((plan, reason))
            continue
        total += plan.estimated_cost_usd
        to_dispatch.append(plan)
    return to_dispatch, skipped


def summarize(plans: Sequence[RowPlan]) -> dict[str, float | int]:
    """Totals for the `avatarflow plan` table: rows, chunks, segments, seconds, units, USD."""
    return {
        "rows": len(plans),
        "chunks": sum(len(p.chunks) for p in plans),
        "segments": sum(p.num_segments for p in plans),
        # rounded only to drop float noise; the CLI and report format for display
        "audio_s": round(sum(p.audio.duration_s for p in plans), 6),
        "video_s": round(sum(p.video_s for p in plans), 6),
        "billable_units": round(sum(p.billable_units for p in plans), 6),
        "estimated_cost_usd": round(sum(p.estimated_cost_usd for p in plans), 6),
    }


def row_work_dir(config: BatchConfig, plan: RowPlan) -> Path:
    """The local scratch folder of one row's inputs as planned (changes when its inputs change)."""
    return config.work_path / "rows" / plan.row.id / plan.input_hash[:16]


def chunk_wav_path(config: BatchConfig, plan: RowPlan, chunk_index: int) -> Path:
    """Where prepare_row wrote the narration span of one chunk."""
    return row_work_dir(config, plan) / f"chunk-{chunk_index}.wav"


def _fetch_image(row: Row, work_dir: Path) -> tuple[str, str]:
    """Fetch the row's portrait and check it is an image; return (local path, sha256)."""
    assert row.image is not None
    try:
        local, sha = fetch_file(row.image, work_dir / "images")
    except AudioError as exc:  # the fetch errors are the same for any input file
        raise PlanError(RowError(row.index, row.id, "image", exc.reason, exc.kind)) from exc
    try:
        with Image.open(local) as image:
            image.verify()  # checks the structure (chunk CRCs) ...
        with Image.open(local) as image:
            image.load()  # ... and decoding finds what verify() misses: a truncated file
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        reason = f"{display_location(row.image)}: not a readable image ({exc})"
        raise PlanError(RowError(row.index, row.id, "image", reason, "not_image")) from exc
    return str(local), sha


def prepare(row: Row, config: BatchConfig) -> RowPlan:
    """Fetch and probe a row's inputs, plan it and write each chunk's WAV; spends nothing."""
    try:
        audio = probe_audio(row.audio, config.work_path)
    except AudioError as exc:
        raise PlanError(RowError(row.index, row.id, "audio", exc.reason, exc.kind)) from exc
    image_path, image_sha = _fetch_image(row, config.work_path) if row.image else (None, None)
    plan = dataclasses.replace(plan_row(row, audio, config, image_sha), image_path=image_path)
    for chunk in plan.chunks:
        dest = chunk_wav_path(config, plan, chunk.index)
        if not dest.exists():
            write_chunk_wav(audio, chunk.start_s, chunk.end_s, dest)
    return plan


@task(name="prepare-row")
def prepare_row(row: Row, config: BatchConfig) -> RowPlan:
    """Fetch + probe a row's audio and image, plan its chunks and cut their WAVs."""
    return prepare(row, config)


def plan_manifest_rows(
    rows: Sequence[Row], config: BatchConfig
) -> tuple[list[RowPlan], list[tuple[str, str]]]:
    """Plan rows without Prefect (for `avatarflow plan`): plans, and (id, reason) per failure."""
    plans: list[RowPlan] = []
    failures: list[tuple[str, str]] = []
    for row in rows:
        try:
            plans.append(prepare(row, config))
        except PlanError as exc:
            failures.append((row.id, str(exc)))
    return plans, failures


def budget_gate(
    plans: Sequence[RowPlan], config: BatchConfig
) -> tuple[list[RowPlan], dict[int, RowResult]]:
    """Skip rows already published with the same inputs, then apply the budget; nothing is paid."""
    ledger = Ledger.for_run(config)
    skipped: dict[int, RowResult] = {}
    pending: list[RowPlan] = []
    for plan in plans:
        done = ledger.published(plan.row.id)
        if done and done.get("input_hash") == plan.input_hash and ledger.exists(done["video_url"]):
            skipped[plan.row.index] = RowResult(
                id=plan.row.id,
                status="skipped",
                video_url=done["video_url"],
                sidecar_url=done.get("sidecar_url"),
                duration_s=done.get("duration_s"),
                segments=done.get("segments"),
                extra=plan.row.extra,
            )
        else:
            pending.append(plan)
    dispatch, over_budget = apply_budget(pending, config.budget_usd)
    for plan, reason in over_budget:
        skipped[plan.row.index] = RowResult(
            id=plan.row.id, status="skipped", error=reason, extra=plan.row.extra
        )
    progress.emit(
        "rows_planned",
        rows=len(plans),
        chunks=sum(len(p.chunks) for p in dispatch),
        estimated_usd=sum(p.estimated_cost_usd for p in dispatch),
    )
    return dispatch, skipped
