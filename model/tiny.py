"""Tiny random-weight LongCat-Video-Avatar checkpoint in the official folder layout.

Tests, the demo and `avatarflow model init-tiny` use it: every component is the real class at a toy
width, saved with `save_pretrained`, so the loader runs the same code path as real weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    GenerationConfig,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from avatarflow.model.transformer_longcat_avatar import LongCatVideoAvatarTransformer3DModel

TEXT_WIDTH = 32
AUDIO_WIDTH = 32
WAV2VEC2_LAYERS = 2  # = the DiT's audio_block for v1.0 (real: 12)
WHISPER_LAYERS = 32  # the Whisper grouping is hard-coded to 33 hidden states (5 groups)
WHISPER_GROUPS = 5
# Default render size of the tiny model (real buckets start at 480x832); kept in avatarflow.json.
TINY_SAMPLE_SIZE = (32, 32)
TINY_STEPS = 2

TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_UMT5 = {
    "d_model": TEXT_WIDTH,
    "num_layers": 1,
    "num_heads": 2,
    "d_kv": 16,
    "d_ff": 64,
    "relative_attention_num_buckets": 8,
}
TINY_WAV2VEC2 = {
    "hidden_size": AUDIO_WIDTH,
    "num_hidden_layers": WAV2VEC2_LAYERS,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16,) * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
TINY_WHISPER = {
    "d_model": AUDIO_WIDTH,
    "encoder_layers": WHISPER_LAYERS,
    "decoder_layers": 2,  # alignment heads for word timestamps live in the last decoder layer
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 200,  # 4 s windows instead of 30 s (see TINY_WHISPER_CHUNK_S)
    "max_target_positions": 32,
    "begin_suppress_tokens": None,
    "suppress_tokens": None,
}
# Whisper's special tokens, in its order; the token after <|notimestamps|> is the first timestamp.
WHISPER_SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
WHISPER_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, ids above the special tokens
# The only words the tiny recogniser says (everything else is suppressed), so its output reads as
# words; which ones, and when, is as meaningless as its random weights.
TINY_WHISPER_WORDS = ("hello", "world", "speech", "avatar", "caption", "the", "and")
TINY_WHISPER_MAX_NEW_TOKENS = 6  # per window: keeps CPU recognition fast
# The v1.0 checkpoint's Whisper only recognises (no DiT reads its layers): a shallow encoder.
TINY_RECOGNISER_LAYERS = 2
# head_dim 16 splits into RoPE t/h/w = 8/4/4; hidden 64 keeps a 2-step 93-frame run well under 1 s.
TINY_DIT = {
    "in_channels": 16,
    "out_channels": 16,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 4,
    "caption_channels": TEXT_WIDTH,
    "mlp_ratio": 4,
    "adaln_tembed_dim": 32,
    "frequency_embedding_size": 32,
    "audio_window": 5,
    "audio_channel": AUDIO_WIDTH,
    "intermediate_dim": 32,
    "output_dim": 32,
    "context_tokens": 8,
    "vae_scale": 4,
}
WHISPER_DIR = "whisper-large-v3"  # the v1.5 checkpoint's Whisper folder
TINY_WHISPER_CHUNK_S = 4  # the feature extractor's window; the encoder takes 100 mel frames/s
TINY_LORA_RANK = 4


def tiny_dit_config(version: str = "1.0") -> dict[str, Any]:
    """Return the tiny DiT constructor arguments for a model version."""
    audio_block = WAV2VEC2_LAYERS if version == "1.0" else WHISPER_GROUPS
    return {**TINY_DIT, "audio_block": audio_block, "text_tokens_zero_pad": version == "1.5"}


def build_tiny_tokenizer() -> T5Tokenizer:
    """Build a small umT5-style tokenizer from an in-memory vocab (no file, no sentencepiece)."""
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    words = ["a", "the", "and", "of", "to", "in", "is", "it", "you", "that", "he", "she", "was"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    vocab += [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars] + [("▁", -4.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _seeded(builder: Any, seed: int) -> Any:
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        return builder().eval()


def _write_base(base: Path, shift: float) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(base / "tokenizer")
    umt5 = UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5)
    _seeded(lambda: UMT5EncoderModel(umt5), 0).save_pretrained(base / "text_encoder")
    _seeded(lambda: AutoencoderKLWan(**TINY_VAE), 1).save_pretrained(base / "vae")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(base / "scheduler")


def _write_wav2vec2(folder: Path) -> None:
    # Official layout: config.json, preprocessor_config.json and a pytorch_model.bin whose keys
    # carry the "wav2vec2." prefix of the pretraining head.
    config = Wav2Vec2Config(**TINY_WAV2VEC2)
    model = _seeded(lambda: Wav2Vec2Model(config), 2)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(folder)
    state = {f"wav2vec2.{k}": v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")


def build_tiny_whisper_tokenizer() -> WhisperTokenizer:
    """A byte-level BPE Whisper tokenizer built in memory: the 256 byte symbols, merges that spell
    TINY_WHISPER_WORDS (with their leading space) and Whisper's special tokens."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in TINY_WHISPER_WORDS:
        pieces = list("Ġ" + word)  # Ġ: the byte-level symbol of a space
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(WHISPER_SPECIALS[1:])})
    return tokenizer


