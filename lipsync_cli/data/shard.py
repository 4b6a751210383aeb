"""The prepped shard's timeline and loudness: written by `prep`, read by `dataset`, and used by the models that cut
their inputs exactly as prep does (models/sync.prepare). No media stack here: training imports it.

Video at FPS and features at FEAT_RATE share one clock: frame i, feature row i * FEAT_RATE / FPS and audio sample
i * SR / FPS are the same instant.
"""

from __future__ import annotations

from lipsync_cli.audio import SR

FORMAT = "1"
FPS = 25
FEAT_RATE = 100
HOP = SR // FEAT_RATE  # 160 samples per feature row
TARGET_DB = -23.0  # speech loudness every shard is normalised to

__all__ = ["FEAT_RATE", "FORMAT", "FPS", "HOP", "SR", "TARGET_DB"]
