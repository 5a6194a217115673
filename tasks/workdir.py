"""The local scratch folder's layout: where each stage keeps a row's inputs, renders and temp files.

One place for every path under the work dir (default ~/.cache/avatarflow/work), so stages that
hand files to each other agree on where they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class WorkDir:
    """Paths under one work dir; a row's folder changes when its inputs (input_hash) change."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def audio(self) -> Path:
        """Fetched narrations and their decoded PCM, content-addressed by sha256."""
        return self.root / "audio"

    @property
    def images(self) -> Path:
        """Fetched portraits, content-addressed by sha256."""
        return self.root / "images"

    @property
    def tiny_checkpoint(self) -> Path:
        """Where the random-weight demo checkpoint is written on first use."""
        return self.root / "tiny-checkpoint"

    def row(self, row_id: str, input_hash: str) -> Path:
        """The folder of one row as planned: chunk WAVs, master audio, joined video, thumbnail."""
        return self.root / "rows" / row_id / input_hash[:16]

    def chunk_wav(self, row_id: str, input_hash: str, chunk_index: int) -> Path:
        """The narration span of one chunk, cut at planning."""
        return self.row(row_id, input_hash) / f"chunk-{chunk_index}.wav"

    def renders(self, row_id: str, input_hash: str) -> Path:
        """Where a backend writes the row's rendered chunk MP4s."""
        return self.row(row_id, input_hash) / "render"

    def thumbnail(self, row_id: str, input_hash: str) -> Path:
        """The row's report thumbnail (JPEG)."""
        return self.row(row_id, input_hash) / f"{row_id}.thumb.jpg"

    def journal(self, state_url: str) -> Path:
        """The local copy of a ledger's request ids (one folder per state URL)."""
        return self.root / "journal" / hashlib.sha256(state_url.encode()).hexdigest()[:16]
