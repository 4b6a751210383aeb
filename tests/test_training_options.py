"""How `lipsync train` layers its options (training.merge): settings < the --config file < flags; no training run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lipsync_cli.errors import LipsyncError
from lipsync_cli.training import TrainOptions, TrainResult, merge
from lipsync_cli.training.options import check, resolve


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


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": float("nan")}, "lr must be a finite number above 0, got nan"),
        ({"lr": -1.0}, "lr must be a finite number above 0"),
        ({"workers": -1}, "workers must be at least 0"),
        ({"batch_size": -1}, "batch_size must be at least 1"),
        ({"max_minutes": float("nan")}, "max_minutes must be a finite number above 0"),  # nan never stopped
        ({"max_minutes": -1.0}, "max_minutes must be a finite number above 0"),
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number at least 0"),
        ({"lr": "abc"}, "lr must be a number, got 'abc'"),
        ({"accumulate": True}, "accumulate must be a whole number, got True"),
        ({"name": "../../escape"}, "--name '../../escape': use letters, digits"),
        ({"name": ".hidden"}, "--name '.hidden'"),
    ],
)
def test_bad_values_are_user_errors(changes, message, tmp_path):
    opts = TrainOptions(**{"out_dir": tmp_path, "max_steps": 2, **changes})
    with pytest.raises(LipsyncError, match=re.escape(message)):
        check(tmp_path / "manifest.json", opts)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[train]\nlr = "abc"\n', "[train]: lr must be a number, got 'abc'"),
        ("[train]\nout_dir = 5\n", "[train]: out_dir must be a path, got 5"),
        ("[train]\nmax_steps = 2.5\n", "[train]: max_steps must be a whole number, got 2.5"),
    ],
)
def test_config_values_of_the_wrong_kind(text, message, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    with pytest.raises(LipsyncError, match=re.escape(f"config {cfg} {message}")):
        merge(TrainOptions(), cfg, {})
    assert merge(TrainOptions(), _write(tmp_path / "ok.toml", "[train]\nlr = 1\n"), {}).lr == 1  # an int is a number


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_model_setting_of_the_wrong_kind():
    from lipsync_cli.models import sync
    from lipsync_cli.models.task import make_config

    with pytest.raises(ValueError, match="sync setting dim must be a whole number, got 'x'"):
        make_config(sync.Config, {"dim": "x"}, "sync")
    with pytest.raises(ValueError, match="video_channels must be a list of whole numbers"):
        make_config(sync.Config, {"video_channels": [16, "x"]}, "sync")
    cfg = make_config(sync.Config, {"dim": 64, "video_channels": [8, 16], "lr": 1, "meta": {}}, "sync")
    assert cfg.dim == 64 and cfg.video_channels == (8, 16) and cfg.lr == 1  # lists to tuples; unknown keys left out


@pytest.mark.parametrize(
    "model, message",
    [
        (":", "cannot load task factory ':'"),
        ("os:system", "'os:system' is not a task factory"),
        ("json:loads", "'json:loads' is not a task factory"),
        ("json:__doc__", "'json:__doc__' is not a task factory"),
    ],
)
def test_not_a_task_factory(model, message):
    with pytest.raises(LipsyncError, match=re.escape(message)):
        resolve(model)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", "it needs a list of 'clips' and a table of 'splits'"),
        ("[]", "a JSON list, not an object"),
        ('{"clips": "x", "splits": {}}', "it needs a list of 'clips'"),
        ('{"clips": [{"path": 3}], "splits": {}}', "clip {'path': 3} lacks its path"),
        ('{"clips": [], "splits": {"utterance": [1]}}', "split 'utterance' is not a table"),
        ("{not json", "Expecting property name"),
    ],
)
def test_a_manifest_of_the_wrong_shape(text, message, tmp_path):
    manifest = _write(tmp_path / "manifest.json", text)
    with pytest.raises(LipsyncError, match=re.escape(f"manifest {manifest} is not a prep manifest ({message}")):
        check(manifest, TrainOptions(out_dir=tmp_path, max_steps=2))
