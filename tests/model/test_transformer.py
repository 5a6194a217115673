"""Tests for model/transformer_longcat_avatar.py: a tiny random model on CPU in fp32, and
meta-device builds of both full-size configs checked against the official tensor names and shapes
(docs/model.md, "Checkpoint layout")."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from avatarflow.model.attention_longcat_avatar import apply_rope, frame_layout, rope_tables
from avatarflow.model.transformer_longcat_avatar import (
    FinalLayer,
    LongCatKVCache,
    LongCatVideoAvatarTransformer3DModel,
    TimestepEmbedder,
)

TINY = {
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 4,  # head_dim 16 -> RoPE t/h/w = 8/4/4
    "caption_channels": 32,
    "adaln_tembed_dim": 32,
    "frequency_embedding_size": 32,
    "audio_block": 2,
    "audio_channel": 8,
    "intermediate_dim": 32,
    "output_dim": 32,
    "context_tokens": 8,
}
LATENT_HW = (4, 6)  # 2 x 3 tokens per latent frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(**overrides) -> LongCatVideoAvatarTransformer3DModel:
    torch.manual_seed(0)
    return LongCatVideoAvatarTransformer3DModel(**{**TINY, **overrides}).eval()


def make_inputs(num_ref=0, num_cond=0, num_noisy=3, batch=2, text_len=10, seed=1) -> dict:
    """Inputs for one forward; audio covers the conditioning + noisy latents (1 + 4k frames)."""
    g = torch.Generator().manual_seed(seed)
    frames = num_ref + num_cond + num_noisy
    audio_frames = 1 + 4 * (num_cond + num_noisy - 1)
    return {
        "hidden_states": torch.randn(batch, 16, frames, *LATENT_HW, generator=g),
        "timestep": torch.full((batch,), 700.0),
        "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=g),
        "audio_embeds": torch.randn(batch, audio_frames, 5, 2, 8, generator=g),
        "num_ref_latents": num_ref,
        "num_cond_latents": num_cond,
    }


@torch.no_grad()
def run(model, **inputs) -> torch.Tensor:
    return model(**inputs).sample


def frames_changed(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per latent frame: does any output value differ?"""
    return [not torch.allclose(a[:, :, i], b[:, :, i], atol=1e-6) for i in range(a.shape[2])]


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("num_ref", "num_cond", "num_noisy"),
    [(0, 0, 3), (0, 1, 3), (1, 2, 4)],
    ids=["at2v", "ai2v", "continuation"],
)
def test_forward_returns_fp32_prediction_for_every_input_frame(num_ref, num_cond, num_noisy):
    model = build()
    inputs = make_inputs(num_ref, num_cond, num_noisy)
    out = run(model, **inputs)
    assert out.shape == inputs["hidden_states"].shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (tuple_out,) = model(**inputs, return_dict=False)
    torch.testing.assert_close(tuple_out, out)


def test_bf16_forward_stays_close_to_fp32():
    model = build()
    inputs = make_inputs(1, 2, 4)
    ref = run(model, **inputs)
    out = run(model.to(torch.bfloat16), **inputs)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05


