"""Speed, memory and MFU of the full-size LongCat-Video-Avatar DiT on one CUDA GPU (random bf16).

Times denoising steps at 480p (24 latent frames of 60x104, 512 text tokens, 93 audio frames) for
v1.0 with CFG (3 forwards per step), v1.5 distilled (1 forward per step), and a continuation step
that reuses a KV cache for each, each with the weights resident on the GPU and with diffusers'
block-level group offloading (weights in pinned CPU memory, streamed one block at a time).
Prints a markdown table: seconds per step and per segment (steps x step + the KV-cache pre-pass;
VAE and encoders excluded), peak GPU memory, TFLOP per step and MFU against `dit_forward_flops`
(docs/model.md, "FLOPs"). The kept-fp32 modules stay fp32, as the loader keeps them.

    python bench/model_speed.py [--peak-tflops 990] [--iters 3] [--cfg-mode split] [--compile]
        [--offload none|group|both] [--attention-backend native|flash|_native_flash|sage]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from avatarflow.model.transformer_longcat_avatar import (  # noqa: E402
    LongCatVideoAvatarTransformer3DModel,
)

# Full-size configs: the class defaults are v1.0 (avatar_single/); v1.5 (base_model/) differs in the
# audio projection input (5 Whisper layer groups x 1280) and zero-pads the text rather than masking.
CONFIGS = {
    "v1.0": {},
    "v1.5": {"audio_block": 5, "audio_channel": 1280, "text_tokens_zero_pad": True},
}
AUDIO_SHAPE = {"v1.0": (12, 768), "v1.5": (5, 1280)}


def dit_forward_flops(
    *,
    num_noisy: int,
    num_cond: int = 0,
    num_ref: int = 0,
    cached: bool = False,
    frame_tokens: int = 1560,
    text_tokens: int = 512,
    batch: int = 1,
    skip_frames: int = 0,
    hidden: int = 4096,
    depth: int = 48,
    ffn_hidden: int = 11008,
    audio_tokens: int = 32,
    audio_dim: int = 768,
    caption_dim: int = 4096,
    patch_out: int = 64,
) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one DiT forward, by term; `total` sums them.

    Reference/conditioning latents run self-attention and the FFN but no cross-attention; with
    `cached` they are keys/values only (their pre-pass is a separate forward with num_noisy=0).
    `skip_frames` noisy frames do not attend to the reference (reference-skip window).
    """
    S, H = frame_tokens, hidden
    n_noisy, n_ref = num_noisy * S, num_ref * S
    n_ctx = (num_ref + num_cond) * S
    n_in = n_noisy + (0 if cached else n_ctx)  # tokens that run the block
    linear = 2 * n_in * (4 * H * H + 3 * H * ffn_hidden)  # qkv, proj, SwiGLU
    linear += 2 * n_noisy * 4 * H * H  # text and audio q / proj
    if n_noisy:
        linear += 2 * text_tokens * H * 2 * H + 2 * num_noisy * audio_tokens * audio_dim * 2 * H
    pairs = (
        n_noisy * (n_ctx + n_noisy) - skip_frames * S * n_ref
    )  # query-key pairs of the noisy tokens
    if not cached:
        pairs += (
            n_ref * n_ref + (n_ctx - n_ref) ** 2
        )  # reference->reference, conditioning->conditioning
    terms = {
        "linear": depth * linear,
        "self_attention": depth * 4 * pairs * H,
        "text_cross_attention": depth * 4 * n_noisy * text_tokens * H,
        "audio_cross_attention": depth * 4 * n_noisy * audio_tokens * H,
        "embed_and_final": 2 * n_in * H * 2 * patch_out
        + 2 * text_tokens * (caption_dim * H + H * H),
    }
    terms = {name: batch * value for name, value in terms.items()}
    terms["total"] = sum(terms.values())
    return terms


@dataclass
class Row:
    case: str
    offload: str
    batch: str
    tokens_q_kv: str
    s_per_step: float
    steps: int
    s_per_segment: float
    peak_gib: float
    tflop_per_step: float
    mfu: float


