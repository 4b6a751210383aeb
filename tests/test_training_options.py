"""How `lipsync train` layers its options (training.merge): settings < the --config file < flags; no training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync_cli.errors import LipsyncError
from lipsync_cli.training import TrainOptions, TrainResult, merge


def test_settings_then_config_then_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('hidden = 24\n\n[train]\nlr = 0.01\nval_every = 7\nout_dir = "elsewhere"\n')
    base = TrainOptions(out_dir=tmp_path, val_every=100, save_every=50, seed=3)
    opts = merge(base, cfg, {"lr": None, "val_every": 9, "resume": True}, default_max_steps=1000)
    assert opts.overrides == {"hidden": 24}  # model settings go to the task
    assert opts.lr == 0.01 and opts.out_dir == Path("elsewhere")  # the config file over the settings ...
    assert opts.val_every == 9 and opts.resume  # ... and flags over both; a flag not given (None) changes nothing
    assert opts.save_every == 50 and opts.seed == 3 and opts.max_steps == 1000  # no stop given: the default one
    assert base.lr is None and base.overrides == {}  # the base is not changed


def test_procs_means_cpu_and_a_given_stop_is_kept():
    opts = merge(TrainOptions(), None, {"max_minutes": 5.0}, procs=2, default_max_steps=1000)
    assert opts.gpus == 0 and opts.max_minutes == 5.0 and opts.max_steps is None
    with pytest.raises(LipsyncError, match="--procs is for CPU processes"):
        merge(TrainOptions(), None, {"gpus": 2}, procs=2)


def test_result_line():
    r = TrainResult(
        name="sync", steps=40, start_step=0, samples=320, samples_per_s=123.4, loss=0.5, metric="acc", best=0.75,
        best_step=40, val={"acc": 0.75}, last=Path("out/checkpoints/sync/last.safetensors"),
        best_checkpoint=Path("out/checkpoints/sync/best.safetensors"), run_dir=Path("out/runs/sync"), precision="32",
        device="cpu", processes=1, batch=8, accumulate=1, effective_batch=8, wall_s=3.0, cpu_s=2.0,
        rank_max_abs_diff=None,
    )  # fmt: skip
    assert r.describe() == "sync: step 40, acc 0.75 at step 40, 123.4 samples/s (32, cpu x1) -> out/checkpoints/sync"
