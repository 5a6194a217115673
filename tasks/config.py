"""Run options at the bottom of the stack: BatchConfig and the per-backend settings.

The only module that reads the environment (through pydantic-settings); it imports nothing else of
ours, so every stage, backend and flow can depend on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PRICE_PER_VIDEO_S = {"480p": 0.15, "720p": 0.30}  # fal's public price page, USD
# fal bills in "units": 1 per video-second at 480p, 4 at 720p (the model's API page). Converting
# units back to seconds keeps actual cost consistent with the per-second price above.
DEFAULT_UNITS_PER_VIDEO_S = {"480p": 1.0, "720p": 4.0}
# The QC gates of tasks/qc.py in report order; stable names (JSON keys, results columns, --qc-skip).
QC_GATES = ("duration", "sync", "black", "freeze", "face", "lipsync", "seams")
# The captions' gate (tasks/captions.py): judged after the video gates, on rows with captions.
CAPTIONS_GATE = "captions"
# --captions: auto = all when the manifest has a transcript column or a recogniser is configured;
# vtt = <id>.vtt only; all = <id>.vtt, <id>.srt and a mov_text track in the MP4.
CaptionsMode = Literal["auto", "off", "vtt", "all"]
# fal-ai/whisper bills compute time. USD per unit (a compute second): fal's model page when this was
# written; check it. Units per narration second is an estimate for large-v3 on fal's GPUs (the
# result's x-fal-billable-units header is what a row is charged).
DEFAULT_WHISPER_PRICE_PER_UNIT = 0.00111
DEFAULT_WHISPER_UNITS_PER_AUDIO_S = 0.05
# The random-weight checkpoint `avatarflow model init-tiny` writes; used only when named.
TINY_MODEL = "tiny"


def state_url_for(target: str, state: str | None = None) -> str:
    """The run ledger's URL: state if given, else <target>/.avatarflow."""
    return state or target.rstrip("/") + "/.avatarflow"


class FalSettings(BaseSettings):
    """The fal backend's settings: where fal lives and how to talk to it (FAL_QUEUE_URL,
    FAL_REST_URL, FAL_CDN_URL, FAL_APP), retries and prices (FAL_<FIELD> each).

    The key is deliberately no field: it is read from FAL_KEY at call time (api_key), so it can
    never be serialised into flow-run parameters, deployments, logs or results.
    """

    # env_ignore_empty: a deployment that pins FAL_QUEUE_URL="" means "the default host".
    # extra="forbid": a stray field (`fal: {key: ...}`) is refused, never kept in a run's
    # parameters, and errors never echo what was given. Environment variables are read per field
    # only, so FAL_KEY and other FAL_* names that are no field are left alone.
    model_config = SettingsConfigDict(
        env_prefix="FAL_",
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    queue_url: str = "https://queue.fal.run"
    rest_url: str = "https://rest.fal.ai"
    cdn_url: str = "https://v3.fal.media"
    app: str = "fal-ai/longcat-single-avatar"
    # Wait on fal's status stream (one request per render, told the moment it completes); off:
    # poll the status (where a proxy buffers server-sent events). Polls also take over from a
    # stream that ends early; they start fast and back off to poll_max_s.
    status_stream: bool = True
    poll_initial_s: float = 0.1
    poll_max_s: float = 5.0
    http_timeout_s: float = 60.0
    max_attempts: int = 6  # for 429 / 5xx / connection errors where nothing was queued
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float | None = None  # sent as X-Fal-Request-Timeout (time-to-start)
    # Requests in flight hold a slot of this Prefect global concurrency limit when it exists
    # (`prefect gcl create avatarflow-fal --limit N`): every run and shard shares the account's N.
    concurrency_limit: str | None = "avatarflow-fal"
    # An earlier submit whose answer was lost may be queued (and billed) at fal: resubmit it only
    # when the user has checked and says so (`avatarflow run --resubmit-ambiguous`).
    resubmit_ambiguous: bool = False
    # Resubmits of a request that ended with a 5xx error (fal does not bill those) per chunk.
    failed_retries: int = Field(default=2, ge=0, le=10)
    price_per_video_s: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_PRICE_PER_VIDEO_S)
    )
    units_per_video_s: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_UNITS_PER_VIDEO_S)
    )
    # Speech recognition (captions) on fal's hosted Whisper. It costs money, so rows without a
    # transcript are recognised only when this is on (FAL_SPEECH_RECOGNITION=1).
    speech_recognition: bool = False
    whisper_app: str = "fal-ai/whisper"
    whisper_price_per_unit: float = Field(default=DEFAULT_WHISPER_PRICE_PER_UNIT, ge=0)
    whisper_units_per_audio_s: float = Field(default=DEFAULT_WHISPER_UNITS_PER_AUDIO_S, ge=0)

    @field_validator("queue_url", "rest_url", "cdn_url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")  # "http://host/" and "http://host" alike

    @staticmethod
    def api_key() -> str | None:
        """The key to send: FAL_KEY from this worker's environment, read when it is needed."""
        return os.environ.get("FAL_KEY") or None


