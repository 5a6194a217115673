"""Load LongCat-Video-Avatar from a local folder into a LongCatVideoAvatarPipeline (no downloads).

Accepts the official Hugging Face layout (`LongCat-Video/` + `LongCat-Video-Avatar/` for v1.0 or
`LongCat-Video-Avatar-1.5/` for v1.5) or a folder written by
`LongCatVideoAvatarPipeline.save_pretrained`. Used by tasks/render_local.py.

INT8 weights are dequantised and the DMD LoRA is merged in fp32, and each tensor is rounded once to
its target dtype: the requested one, or fp32 for the model's `_keep_in_fp32_modules`. The
reference (meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794,
`longcat_video/modules/lora_utils.py`) never merges: it adds multiplier * alpha_scale *
up(down(x)) to each target Linear's output in the model dtype; in fp32 the two agree to float
rounding, which tests/model/test_loading.py checks.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    UMT5EncoderModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatarflow.model.pipeline_longcat_avatar import LongCatVideoAvatarPipeline
from avatarflow.model.transformer_longcat_avatar import LongCatVideoAvatarTransformer3DModel

BASE_DIR = "LongCat-Video"
AVATAR_DIRS = {"1.0": "LongCat-Video-Avatar", "1.5": "LongCat-Video-Avatar-1.5"}
DEFAULTS_FILE = "avatarflow.json"  # optional pipeline defaults (the tiny checkpoint's sample size)
_LORA_PREFIX = "lora___lorahyphen___"
_LORA_DOT = "___lorahyphen___"
# transformers' from_pretrained is not safe to run while another thread runs a model (meta tensors).
_LOAD_LOCK = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match the model."""


def _require(path: Path, *alternatives: str) -> Path:
    """Return path (or the first existing sibling alternative); raise naming it when none exists."""
    for candidate in (path, *(path.parent / name for name in alternatives)):
        if candidate.exists():
            return candidate
    names = " or ".join(str(path.parent / n) for n in (path.name, *alternatives))
    raise FileNotFoundError(f"LongCat checkpoint is incomplete: expected {names}")


def detect_layout(root: str | Path) -> str:
    """Return "diffusers", "1.5" or "1.0" for a checkpoint folder."""
    root = Path(root)
    if (root / "model_index.json").exists():
        return "diffusers"
    if (root / AVATAR_DIRS["1.5"]).is_dir():
        return "1.5"
    if (root / AVATAR_DIRS["1.0"]).is_dir():
        return "1.0"
    expected = " or ".join(str(root / d) for d in ("model_index.json", *AVATAR_DIRS.values()))
    raise FileNotFoundError(f"no LongCat-Video-Avatar checkpoint in {root}: expected {expected}")


def checkpoint_fps(root: str | Path) -> int:
    """The frame rate a checkpoint renders at (16 for v1.0, 25 for v1.5), without loading it."""
    from avatarflow.model.pipeline_longcat_avatar import VERSION_DEFAULTS

    version = detect_layout(root)
    if version == "diffusers":
        index = json.loads((Path(root) / "model_index.json").read_text())
        return int(index.get("fps") or VERSION_DEFAULTS[index.get("model_version", "1.0")]["fps"])
    return int(VERSION_DEFAULTS[version]["fps"])


def _shards(folder: Path, index_name: str, single_name: str) -> list[Path]:
    """Shard files of a (possibly sharded) safetensors checkpoint, each checked to exist."""
    index = folder / index_name
    if not index.exists():
        return [_require(folder / single_name, index_name)]
    weight_map = json.loads(index.read_text())["weight_map"]
    return [_require(folder / name) for name in sorted(set(weight_map.values()))]