# ----------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(("ref_img_index", "skip_fits"), [(3, True), (10, False)])
def test_kv_cache_forward_matches_uncached_forward(ref_img_index, skip_fits):
    model = build()
    num_ref, num_cond, num_noisy = 1, 2, 4
    inputs = make_inputs(num_ref, num_cond, num_noisy)
    ctx = num_ref + num_cond
    inputs["hidden_states"][1, :, :ctx] = inputs["hidden_states"][0, :, :ctx]  # one shared context
    kwargs = {"ref_img_index": ref_img_index, "mask_frame_range": 1}
    timestep = torch.full((2, ctx + num_noisy), 700.0)
    timestep[:, :ctx] = 0  # the cache holds clean (timestep 0) context
    full = run(model, **{**inputs, "timestep": timestep}, **kwargs)

    with torch.no_grad():
        cache = model.build_kv_cache(
            inputs["hidden_states"][:1, :, :ctx], num_ref, num_cond, ref_img_index
        )
    assert isinstance(cache, LongCatKVCache)
    assert len(cache.keys) == len(cache.values) == TINY["depth"]
    assert cache.keys[0].shape == (1, 4, ctx * 6, 16)  # (B, heads, S_cached, head_dim), batch 1
    cached_inputs = {**inputs, "hidden_states": inputs["hidden_states"][:, :, ctx:]}
    del cached_inputs["num_ref_latents"], cached_inputs["num_cond_latents"]
    cached = run(model, **cached_inputs, **kwargs, kv_cache=cache)

    assert cached.shape == (2, 16, num_noisy, *LATENT_HW)
    torch.testing.assert_close(cached, full[:, :, ctx:], atol=1e-5, rtol=1e-5)
    # Window ref_img_index +- 1, minus num_cond: noisy frames [0, 3); fits only at index 3.
    layout = frame_layout(num_noisy, 6, 0, 0, cache, ref_img_index, 1)
    assert (layout.skip is not None) == skip_fits


def test_kv_cache_from_another_grid_is_rejected():
    model = build()
    with torch.no_grad():
        cache = model.build_kv_cache(torch.randn(1, 16, 3, 4, 4), 1, 2)
    with pytest.raises(ValueError, match="kv_cache"):
        run(model, **{**make_inputs(0, 0, 4), "num_cond_latents": 0}, kv_cache=cache)


# -------------------------------------------------------------------------------------------- masks


def test_context_latents_ignore_noisy_latents_text_and_each_other():
    model = build()
    base = make_inputs(1, 2, 4)
    out = run(model, **base)

    noisy = {**base, "hidden_states": base["hidden_states"].clone()}
    noisy["hidden_states"][:, :, 3:] += 1.0
    assert frames_changed(out, run(model, **noisy)) == [False] * 3 + [True] * 4

    text = {**base, "encoder_hidden_states": base["encoder_hidden_states"] + 1.0}
    assert frames_changed(out, run(model, **text)) == [False] * 3 + [True] * 4

    cond = {**base, "hidden_states": base["hidden_states"].clone()}
    cond["hidden_states"][:, :, 1:3] += 1.0  # the reference attends only to itself
    assert frames_changed(out, run(model, **cond)) == [False] + [True] * 6

    ref = {**base, "hidden_states": base["hidden_states"].clone()}
    ref["hidden_states"][:, :, :1] += 1.0  # conditioning latents never see the reference
    changed = frames_changed(out, run(model, **ref))
    assert changed[:3] == [True, False, False]


@pytest.mark.parametrize(
    ("ref_img_index", "expected_noisy"),
    [
        (3, [False, False, False, True]),  # window frames 0..2 do not see the reference
        (4, [True, False, False, False]),  # window 1..3
        (5, [True] * 4),  # window 2..4 does not fit 4 noisy frames: disabled, not clipped
        (1, [True] * 4),  # starts before the first noisy frame: disabled
    ],
)
def test_reference_skip_window_hides_reference_from_noisy_frames(ref_img_index, expected_noisy):
    model = build(depth=1)  # one block: a frame sees the reference only through its own attention
    base = {**make_inputs(1, 2, 4), "ref_img_index": ref_img_index, "mask_frame_range": 1}
    moved = {**base, "hidden_states": base["hidden_states"].clone()}
    moved["hidden_states"][:, :, :1] += 1.0
    changed = frames_changed(run(model, **base), run(model, **moved))
    assert changed == [True, False, False, *expected_noisy]


# -------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    ("video_frame", "slot", "latent"),
    [
        (0, 0, 0),  # first latent: its video frame's whole window
        (0, 4, 0),
        (5, 0, 2),  # latent 2 covers video frames 5..8: first frame slots 0..2
        (5, 2, 2),
        (5, 3, None),
        (6, 2, 2),  # middle frames: centre slot only
        (6, 1, None),
        (7, 3, None),
        (8, 4, 2),  # last frame: slots 2..4
        (8, 1, None),
    ],
)
def test_audio_window_slot_reaches_only_its_latent_frame(video_frame, slot, latent):
    model = build(depth=1)  # after one block, frames mix only through audio
    base = make_inputs(0, 0, 4)  # 13 video frames -> 4 latents
    moved = {**base, "audio_embeds": base["audio_embeds"].clone()}
    moved["audio_embeds"][:, video_frame, slot] += 1.0
    changed = frames_changed(run(model, **base), run(model, **moved))
    assert changed == [i == latent for i in range(4)]


