"""Prepare stage: fetch and probe a row's inputs, plan it (plan_row: segments, chunks, seed, cost
and idempotency key, as a RowPlan) and cut its chunk WAVs; then the admission and budget gates.

plan_row is a pure function of its inputs (it reads the row's decoded PCM only when the narration
is long enough to need cutting); prepare_row does the fetching and writing around it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError
from prefect import task
from prefect.cache_policies import NO_CACHE

from avatarflow.tasks import progress
from avatarflow.tasks.audio import (
    AudioError,
    fetch_file,
    find_cut_points,
    load_pcm,
    probe_audio,
    write_chunk_wav,
)
from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.captions import captions_key, outputs
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import (
    AudioInfo,
    Chunk,
    FrameGrid,
    Published,
    Row,
    RowError,
    RowPlan,
    RowResult,
    RowsPlanned,
)
from avatarflow.tasks.redact import public_url
from avatarflow.tasks.speech import estimate_recognition
from avatarflow.tasks.stream import Stages
from avatarflow.tasks.workdir import WorkDir


class PlanError(ValueError):
    """A row cannot be planned as asked; `error` is the RowError to record for it."""

    def __init__(self, error: RowError) -> None:
        super().__init__(str(error))
        self.error = error


def derive_seed(row_id: str) -> int:
    """A stable seed in 0 … 2^32−1 from the row id, for rows that give none."""
    return int.from_bytes(hashlib.sha256(f"avatarflow-seed:{row_id}".encode()).digest()[:4], "big")


def plan_row(
    row: Row, audio: AudioInfo, config: BatchConfig, image_sha256: str | None = None
) -> RowPlan:
    """Plan one row: its chunks and segments, seed, billable units, cost and input hash."""
    backend = renderer_class(config.backend)
    grid = backend.frame_grid(config)
    chunks: tuple[Chunk, ...]
    if row.num_segments is not None:
        chunks = (_override_chunk(row, audio, row.num_segments, grid),)
    else:
        cuts: list[float] = []
        if audio.duration_s > grid.longest_span_s(config.chunk_target_s):  # else no PCM read
            samples, rate = load_pcm(audio.pcm_path)
            cuts = find_cut_points(
                samples,
                rate,
                config.chunk_target_s,
                config.chunk_window_s,
                config.chunk_min_s,
                grid=grid,
            )
        bounds = [0.0, *cuts, audio.duration_s]
        chunks = tuple(
            Chunk(row.id, i, start, end, grid.segments_for(end - start), grid.fps)
            for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
        )
    seed = row.seed if row.seed is not None else derive_seed(row.id)
    units, cost = backend.estimate(config, row.resolution, sum(c.video_s for c in chunks))
    if outputs(row, config):  # its captions recognise the narration too: paid on fal
        cost += estimate_recognition(config, audio.duration_s)[1]
    return RowPlan(
        row=row,
        audio=audio,
        chunks=chunks,
        seed=seed,
        billable_units=units,
        estimated_cost_usd=cost,
        input_hash=input_hash(row, audio, chunks, seed, image_sha256),
        image_sha256=image_sha256,
    )


def _override_chunk(row: Row, audio: AudioInfo, n: int, grid: FrameGrid) -> Chunk:
    """One chunk of the row's n = num_segments, if that covers all of the audio."""
    needed = grid.segments_for(audio.duration_s)
    if n < needed:
        reason = (
            f"num_segments={n} renders {grid.video_s(n):.3f} s of video but the "
            f"audio is {audio.duration_s:.3f} s long; it needs at least {needed}"
        )
        raise PlanError(RowError(row.index, row.id, "num_segments", reason, "too_few_segments"))
    return Chunk(row.id, 0, 0.0, audio.duration_s, n, grid.fps)