def dequantize_int8(
    state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Turn `X.weight_int8` + per-output-channel `X.weight_scale` pairs into `X.weight` of dtype.

    Returns (tensors, unpaired): a pair split across two shards waits in unpaired for the next.
    """
    out: dict[str, torch.Tensor] = {}
    unpaired: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.endswith((".weight_int8", ".weight_scale")):
            out[key] = tensor
            continue
        base = key.rsplit("_", 1)[0]
        q, scale = state.get(base + "_int8"), state.get(base + "_scale")
        if q is None or scale is None:
            unpaired[key] = tensor
        elif key.endswith("_int8"):
            scale = scale.float().reshape(-1, *([1] * (q.ndim - 1)))
            out[base] = (q.float() * scale).to(dtype)
    return out, unpaired


def read_lora(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group an official LoRA file by target module: {module: {down, up or up.K, alpha_scale}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, part = key.partition(".")
        if not name.startswith(_LORA_PREFIX):
            raise CheckpointError(f"unexpected LoRA tensor {key} in {path}")
        module = name.removeprefix(_LORA_PREFIX).replace(_LORA_DOT, ".")
        modules.setdefault(module, {})[part] = tensor
    return modules


def lora_delta(parts: dict[str, torch.Tensor], multiplier: float = 1.0) -> torch.Tensor:
    """Return the weight update multiplier · alpha_scale · up @ down for one LoRA module.

    Split fused layers (qkv, kv) store one up-projection per part (`lora_up.blocks.K`) over its own
    rank-slice of `lora_down`: a block-diagonal up-projection.
    """
    down = parts["lora_down.weight"].float()
    blocks = sorted(
        (int(k.split(".")[2]), v) for k, v in parts.items() if k.startswith("lora_up.blocks.")
    )
    if blocks:
        up = torch.block_diag(*(v.float() for _, v in blocks))
    else:
        up = parts["lora_up.weight"].float()
    scale = float(parts["alpha_scale"]) if "alpha_scale" in parts else 1.0
    return multiplier * scale * (up @ down)


def _merge_lora(
    state: dict[str, torch.Tensor], lora: dict[str, dict[str, torch.Tensor]], multiplier: float
) -> set[str]:
    """Add the LoRA updates in fp32 to the weights present in state (one shard), leaving them
    fp32 (no rounding to the stored dtype); return the merged modules."""
    merged = set()
    for module, parts in lora.items():
        key = module + ".weight"
        if key in state:
            weight = state[key]
            delta = lora_delta(parts, multiplier)
            if delta.shape != weight.shape:
                got, want = tuple(delta.shape), tuple(weight.shape)
                raise CheckpointError(f"LoRA for {key} has shape {got}, weight is {want}")
            state[key] = weight.float() + delta
            merged.add(module)
    return merged


def _check_shapes(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], shard: Path
) -> None:
    """Raise naming the first tensor the model does not have or whose shape differs."""
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key} in {shard}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            want, got = tuple(expected[key].shape), tuple(tensor.shape)
            raise CheckpointError(f"tensor {key} in {shard} has shape {got}, model expects {want}")


def load_transformer(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    lora_path: str | Path | None = None,
    lora_multiplier: float = 1.0,
) -> LongCatVideoAvatarTransformer3DModel:
    """Load the DiT from an official folder (bf16/fp32 shards or INT8), merging a LoRA if given.

    Tensors end in `dtype`, except the `_keep_in_fp32_modules`, which stay fp32.
    """
    folder = Path(folder)
    config = LongCatVideoAvatarTransformer3DModel.load_config(_require(folder / "config.json"))
    int8 = (folder / "quantized_model.safetensors.index.json").exists()
    if int8:
        shards = _shards(folder, "quantized_model.safetensors.index.json", "")
    else:
        index = "diffusion_pytorch_model.safetensors.index.json"
        shards = _shards(folder, index, "diffusion_pytorch_model.safetensors")
    with init_empty_weights():
        model = LongCatVideoAvatarTransformer3DModel.from_config(config)
    expected = model.state_dict()
    fp32_modules = set(model._keep_in_fp32_modules)

    def target_dtype(key: str) -> torch.dtype:
        return torch.float32 if fp32_modules.intersection(key.split(".")) else dtype

    lora = read_lora(lora_path) if lora_path else {}
    merged: set[str] = set()
    unpaired: dict[str, torch.Tensor] = {}
    for shard in shards:
        state = load_file(str(shard))
        if int8:
            state, unpaired = dequantize_int8(unpaired | state)
        _check_shapes(state, expected, shard)
        merged |= _merge_lora(state, lora, lora_multiplier)
        state = {k: v.to(target_dtype(k)) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
    if unpaired:
        raise CheckpointError(f"INT8 tensor {min(unpaired)} in {folder} has no int8/scale partner")
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise CheckpointError(f"tensor {missing[0]} missing from {folder} ({len(missing)} missing)")
    unmatched = sorted(set(lora) - merged)
    if unmatched:
        raise CheckpointError(f"LoRA module {unmatched[0]} in {lora_path} matches no weight")
    return model.eval()


def _load_audio(folder: Path, version: str, dtype: torch.dtype) -> tuple:
    _require(folder / "config.json")
    _require(folder / "preprocessor_config.json")
    if version == "1.0":
        # The official folder holds a pytorch_model.bin whose keys carry a "wav2vec2." prefix;
        # transformers strips it as the base-model prefix.
        _require(folder / "pytorch_model.bin", "model.safetensors")
        encoder = Wav2Vec2Model.from_pretrained(folder, dtype=dtype, local_files_only=True)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    else:
        _shards(folder, "model.safetensors.index.json", "model.safetensors")
        encoder = WhisperModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        extractor = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
    return encoder.eval(), extractor


def _dit_folder(avatar: Path, version: str, prefer_int8: bool) -> Path:
    if version == "1.0":
        return avatar / "avatar_single"
    int8 = avatar / "base_model_int8"
    if (prefer_int8 or not (avatar / "base_model").exists()) and int8.exists():
        return int8
    return avatar / "base_model"


def load_official(
    root: str | Path,
    version: str | None = None,
    dtype: torch.dtype = torch.float32,
    prefer_int8: bool = False,
    lora_multiplier: float = 1.0,
) -> LongCatVideoAvatarPipeline:
    """Build the pipeline from the official layout under root (v1.0 or v1.5, auto-detected)."""
    root = Path(root)
    version = version or detect_layout(root)
    base, avatar = root / BASE_DIR, root / AVATAR_DIRS[version]
    _require(base / "tokenizer" / "tokenizer_config.json")
    _require(base / "text_encoder" / "config.json")
    _shards(base / "text_encoder", "model.safetensors.index.json", "model.safetensors")
    _require(base / "vae" / "diffusion_pytorch_model.safetensors")
    scheduler_dir = (base if version == "1.0" else avatar) / "scheduler"
    _require(scheduler_dir / "scheduler_config.json")
    lora = _require(avatar / "lora" / "dmd_lora.safetensors") if version == "1.5" else None
    audio_dir = avatar / ("chinese-wav2vec2-base" if version == "1.0" else "whisper-large-v3")
    encoder, extractor = _load_audio(audio_dir, version, dtype)
    defaults_file = root / DEFAULTS_FILE
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    return LongCatVideoAvatarPipeline(
        tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer", local_files_only=True),
        text_encoder=UMT5EncoderModel.from_pretrained(
            base / "text_encoder", dtype=dtype, local_files_only=True
        ).eval(),
        vae=AutoencoderKLWan.from_pretrained(base / "vae", dtype=dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir),
        transformer=load_transformer(
            _dit_folder(avatar, version, prefer_int8), dtype, lora, lora_multiplier
        ),
        audio_encoder=encoder,
        audio_feature_extractor=extractor,
        model_version=version,
        sample_size=defaults.get("sample_size"),
        default_steps=defaults.get("default_steps"),
        enhance_hf=defaults.get("enhance_hf"),
    )


def load_pipeline(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    prefer_int8: bool = False,
    lora_multiplier: float = 1.0,
) -> LongCatVideoAvatarPipeline:
    """Load a pipeline from the official layout or a diffusers-saved folder (thread-safe).

    `lora_multiplier` scales the v1.5 DMD LoRA merged into the official weights (the maintainers
    suggest 0.3 against lip colour drift on long videos); a diffusers-saved folder already holds
    merged weights and ignores it.
    """
    with _LOAD_LOCK:
        if detect_layout(path) == "diffusers":
            return LongCatVideoAvatarPipeline.from_pretrained(
                path, dtype=dtype, local_files_only=True
            )
        return load_official(
            path, dtype=dtype, prefer_int8=prefer_int8, lora_multiplier=lora_multiplier
        )