def build_random_model(version: str, device: torch.device) -> LongCatVideoAvatarTransformer3DModel:
    """Full-size model with random bf16 weights, built on meta so no fp32 copy ever exists."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LongCatVideoAvatarTransformer3DModel(**CONFIGS[version])
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    keep = set(model._keep_in_fp32_modules)
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            torch.nn.Module.float(module)  # what the loader does for _keep_in_fp32_modules
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # norm scales
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def apply_offload(model: LongCatVideoAvatarTransformer3DModel, mode: str, device) -> None:
    """Leave the weights on the GPU ("none") or stream them from pinned CPU memory ("group")."""
    if mode == "group":
        model.to("cpu")
        torch.cuda.empty_cache()
        model.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )


def make_inputs(version: str, batch: int, frames: int, lat_hw: tuple[int, int], args, device):
    """Random latents, text and audio in bf16 (a 40-token prompt padded to --text-tokens)."""
    bf16 = torch.bfloat16
    blocks, channels = AUDIO_SHAPE[version]
    mask = torch.zeros(batch, args.text_tokens, dtype=torch.long, device=device)
    mask[:, :40] = 1
    return {
        "hidden_states": torch.randn(batch, 16, frames, *lat_hw, device=device, dtype=bf16),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(
            batch, args.text_tokens, 4096, device=device, dtype=bf16
        ),
        "encoder_attention_mask": mask,
        "audio_embeds": torch.randn(
            batch, args.audio_frames, 5, blocks, channels, device=device, dtype=bf16
        ),
    }


def time_call(fn, warmup: int, iters: int) -> float:
    """Mean seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench_version(version: str, offload: str, args, device) -> list[Row]:
    """First-segment and continuation steps for one model version (model freed on return)."""
    model = build_random_model(version, device)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    apply_offload(model, offload, device)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=False)
    cfg = version == "v1.0"  # v1.0: text + audio CFG; v1.5 distilled: CFG 1.0 / 1.0, one forward
    splits = ([3] if args.cfg_mode == "batch3" else [2, 1]) if cfg else [1]
    # v1.0 continuation: 50 shifted steps, those above t=500 kept plus 10 (enhance_hf): 53 at shift
    # 7; the base scheduler's shift decides the real count (56 at shift 12).
    steps_first, steps_cont = (50, 53) if cfg else (8, 8)
    rows = [
        bench_first_segment(model, version, splits, steps_first, args, device),
        bench_continuation(model, version, splits, steps_cont, args, device),
    ]
    for row in rows:
        row.offload = offload
    return rows


