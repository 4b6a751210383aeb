"""The training loop (lipsync_cli/training/) on a tiny real task: tests/train_tiny.py over the tiny_prep shards, CPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_tiny  # tests/ is on sys.path (pytest's rootdir conftest)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from lipsync_cli import progress
from lipsync_cli.cli import app
from lipsync_cli.errors import LipsyncError
from lipsync_cli.training import StepBatches, TrainOptions, lr_at, read_config, train

TINY = "train_tiny:make_task"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    threads, quiet = torch.get_num_threads(), progress.is_quiet()
    torch.set_num_threads(1)
    progress.set_quiet(True)
    yield
    torch.set_num_threads(threads)
    progress.set_quiet(quiet)


def options(out: Path, **kw) -> TrainOptions:
    return TrainOptions(
        **{"out_dir": out, "max_steps": 6, "val_every": 100, "log_every": 3, "tensorboard": False, **kw}
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / "tiny" / "last.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def val_mae(manifest: Path, model: torch.nn.Module) -> float:
    task = train_tiny.make_task(manifest, {})
    with torch.no_grad():
        return train_tiny.validate(model.eval(), DataLoader(task.val_set, batch_size=16))["mae"]


def test_step_batches_resume_and_split_across_processes():
    one = iter(StepBatches(50, batch=4, accumulate=2, world=1, rank=0, seed=3))
    steps = [next(one) + next(one) for _ in range(14)]  # two micro-batches a step, 6 steps an epoch: 3 epochs
    assert len(set(sum(steps[:6], []))) == 48 and steps[6] != steps[0]  # no repeats in an epoch; reshuffled after
    ranks = [iter(StepBatches(50, batch=2, accumulate=2, world=2, rank=r, seed=3)) for r in (0, 1)]
    for step in steps:
        mine = [next(it) + next(it) for it in ranks]  # each process's two micro-batches of this step
        assert sorted(mine[0] + mine[1]) == sorted(step)
    later = iter(StepBatches(50, batch=4, accumulate=2, world=1, rank=0, seed=3, start=5))
    assert [next(later) + next(later) for _ in range(3)] == steps[5:8]


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1.0, warmup=10, horizon=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lr_at(500, 1.0, warmup=10, horizon=None, min_ratio=0.1) == 1.0


def test_loss_goes_down_and_checkpoints_load(tiny_prep, tmp_path):
    torch.manual_seed(0)  # what train() seeds before building: these are the run's own initial weights
    before = val_mae(tiny_prep, train_tiny.make_task(tiny_prep, {}).model)
    s = train(TINY, tiny_prep, options(tmp_path, max_steps=40, val_every=20, log_every=10, tensorboard=True))

    losses = [h["loss"] for h in s.history]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    assert s.best < 0.8 * before, (s.best, before)
    assert s.steps == 40 and s.samples == 40 * 8 and s.samples_per_s > 0

    ckpt = tmp_path / "checkpoints" / "tiny"
    for f in ("last.safetensors", "last.json", "last.state.safetensors", "last.state.json", "best.safetensors"):
        assert (ckpt / f).is_file(), f
    assert list((tmp_path / "runs" / "tiny").glob("events.out.tfevents.*"))
    config = json.loads((ckpt / "best.json").read_text())
    assert config["meta"]["step"] == s.best_step and config["meta"]["metric"] == "mae"
    model = train_tiny.build(config)
    model.load_state_dict(load_file(str(ckpt / "best.safetensors")))
    assert val_mae(tiny_prep, model) == pytest.approx(s.best, rel=1e-5)


def test_resume_is_exact(tiny_prep, tmp_path):
    kw = {"val_every": 4, "overrides": {"dropout": 0.2}}  # dropout: the restored RNG states matter
    train(TINY, tiny_prep, options(tmp_path / "straight", max_steps=12, **kw))
    # stopped half way (same LR horizon), then resumed: validation at step 6 must not disturb anything either
    half = train(TINY, tiny_prep, options(tmp_path / "split", max_steps=6, schedule_steps=12, **kw))
    assert half.steps == 6
    with pytest.raises(LipsyncError, match="--resume to continue"):
        train(TINY, tiny_prep, options(tmp_path / "split", max_steps=12, **kw))
    rest = train(TINY, tiny_prep, options(tmp_path / "split", max_steps=12, resume=True, **kw))
    assert rest.start_step == 6 and rest.steps == 12 and rest.samples == 12 * 8

    assert max_diff(weights(tmp_path / "straight"), weights(tmp_path / "split")) == 0.0
    states = [
        load_file(str(tmp_path / run / "checkpoints/tiny/last.state.safetensors")) for run in ("straight", "split")
    ]
    assert max_diff(*states) == 0.0  # the AdamW moments too


def test_accumulation_matches_one_big_batch(tiny_prep, tmp_path):
    train(TINY, tiny_prep, options(tmp_path / "accumulated", batch_size=4, accumulate=2))
    train(TINY, tiny_prep, options(tmp_path / "big", batch_size=8))
    assert max_diff(weights(tmp_path / "accumulated"), weights(tmp_path / "big")) < 1e-6
    train(TINY, tiny_prep, options(tmp_path / "small", batch_size=4))
    assert max_diff(weights(tmp_path / "small"), weights(tmp_path / "big")) > 1e-4  # the comparison can fail


def test_two_cpu_processes_agree(tiny_prep, tmp_path):
    """`lipsync train --procs 2`: torchrun, gloo DDP; both ranks end equal, and equal to one process of batch 2B."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("hidden = 24\n\n[train]\nwarmup_steps = 2\nlog_every = 2\nval_every = 3\n")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "LIPSYNC_OUTPUT_DIR": str(tmp_path / "ddp"),
           "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    args = ["train", "--model", TINY, "--manifest", str(tiny_prep), "--procs", "2", "--batch-size", "4"]
    args += ["--max-steps", "6", "--config", str(cfg)]
    run = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done tiny: step 6" in run.stderr
    assert not list((tmp_path / "tmp").glob("torchelastic_*"))  # torchrun's log folder is removed
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "tiny" / "last.json").read_text())
    assert meta["hidden"] == 24 and meta["meta"]["world"] == 2 and meta["meta"]["rank_max_abs_diff"] == 0.0

    overrides, trainer = read_config(cfg)
    single = options(tmp_path / "one", batch_size=8, overrides=overrides, **trainer)
    train(TINY, tiny_prep, single)
    assert max_diff(weights(tmp_path / "ddp"), weights(tmp_path / "one")) < 1e-5


