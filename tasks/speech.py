"""Speech recognition of a row's narration, on the row's backend: words with their times.

local: Whisper through transformers' ASR pipeline with word timestamps (cross-attention DTW over
the generation config's alignment heads), loaded once per process. The folder is
LocalSettings.whisper_dir, else the checkpoint's own whisper-large-v3/ (v1.5, and the tiny
checkpoint, whose random weights say meaningless words).

fal: fal's hosted fal-ai/whisper through the renders' queue client and ledger rules: the attempt is
recorded right before the submit and the request id right after it, so a rerun (or a run killed
mid-wait) polls the known request and never pays twice.

Either way the words are kept in the ledger per row and input hash (speech.done.json, with what
fal billed): a rerun neither recognises nor pays again, and the row's cost includes it. Inputs
that change but keep the narration (a re-render's seed, a new portrait) reuse the words too.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from avatarflow.tasks.backends.fal.client import (
    AmbiguousSubmitError,
    FalError,
    FalQueueClient,
    SubmitResult,
)
from avatarflow.tasks.backends.fal.renderer import (
    AmbiguousChunkError,
    FailedCompletionError,
    ResultExpiredError,
    classify_failure,
)
from avatarflow.tasks.config import BatchConfig, FalSettings
from avatarflow.tasks.ledger import SPEECH, Ledger
from avatarflow.tasks.records import Recognised, RowPlan, Word
from avatarflow.tasks.stop import (
    RenderStopped,
    calling_on_stop,
    stop_requested,
    wait_unless_stopped,
)
from avatarflow.tasks.storage import sha256_file
from avatarflow.tasks.workdir import WorkDir

log = logging.getLogger(__name__)

WHISPER_DIR = "whisper-large-v3"  # the v1.5 checkpoint's Whisper folder
AVATAR_DIRS = ("LongCat-Video-Avatar-1.5", "LongCat-Video-Avatar")  # where it may sit
SAMPLE_RATE_HZ = 16_000  # what Whisper's feature extractor takes


class SpeechError(Exception):
    """Speech recognition is not possible as configured (no Whisper, an unknown backend)."""


def recognise(
    plan: RowPlan, audio_path: str, config: BatchConfig, *, backend: str | None = None
) -> list[Word]:
    """The words spoken in audio_path (the row's master narration, a local WAV), in order.

    backend: where to recognise, default config.backend ("local" or "fal"). Words recognised
    before for this row and input hash come from the ledger: nothing is recognised or paid again.
    """
    backend = backend or config.backend
    if backend not in ("local", "fal"):
        raise SpeechError(f"the {backend!r} backend cannot recognise speech (local or fal can)")
    ledger = Ledger.for_run(config)
    row_id, input_hash = plan.row.id, plan.input_hash
    kept = ledger.recognised(row_id, input_hash)
    kept = kept or _same_narration(ledger, plan, audio_path, backend)
    if kept is not None:
        return list(kept.words)
    if backend == "fal":
        recognised = _recognise_fal(plan, audio_path, config, ledger)
    else:
        recognised = _recognise_local(audio_path, config)
    ledger.record_recognised(row_id, input_hash, recognised)
    log.info(
        "row %s: %d words recognised on %s ($%.4f)",
        row_id,
        len(recognised.words),
        backend,
        recognised.cost_usd,
    )
    return list(recognised.words)


def _same_narration(
    ledger: Ledger, plan: RowPlan, audio_path: str, backend: str
) -> Recognised | None:
    """Words recognised on this backend for this row under other inputs (a new seed, portrait or
    prompt) from the same narration: kept under this input hash too, at no cost (paid once,
    counted once)."""
    sha = sha256_file(audio_path)
    for earlier in ledger.recognitions(plan.row.id):
        if earlier.audio_sha256 == sha and earlier.backend == backend:
            reused = dataclasses.replace(earlier, billable_units=0.0, cost_usd=0.0)
            ledger.record_recognised(plan.row.id, plan.input_hash, reused)
            return reused
    return None


def recogniser_configured(config: BatchConfig, *, backend: str | None = None) -> bool:
    """True when config's backend can recognise speech without being asked to (captions default
    on even for rows without a transcript): local with a Whisper folder set or in the checkpoint;
    fal only with FalSettings.speech_recognition on, since each recognition is paid."""
    backend = backend or config.backend
    if backend == "auto":  # a routed run: its local rows need the local recogniser
        return recogniser_configured(config, backend="local")
    if backend == "fal":
        return config.fal.speech_recognition
    if backend == "local":
        return config.local.is_tiny or whisper_folder(config) is not None
    return False


def estimate_recognition(
    config: BatchConfig, audio_s: float, *, backend: str | None = None
) -> tuple[float, float]:
    """(billable units, USD) that recognising audio_s seconds of narration is expected to cost
    on the backend (default config's): fal's compute-time price, nothing locally."""
    if (backend or config.backend) != "fal":
        return 0.0, 0.0
    return whisper_estimate(config.fal, audio_s)


def whisper_estimate(settings: FalSettings, audio_s: float) -> tuple[float, float]:
    """(billable units, USD) of one fal-ai/whisper request on audio_s seconds of audio."""
    units = audio_s * settings.whisper_units_per_audio_s
    return units, units * settings.whisper_price_per_unit


# --- words -----------------------------------------------------------------------------------


def words_from_chunks(chunks: Iterable[Mapping[str, Any]], duration_s: float) -> list[Word]:
    """Whisper's word chunks ({"text", "timestamp": [start, end]}) as Words: text stripped, empty
    ones dropped, times clamped into the audio and made non-overlapping and in order."""
    words: list[Word] = []
    previous_end = 0.0
    for chunk in chunks:
        text = str(chunk.get("text") or "").strip()
        stamp = chunk.get("timestamp") or (None, None)
        if not text or stamp[0] is None:
            continue
        start = min(max(float(stamp[0]), previous_end), duration_s)
        # a last word may have no end (the audio ran out): it ends with the audio
        end = min(max(float(stamp[1] if stamp[1] is not None else duration_s), start), duration_s)
        words.append(Word(text, round(start, 3), round(end, 3)))
        previous_end = end
    return words


# --- local -----------------------------------------------------------------------------------


def whisper_folder(config: BatchConfig) -> Path | None:
    """The Whisper folder local recognition uses: LocalSettings.whisper_dir, else the checkpoint's
    whisper-large-v3/ when it has one."""
    if config.local.whisper_dir:
        return Path(config.local.whisper_dir)
    if config.local.is_tiny:
        root = WorkDir(config.work_path).tiny_checkpoint
    elif config.local.model_dir:
        root = Path(config.local.model_dir)
    else:
        return None
    for avatar in AVATAR_DIRS:
        if (root / avatar / WHISPER_DIR / "config.json").exists():
            return root / avatar / WHISPER_DIR
    return None


def _tiny_whisper(config: BatchConfig) -> Path:
    """The tiny checkpoint's Whisper, writing the checkpoint (or, in one written before it had a
    Whisper, the Whisper alone) when it is missing."""
    from avatarflow.model.loading import DEFAULTS_FILE
    from avatarflow.model.tiny import write_tiny_checkpoint, write_tiny_whisper

    root = WorkDir(config.work_path).tiny_checkpoint
    if not (root / DEFAULTS_FILE).exists():
        write_tiny_checkpoint(root)
    folder = whisper_folder(config)
    if folder is None:
        folder = root / AVATAR_DIRS[1] / WHISPER_DIR
        write_tiny_whisper(folder)
    return folder


class _Loaded:
    """One Whisper pipeline and the lock that serialises its calls (rows recognise in threads)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.lock = threading.Lock()