def test_reference_and_conditioning_latents_get_no_audio():
    model = build()
    base = make_inputs(1, 2, 4)
    quiet = run(model, **{**base, "audio_embeds": None})  # None = zero audio features
    torch.testing.assert_close(
        quiet, run(model, **{**base, "audio_embeds": torch.zeros_like(base["audio_embeds"])})
    )
    assert frames_changed(quiet, run(model, **base)) == [False] * 3 + [True] * 4


# ----------------------------------------------------------------------------------- text, timestep


@pytest.mark.parametrize("zero_pad", [False, True])
def test_padded_text_tokens_are_ignored(zero_pad):
    model = build(text_tokens_zero_pad=zero_pad)
    base = make_inputs(0, 1, 3)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 7:] = 0
    out = run(model, **base, encoder_attention_mask=mask)
    noisy_pad = base["encoder_hidden_states"].clone()
    noisy_pad[mask == 0] = torch.randn(int((mask == 0).sum()), 32)
    torch.testing.assert_close(
        run(model, **{**base, "encoder_hidden_states": noisy_pad}, encoder_attention_mask=mask), out
    )
    # Zero-pad keeps padded positions as keys (equal to the kv bias), so it differs from masking.
    other = build(text_tokens_zero_pad=not zero_pad)
    assert not torch.allclose(run(other, **base, encoder_attention_mask=mask), out)


def test_one_timestep_per_sample_applies_to_every_frame_as_in_the_reference():
    # The reference expands a (B,) timestep to all T frames, reference and conditioning included
    # (LongCatVideoAvatarTransformer3DModel.forward); clean frames need an explicit (B, T) zero.
    model = build()
    base = make_inputs(1, 2, 4)
    every_frame = torch.full((2, 7), 700.0)
    torch.testing.assert_close(run(model, **base), run(model, **{**base, "timestep": every_frame}))
    clean_context = every_frame.clone()
    clean_context[:, :3] = 0
    assert frames_changed(run(model, **base), run(model, **{**base, "timestep": clean_context}))[0]


# -------------------------------------------------------------------------------------- conventions


def test_timestep_sinusoid_is_cos_then_sin_of_the_weight_dtype_value():
    emb = TimestepEmbedder.sinusoid(torch.tensor([0.0, 2.0]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, [0, 4]], torch.tensor([math.cos(2.0), math.sin(2.0)]))
    model = build().to(torch.bfloat16)  # a bf16 model sees 980.25 as 980
    inputs = make_inputs(0, 0, 2)
    a = run(model, **{**inputs, "timestep": torch.full((2,), 980.25)})
    assert torch.equal(a, run(model, **{**inputs, "timestep": torch.full((2,), 980.0)}))


def test_rope_rotates_interleaved_pairs_by_t_then_h_then_w_positions():
    # head_dim 16: t uses pairs 0..3, h pairs 4..5, w pairs 6..7; each axis' first pair has freq 1.
    cos, sin = rope_tables(16, (3, 2, 2), num_ref=1, ref_img_index=10, device=torch.device("cpu"))
    angles = torch.atan2(sin, cos).view(3, 2, 2, 8)
    torch.testing.assert_close(angles[:, 0, 0, 0], torch.tensor([10.0 - 4 * math.pi, 0.0, 1.0]))
    torch.testing.assert_close(angles[0, :, 1, 4], torch.tensor([0.0, 1.0]))  # h axis
    torch.testing.assert_close(angles[0, 1, :, 6], torch.tensor([0.0, 1.0]))  # w axis
    x = torch.zeros(1, 12, 1, 16)
    x[..., 0] = 1.0  # (x0, x1) = (1, 0) -> (cos, sin) in the same pair
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, :, 0, :2], torch.stack([cos[:, 0], sin[:, 0]], dim=-1))