class LocalSettings(BaseSettings):
    """The local LongCat-Video-Avatar backend (AVATARFLOW_LOCAL_MODEL_DIR, _DEVICE, _DTYPE ...)."""

    model_config = SettingsConfigDict(
        env_prefix="AVATARFLOW_LOCAL_",
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,
        protected_namespaces=(),
    )

    # A checkpoint folder, or "tiny" for the random-weight demo checkpoint (written on first use).
    model_dir: str | None = None
    device: str = "auto"  # auto → cuda if available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_inference_steps: int | None = None  # None → the checkpoint's default
    cpu_offload: bool = False
    vae_tiling: bool = False
    # A Dask scheduler whose workers (each with a GPU=1 resource) render and keep the model
    # loaded across rows and runs: "tcp://host:8786", or "local" (a LocalCluster, one per GPU).
    dask_address: str | None = None
    # A Whisper folder (transformers layout) for speech recognition; default: the checkpoint's own
    # whisper-large-v3/ (v1.5, and the tiny checkpoint).
    whisper_dir: str | None = None

    @property
    def is_tiny(self) -> bool:
        """True when the run asked for the random-weight demo checkpoint by name."""
        return self.model_dir == TINY_MODEL


class QCSettings(BaseModel):
    """Thresholds and sampling of the QC gates (tasks/qc.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis_width: int = Field(256, ge=64)  # frames are scaled to this width for every gate
    duration_max_frames_off: int = Field(1, ge=0)  # |frames - planned frames| allowed
    sync_max_drift_s: float = Field(0.1, ge=0)  # |audio s - video s|; AAC pads up to 1024 samples
    black_pixel_max: float = Field(0.10, ge=0, le=1)  # luma (0-1 of the range) of a black pixel
    black_frame_ratio: float = Field(0.98, gt=0, le=1)  # share of black pixels in a black frame
    black_max_s: float = Field(0.1, ge=0)  # longest black stretch allowed (a lone frame passes)
    freeze_max_diff: float = Field(0.004, ge=0)  # two frames are equal below it: see _block_diff
    freeze_max_s: float = Field(1.0, ge=0)  # longest frozen stretch allowed
    face_every_s: float = Field(1.0, gt=0)  # face detection sampling interval
    face_min_ratio: float = Field(0.8, ge=0, le=1)  # share of sampled frames that need a face
    lipsync_search_frames: int = Field(8, ge=1)  # offsets tried: -N..+N frames
    lipsync_max_offset_frames: int = Field(2, ge=0)  # |best offset| allowed
    lipsync_min_corr: float = Field(0.2, ge=-1, le=1)  # correlation needed at the best offset
    lipsync_min_offset_t: float = Field(3.0, ge=0)  # an offset counts when it beats lag 0 by this t
    seam_window_frames: int = Field(2, ge=1)  # frames averaged on each side of a join
    seam_max_distance: float = Field(0.25, ge=0, le=1)  # Hellinger distance allowed at a join
    jump_max_distance: float = Field(0.4, ge=0, le=1)  # ... between any two consecutive frames


class RouteSettings(BaseSettings):
    """`--backend auto`: the priors the router predicts with before earlier runs' sidecars on
    the target say better (AVATARFLOW_ROUTE_<FIELD>). docs/routing.md says where they come from.
    """

    model_config = SettingsConfigDict(
        env_prefix="AVATARFLOW_ROUTE_", frozen=True, extra="forbid", env_ignore_empty=True
    )

    # One 480p segment of the full model on one H100: 30 steps x 3 CFG passes of 2.09 PFLOP at
    # ~50 % MFU (bench/model_speed.py's FLOP count); no GPU has measured it yet.
    local_s_per_segment: float = Field(380.0, gt=0)
    local_load_s: float = Field(120.0, ge=0)  # a worker's first model load
    # fal publishes no render speed: one 480p segment per minute, 30 s in the queue (assumed).
    fal_s_per_segment: float = Field(60.0, gt=0)
    fal_queue_s: float = Field(30.0, ge=0)
    fal_concurrency: int = Field(10, ge=1)  # the account's requests in progress at once
    # A measured value counts as much as the prior once it covers this many segments.
    prior_segments: float = Field(10.0, gt=0)
    # Local work is planned to end this share of the time left before the deadline: a margin
    # for predictions that turn out optimistic.
    margin: float = Field(0.1, ge=0, lt=1)
    poll_s: float = Field(2.0, gt=0)  # how often the run looks for lost or new GPU workers
    history_sidecars: int = Field(500, ge=0)  # the newest sidecars on the target it learns from


class CaptionSettings(BaseModel):
    """Caption cue limits (common caption guidelines) and the captions gate's thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_lines: int = Field(2, ge=1, le=4)
    max_line_chars: int = Field(42, ge=10)
    max_cps: float = Field(17.0, gt=0)  # reading speed; met where the pauses leave room
    pause_s: float = Field(1.0, gt=0)  # no cue spans a silence longer than this
    min_cue_s: float = Field(0.8, ge=0)
    max_cue_s: float = Field(7.0, gt=0)
    min_gap_s: float = Field(0.08, ge=0)  # between consecutive cues: 2 frames at 25 fps
    min_coverage: float = Field(0.9, ge=0, le=1)  # share of recognised speech the cues cover
    # With a transcript: word error rate of the recognised words against the script. A wrong
    # narration for the row scores near 1; a clean narration under a few tenths.
    max_wer: float = Field(0.5, ge=0)


