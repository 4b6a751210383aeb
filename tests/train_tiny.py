"""A tiny real training task for tests/test_train.py: the mouth opening of each frame from its four mel rows.

Real data (`WindowDataset` windows over the `tiny_prep` shards), a two-layer net and a loss that must go down;
`lipsync train --model train_tiny:make_task` trains it like any model file (tests put this folder on the path).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lipsync_cli.data.dataset import WindowDataset
from lipsync_cli.models.task import Task

DEFAULTS = {"model": "train_tiny", "hidden": 32, "dropout": 0.0, "window": 5, "train_split": "train", "validate": True}


class MouthNet(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * 80, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 4N, 80) log-mel rows -> (B, N) mouth opening x 10 (so targets are ~0.5)."""
        b, rows, bins = mel.shape
        x = ((mel + 5) / 2).reshape(b, rows // 4, 4 * bins)  # log10 power is ~ -5 +- 2
        return self.net(x).squeeze(-1)


def build(config: dict) -> nn.Module:
    return MouthNet(config["hidden"], config["dropout"])


def loss(model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    pred = model(batch["mel"])
    target = batch["mouth"] * 10
    err = pred.float() - target
    return (err**2).mean(), {"mae": float(err.detach().abs().mean())}


def validate(model: nn.Module, batches) -> dict[str, float]:
    err, n = 0.0, 0
    for b in batches:
        err += float((model(b["mel"]).float() - b["mouth"] * 10).abs().sum())
        n += b["mouth"].numel()
    return {"mae": err / n}


def make_task(manifest: str | Path, overrides: dict | None = None) -> Task:
    config = {**DEFAULTS, **(overrides or {})}
    if unknown := set(config) - set(DEFAULTS):
        raise ValueError(f"unknown setting(s) {sorted(unknown)}")
    window = config["window"]
    return Task(
        name="tiny",
        model=build(config),
        config=config,
        train_set=WindowDataset(manifest, config["train_split"], window=window),
        val_set=WindowDataset(manifest, "val", window=window),
        loss=loss,
        validate=validate if config["validate"] else None,
        metric="mae" if config["validate"] else "val_loss",
        lr=3e-3,
        warmup_steps=5,
        batch_size=8,
    )