def _write_whisper(folder: Path, encoder_layers: int = WHISPER_LAYERS) -> None:
    """A tiny Whisper that both encodes audio (the v1.5 DiT reads its encoder) and recognises
    speech: weights, feature extractor, tokenizer, and a generation config with alignment heads
    (word timestamps)."""
    tokenizer = build_tiny_whisper_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in WHISPER_SPECIALS}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        **{**TINY_WHISPER, "encoder_layers": encoder_layers},
        vocab_size=len(tokenizer) + WHISPER_TIMESTAMPS,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
    )
    model = _seeded(lambda: WhisperForConditionalGeneration(config), 2)
    words = set(tokenizer.convert_tokens_to_ids(["Ġ" + w for w in TINY_WHISPER_WORDS]))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=1 + TINY_WHISPER_MAX_NEW_TOKENS,  # <|startoftranscript|> and the new tokens
        is_multilingual=False,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        # cross-attention heads whose DTW path gives the word times
        alignment_heads=[[TINY_WHISPER["decoder_layers"] - 1, h] for h in range(2)],
        suppress_tokens=[i for i in range(len(tokenizer)) if i not in words],
    )
    model.save_pretrained(folder)
    extractor = WhisperFeatureExtractor(
        feature_size=TINY_WHISPER["num_mel_bins"], chunk_length=TINY_WHISPER_CHUNK_S
    )
    extractor.save_pretrained(folder)  # preprocessor_config.json, as the audio loader reads it
    tokenizer.save_pretrained(folder)


def write_tiny_whisper(folder: str | Path) -> Path:
    """Write only the tiny recogniser (for a tiny checkpoint written before it had one)."""
    _write_whisper(Path(folder), TINY_RECOGNISER_LAYERS)
    return Path(folder)


def tiny_lora_state(
    transformer: torch.nn.Module, rank: int = TINY_LORA_RANK
) -> dict[str, torch.Tensor]:
    """Return a random DMD-style LoRA state dict (official key scheme) for a transformer."""
    gen = torch.Generator().manual_seed(3)
    splits = {"attn.qkv": 3, "cross_attn.kv_linear": 2}
    targets = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1")
    state: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        suffix = next((t for t in targets if name.endswith(t)), None)
        if suffix is None or not isinstance(module, torch.nn.Linear):
            continue
        key = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
        parts = splits.get(suffix, 1)
        out_per_part = module.out_features // parts
        state[f"{key}.alpha_scale"] = torch.tensor(0.5)
        state[f"{key}.lora_down.weight"] = torch.randn(
            parts * rank, module.in_features, generator=gen
        )
        ups = [torch.randn(out_per_part, rank, generator=gen) * 0.1 for _ in range(parts)]
        if parts == 1:
            state[f"{key}.lora_up.weight"] = ups[0]
        else:  # split fused layer: one up-projection per output part
            state |= {f"{key}.lora_up.blocks.{i}.weight": up for i, up in enumerate(ups)}
    return state


def write_tiny_checkpoint(root: str | Path, version: str = "1.0") -> Path:
    """Write a tiny random-weight checkpoint in the official layout under root; return root."""
    if version not in ("1.0", "1.5"):
        raise ValueError(f"version must be '1.0' or '1.5', got {version!r}")
    root = Path(root)
    _write_base(root / "LongCat-Video", shift=7.0)
    dit = _seeded(lambda: LongCatVideoAvatarTransformer3DModel(**tiny_dit_config(version)), 4)
    if version == "1.0":
        avatar = root / "LongCat-Video-Avatar"
        # Small shards reproduce the official index + shard naming.
        dit.save_pretrained(avatar / "avatar_single", max_shard_size="200KB")
        _write_wav2vec2(avatar / "chinese-wav2vec2-base")
        # Not in the official v1.0 layout: speech recognition (captions) for the demo and tests.
        _write_whisper(avatar / WHISPER_DIR, TINY_RECOGNISER_LAYERS)
    else:
        avatar = root / "LongCat-Video-Avatar-1.5"
        # Stored in bf16 like the official base_model/, so loading exercises the up-cast.
        dit.bfloat16().save_pretrained(avatar / "base_model", max_shard_size="200KB")
        (avatar / "lora").mkdir(parents=True, exist_ok=True)
        save_file(tiny_lora_state(dit), avatar / "lora" / "dmd_lora.safetensors")
        FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(avatar / "scheduler")
        _write_whisper(avatar / WHISPER_DIR)
    # enhance_hf off: v1.0 continuation would otherwise add 10 tail steps to the 2 tiny ones.
    defaults = {
        "sample_size": list(TINY_SAMPLE_SIZE),
        "default_steps": TINY_STEPS,
        "enhance_hf": False,
    }
    (root / "avatarflow.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return root