def input_hash(
    row: Row,
    audio: AudioInfo,
    chunks: Sequence[Chunk],
    seed: int,
    image_sha256: str | None = None,
) -> str:
    """sha256 over everything that changes the rendered video (not the backend or the row id)."""
    key: dict[str, Any] = {
        **row.params.model_dump(),  # every model parameter, set or not
        "audio_sha256": audio.sha256,
        "image": image_sha256 or row.image,
        "seed": seed,
        "chunks": [[c.start_s, c.end_s, c.num_segments, c.fps] for c in chunks],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _fetch_image(row: Row, work_dir: WorkDir) -> tuple[str, str]:
    """Fetch the row's portrait and check it is an image; return (local path, sha256)."""
    assert row.image is not None
    try:
        local, sha = fetch_file(row.image, work_dir.images)
    except AudioError as exc:  # the fetch errors are the same for any input file
        raise PlanError(RowError(row.index, row.id, "image", exc.reason, exc.kind)) from exc
    try:
        with Image.open(local) as image:
            image.verify()  # checks the structure (chunk CRCs) ...
        with Image.open(local) as image:
            image.load()  # ... and decoding finds what verify() misses: a truncated file
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        reason = f"{public_url(row.image)}: not a readable image ({exc})"
        raise PlanError(RowError(row.index, row.id, "image", reason, "not_image")) from exc
    return str(local), sha


# No Prefect cache: the ledger decides what is reused (hashing the inputs cost CPU per run).
@task(name="prepare-row", cache_policy=NO_CACHE)
def prepare_row(row: Row, config: BatchConfig) -> RowPlan:
    """Fetch and probe a row's inputs, plan it and write each chunk's WAV; spends nothing
    (prepare_row.fn runs it without Prefect)."""
    work = WorkDir(config.work_path)
    try:
        audio = probe_audio(row.audio, work.audio)
    except AudioError as exc:
        raise PlanError(RowError(row.index, row.id, "audio", exc.reason, exc.kind)) from exc
    image_path, image_sha = _fetch_image(row, work) if row.image else (None, None)
    plan = dataclasses.replace(plan_row(row, audio, config, image_sha), image_path=image_path)
    for chunk in plan.chunks:
        dest = work.chunk_wav(row.id, plan.input_hash, chunk.index)
        if not dest.exists():
            write_chunk_wav(audio, chunk.start_s, chunk.end_s, dest)
    return plan


def prepare_rows(
    rows: Sequence[Row], config: BatchConfig
) -> tuple[list[RowPlan], list[tuple[str, str]]]:
    """Prepare rows without Prefect (for `avatarflow plan`): plans, and (id, reason) per failure."""
    plans: list[RowPlan] = []
    failures: list[tuple[str, str]] = []
    for row in rows:
        try:
            plans.append(prepare_row.fn(row, config))
        except PlanError as exc:
            failures.append((row.id, str(exc)))
    return plans, failures


class Admission:
    """Decides, row by row in manifest order, what a run dispatches; nothing is paid here.

    A row already published from the same inputs keeps its earlier result (URL, QC values, first
    publish time), skipped by this run. Every other row reserves its estimate against the run's
    budget (RunBudget, which re-renders draw on too): the first row that does not fit is held back
    with every row after it, even cheaper ones, so what runs is always a prefix of the manifest.
    """

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self.ledger = Ledger.for_run(config)
        self.budget = RunBudget.open(config)
        self.budget_usd = config.budget_usd
        self.reserved_usd = 0.0
        self.held = False

    def admit(self, plan: RowPlan) -> RowResult | None:
        """None: dispatch the row. Otherwise the row's result for this run (skipped or held)."""
        published = self._published(plan)
        if published is not None:
            return published
        return self._reserve(plan)

    def dispatch(self, plan: RowPlan, config: BatchConfig) -> Stages[tuple[RowPlan, BatchConfig]]:
        """Stages before an admitted row renders: the plan and config it renders with (a routed
        run waits here for the row's worker or fal slot; tasks/route.py)."""
        return plan, config
        yield  # a generator, like every row stage

    def rendered(self, plan: RowPlan, ok: bool) -> RowPlan:
        """A row's render ended (ok: it has its videos); the plan it finishes with."""
        return plan

    def close(self) -> None:
        """The run's rows are all done."""

    def _reserve(self, plan: RowPlan) -> RowResult | None:
        """Reserve the row's estimate from the budget: None, or the held row's result."""
        if not self.held and self.budget.take(plan.estimated_cost_usd):
            self.reserved_usd += plan.estimated_cost_usd
            progress.emit(RowsPlanned(0, len(plan.chunks), plan.estimated_cost_usd))
            return None
        self.held = True
        reason = (
            f"budget: ${self.budget_usd or 0:.2f} reached (${self.reserved_usd:.2f} planned before "
            f"this row, which is estimated at ${plan.estimated_cost_usd:.2f})"
        )
        return RowResult(
            id=plan.row.id,
            status="failed",
            duration_s=plan.audio.duration_s,
            error=reason,
            extra=plan.row.extra,
            run_action="skipped",
        )

    def _published(self, plan: RowPlan) -> RowResult | None:
        """The row's earlier result, when its video from these same inputs is still there, with
        the captions this run asks for (else the row is finished again: its chunks are reused
        from the ledger, nothing is paid twice)."""
        done = self.ledger.published(plan.row.id)
        url = done.result.video_url if done else None
        if (
            done
            and done.result.status == "published"
            and done.input_hash == plan.input_hash
            and url
            and self.ledger.exists(url)
            and self._has_captions(plan, done)
        ):
            return dataclasses.replace(
                done.result, run_action="skipped", error=None, extra=plan.row.extra
            )
        return None

    def _has_captions(self, plan: RowPlan, done: Published) -> bool:
        """True when the row needs no captions, or has them from the same inputs and settings."""
        wanted = captions_key(plan.row, self.config)
        if wanted is None:
            return True
        if done.captions_key != wanted:
            return False
        urls = (done.result.captions_vtt_url, done.result.captions_srt_url)
        return all(self.ledger.exists(u) for u in urls if u)


class RunBudget:
    """What a run's budget has left: admitted rows' estimates and re-renders are taken from it.

    One per run, by ledger URL (one run per target holds the ledger), in the flow's process:
    re-renders are decided in its task threads. Where none was opened (another process), a run
    with a budget re-renders nothing that costs.
    """

    _runs: ClassVar[dict[str, RunBudget]] = {}

    def __init__(self, remaining_usd: float | None) -> None:
        self.remaining_usd = remaining_usd  # None: no budget
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: BatchConfig) -> RunBudget:
        """Start the run's budget: all of it, for admitted rows and re-renders to take from."""
        cls._runs[config.state_url] = run = cls(config.budget_usd)
        return run

    @classmethod
    def of(cls, config: BatchConfig) -> RunBudget:
        """The run's budget (an empty one for a budgeted run opened elsewhere)."""
        run = cls._runs.get(config.state_url)
        if run is None:
            return cls(None if config.budget_usd is None else 0.0)
        return run

    def take(self, usd: float) -> bool:
        """Reserve usd if it fits what is left; False (nothing reserved) when it does not."""
        with self._lock:
            if self.remaining_usd is None:
                return True
            if usd > self.remaining_usd + 1e-9:
                return False
            self.remaining_usd -= usd
            return True

    def give(self, usd: float) -> None:
        """Return a reservation that will not be spent (a row moved to a free backend)."""
        with self._lock:
            if self.remaining_usd is not None:
                self.remaining_usd += usd