_LOADED: dict[tuple[str, str], _Loaded] = {}
_LOAD_LOCK = threading.Lock()


def whisper_pipeline(folder: Path, device: str = "cpu") -> Any:
    """The ASR pipeline of a Whisper folder on a device, loaded once per process."""
    return _loaded(folder, device).pipe


def _loaded(folder: Path, device: str) -> _Loaded:
    key = (str(Path(folder).resolve()), device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            import torch
            from transformers import pipeline
            from transformers.utils import logging as transformers_logging

            # a batch run shows its own progress; the load bar would tear through it
            transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

            if not (Path(folder) / "config.json").exists():
                raise SpeechError(f"no Whisper in {folder} (config.json missing)")
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            started = time.monotonic()
            pipe = pipeline(
                "automatic-speech-recognition",
                model=str(folder),
                device=device,
                dtype=dtype,
            )
            log.info("loaded Whisper %s on %s in %.1fs", folder, device, time.monotonic() - started)
            _LOADED[key] = _Loaded(pipe)
        return _LOADED[key]


def _recognise_local(audio_path: str, config: BatchConfig) -> Recognised:
    from avatarflow.tasks.backends.local import read_wav, resolve_device

    folder = _tiny_whisper(config) if config.local.is_tiny else whisper_folder(config)
    if folder is None:
        raise SpeechError(
            "no Whisper for local speech recognition: set AVATARFLOW_LOCAL_WHISPER_DIR, or use a "
            f"checkpoint with a {WHISPER_DIR}/ folder (v1.5)"
        )
    loaded = _loaded(folder, str(resolve_device(config.local)))
    samples = read_wav(audio_path)
    duration_s = len(samples) / SAMPLE_RATE_HZ
    words: list[Word] = []
    if len(samples):
        with loaded.lock:
            out = loaded.pipe(
                {"raw": samples, "sampling_rate": SAMPLE_RATE_HZ},
                return_timestamps="word",
                # the model's own window: 30 s for Whisper, 4 s for the tiny one
                chunk_length_s=loaded.pipe.feature_extractor.chunk_length,
                ignore_warning=True,  # "chunk_length_s is experimental": known, and wanted
            )
        words = words_from_chunks(out.get("chunks") or [], duration_s)
    return Recognised(tuple(words), "local", str(folder), sha256_file(audio_path))


# --- fal -------------------------------------------------------------------------------------


def _recognise_fal(
    plan: RowPlan, audio_path: str, config: BatchConfig, ledger: Ledger
) -> Recognised:
    """Resume the row's known whisper request or submit one; resubmit only what fal did not
    bill (a 5xx failure, at most failed_retries times) or no longer has (404, once)."""
    row_id, input_hash = plan.row.id, plan.input_hash
    record = ledger.chunk(row_id, input_hash, SPEECH)
    if record.ambiguous and not config.fal.resubmit_ambiguous:
        raise AmbiguousChunkError(record, "an earlier run stopped during its submit")
    request_id = record.request_id
    failures_left, expiries_left = config.fal.failed_retries, 1
    with FalQueueClient(config.fal, sleep=wait_unless_stopped, on_stop=calling_on_stop) as client:
        while True:
            try:
                if request_id is None:
                    handle = _submit(client, plan, audio_path, config, ledger)
                else:  # submitted before: poll it, never pay again
                    handle = client.handle(request_id, app=config.fal.whisper_app)
                return _collect(client, handle, audio_path, config)
            except ResultExpiredError as exc:
                if expiries_left == 0:
                    raise
                expiries_left -= 1
                log.warning("row %s speech: %s; resubmitting", row_id, exc)
            except FailedCompletionError as exc:
                if failures_left == 0:
                    raise
                failures_left -= 1
                log.warning("row %s speech: %s; resubmitting (not billed)", row_id, exc)
            request_id = None


def _submit(
    client: FalQueueClient, plan: RowPlan, audio_path: str, config: BatchConfig, ledger: Ledger
) -> SubmitResult:
    """Upload the narration and submit, the attempt recorded right before and the id right after."""
    row_id, input_hash = plan.row.id, plan.input_hash
    endpoint = config.fal.whisper_app
    payload = {
        "audio_url": client.upload(audio_path, "audio/wav", f"{row_id}.narration.wav"),
        "task": "transcribe",
        "chunk_level": "word",
        "version": "3",
    }
    if stop_requested():
        raise RenderStopped(f"row {row_id}: speech recognition not submitted")
    ledger.record_attempt(row_id, input_hash, SPEECH, endpoint)
    try:
        handle = client.submit(endpoint, payload)
    except AmbiguousSubmitError as exc:
        raise AmbiguousChunkError(ledger.chunk(row_id, input_hash, SPEECH), str(exc)) from exc
    ledger.record_request(row_id, input_hash, SPEECH, handle.request_id, endpoint)
    return handle


def _collect(
    client: FalQueueClient, handle: SubmitResult, audio_path: str, config: BatchConfig
) -> Recognised:
    """Wait for the request, fetch its words and price them."""
    try:
        client.wait(handle)
        result = client.result(handle)
    except FalError as exc:
        raise classify_failure(client, handle, exc) from exc
    from avatarflow.tasks.audio import load_pcm

    samples, rate = load_pcm(audio_path)
    duration_s = len(samples) / rate
    units = result.billable_units
    if units is None:  # fal did not say: bill what the estimate implies
        units = whisper_estimate(config.fal, duration_s)[0]
    words = words_from_chunks(result.data.get("chunks") or [], duration_s)
    return Recognised(
        words=tuple(words),
        backend="fal",
        model=config.fal.whisper_app,
        audio_sha256=sha256_file(audio_path),
        request_id=handle.request_id,
        billable_units=units,
        cost_usd=units * config.fal.whisper_price_per_unit,
    )
