"""Checkpoint loading: official layouts (v1.0, v1.5 INT8 + LoRA), diffusers folders, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2Model, WhisperModel

from avatarflow.model import CheckpointError, detect_layout, load_pipeline, load_transformer
from avatarflow.model.loading import lora_delta, read_lora

AVATAR = Path("LongCat-Video-Avatar")
DIT = AVATAR / "avatar_single"


@pytest.fixture
def copy_root(tiny_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_root, tmp_path / "ckpt"))


def _saved_dit_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state |= load_file(shard)
    return state


def test_detect_layout(tiny_root, tiny15_root, tmp_path) -> None:
    assert detect_layout(tiny_root) == "1.0"
    assert detect_layout(tiny15_root) == "1.5"
    with pytest.raises(FileNotFoundError, match="LongCat-Video-Avatar"):
        detect_layout(tmp_path)


def test_official_v10_layout_loads_every_weight(tiny_root) -> None:
    pipe = load_pipeline(tiny_root)
    saved = _saved_dit_state(tiny_root / DIT)
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert isinstance(pipe.audio_encoder, Wav2Vec2Model)
    # The official wav2vec2 .bin carries a "wav2vec2." prefix that must be stripped on load.
    raw = torch.load(tiny_root / AVATAR / "chinese-wav2vec2-base" / "pytorch_model.bin")
    encoder = pipe.audio_encoder.state_dict()
    assert all(torch.equal(encoder[k.removeprefix("wav2vec2.")], v) for k, v in raw.items())
    assert pipe.config.model_version == "1.0"
    assert pipe.scheduler.config.shift == 7.0


def test_diffusers_folder_round_trip(tiny_root, tmp_path) -> None:
    pipe = load_pipeline(tiny_root)
    pipe.save_pretrained(tmp_path / "saved")
    assert detect_layout(tmp_path / "saved") == "diffusers"
    reloaded = load_pipeline(tmp_path / "saved")
    for name in ("transformer", "vae", "text_encoder", "audio_encoder"):
        before, after = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name
    assert reloaded.config.default_steps == pipe.config.default_steps == 2


@pytest.mark.parametrize(
    "missing",
    [
        "LongCat-Video/vae/diffusion_pytorch_model.safetensors",
        "LongCat-Video/scheduler/scheduler_config.json",
        "LongCat-Video/text_encoder/model.safetensors",
        "LongCat-Video-Avatar/chinese-wav2vec2-base/preprocessor_config.json",
        "LongCat-Video-Avatar/avatar_single/diffusion_pytorch_model-00002-of-00007.safetensors",
    ],
)
def test_missing_file_error_names_the_expected_path(copy_root, missing) -> None:
    (copy_root / missing).unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_pipeline(copy_root)
    assert str(copy_root / missing) in str(error.value)


def test_shape_mismatch_names_the_tensor(copy_root) -> None:
    shard = next(iter(sorted((copy_root / DIT).glob("*.safetensors"))))
    state = load_file(shard)
    name = next(iter(state))
    state[name] = torch.zeros(3, 5)
    save_file(state, shard)
    with pytest.raises(CheckpointError, match=f"tensor {name} .* shape \\(3, 5\\)"):
        load_transformer(copy_root / DIT)


def test_int8_weights_are_dequantised_per_output_channel(tiny_root, tmp_path) -> None:
    reference = _saved_dit_state(tiny_root / DIT)
    quantised, expected = {}, {}
    for key, weight in reference.items():
        if key.endswith(("linear.weight", "qkv.weight")):
            scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
            q = torch.round(weight / scale[:, None]).to(torch.int8)
            quantised[key + "_int8"], quantised[key + "_scale"] = q, scale
            expected[key] = q.float() * scale[:, None]
        else:
            quantised[key] = expected[key] = weight
    folder = tmp_path / "base_model_int8"
    folder.mkdir()
    shutil.copy(tiny_root / DIT / "config.json", folder)
    # Two shards that split some int8/scale pairs: each half must wait for its partner.
    keys = sorted(quantised)
    shards = {"quantized_model-00001-of-00002.safetensors": keys[::2]}
    shards["quantized_model-00002-of-00002.safetensors"] = keys[1::2]
    for name, names in shards.items():
        save_file({k: quantised[k] for k in names}, folder / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "quantized_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_transformer(folder).state_dict()
    assert any(k.endswith("_int8") for k in quantised)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_v15_merges_the_dmd_lora_block_diagonally(tiny15_root) -> None:
    avatar = tiny15_root / "LongCat-Video-Avatar-1.5"
    pipe = load_pipeline(tiny15_root)
    base = _saved_dit_state(avatar / "base_model")
    lora = load_file(avatar / "lora" / "dmd_lora.safetensors")
    prefix = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    down, rank = lora[f"{prefix}.lora_down.weight"], 4
    ups = [lora[f"{prefix}.lora_up.blocks.{i}.weight"] for i in range(3)]
    # Split i of the fused qkv output gets up_i @ (its own rank slice of down), scaled by alpha.
    delta = torch.cat([ups[i] @ down[i * rank : (i + 1) * rank] for i in range(3)])
    expected = base["blocks.0.attn.qkv.weight"] + 0.5 * delta
    torch.testing.assert_close(pipe.transformer.blocks[0].attn.qkv.weight, expected)
    assert isinstance(pipe.audio_encoder, WhisperModel)
    assert pipe.config.model_version == "1.5"


def test_lora_for_an_unknown_module_is_an_error(tiny15_root, tmp_path) -> None:
    avatar = tiny15_root / "LongCat-Video-Avatar-1.5"
    lora = load_file(avatar / "lora" / "dmd_lora.safetensors")
    lora = {k.replace("___lorahyphen___0___", "___lorahyphen___9___"): v for k, v in lora.items()}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="blocks.9"):
        load_transformer(avatar / "base_model", lora_path=tmp_path / "lora.safetensors")


def test_lora_delta_without_splits_is_scaled_up_down() -> None:
    parts = {
        "lora_down.weight": torch.ones(2, 3),
        "lora_up.weight": torch.full((4, 2), 2.0),
        "alpha_scale": torch.tensor(0.5),
    }
    assert torch.equal(lora_delta(parts, multiplier=2.0), torch.full((4, 3), 4.0))


def test_read_lora_groups_by_module(tiny15_root) -> None:
    lora = read_lora(tiny15_root / "LongCat-Video-Avatar-1.5" / "lora" / "dmd_lora.safetensors")
    assert "blocks.1.cross_attn.kv_linear" in lora
    assert set(lora["blocks.1.cross_attn.kv_linear"]) == {
        "alpha_scale",
        "lora_down.weight",
        "lora_up.blocks.0.weight",
        "lora_up.blocks.1.weight",
    }


def _v15_inputs() -> dict:
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[:, 7:] = 0
    return {
        "hidden_states": torch.randn(1, 16, 3, 4, 4, generator=g),
        "timestep": torch.tensor([[0.0, 874.9, 874.9]]),
        "encoder_hidden_states": torch.randn(1, 12, 32, generator=g),
        "encoder_attention_mask": mask,
        "audio_embeds": torch.randn(1, 9, 5, 5, 32, generator=g),
        "num_cond_latents": 1,
    }


def _add_reference_lora_hooks(model: torch.nn.Module, lora_file: Path) -> list:
    """The reference's unmerged LoRA: Linear(x) + alpha_scale * up(down(x)), split ups per part."""
    handles = []
    for name, parts in read_lora(lora_file).items():
        down = parts["lora_down.weight"]
        ups = [parts[k] for k in sorted(parts) if k.startswith("lora_up.blocks.")]
        ups = ups or [parts["lora_up.weight"]]
        scale = float(parts["alpha_scale"])

        def hook(module, args, out, down=down, ups=ups, scale=scale):
            chunks = (args[0] @ down.T).chunk(len(ups), dim=-1)
            return out + scale * torch.cat([c @ u.T for c, u in zip(chunks, ups, strict=True)], -1)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