def test_bf16_autocast_on_cpu_and_val_loss_without_validate(tiny_prep, tmp_path):
    s = train(TINY, tiny_prep, options(tmp_path, max_steps=12, precision="bf16", overrides={"validate": False}))
    losses = [h["loss"] for h in s.history]
    assert s.precision == "bf16" and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert s.metric == "val_loss" and s.best == s.val["val_loss"] and 0 < s.best < 1  # mean task.loss
    assert json.loads((tmp_path / "checkpoints" / "tiny" / "last.json").read_text())["meta"]["precision"] == "bf16"


def test_clear_errors(tiny_prep, tmp_path):
    with pytest.raises(LipsyncError, match="run `lipsync prep` first"):
        train(TINY, tmp_path / "nowhere" / "manifest.json", options(tmp_path))
    with pytest.raises(LipsyncError, match="train split .* is empty"):
        train(TINY, tiny_prep, options(tmp_path, overrides={"train_split": "test"}))  # tiny_prep has no test clips
    with pytest.raises(LipsyncError, match="nothing to resume"):
        train(TINY, tiny_prep, options(tmp_path, resume=True))
    with pytest.raises(LipsyncError, match="precision must be"):
        train(TINY, tiny_prep, options(tmp_path, precision="fp8"))
    with pytest.raises(LipsyncError, match="cannot load task factory"):
        train("no_such_module:make_task", tiny_prep, options(tmp_path))
    with pytest.raises(LipsyncError, match="cannot set up the task: unknown setting"):
        train(TINY, tiny_prep, options(tmp_path, overrides={"hiden": 3}))
    if not torch.cuda.is_available():
        with pytest.raises(LipsyncError, match="precision 16 needs a CUDA GPU"):
            train(TINY, tiny_prep, options(tmp_path, precision="16"))
        with pytest.raises(LipsyncError, match="no CUDA device"):
            train(TINY, tiny_prep, options(tmp_path, gpus=2))

    with pytest.raises(LipsyncError, match="cannot read config"):
        read_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("hidden = [1,\n")
    with pytest.raises(LipsyncError, match="cannot read config"):
        read_config(tmp_path / "bad.toml")
    (tmp_path / "keys.json").write_text('{"train": {"max_stepz": 3}}')
    with pytest.raises(LipsyncError, match="unknown \\[train\\] key"):
        read_config(tmp_path / "keys.json")

    result = CliRunner().invoke(app, ["train", "--model", TINY, "--manifest", str(tmp_path / "none.json")])
    assert isinstance(result.exception, LipsyncError) and "lipsync prep" in str(result.exception)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_prep, tmp_path_factory) -> Path:
    """The output folder of a 2-step run of the tiny task: checkpoints/tiny/last.* to damage, copy by copy."""
    out = tmp_path_factory.mktemp("ckpt")
    progress.set_quiet(True)
    train(TINY, tiny_prep, options(out, max_steps=2))
    return out


