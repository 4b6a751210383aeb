"""One real training step of every model through `train()`: on the CPU always, on CUDA (fp32, bf16, fp16 with
GradScaler, DataLoader workers) when torch sees a GPU. Catches device bugs such as a CUDA generator handed to a
CPU-only draw, which no CPU run can show. The data is `tiny_prep` (24 real GRID clips; LIPSYNC_TINY_PREP names an
already prepped manifest instead, for machines without the media stack)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lipsync_cli import models, progress
from lipsync_cli.training import TrainOptions, train

MODELS = ("sync", "lips", "render", "seed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
RUNS = [
    pytest.param("cpu", "32", id="cpu-32"),
    pytest.param("cuda", "32", marks=CUDA, id="cuda-32"),
    pytest.param("cuda", "bf16", marks=CUDA, id="cuda-bf16"),
    pytest.param("cuda", "16", marks=CUDA, id="cuda-16"),
]
BATCH = {"sync": 8, "lips": 4, "render": 2, "seed": 2}  # small: one step must be cheap on a shared CPU


@pytest.mark.parametrize("device,precision", RUNS)
@pytest.mark.parametrize("model", MODELS)
def test_one_training_step(model, device, precision, tiny_prep, tmp_path):
    quiet = progress.is_quiet()
    progress.set_quiet(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = TrainOptions(
            out_dir=tmp_path,
            gpus=1 if device == "cuda" else 0,
            precision=precision,
            batch_size=BATCH[model],
            max_steps=1,
            val_every=1,
            val_batches=1,
            workers=2 if device == "cuda" else 0,  # worker processes on CUDA: what a real GPU run uses
            channels_last=device == "cuda" and model in ("render", "seed"),
            tensorboard=False,
        )
        s = train(model, tiny_prep, opts)
    finally:
        torch.set_num_threads(threads)
        progress.set_quiet(quiet)
    assert s.steps == 1 and s.device.startswith(device) and math.isfinite(s.loss)
    assert s.val is not None and all(math.isfinite(v) for v in s.val.values())
    trained = load_file(str(s.last))
    torch.manual_seed(0)  # train() builds the model from seed 0: these are its initial weights
    fresh = models.module(model).make_task(tiny_prep, {}).model.state_dict()
    moved = [k for k, v in trained.items() if v.is_floating_point() and not torch.equal(v.float(), fresh[k].float())]
    if precision == "16" and not moved:  # GradScaler skips a step whose scaled gradients overflow, and backs off
        state = json.loads((tmp_path / "checkpoints" / s.name / "last.state.json").read_text())
        assert state["scaler"]["scale"] < 2.0**16, "fp16: no weight changed, yet the scaler did not back off"
    else:
        assert moved, "one optimiser step changed no weight"
    net, _ = models.load(s.last)
    assert sum(p.numel() for p in net.parameters()) > 0
