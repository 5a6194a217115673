"""Local render backend: LongCat-Video-Avatar on this machine's GPU (or CPU for the tiny model).

The only module that imports model/. A row's chunks render as one continuous video, segment by
segment, continuing in latent space across chunk boundaries; each finished segment's frames and
continuation state are saved under job.out_dir, so an interrupted row resumes at its last finished
segment. Each chunk then becomes one H.264 MP4 of its span of the narration (video only: the
concat stage muxes the audio). Frame size: a checkpoint's avatarflow.json `sample_size` wins (the
tiny one renders 32x32 on CPU), otherwise the row's resolution bucket (480x832 / 768x1280, or the
portrait's aspect bucket).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import av
import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from scipy.signal import resample_poly
from transformers.utils import logging as transformers_logging

from avatarflow.model.loading import DEFAULTS_FILE, checkpoint_fps, load_pipeline
from avatarflow.model.pipeline_longcat_avatar import (
    LongCatAvatarSegmentState,
    LongCatVideoAvatarPipeline,
)
from avatarflow.model.tiny import write_tiny_checkpoint
from avatarflow.tasks.audio import load_pcm
from avatarflow.tasks.backends.base import NOMINAL_AREA, Renderer, RenderJob
from avatarflow.tasks.config import CAPTIONS_GATE, TINY_MODEL, BatchConfig, LocalSettings
from avatarflow.tasks.records import V1_GRID, Chunk, ChunkVideo, FrameGrid, RowPlan, Timings
from avatarflow.tasks.stop import RenderStopped, stop_requested
from avatarflow.tasks.storage import sha256_file, writing
from avatarflow.tasks.workdir import WorkDir

if TYPE_CHECKING:
    from avatarflow.tasks.ledger import Ledger

MODEL_SAMPLE_RATE_HZ = 16_000  # both audio encoders (wav2vec2, Whisper) take 16 kHz mono
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_log = logging.getLogger(__name__)
TINY_MODEL_NAME = "tiny random-weight checkpoint (renders noise; for demos and tests)"


def resolve_device(settings: LocalSettings) -> torch.device:
    """Return the configured device; "auto" is cuda when available, else cpu."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def checkpoint_dir(config: BatchConfig) -> Path:
    """The configured checkpoint folder (the tiny one lives in the work dir)."""
    if config.local.is_tiny:
        return WorkDir(config.work_path).tiny_checkpoint
    if config.local.model_dir is None:
        raise ValueError(LocalRenderer.check_config(config))
    return Path(config.local.model_dir)