def test_v15_dmd_lora_in_fp32_matches_the_reference_unmerged_forward(tiny15_root) -> None:
    avatar = tiny15_root / "LongCat-Video-Avatar-1.5"
    lora_file = avatar / "lora" / "dmd_lora.safetensors"
    base = _saved_dit_state(avatar / "base_model")
    assert all(v.dtype == torch.bfloat16 for v in base.values())  # stored like the official bf16
    merged = load_pipeline(tiny15_root).transformer  # fp32, LoRA merged at load
    for name, parts in read_lora(lora_file).items():  # the load is exactly an fp32 merge
        expected = base[name + ".weight"].float() + lora_delta(parts)
        assert torch.equal(merged.get_submodule(name).weight, expected), name

    reference = load_transformer(avatar / "base_model")  # no LoRA: hooks add it per call
    handles = _add_reference_lora_hooks(reference, lora_file)
    with torch.no_grad():
        want = reference(**_v15_inputs()).sample
        got = merged(**_v15_inputs()).sample
    for handle in handles:
        handle.remove()
    assert (got - want).abs().max() <= 1e-6

    # The earlier loader rounded weight + delta back to bf16 before the fp32 cast: visibly off.
    rounded = load_transformer(avatar / "base_model")
    with torch.no_grad():
        for name, parts in read_lora(lora_file).items():
            weight = base[name + ".weight"].float() + lora_delta(parts)
            rounded.get_submodule(name).weight.copy_(weight.to(torch.bfloat16).float())
        old = rounded(**_v15_inputs()).sample
    assert (old - want).abs().max() > 1e-4


def test_bf16_load_keeps_the_fp32_modules_in_fp32(tiny15_root) -> None:
    model = load_transformer(
        tiny15_root / "LongCat-Video-Avatar-1.5" / "base_model", torch.bfloat16
    )
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["t_embedder.mlp.0.weight"] == torch.float32
    assert dtypes["blocks.0.adaLN_modulation.1.weight"] == torch.float32
    assert dtypes["blocks.0.audio_adaLN_modulation.1.bias"] == torch.float32
    assert dtypes["blocks.0.pre_crs_attn_norm.weight"] == torch.float32
    assert dtypes["final_layer.linear.weight"] == torch.float32
    assert dtypes["blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.attn.q_norm.weight"] == torch.bfloat16
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**_v15_inputs()).sample
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
