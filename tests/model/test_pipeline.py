"""LongCatVideoAvatarPipeline on the tiny checkpoint: frames, modes, CFG, callbacks, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from avatarflow.model import (
    LongCatAvatarSegmentState,
    LongCatVideoAvatarPipeline,
    guided_velocity,
    load_pipeline,
)
from avatarflow.model.pipeline_helpers_longcat_avatar import enhance_hf_schedule, prompt_clean
from avatarflow.model.pipeline_longcat_avatar import sampling_sigmas

SHORT = {"num_frames": 9, "num_cond_frames": 5}  # 3 latents, 2 of them conditioning


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_root: Path) -> LongCatVideoAvatarPipeline:
    pipe = load_pipeline(tiny_root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _audio(seconds: float = 1.0, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _run(pipe: LongCatVideoAvatarPipeline, seed: int = 0, **kwargs):
    kwargs = {"prompt": "a person talks", "audio": _audio(), "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def test_guided_velocity_combines_three_passes() -> None:
    v_cond, v_text, v_uncond = torch.full((2,), 3.0), torch.full((2,), 2.0), torch.full((2,), 1.0)
    # 1 + 4 * (3 - 2) + 2 * (2 - 1)
    assert guided_velocity(v_cond, v_text, v_uncond, 4.0, 2.0).tolist() == [7.0, 7.0]
    assert torch.equal(guided_velocity(v_cond, v_text, v_uncond, 1.0, 1.0), v_cond)


def test_sampling_sigmas() -> None:
    assert sampling_sigmas(50, use_distill=False)[::49] == pytest.approx([1.0, 0.001])
    assert sampling_sigmas(8, use_distill=True) == pytest.approx([1 - k / 8 for k in range(8)])
    assert sampling_sigmas(2, use_distill=True) == pytest.approx([1.0, 0.5])
    # v1.5 reads its 8 points off linspace(1, 0, 1000): 1 - 125k / 999, not 1 - k / 8.
    v15 = sampling_sigmas(8, True, num_distill_steps=8, distill_linspace_grid=True)
    assert v15 == pytest.approx([1 - 125 * k / 999 for k in range(8)], abs=1e-7)
    # v1.0 distilled (cfg-step LoRA) picks from a 50-point grid of multiples of 1/50.
    v10 = sampling_sigmas(16, True, num_distill_steps=50)
    assert v10[:3] == pytest.approx([1.0, 0.94, 0.88])


def test_enhance_hf_keeps_timesteps_above_500_then_adds_a_uniform_tail() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(sigmas=sampling_sigmas(50, use_distill=False))
    kept = scheduler.timesteps[scheduler.timesteps > 500]
    enhance_hf_schedule(scheduler)
    assert len(kept) == 43  # with shift 7: 43 + 10 = 53 steps
    assert scheduler.timesteps[:43].tolist() == kept.tolist()
    assert scheduler.timesteps[43:].tolist() == [500.0 - 50 * k for k in range(10)]
    torch.testing.assert_close(scheduler.sigmas[:-1], scheduler.timesteps / 1000)
    assert scheduler.sigmas[-1] == 0


def test_v10_continuation_runs_the_enhance_hf_schedule(pipe) -> None:
    steps = []
    handle = pipe.transformer.register_forward_hook(lambda *args: steps.append(1))
    try:
        _run(pipe, num_segments=2, enhance_hf=True, **SHORT)
    finally:
        handle.remove()
    # 2 steps first; continuation keeps the t=1000 step and adds 10 tail steps.
    assert len(steps) == 2 + 1 + 10
    assert pipe.num_timesteps == 11
    with pytest.raises(ValueError, match="enhance_hf"):
        _run(pipe, num_segments=1, enhance_hf=True, use_distill=True, **SHORT)


def test_version_behaviour_is_config_flags(pipe, tiny15_root) -> None:
    v15 = load_pipeline(tiny15_root)
    assert (pipe.config.fps, pipe.config.audio_stride, pipe.config.reuse_cond_latents) == (
        16,
        2,
        True,
    )
    assert (v15.config.fps, v15.config.audio_stride, v15.config.reuse_cond_latents) == (
        25,
        1,
        False,
    )
    assert v15.config.use_distill
    assert v15.config.distill_linspace_grid
    assert pipe.config.default_guidance_scale == 4.0
    assert v15.config.default_guidance_scale == 1.0
    assert not pipe.config.enhance_hf  # the tiny checkpoint's avatarflow.json turns it off
    assert LongCatVideoAvatarPipeline(**pipe.components).config.enhance_hf  # v1.0's default


def test_prompt_clean_fixes_mojibake_html_and_spaces() -> None:
    assert prompt_clean("  a  caf\u00c3\u00a9 &amp;amp;\n talk ") == "a caf\u00e9 & talk"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (
            "1.0",
            [0.7709, 0.7766, 0.7757, 0.7572, 0.5756, 0.601, 0.5657, 0.4912, 0.5516, 0.6512]
            + [0.692, 0.6728],
        ),
        (
            "1.5",
            [0.7508, 0.7202, 0.7229, 0.7061, 0.4447, 0.4965, 0.5453, 0.43, 0.734, 0.6696]
            + [0.6843, 0.6748],
        ),
    ],
)
def test_expected_output_slice(request, version, expected) -> None:
    root = request.getfixturevalue("tiny_root" if version == "1.0" else "tiny15_root")
    pipe = load_pipeline(root)
    pipe.set_progress_bar_config(disable=True)
    frames = _run(pipe, num_segments=2, **SHORT).frames
    assert frames.shape == (1, 13, 3, 32, 32)
    got = frames[0, [0, 6, 12], 1, 16, 14:18].flatten()
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-3, rtol=0)


def test_native_attention_backend_gives_the_default_frames(pipe) -> None:
    default = _run(pipe, num_segments=2, **SHORT).frames
    pipe.transformer.set_attention_backend("native")
    try:
        native = _run(pipe, num_segments=2, **SHORT).frames
    finally:
        pipe.transformer.reset_attention_backend()
    torch.testing.assert_close(native, default, atol=1e-6, rtol=0)


def test_guidance_scale_drives_text_cfg(pipe) -> None:
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[0]))
    try:
        text_only = _run(
            pipe, num_segments=1, guidance_scale=4.0, audio_guidance_scale=1.0, **SHORT
        )
    finally:
        handle.remove()
    assert seen == [3, 3]  # text guidance alone turns on the 3-pass CFG
    assert pipe.guidance_scale == pipe.text_guidance_scale == 4.0
    assert pipe.do_classifier_free_guidance
    alias = _run(pipe, num_segments=1, text_guidance_scale=4.0, audio_guidance_scale=1.0, **SHORT)
    torch.testing.assert_close(alias.frames, text_only.frames)
    weaker = _run(pipe, num_segments=1, guidance_scale=2.0, audio_guidance_scale=1.0, **SHORT)
    assert not torch.allclose(weaker.frames, text_only.frames)
    with pytest.raises(ValueError, match="guidance_scale"):
        _run(pipe, num_segments=1, guidance_scale=2.0, text_guidance_scale=3.0, **SHORT)


def test_a_swapped_scheduler_is_the_one_that_samples(pipe) -> None:
    calls = []

    class Counting(FlowMatchEulerDiscreteScheduler):
        def step(self, *args, **kwargs):
            calls.append(1)
            return super().step(*args, **kwargs)

    original = pipe.scheduler
    default = _run(pipe, num_segments=2, **SHORT).frames
    try:
        pipe.scheduler = Counting.from_config(original.config, shift=3.0)
        swapped = _run(pipe, num_segments=2, **SHORT).frames
        assert pipe.scheduler.step_index is None  # each call steps its own copy
    finally:
        pipe.scheduler = original
    assert len(calls) == 4
    assert not torch.allclose(swapped, default)


@pytest.mark.timeout(60)
def test_first_segment_has_93_frames_and_each_continuation_80(pipe) -> None:
    counts = []
    out = _run(pipe, num_segments=2, segment_callback=lambda p, i, s, v: counts.append(v.shape[2]))
    assert counts == [93, 80]
    assert out.frames.shape == (1, 173, 3, 32, 32)  # (B, F, C, H, W)
    assert out.frames.min() >= 0.0
    assert out.frames.max() <= 1.0
    assert out.state.segments_done == 2


def test_num_segments_defaults_to_cover_the_audio(pipe) -> None:
    assert pipe.num_segments_for(93 / 16) == 1
    assert pipe.num_segments_for(93 / 16 + 0.01) == 2
    assert pipe.num_segments_for(10.8125) == 2
    counts = []
    _run(pipe, audio=_audio(2.0), segment_callback=lambda p, i, s, v: counts.append(i), **SHORT)
    assert counts == list(range(7))  # 32 frames = 1 + ceil((32 - 9) / 4) segments of 9/5


def test_same_seed_gives_identical_frames(pipe) -> None:
    first = _run(pipe, seed=7, num_segments=2, **SHORT).frames
    again = _run(pipe, seed=7, num_segments=2, **SHORT).frames
    other = _run(pipe, seed=8, num_segments=2, **SHORT).frames
    assert first.shape == (1, 13, 3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


class _Interrupted(Exception):
    pass


def test_resume_from_saved_state_matches_an_uninterrupted_run(pipe, tmp_path) -> None:
    full = _run(pipe, seed=3, num_segments=3, **SHORT).frames
    saved = {}

    def interrupt(p, index, state, video):
        state.save(tmp_path / "state.safetensors")
        saved["video"] = video
        raise _Interrupted

    with pytest.raises(_Interrupted):
        _run(pipe, seed=3, num_segments=3, segment_callback=interrupt, **SHORT)
    state = LongCatAvatarSegmentState.load(tmp_path / "state.safetensors")
    tail = _run(pipe, seed=99, num_segments=3, resume_state=state, **SHORT).frames
    head = pipe.video_processor.postprocess_video(saved["video"], "pt")
    assert state.segments_done == 1
    assert tail.shape[1] == 8
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full)


def test_ai2v_keeps_the_portrait_latent_clean(pipe) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8))
    latents = _run(pipe, image=image, num_segments=1, output_type="latent", **SHORT).frames
    pixels = pipe.video_processor.preprocess(image, 32, 32, resize_mode="crop").unsqueeze(2)
    expected = pipe.encode_video(pixels)
    assert latents.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(latents[:, :, :1], expected)


@pytest.mark.parametrize(("scale", "batches"), [(4.0, [3, 3]), (1.0, [1, 1])])
def test_guidance_runs_three_passes_in_one_batched_call(pipe, scale, batches) -> None:
    seen = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, args, out: seen.append(out[0].shape[0])
    )
    try:
        _run(pipe, num_segments=1, text_guidance_scale=scale, audio_guidance_scale=scale, **SHORT)
    finally:
        handle.remove()
    assert seen == batches  # one DiT call per step


def test_callback_output_replaces_the_latents(pipe) -> None:
    def zero_last_step(p, step, timestep, kwargs):
        assert set(kwargs) == {"latents"}
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 1 else {}

    out = _run(pipe, num_segments=1, output_type="latent", callback_on_step_end=zero_last_step)
    assert out.frames.abs().max() == 0


def test_size_comes_from_the_resolution_bucket_without_a_sample_size(pipe) -> None:
    real = LongCatVideoAvatarPipeline(**pipe.components)  # no tiny sample_size
    portrait = Image.new("RGB", (90, 160))
    assert real.resolve_size(None, None, "480p") == (480, 832)
    assert real.resolve_size(None, None, "720p") == (768, 1280)
    assert real.resolve_size(None, None, "480p", portrait) == (832, 480)
    assert real.resolve_size(None, None, "720p", Image.new("RGB", (64, 64))) == (960, 960)
    assert real.resolve_size(64, 96, "720p") == (64, 96)
    assert pipe.resolve_size(None, None, "720p", portrait) == (32, 32)


def test_num_videos_per_prompt_repeats_the_prompt(pipe) -> None:
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    out = pipe(
        prompt="a person talks",
        audio=_audio(),
        num_videos_per_prompt=2,
        generator=gens,
        num_segments=1,
        output_type="np",
        **SHORT,
    )
    assert out.frames.shape == (2, 9, 32, 32, 3)
    assert not np.allclose(out.frames[0], out.frames[1])


def test_prompt_embeds_replace_text_and_need_no_text_encoder(pipe) -> None:
    embeds, negative = pipe.encode_prompt("a person talks")
    components = {**pipe.components, "tokenizer": None, "text_encoder": None}
    bare = LongCatVideoAvatarPipeline(**components, sample_size=[32, 32], default_steps=2)
    bare.set_progress_bar_config(disable=True)
    via_text = _run(pipe, num_segments=1, **SHORT).frames
    via_embeds = _run(
        bare,
        prompt=None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_segments=1,
        **SHORT,
    ).frames
    torch.testing.assert_close(via_embeds, via_text)


def test_encode_prompt_pads_to_512_and_cleans_html(pipe) -> None:
    embeds, negative = pipe.encode_prompt(["a &amp; b", "a & b   "])
    assert embeds.shape == negative.shape == (2, 512, 32)
    torch.testing.assert_close(embeds[0], embeds[1])
    assert embeds[:, 20:].abs().max() == 0  # padding
    assert embeds[:, 0].abs().min() > 0


def test_batch_samples_match_single_runs(pipe) -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = pipe(
        prompt=["a person talks", "the man speaks"],
        audio=[_audio(freq=200), _audio(freq=300)],
        generator=gens,
        output_type="pt",
        num_segments=2,
        **SHORT,
    ).frames
    second = _run(
        pipe, seed=2, prompt="the man speaks", audio=_audio(freq=300), num_segments=2, **SHORT
    )
    assert batch.shape[0] == 2
    torch.testing.assert_close(batch[1:], second.frames, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 30, "width": 32}, "height and width"),
        ({"num_frames": 10}, "num_frames"),
        ({"output_type": "gif"}, "output_type"),
        ({"audio": None}, "audio"),
    ],
)
def test_check_inputs_names_the_argument(pipe, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _run(pipe, num_segments=1, **kwargs)


def test_save_pretrained_round_trip_reproduces_output(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    # Recorded under our namespace, never as a bare `model` package a user's project may have.
    assert index["transformer"] == [
        "avatarflow.model.transformer_longcat_avatar",
        "LongCatVideoAvatarTransformer3DModel",
    ]
    reloaded = load_pipeline(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.sample_size == [32, 32]
    expected = _run(pipe, num_segments=2, **SHORT).frames
    torch.testing.assert_close(_run(reloaded, num_segments=2, **SHORT).frames, expected)


def test_v15_runs_with_whisper_and_reencoded_continuation(tiny15_root) -> None:
    pipe = load_pipeline(tiny15_root)
    pipe.set_progress_bar_config(disable=True)
    out = _run(pipe, num_segments=2, **SHORT)
    assert pipe.fps == 25
    assert not pipe.do_classifier_free_guidance
    assert out.frames.shape == (1, 13, 3, 32, 32)
    assert torch.isfinite(out.frames).all()