def load_local_pipeline(settings: LocalSettings, model_dir: Path) -> LongCatVideoAvatarPipeline:
    """Load a checkpoint folder on the configured device and dtype."""
    device = resolve_device(settings)
    # bf16 on GPU halves memory; CPU stays fp32 (the DiT's fp32 modulation needs it there).
    dtype = _DTYPES.get(settings.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(model_dir, dtype=dtype)
    if settings.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_wav(path: str | Path) -> np.ndarray:
    """Read a chunk's 16-bit WAV as mono float32 at the model's 16 kHz."""
    samples, rate = load_pcm(path)
    if rate == MODEL_SAMPLE_RATE_HZ:
        return samples
    divisor = math.gcd(rate, MODEL_SAMPLE_RATE_HZ)
    resampled = resample_poly(samples, MODEL_SAMPLE_RATE_HZ // divisor, rate // divisor)
    return np.asarray(resampled, dtype=np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 frames as H.264 MP4 at fps, written atomically."""
    with writing(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # mbtree off: libx264's macroblock-tree pass reads uninitialised memory on some frame
        # sizes (e.g. 32x32, 96x96), so the same frames could encode to different bytes.
        stream.options = {"crf": "18", "x264-params": "mbtree=0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


class LocalRenderer(Renderer):
    """Renderer on LongCatVideoAvatarPipeline; one model per process, reused for every row."""

    name: ClassVar[str] = "local"
    continuous: ClassVar[bool] = True
    settings_class: ClassVar[type[LocalSettings]] = LocalSettings  # AVATARFLOW_LOCAL_*
    config_field: ClassVar[str] = "local"

    # With LocalSettings.dask_address, render tasks require one of these per Dask worker.
    resources: ClassVar[dict[str, float]] = {"GPU": 1}

    def __init__(
        self,
        pipe: LongCatVideoAvatarPipeline | None,
        settings: LocalSettings | None = None,
        on_segment: Callable[[str, int], None] | None = None,
    ) -> None:
        self.pipe = pipe  # None: rows render on the Dask workers at settings.dask_address
        self.settings = settings or LocalSettings()
        self.on_segment = on_segment  # called with (row id, segment index) after each save
        self._lock = threading.Lock()  # one render at a time on the one model
        self._fresh = True  # the first render after loading reports model_load="loaded"

    # --- what the stages ask --------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: BatchConfig) -> str | None:
        model_dir = config.local.model_dir
        if model_dir is None:
            return (
                "the local backend needs a checkpoint folder: --model-dir DIR (or "
                f"AVATARFLOW_LOCAL_MODEL_DIR); --model-dir {TINY_MODEL} uses the random-weight "
                "demo checkpoint, which renders noise"
            )
        if not config.local.is_tiny and not Path(model_dir).is_dir():
            return f"model folder {model_dir} does not exist"
        if config.local.dask_address:  # a scheduler no GPU worker serves would wait forever
            return dask_problem(config.local.dask_address)
        return None

    @classmethod
    def frame_grid(cls, config: BatchConfig) -> FrameGrid:
        if config.local.is_tiny or config.local.model_dir is None:
            return V1_GRID  # the tiny demo checkpoint is v1.0
        return FrameGrid(_checkpoint_fps(config.local.model_dir))

    @classmethod
    def expected_frames(cls, plan: RowPlan, chunk: Chunk) -> int:
        first, last = chunk.frame_span(plan.is_last(chunk))  # only the chunk's span is written
        return last - first

    @classmethod
    def expected_area(cls, config: BatchConfig, resolution: str) -> int | None:
        return None if _random_weights(config) else NOMINAL_AREA.get(resolution)

    @classmethod
    def model_name(cls, config: BatchConfig) -> str:
        if _random_weights(config):
            return TINY_MODEL_NAME
        return f"LongCat-Video-Avatar (local checkpoint {config.local.model_dir})"

    @classmethod
    def qc_not_applicable(cls, config: BatchConfig) -> frozenset[str]:
        # Random weights render noise: no face, no lips, no identity to keep across a seam; and
        # the tiny Whisper's words agree with no script (the captions gate checks the rest).
        tiny = frozenset({"face", "lipsync", "seams", CAPTIONS_GATE})
        return tiny if _random_weights(config) else frozenset()

    @classmethod
    def warning(cls, config: BatchConfig) -> str | None:
        if _random_weights(config):
            return "Rendered with the tiny random-weight checkpoint: these videos are noise."
        return None

    @classmethod
    def cache_key(cls, config: BatchConfig) -> str:
        return f"{checkpoint_dir(config)}|{config.local.model_dump_json()}"

    @classmethod
    def create(cls, config: BatchConfig) -> Self:
        # A batch run shows its own progress; the libraries' load/save bars would tear through it.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        if config.local.dask_address:
            return cls(None, config.local)  # the model lives in the Dask workers, not here
        model_dir = checkpoint_dir(config)
        if config.local.is_tiny and not (model_dir / DEFAULTS_FILE).exists():
            write_tiny_checkpoint(model_dir)  # DEFAULTS_FILE is written last: folder complete
        return cls(load_local_pipeline(config.local, model_dir), config.local)

    # --- rendering ------------------------------------------------------------------------------

    def render(self, job: RenderJob, ledger: Ledger | None = None) -> list[ChunkVideo]:
        """Render all of job's chunks as one continuous video; return one MP4 per chunk."""
        if self.pipe is None:
            return render_on_dask(job, self.settings)
        started = time.monotonic()
        segments_dir = Path(job.out_dir) / f"{job.plan.row.id}.segments"
        segments_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            num_segments = self._render_segments(job, segments_dir)
            model_load: Literal["loaded", "reused"] = "loaded" if self._fresh else "reused"
            self._fresh = False
        rendered = time.monotonic()
        segments = [
            np.load(segments_dir / f"{k:04d}.npy", mmap_mode="r") for k in range(num_segments)
        ]
        videos = self._write_chunks(job, segments, Timings(render_s=rendered - started))
        del segments  # release the memory maps before removing their files
        shutil.rmtree(segments_dir)
        worker = _worker_name()
        return [dataclasses.replace(v, worker=worker, model_load=model_load) for v in videos]

    def _row_audio(self, job: RenderJob) -> np.ndarray:
        """Place each chunk's WAV at its start in one 16 kHz buffer covering the row."""
        end_s = max(chunk.end_s for chunk in job.chunks)
        audio = np.zeros(int(np.ceil(end_s * MODEL_SAMPLE_RATE_HZ)), dtype=np.float32)
        for chunk, path in zip(job.chunks, job.chunk_audio_paths, strict=True):
            samples = read_wav(path)
            start = int(round(chunk.start_s * MODEL_SAMPLE_RATE_HZ))
            samples = samples[: max(0, audio.size - start)]
            audio[start : start + samples.size] = samples
        return audio

    def _render_segments(self, job: RenderJob, segments_dir: Path) -> int:
        """Render the row's missing segments, saving frames + state after each; return the total."""
        row, pipe = job.plan.row, self.pipe
        assert pipe is not None
        audio = self._row_audio(job)
        # The chunks' own segment counts, or more when their sum falls short of the whole row.
        needed = int(pipe.num_segments_for(audio.size / MODEL_SAMPLE_RATE_HZ))
        num_segments = max(sum(c.num_segments for c in job.chunks), needed)
        state = _latest_state(segments_dir, num_segments)
        if state is not None and state.segments_done == num_segments:
            return num_segments

        image = Image.open(job.image_path).convert("RGB") if job.image_path else None
        generator = torch.Generator(device=pipe._execution_device).manual_seed(job.plan.seed)
        params = {"num_inference_steps": self.settings.num_inference_steps, **row.params.given()}
        pipe(
            **params,  # the pipeline takes the manifest's parameter names
            audio=audio,
            image=image,
            num_segments=num_segments,
            generator=generator,
            output_type="latent",
            resume_state=state,
            segment_callback=partial(self._save_segment, segments_dir, row.id),
        )
        return num_segments

    def _save_segment(
        self,
        segments_dir: Path,
        row_id: str,
        _pipe: LongCatVideoAvatarPipeline,
        index: int,
        state: LongCatAvatarSegmentState,
        video: torch.Tensor,
    ) -> None:
        """Persist one finished segment: its frames (uint8 .npy), then its continuation state."""
        pixels = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255)
        with writing(segments_dir / f"{index:04d}.npy") as tmp, tmp.open("wb") as handle:
            np.save(handle, pixels.to(torch.uint8).numpy())
        # The state file is written last: its presence marks the segment finished.
        with writing(segments_dir / f"{index:04d}.safetensors") as tmp:
            state.save(tmp)
        if self.on_segment is not None:
            self.on_segment(row_id, index)

    def _write_chunks(
        self, job: RenderJob, segments: list[np.ndarray], timings: Timings
    ) -> list[ChunkVideo]:
        """Cut the row's frames at the chunk boundaries and encode one MP4 per chunk."""
        assert self.pipe is not None
        fps, videos = self.pipe.fps, []
        for chunk in job.chunks:
            first, last = chunk.frame_span(job.plan.is_last(chunk))
            path = Path(job.out_dir) / f"{chunk.row_id}-{chunk.index:03d}.mp4"
            encode_started = time.monotonic()
            write_mp4(path, _frame_span(segments, first, last), fps)
            videos.append(
                ChunkVideo(
                    row_id=chunk.row_id,
                    chunk_index=chunk.index,
                    path=str(path),
                    sha256=sha256_file(path),
                    backend=self.name,
                    seed=job.plan.seed,
                    timings=timings + Timings(encode_s=time.monotonic() - encode_started),
                )
            )
        return videos


def _latest_state(segments_dir: Path, num_segments: int) -> LongCatAvatarSegmentState | None:
    """The state after the last finished segment saved in segments_dir, if any."""
    for index in range(num_segments - 1, -1, -1):
        path = segments_dir / f"{index:04d}.safetensors"
        if path.exists() and (segments_dir / f"{index:04d}.npy").exists():
            return LongCatAvatarSegmentState.load(path)
    return None


def _frame_span(segments: list[np.ndarray], first: int, last: int) -> np.ndarray:
    """Frames [first, last) of the row, gathered from the per-segment arrays without joining all."""
    parts, offset = [], 0
    for frames in segments:
        lo, hi = max(first - offset, 0), min(last - offset, len(frames))
        if lo < hi:
            parts.append(frames[lo:hi])
        offset += len(frames)
    return np.ascontiguousarray(np.concatenate(parts))


def _random_weights(config: BatchConfig) -> bool:
    """The tiny random-weight checkpoint: "tiny", or a folder whose avatarflow.json declares its
    own small render size, as only `avatarflow model init-tiny` writes."""
    if config.local.is_tiny:
        return True
    return _declares_own_size(config.local.model_dir or "")


# Stages ask these once per row; a checkpoint folder's layout does not change under a run.
@functools.cache
def _declares_own_size(model_dir: str) -> bool:
    defaults = Path(model_dir) / DEFAULTS_FILE
    return defaults.is_file() and "sample_size" in json.loads(defaults.read_text())


@functools.cache
def _checkpoint_fps(model_dir: str) -> int:
    return int(checkpoint_fps(model_dir))


DASK_CONNECT_TIMEOUT_S = 10  # a scheduler that does not answer within this fails the run
DASK_POLL_S = 0.5  # a wait on a Dask render looks at the stop flag this often
DASK_NO_GPU_GRACE_S = 10.0  # how long a render waits for a worker with GPU=1 to (re)appear


class DaskWorkersError(RuntimeError):
    """The Dask scheduler has no worker that can run a render (none offers resources GPU=1)."""


def dask_problem(address: str) -> str | None:
    """Why renders cannot run on the Dask scheduler at address now (one line), or None.

    "local" is this process's own cluster, whose workers always offer GPU=1.
    """
    if address == "local":
        return None
    try:
        workers = _gpu_workers(_dask_client(address))
    except OSError as exc:  # TimeoutError included
        return f"cannot reach the Dask scheduler at {address}: {exc}"
    return None if workers else _no_gpu_message(address)


def render_on_dask(job: RenderJob, settings: LocalSettings) -> list[ChunkVideo]:
    """Render a row on a Dask worker holding a GPU resource, and wait for it.

    Each worker process keeps its own LocalRenderer, so the model is loaded once per worker and
    reused by every row and every flow run sent to that scheduler. Workers run their own installed
    copy of this module, read the job's inputs and write its MP4s under the run's work dir: same
    machine, or a work dir on shared storage at the same path.
    """
    address = settings.dask_address or ""
    client = _dask_client(address)
    worker_settings = settings.model_copy(update={"dask_address": None})
    future = client.submit(
        _render_here, job, worker_settings, resources=LocalRenderer.resources, pure=False
    )
    _log.info("row %s: rendering on the Dask scheduler at %s", job.plan.row.id, address)
    try:
        videos: list[ChunkVideo] = _wait_for_render(client, future, address, job.plan.row.id)
    except BaseException:
        future.cancel()  # a queued render never starts; a running one finishes its segments
        raise
    return videos


def _wait_for_render(client: Any, future: Any, address: str, row_id: str) -> Any:
    """future's result, waking every DASK_POLL_S: raise RenderStopped once a stop is requested,
    DaskWorkersError once no worker with GPU=1 has been there for DASK_NO_GPU_GRACE_S."""
    seen_gpu = time.monotonic()
    while True:
        try:
            return future.result(timeout=DASK_POLL_S)
        except TimeoutError:
            pass
        if stop_requested():
            raise RenderStopped(f"row {row_id}: Dask render abandoned (stopping)")
        try:
            present = address == "local" or _gpu_workers(client) > 0
        except OSError:  # no answer: unknown, not gone (the future fails if the scheduler is)
            present = True
        if present:
            seen_gpu = time.monotonic()
        elif time.monotonic() - seen_gpu > DASK_NO_GPU_GRACE_S:
            raise DaskWorkersError(_no_gpu_message(address))


def gpu_worker_count(address: str) -> int:
    """How many workers of the Dask scheduler at address can render now (offer GPU=1)."""
    return _gpu_workers(_dask_client(address))


def _gpu_workers(client: Any) -> int:
    """How many of the scheduler's workers offer every resource a render needs (GPU=1), asked of
    the scheduler now; raises OSError when it does not answer.

    Not client.scheduler_info(): the client refreshes that cached copy every few seconds with
    the totals only (no workers), and a refresh can land between its fetch and its read. On a
    loaded machine that counted 0 workers and failed every row with DaskWorkersError.
    """
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    workers = identity["workers"].values()
    needed = LocalRenderer.resources.items()
    return sum(all(w["resources"].get(k, 0) >= v for k, v in needed) for w in workers)


def _no_gpu_message(address: str) -> str:
    return (
        f"the Dask scheduler at {address} has no worker with resources GPU=1; start one worker "
        f"per GPU with `dask worker {address} --resources GPU=1 --nthreads 1`"
    )


def _render_here(job: RenderJob, settings: LocalSettings) -> list[ChunkVideo]:
    """On a Dask worker: render with this process's resident model (loaded on first use)."""
    config = BatchConfig(manifest="-", backend=LocalRenderer.name, local=settings)
    return LocalRenderer.shared(config).render(job)


_DASK_CLIENT_LOCK = threading.Lock()  # rows start on many threads: build each client once


def _dask_client(address: str) -> Any:
    """The process's one Dask client for address (built once, whichever thread asks first)."""
    with _DASK_CLIENT_LOCK:
        return _new_dask_client(address)


@functools.cache
def _new_dask_client(address: str) -> Any:
    """One Dask client per scheduler address in this process. "local": a LocalCluster in this
    process, one single-threaded worker per visible GPU each offering GPU=1, kept for the life of
    the process (a CLI run, or one Python session's runs; a deployment's flow run is a process of
    its own, so a model kept across runs needs a scheduler that outlives them)."""
    from distributed import Client, LocalCluster

    if address == "local":
        if torch.cuda.device_count() > 1:
            # dask-cuda pins one GPU per worker (CUDA_VISIBLE_DEVICES); `pip install dask-cuda`.
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(
                threads_per_worker=1, resources=LocalRenderer.resources, dashboard_address=":0"
            )
        else:
            cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=1,
                threads_per_worker=1,
                resources=LocalRenderer.resources,
                dashboard_address=":0",  # any free port: 8787 may be another cluster's
            )
        return Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
    return Client(  # type: ignore[no-untyped-call]
        address, set_as_default=False, timeout=DASK_CONNECT_TIMEOUT_S
    )


def _worker_name() -> str:
    """This process's name for sidecars: the Dask worker's address, else host:pid."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"