def test_final_layer_modulation_chunks_are_shift_then_scale():
    layer = FinalLayer(hidden_size=8, num_patch=1, out_channels=8, adaln_tembed_dim=4)
    with torch.no_grad():
        layer.adaLN_modulation[1].weight.zero_()
        layer.adaLN_modulation[1].bias.copy_(torch.cat([torch.full((8,), 3.0), torch.zeros(8)]))
    x, t = torch.randn(1, 4, 8), torch.randn(1, 2, 4)
    expected = layer.linear(torch.nn.functional.layer_norm(x, (8,), eps=1e-6) + 3.0)
    torch.testing.assert_close(layer(x, t), expected)


def test_block_is_identity_when_gates_and_text_projection_are_zero():
    # adaLN chunks are (shift, scale, gate) x 2 and audio (shift, scale, gate): zero only the gates.
    block = build().blocks[0]
    with torch.no_grad():
        for mod, n in ((block.adaLN_modulation[1], 6), (block.audio_adaLN_modulation[1], 3)):
            mod.weight.zero_()
            bias = torch.randn(n, 64)
            bias[2::3] = 0
            mod.bias.copy_(bias.flatten())
        block.cross_attn.proj.weight.zero_()
        block.cross_attn.proj.bias.zero_()
    model = build()
    model.blocks[0] = block
    x = torch.randn(1, 12, 64)
    layout = frame_layout(2, 6, 0, 0, None, 10, 0)
    rope = rope_tables(16, (2, 2, 3), 0, 10, torch.device("cpu"))
    with torch.no_grad():
        out, _ = block(
            x.clone(),
            torch.randn(1, 2, 32),
            torch.randn(1, 5, 64),
            None,
            torch.randn(1, 2, 8, 32),
            rope,
            layout,
        )
    torch.testing.assert_close(out, x)


# ----------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = make_inputs(1, 2, 4)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(**inputs).sample.square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert "blocks.0.attn.qkv.weight" in plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


# ------------------------------------------------------------------------------------------ loading


def test_save_pretrained_shards_round_trip_with_official_config_keys(tmp_path):
    model = build()
    inputs = make_inputs(1, 2, 4)
    folder = tmp_path / "avatar_single"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    config = json.loads((folder / "config.json").read_text())
    config.update(  # keys of the shipped v1.5 config.json that only pick kernels / parallelism
        enable_flashattn2=True,
        enable_flashattn3=False,
        enable_xformers=False,
        enable_bsa=False,
        bsa_params=None,
        cp_split_hw=None,
        audio_prenorm=False,
        class_range=24,
        class_interval=4,
    )
    (folder / "config.json").write_text(json.dumps(config))

    loaded = LongCatVideoAvatarTransformer3DModel.from_pretrained(folder, cp_split_hw=[1, 1]).eval()
    assert loaded.config.cp_split_hw == [1, 1]
    assert torch.equal(run(loaded, **inputs), run(model, **inputs))


# ---------------------------------------------------------------------------------------- full size

