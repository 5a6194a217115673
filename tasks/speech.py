"""Speech recognition of a row's narration, on the row's backend: words with their times."""

from __future__ import annotations

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.records import RowPlan, Word


def recognise(plan: RowPlan, audio_path: str, config: BatchConfig) -> list[Word]:
    """The words spoken in audio_path (the row's master narration, a local WAV), in order."""
    raise NotImplementedError("speech recognition is not implemented yet")


def recogniser_configured(config: BatchConfig) -> bool:
    """True when config's backend can recognise speech without being asked to (captions default
    on even for rows without a transcript)."""
    raise NotImplementedError("speech recognition is not implemented yet")
