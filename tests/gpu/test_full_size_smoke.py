"""One full-size, random-weight denoising step on CUDA (skipped without it, see tests/conftest.py).

Checks what the tiny CPU tests cannot: the 15.9 B-parameter DiT fits and runs in bf16 at 480p with
the kept-fp32 modules, the default and the native attention backends agree, and a continuation step
through the KV cache gives finite output.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "model_speed.py"
    spec = importlib.util.spec_from_file_location("model_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.mark.timeout(900)
def test_one_full_size_step_at_480p(bench) -> None:
    device = torch.device("cuda")
    model = bench.build_random_model("v1.5", device)
    assert model.t_embedder.mlp[0].weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    args = bench.parse_args([])
    inputs = bench.make_inputs("v1.5", 1, args.latent_frames, (60, 104), args, device)
    with torch.inference_mode():
        out = model(**inputs).sample
        model.set_attention_backend("native")
        native = model(**inputs).sample
        model.reset_attention_backend()
        assert out.shape == (1, 16, 24, 60, 104)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(native, out)

        ctx = torch.randn(1, 16, 5, 60, 104, device=device, dtype=torch.bfloat16)
        cache = model.build_kv_cache(ctx, num_ref_latents=1, num_cond_latents=4)
        noisy = bench.make_inputs("v1.5", 1, 20, (60, 104), args, device)
        cont = model(**noisy, kv_cache=cache, ref_img_index=10, mask_frame_range=3).sample
        assert cont.shape == (1, 16, 20, 60, 104)
        assert torch.isfinite(cont).all()