# Block 0 and the top-level tensors of v1.0 `avatar_single/`, in the official index order.
V10_TOP = [
    ("x_embedder.proj.weight", (4096, 16, 1, 2, 2)),
    ("x_embedder.proj.bias", (4096,)),
    ("t_embedder.mlp.0.weight", (512, 256)),
    ("t_embedder.mlp.0.bias", (512,)),
    ("t_embedder.mlp.2.weight", (512, 512)),
    ("t_embedder.mlp.2.bias", (512,)),
    ("y_embedder.y_proj.0.weight", (4096, 4096)),
    ("y_embedder.y_proj.0.bias", (4096,)),
    ("y_embedder.y_proj.2.weight", (4096, 4096)),
    ("y_embedder.y_proj.2.bias", (4096,)),
]
V10_BLOCK = [
    ("adaLN_modulation.1.weight", (24576, 512)),
    ("adaLN_modulation.1.bias", (24576,)),
    ("audio_adaLN_modulation.1.weight", (12288, 512)),
    ("audio_adaLN_modulation.1.bias", (12288,)),
    ("pre_crs_attn_norm.weight", (4096,)),
    ("pre_crs_attn_norm.bias", (4096,)),
    ("pre_video_crs_attn_norm.weight", (4096,)),
    ("pre_video_crs_attn_norm.bias", (4096,)),
    ("attn.qkv.weight", (12288, 4096)),
    ("attn.qkv.bias", (12288,)),
    ("attn.q_norm.weight", (128,)),
    ("attn.k_norm.weight", (128,)),
    ("attn.proj.weight", (4096, 4096)),
    ("attn.proj.bias", (4096,)),
    ("cross_attn.q_linear.weight", (4096, 4096)),
    ("cross_attn.q_linear.bias", (4096,)),
    ("cross_attn.kv_linear.weight", (8192, 4096)),
    ("cross_attn.kv_linear.bias", (8192,)),
    ("cross_attn.proj.weight", (4096, 4096)),
    ("cross_attn.proj.bias", (4096,)),
    ("cross_attn.q_norm.weight", (128,)),
    ("cross_attn.k_norm.weight", (128,)),
    ("audio_cross_attn.q_linear.weight", (4096, 4096)),
    ("audio_cross_attn.q_linear.bias", (4096,)),
    ("audio_cross_attn.q_norm.weight", (128,)),
    ("audio_cross_attn.proj.weight", (4096, 4096)),
    ("audio_cross_attn.proj.bias", (4096,)),
    ("audio_cross_attn.kv_linear.weight", (8192, 768)),
    ("audio_cross_attn.kv_linear.bias", (8192,)),
    ("audio_cross_attn.k_norm.weight", (128,)),
    ("ffn.w1.weight", (11008, 4096)),
    ("ffn.w2.weight", (4096, 11008)),
    ("ffn.w3.weight", (11008, 4096)),
]
V10_TAIL = [
    ("audio_proj.proj1.weight", (512, 46080)),
    ("audio_proj.proj1.bias", (512,)),
    ("audio_proj.proj1_vf.weight", (512, 73728)),
    ("audio_proj.proj1_vf.bias", (512,)),
    ("audio_proj.proj2.weight", (512, 512)),
    ("audio_proj.proj2.bias", (512,)),
    ("audio_proj.proj3.weight", (24576, 512)),
    ("audio_proj.proj3.bias", (24576,)),
    ("audio_proj.norm.weight", (768,)),
    ("audio_proj.norm.bias", (768,)),
    ("final_layer.linear.weight", (64, 4096)),
    ("final_layer.linear.bias", (64,)),
    ("final_layer.adaLN_modulation.1.weight", (8192, 512)),
    ("final_layer.adaLN_modulation.1.bias", (8192,)),
]
# v1.5 `base_model/` differs only in the audio projection input (5 Whisper groups x 1280).
V15_TAIL_CHANGES = {
    "audio_proj.proj1.weight": (512, 32000),
    "audio_proj.proj1_vf.weight": (512, 51200),
}


def expected_tensors(version: str) -> list[tuple[str, tuple[int, ...]]]:
    blocks = [(f"blocks.{i}.{name}", shape) for i in range(48) for name, shape in V10_BLOCK]
    tail = V10_TAIL
    if version == "v1.5":
        tail = [(name, V15_TAIL_CHANGES.get(name, shape)) for name, shape in tail]
    return V10_TOP + blocks + tail


@pytest.mark.parametrize(
    ("version", "overrides", "num_params"),
    [
        ("v1.0", {"audio_block": 12, "audio_channel": 768}, 15_871_660_096),
        (
            "v1.5",
            {"audio_block": 5, "audio_channel": 1280, "text_tokens_zero_pad": True},
            15_852_916_800,
        ),
    ],
)
def test_full_size_state_dict_matches_official_checkpoint(version, overrides, num_params):
    with torch.device("meta"):
        model = LongCatVideoAvatarTransformer3DModel(**overrides)
    state = model.state_dict()
    assert [(name, tuple(t.shape)) for name, t in state.items()] == expected_tensors(version)
    assert len(state) == 1608
    assert sum(t.numel() for t in state.values()) == num_params