class BatchConfig(BaseModel):
    """All options of one batch run."""

    # A misspelt option is an error, not a silently ignored one.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    manifest: str
    target: str = "./out"
    backend: str = "local"  # a name in avatarflow.tasks.backends' registry ("local", "fal", ...)
    state: str | None = None  # run ledger URL; default <target>/.avatarflow
    work_dir: str | None = None  # local scratch; default ~/.cache/avatarflow/work
    budget_usd: float | None = Field(default=None, ge=0)
    max_concurrency: int = Field(default=8, ge=1, le=256)
    chunk_target_s: float = Field(default=60.0, gt=5.0)  # cut long audio near this length
    chunk_window_s: float = Field(default=5.0, ge=0.0)  # search back from a grid end
    chunk_min_s: float = Field(default=3.0, ge=0.5)
    qc: QCSettings = Field(default_factory=QCSettings)  # thresholds of the final video's gates
    qc_skip: frozenset[str] = frozenset()  # gate names (tasks/qc.py GATES) not run: "skipped"
    # A row whose final video fails a QC gate is rendered once more with a derived seed (paid
    # backends: only when its estimate fits what the budget has left).
    rerender_on_qc_fail: bool = False
    captions: CaptionsMode = "auto"
    caption_settings: CaptionSettings = Field(default_factory=CaptionSettings)
    notify_url: str | None = None  # POST a batch summary here when the run ends
    notify_format: Literal["json", "slack"] = "json"
    # Set by a sharded parent for its child runs: the shard's id. A shard's rows are its own, so
    # children share the target's ledger and hold only their shard's run slot.
    shard: str | None = None
    results_name: str = "results.parquet"  # shard children write results-shard-<id>.parquet
    report_name: str = "report.html"
    # --backend auto: "06:00" (the next such local time), "3h", "90m", "45s" or an ISO time.
    deadline: str | None = None
    route: RouteSettings = Field(default_factory=RouteSettings)
    fal: FalSettings = Field(default_factory=FalSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    # A registered backend's own settings by field name (its Renderer.settings_class), checked
    # when the run starts (backends.with_backend_settings); the built-ins fold them into `fal` or
    # `local`.
    backend_settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("qc_skip")
    @classmethod
    def _known_gates(cls, names: frozenset[str]) -> frozenset[str]:
        unknown = sorted(names - set(QC_GATES))
        if unknown:
            raise ValueError(
                f"unknown QC gate(s) {', '.join(unknown)}; gates: {', '.join(QC_GATES)}"
            )
        return names

    @property
    def state_url(self) -> str:
        return state_url_for(self.target, self.state)

    @property
    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "avatarflow/work"
