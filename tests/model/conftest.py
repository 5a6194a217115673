"""Tiny checkpoints shared by the model tests: one per model version, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarflow.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny v1.0 checkpoint in the official folder layout."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny10"))


@pytest.fixture(scope="session")
def tiny15_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny v1.5 checkpoint (bf16 base_model, DMD LoRA, Whisper) in the official layout."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny15"), version="1.5")