def bench_first_segment(model, version, splits, steps, args, device) -> Row:
    """One step of a fresh segment (AT2V; AI2V's one conditioning latent changes <1% of FLOPs)."""
    frames, hw = args.latent_frames, (args.latent_height, args.latent_width)
    S = (hw[0] // 2) * (hw[1] // 2)
    inputs = [make_inputs(version, b, frames, hw, args, device) for b in splits]
    flops = sum(
        dit_forward_flops(num_noisy=frames, frame_tokens=S, batch=b, text_tokens=args.text_tokens)[
            "total"
        ]
        for b in splits
    )

    def step():
        return [model(**kw) for kw in inputs]

    tokens = f"{frames * S}/{frames * S}"
    return run_case(f"{version} first segment", splits, tokens, step, flops, steps, 0.0, args)


def bench_continuation(model, version, splits, steps, args, device) -> Row:
    """One step of a continuation segment: ref + 4 cond latents in a batch-1 KV cache, the rest
    noisy; the segment total includes the cache pre-pass."""
    num_ref, num_cond = 1, 4
    noisy, hw = args.latent_frames - num_cond, (args.latent_height, args.latent_width)
    S = (hw[0] // 2) * (hw[1] // 2)
    ctx = torch.randn(1, 16, num_ref + num_cond, *hw, device=device, dtype=torch.bfloat16)

    def prepass():
        return model.build_kv_cache(ctx, num_ref, num_cond, ref_img_index=10)

    prepass_s = time_call(prepass, 1, 1)
    cache = prepass()
    inputs = [make_inputs(version, b, noisy, hw, args, device) for b in splits]
    flops = sum(
        dit_forward_flops(
            num_noisy=noisy,
            num_cond=num_cond,
            num_ref=num_ref,
            cached=True,
            frame_tokens=S,
            batch=b,
            skip_frames=7,  # ref_img_index 10, mask_frame_range 3, 4 cond latents: frames 3..9
            text_tokens=args.text_tokens,
        )["total"]
        for b in splits
    )

    def step():
        return [model(**kw, kv_cache=cache, ref_img_index=10, mask_frame_range=3) for kw in inputs]

    tokens = f"{noisy * S}/{(noisy + num_ref + num_cond) * S}"
    name = f"{version} continuation (KV cache)"
    return run_case(name, splits, tokens, step, flops, steps, prepass_s, args)


def run_case(name, splits, tokens, step_fn, flops, steps, extra_s, args) -> Row:
    """Time one denoising step; a CUDA OOM becomes a row of NaNs rather than a crash."""
    torch.cuda.reset_peak_memory_stats()
    try:
        sec = time_call(step_fn, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        sec = float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    return Row(
        name,
        "none",
        "+".join(map(str, splits)),
        tokens,
        sec,
        steps,
        extra_s + steps * sec,
        peak,
        flops / 1e12,
        flops / (sec * args.peak_tflops * 1e12),
    )


def to_markdown(rows: list[Row], device_name: str, args) -> str:
    head = (
        f"DiT speed on {device_name}, latent {args.latent_frames}x{args.latent_height}x"
        f"{args.latent_width}, {args.text_tokens} text tokens, peak {args.peak_tflops:g} TFLOP/s"
        f"{', torch.compile' if args.compile else ''}"
        f", attention {args.attention_backend or 'default'}\n\n"
    )
    lines = [
        "| case | offload | batch | tokens q/kv | s/step | steps | s/segment | peak GiB | "
        "TFLOP/step | MFU |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.offload} | {r.batch} | {r.tokens_q_kv} | {r.s_per_step:.2f} | "
            f"{r.steps} | "
            f"{r.s_per_segment:.1f} | {r.peak_gib:.1f} | {r.tflop_per_step:.0f} | {r.mfu:.1%} |"
        )
    return head + "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", nargs="+", default=["v1.0", "v1.5"], choices=sorted(CONFIGS))
    p.add_argument(
        "--peak-tflops", type=float, default=990.0, help="dense bf16 peak (H100 SXM: 990)"
    )
    p.add_argument(
        "--cfg-mode",
        choices=["batch3", "split"],
        default="batch3",
        help="v1.0 CFG as one batch-3 forward or a batch-2 plus a batch-1 forward",
    )
    p.add_argument("--latent-frames", type=int, default=24)
    p.add_argument("--latent-height", type=int, default=60)
    p.add_argument("--latent-width", type=int, default=104)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--audio-frames", type=int, default=93)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks")
    p.add_argument(
        "--offload",
        choices=["none", "group", "both"],
        default="both",
        help="weights resident on the GPU, streamed per block from CPU (group), or both",
    )
    p.add_argument(
        "--attention-backend",
        default=None,
        help="diffusers backend (native, flash, _native_flash, sage); default: dispatch's own",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/model_speed.py needs a CUDA GPU, and torch.cuda.is_available() is False."
        )
    device = torch.device("cuda")
    rows = []
    offloads = ["none", "group"] if args.offload == "both" else [args.offload]
    with torch.inference_mode():
        for version in args.versions:
            for offload in offloads:
                rows += bench_version(version, offload, args, device)
                torch.cuda.empty_cache()
    print(to_markdown(rows, torch.cuda.get_device_name(device), args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