# -------------------------------------------------------------------------------------- bench FLOPs


def load_bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "model_speed.py"
    spec = importlib.util.spec_from_file_location("model_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_flop_count_matches_reference_notes():
    bench = load_bench()
    per_token = bench.dit_forward_flops(
        num_noisy=1, frame_tokens=1, text_tokens=0, audio_tokens=0, patch_out=0
    )
    assert per_token["linear"] == pytest.approx(25.87e9, rel=1e-3)  # 0.539 GFLOP x 48 per token
    at2v = bench.dit_forward_flops(num_noisy=24)  # 480p: 37,440 tokens
    assert at2v["self_attention"] == 4 * 37_440**2 * 4096 * 48
    assert at2v["total"] == pytest.approx(2.09e15, rel=0.01)
    cont = bench.dit_forward_flops(num_noisy=20, num_cond=4, num_ref=1, cached=True, skip_frames=7)
    assert cont["total"] == pytest.approx(1.78e15, rel=0.01)  # 31,200 queries over 39,000 keys
    prepass = bench.dit_forward_flops(num_noisy=0, num_cond=4, num_ref=1)
    assert prepass["total"] == pytest.approx(0.2e15, rel=0.1)
    assert 3 * at2v["total"] == pytest.approx(6.27e15, rel=0.01)  # v1.0 CFG step


# ---------------------------------------------------------------------------------------- attention


def test_native_attention_backend_gives_the_default_output():
    model = build()
    inputs = make_inputs(1, 2, 4)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    kwargs = {"encoder_attention_mask": mask, "ref_img_index": 3, "mask_frame_range": 1}
    default = run(model, **inputs, **kwargs)
    model.set_attention_backend("native")
    try:
        processors = model.attn_processors
        assert len(processors) == 3 * TINY["depth"]
        assert all(p._attention_backend.value == "native" for p in processors.values())
        native = run(model, **inputs, **kwargs)
    finally:
        model.reset_attention_backend()
    torch.testing.assert_close(native, default, atol=1e-6, rtol=0)


def test_attention_kwargs_reach_a_custom_processor():
    from avatarflow.model import LongCatAvatarAudioCrossAttnProcessor

    seen = []

    class Recording(LongCatAvatarAudioCrossAttnProcessor):
        def __call__(self, attn, hidden_states, audio, attention_kwargs=None):
            seen.append(attention_kwargs)
            return super().__call__(attn, hidden_states, audio)

    model = build()
    for block in model.blocks:
        block.audio_cross_attn.set_processor(Recording())
    run(model, **make_inputs(0, 0, 2), attention_kwargs={"tag": 1})
    assert seen == [{"tag": 1}] * TINY["depth"]


def test_layerwise_casting_keeps_the_fp32_regions():
    model = build()
    inputs = make_inputs(1, 2, 4)
    ref = run(model, **inputs)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert model.t_embedder.mlp[0].weight.dtype == torch.float32
    assert model.blocks[0].adaLN_modulation[1].weight.dtype == torch.float32
    assert model.blocks[0].attn.q_norm.weight.dtype == torch.float32
    assert model.final_layer.linear.weight.dtype == torch.float32
    assert model.blocks[0].ffn.w1.weight.dtype == torch.bfloat16
    out = run(model, **inputs)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_text_mask_need_not_be_a_prefix():
    model = build()
    base = make_inputs(0, 1, 3)
    prefix = torch.zeros(2, 10, dtype=torch.long)
    prefix[:, :4] = 1
    scattered = torch.zeros(2, 10, dtype=torch.long)
    scattered[:, [1, 3, 6, 8]] = 1
    moved = base["encoder_hidden_states"].clone()
    moved[:, [1, 3, 6, 8]] = base["encoder_hidden_states"][:, :4]
    torch.testing.assert_close(
        run(model, **{**base, "encoder_hidden_states": moved}, encoder_attention_mask=scattered),
        run(model, **base, encoder_attention_mask=prefix),
    )