def _write(name: str, data: bytes | str):
    return lambda ckpt: (ckpt / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def _edit_json(name: str, **changes):
    def edit(ckpt: Path) -> None:
        doc = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**doc, **changes}))

    return edit


def _truncate(name: str):
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:-100])


def _reshape_first(name: str):
    def edit(ckpt: Path) -> None:
        from safetensors.torch import save_file

        tensors = load_file(str(ckpt / name))
        tensors[sorted(tensors)[0]] = torch.zeros(7)
        save_file(tensors, str(ckpt / name))

    return edit


def _pickle(name: str):
    return lambda ckpt: torch.save({"x": torch.zeros(3)}, ckpt / name)


DAMAGES = {
    "weights truncated": ("last.safetensors", _truncate("last.safetensors")),
    "weights garbage": ("last.safetensors", _write("last.safetensors", b"garbage")),
    "weights empty": ("last.safetensors", _write("last.safetensors", b"")),
    "weights a pickle": ("last.safetensors", _pickle("last.safetensors")),
    "weights missing": ("last.safetensors", lambda c: (c / "last.safetensors").unlink()),
    "weights misshapen": ("last.safetensors", _reshape_first("last.safetensors")),
    "state truncated": ("last.state.safetensors", _truncate("last.state.safetensors")),
    "state a pickle": ("last.state.safetensors", _pickle("last.state.safetensors")),
    "state misshapen": ("last.state.safetensors", _reshape_first("last.state.safetensors")),
    "state json garbage": ("last.state.json", _write("last.state.json", "{not json")),
    "state json a list": ("last.state.json", _write("last.state.json", "[1, 2]")),
    "state json missing": ("last.state.json", lambda c: (c / "last.state.json").unlink()),
    "rng a string": ("last.state.json", _edit_json("last.state.json", rng="abc")),
    "rng garbage": ("last.state.json", _edit_json("last.state.json", rng=[{"torch": "!!!", "cuda": None}])),
    "optimizer state empty": (
        "last.state.safetensors",
        _edit_json("last.state.json", optimizer={"state": {}, "param_groups": [{"params": [0, 1, 2, 3]}]}),
    ),
    "optimizer no groups": ("last.state.json", _edit_json("last.state.json", optimizer={"state": {}})),
    "best a string": ("last.state.json", _edit_json("last.state.json", best="x")),
    "config json a list": ("last.json", _write("last.json", "[]")),
    "config json missing": ("last.json", lambda c: (c / "last.json").unlink()),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_from_a_damaged_checkpoint_is_a_user_error(damage, tiny_prep, tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / "checkpoints" / "tiny"
    name, spoil = DAMAGES[damage]
    spoil(ckpt)
    with pytest.raises(LipsyncError, match=rf"checkpoint {ckpt / name} is (damaged \(.+\)|missing): start over"):
        train(TINY, tiny_prep, options(tmp_path, max_steps=3, resume=True))


def test_a_damaged_model_checkpoint_does_not_load(tmp_path):
    """models.load (--checkpoint elsewhere): garbage, pickled or cut weights and a bad config are one clear error."""
    from lipsync_cli import models

    def damaged(weights: bytes | None = None, config: str | None = None) -> Path:
        path = tmp_path / "sync.safetensors"
        shutil.copy(models.WEIGHTS / "sync.safetensors", path)
        shutil.copy(models.WEIGHTS / "sync.json", path.with_suffix(".json"))
        if weights is not None:
            path.write_bytes(weights)
        if config is not None:
            path.with_suffix(".json").write_text(config)
        return path

    good = (models.WEIGHTS / "sync.safetensors").read_bytes()
    torch.save({"x": torch.zeros(3)}, tmp_path / "pickle.pt")
    sync_config = json.loads((models.WEIGHTS / "sync.json").read_text())
    for weights, config, why in [
        (b"garbage", None, "not a readable safetensors file"),
        (good[: len(good) // 2], None, "not a readable safetensors file"),
        ((tmp_path / "pickle.pt").read_bytes(), None, "a pickle"),
        (None, "[]", "a JSON list, not an object"),
        (None, json.dumps({**sync_config, "dim": "x"}), "sync setting dim must be a whole number, got 'x'"),
    ]:
        with pytest.raises(LipsyncError, match=rf"does not load: {why}"):
            models.load(damaged(weights, config))


def not_a_task(manifest, overrides):
    return {"model": "no"}


@pytest.mark.parametrize("spoil", ["missing", "garbage"])
def test_an_unreadable_shard_is_a_user_error(spoil, tiny_prep, tmp_path):
    shutil.copytree(tiny_prep.parent, tmp_path / "prep")
    manifest = tmp_path / "prep" / "manifest.json"
    shard = manifest.parent / json.loads(manifest.read_text())["clips"][0]["path"]
    shard.unlink() if spoil == "missing" else shard.write_bytes(b"garbage")
    with pytest.raises(LipsyncError, match=rf"cannot read shard {shard} \(.+\): run `lipsync prep` again"):
        train(TINY, manifest, options(tmp_path / "out"))


def test_a_factory_must_return_a_task(tiny_prep, tmp_path):
    with pytest.raises(LipsyncError, match="the task factory returned dict, not a Task"):
        train("test_train:not_a_task", tiny_prep, options(tmp_path))


def _processes_under(pid: int) -> set[int]:
    """Every process below `pid` (from /proc: torchrun's workers are children of children)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    under, todo = set(), [pid]
    while todo:
        above = todo.pop()
        kids = [p for p, pp in parent.items() if pp == above]
        under.update(kids)
        todo.extend(kids)
    return under


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped: only its parent has not collected it yet


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_of_train_procs(sig, tiny_prep, tmp_path):
    """SIGTERM / SIGINT to `lipsync train --procs 2` stops torchrun and both workers (none keeps training and
    rewriting last.*), and torchrun's log folder goes with them."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "LIPSYNC_OUTPUT_DIR": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    args = ["train", "--model", TINY, "--manifest", str(tiny_prep), "--procs", "2", "--batch-size", "4"]
    args += ["--max-steps", "100000", "--save-every", "1", "--val-every", "100000"]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a worker left behind would hold a pipe open forever
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lipsync_cli.cli", *args], env=env, stderr=err)
    last = tmp_path / "out" / "checkpoints" / "tiny" / "last.json"
    under: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until the workers train: they save every step
        assert last.is_file(), log.read_text()
        under = _processes_under(proc.pid)
        assert len(under) >= 3, under  # torchrun and its two workers
        proc.send_signal(sig)
        code = proc.wait(30)
        deadline = time.monotonic() + 20
        while any(map(_alive, under)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in under if _alive(p)], log.read_text()
        assert code == (143 if sig == signal.SIGTERM else 130)
        assert not list((tmp_path / "tmp").glob("torchelastic_*"))  # torchrun's log folder went with it
    finally:
        for pid in [proc.pid, *under]:  # a failed run must not leave workers training
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_a_user_error_under_train_procs_is_one_line(tiny_prep, tmp_path):
    """The workers' user error reaches the user once: no torchrun traceback, no second `error:` line, exit 1."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "LIPSYNC_OUTPUT_DIR": str(tmp_path)}
    args = ["train", "--model", TINY, "--manifest", str(tiny_prep), "--procs", "2", "--batch-size", "100000"]
    run = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", *args, "--max-steps", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: the train split has"), run.stderr
    assert "Traceback" not in run.stderr, run.stderr
