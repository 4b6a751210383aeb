"""`lipsync train`: one training loop for every model (see models/): AMP, accumulation, DDP, checkpoints, resume.

A model file hands the loop a `Task`: the model, its datasets, a loss and a validation function. Everything else
(optimiser, schedule, precision, devices, logging, checkpoints) lives here, once.

    train(model, manifest, TrainOptions(...)) -> summary    model: "sync" | "lips" | "seed" | "pkg.mod:factory"
    read_config(path) -> (model overrides, trainer options) a --config TOML/JSON file
    launch(nproc) / launched()                              re-run the command under torchrun / are we under it

Under torchrun each process trains on its share of every step (gloo on CPU, NCCL on CUDA); rank 0 validates, logs
and saves. Checkpoints in <out>/checkpoints/<name>/: last.{safetensors,json} and best.{safetensors,json} through
`models.save`, and last.state.{safetensors,json} (optimiser, GradScaler, every process's RNG states, the step)
for an exact --resume. The data order is a pure function of the step (`StepBatches`), so it needs no saving.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Sampler, default_collate

from lipsync_cli import models, progress
from lipsync_cli.errors import LipsyncError, require
from lipsync_cli.files import atomic, write_json
from lipsync_cli.models.task import Task, unwrap

# ---------------------------------------------------------------------------------------------------------------------
# options


@dataclass
class TrainOptions:
    """How to train. None means "the task's default" for the hyper-parameters that a Task carries.

    The effective batch of one optimiser step is batch_size x accumulate x processes. `max_steps` stops the run and
    sets the cosine horizon (override the horizon with `schedule_steps`, e.g. to stop early yet keep the schedule);
    `max_minutes` stops on wall time (with neither horizon, the LR stays flat after warmup).
    """

    out_dir: Path = Path("outputs")  # runs/<name>/ (TensorBoard) and checkpoints/<name>/
    name: str | None = None  # run name; default: the task's name
    overrides: dict = field(default_factory=dict)  # model-config overrides, passed to make_task
    gpus: int | None = None  # None: one CUDA device when there is one, else CPU; 0: CPU
    precision: str = "auto"  # 32 | bf16 | 16 (CUDA, with GradScaler) | auto: bf16 on a CUDA GPU that has it, else 32
    batch_size: int | None = None  # per process and micro-batch
    accumulate: int = 1
    max_steps: int | None = None
    max_minutes: float | None = None
    schedule_steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    val_every: int = 500
    save_every: int = 500
    log_every: int = 20
    val_batches: int | None = None  # at most this many validation batches (None: the whole split)
    workers: int | None = None  # DataLoader processes per training process; None: 4 on CUDA, 0 on CPU
    channels_last: bool = False  # convolution weights and activations NHWC (tensor cores like it; measure first)
    compile: bool = False  # torch.compile the model's forward (pays only on long runs: it compiles for ~a minute)
    seed: int = 0
    resume: bool = False
    fresh: bool = False  # start over even though checkpoints/<name>/last.* exists (it is overwritten)
    tensorboard: bool = True
    dist_timeout_min: float = 60.0  # collective-op timeout (rank 0 validates while the others wait)


# keys a --config file may set under its [train] table (everything else there is a model override)
TRAINER_KEYS = tuple(f for f in TrainOptions.__dataclass_fields__ if f not in ("overrides", "resume", "fresh"))
PRECISIONS = {"32": "32", "fp32": "32", "bf16": "bf16", "16": "16", "fp16": "16", "auto": "auto"}


def read_config(path: str | Path) -> tuple[dict, dict]:
    """(model overrides, trainer options) from a TOML or JSON file; trainer keys sit in its "train" table."""
    path = Path(path)
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise LipsyncError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("train", {}), dict):
        raise LipsyncError(f"config {path} must be a table of model settings with an optional [train] table")
    trainer = doc.pop("train", {})
    unknown = sorted(set(trainer) - set(TRAINER_KEYS))
    if unknown:
        raise LipsyncError(
            f"config {path}: unknown [train] key(s) {', '.join(unknown)}; known: {', '.join(TRAINER_KEYS)}"
        )
    if "out_dir" in trainer:
        trainer["out_dir"] = Path(trainer["out_dir"])
    return doc, trainer


def resolve(model: str) -> Callable[[Path, dict], Task]:
    """The task factory for a model name (sync, lips, seed) or a dotted `package.module:factory` path."""
    if ":" not in model:
        from lipsync_cli import models

        return models.module(model).make_task
    mod, _, attr = model.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the user's own module next to where they stand
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise LipsyncError(f"cannot load task factory {model!r}: {e}") from None
    if not callable(factory):
        raise LipsyncError(f"task factory {model!r} is not callable")
    return factory


def check(manifest: str | Path, opts: TrainOptions, name: str | None = None) -> None:
    """Cheap checks of what the user asked for, before any process is started or model built.

    With the run's `name` (known up front for the built-in models) the checkpoint folder is checked too.
    """
    if not Path(manifest).is_file():
        raise LipsyncError(f"no prepped data at {manifest}: run `lipsync prep` first (or pass --manifest)")
    if str(opts.precision) not in PRECISIONS:
        raise LipsyncError(f"precision must be 32, bf16, 16 or auto, not {opts.precision!r}")
    gpus = opts.gpus
    if gpus and not torch.cuda.is_available():
        raise LipsyncError(f"--gpus {gpus}: torch sees no CUDA device here (on CPU use --procs N for N processes)")
    if gpus and gpus > torch.cuda.device_count():
        raise LipsyncError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) here")
    on_cuda = gpus != 0 and torch.cuda.is_available()
    if PRECISIONS[str(opts.precision)] == "16" and not on_cuda:
        raise LipsyncError("precision 16 needs a CUDA GPU (fp16 with loss scaling); on CPU use bf16 or 32")
    if opts.max_steps is None and opts.max_minutes is None:
        raise LipsyncError("give max_steps or max_minutes: when to stop")
    for key in ("accumulate", "val_every", "save_every", "log_every"):
        if getattr(opts, key) < 1:
            raise LipsyncError(f"{key} must be >= 1, got {getattr(opts, key)}")
    if name is not None:
        _check_checkpoints(opts.out_dir / "checkpoints" / name, opts)


def _check_checkpoints(ckpt_dir: Path, opts: TrainOptions) -> None:
    if opts.resume and not (ckpt_dir / "last.state.safetensors").is_file():
        raise LipsyncError(
            f"nothing to resume: no {ckpt_dir / 'last.state.safetensors'} (train without --resume first)"
        )
    if not opts.resume and not opts.fresh and (ckpt_dir / "last.safetensors").is_file():
        raise LipsyncError(f"{ckpt_dir}/last.safetensors exists: pass --resume to continue it or --fresh to start over")


def launch(nproc: int, argv: list[str] | None = None) -> int:
    """Re-run this command as `nproc` processes under torchrun (one machine); the exit code of the group.

    Each process runs `python -m lipsync_cli.cli <argv>` (default: this process's own arguments) and finds its rank
    in torchrun's environment. For several machines, start torchrun yourself (--nnodes, --rdzv-endpoint, ...).
    """
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*cmd, "-m", "lipsync_cli.cli", *argv])


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


# ---------------------------------------------------------------------------------------------------------------------
# processes, devices, precision


@dataclass
class _Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(opts: TrainOptions) -> _Dist:
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if world == 1 and max(opts.gpus or 0, 1) > 1:
        raise LipsyncError(f"--gpus {opts.gpus} needs one process per GPU: use `lipsync train` or torchrun")
    cuda = opts.gpus != 0 and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=opts.dist_timeout_min))
    return _Dist(rank, local, world, device)


def _precision(name: str, device: torch.device) -> str:
    name = PRECISIONS[str(name)]
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"
    return name


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


def lr_at(step: int, lr: float, warmup: int, horizon: int | None, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_ratio at `horizon` (flat without one)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if not horizon or horizon <= warmup:
        return lr
    t = min(1.0, (step - warmup) / (horizon - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------------------------
# data order


class StepBatches(Sampler[list[int]]):
    """This process's micro-batches, forever, starting at optimiser step `start`.

    Epoch e is a permutation seeded by seed + e; each step takes the next batch x accumulate x world indices of it
    and process r gets every world-th one. The order is a pure function of the step, so resuming needs only the step,
    and one process with batch B x world sees exactly the samples that `world` processes of batch B see together.
    Each epoch drops its last incomplete step.
    """

    def __init__(self, n: int, batch: int, accumulate: int, world: int, rank: int, seed: int, start: int = 0):
        self.n, self.batch, self.accumulate, self.world, self.rank = n, batch, accumulate, world, rank
        self.seed, self.start = seed, start
        self.steps_per_epoch = n // (batch * accumulate * world)

    def __iter__(self):
        step = self.start
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = perm[self.rank :: self.world]
            for s in range(first, self.steps_per_epoch):
                for k in range(self.accumulate):
                    i = (s * self.accumulate + k) * self.batch
                    yield mine[i : i + self.batch].tolist()
            step = (epoch + 1) * self.steps_per_epoch


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: weights through models.save; optimiser, scaler, RNG and position in last.state.{safetensors,json}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": _b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "augment": _b64(gen.get_state()),
    }


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    gen.set_state(_unb64(state["augment"]))


def _gather_json(obj, d: _Dist) -> list:
    """Every process's `obj` (JSON-able), on every process: bytes over the process group, nothing unpickled."""
    if d.world == 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(d.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=d.device) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=d.device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=d.device)
    padded[: data.numel()] = data
    out = [torch.empty(longest, dtype=torch.uint8, device=d.device) for _ in range(d.world)]
    dist.all_gather(out, padded)
    return [json.loads(o[: int(s)].cpu().numpy().tobytes()) for o, s in zip(out, sizes, strict=True)]


def _save_state(path: Path, optimizer: torch.optim.Optimizer, scaler, doc: dict) -> None:
    """Optimiser tensors to <path>.safetensors; its other fields, the scaler and `doc` to <path>.json."""

    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for i, s in sd["state"].items():
        state[str(i)] = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                state[str(i)][k] = v
    doc = {**doc, "optimizer": {"state": state, "param_groups": sd["param_groups"]}, "scaler": scaler.state_dict()}
    with atomic(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    write_json(path.with_suffix(".json"), doc, indent=None)


def _load_state(path: Path, optimizer: torch.optim.Optimizer, scaler, device: torch.device) -> dict:
    doc = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))  # load_state_dict puts each where its param is
    state = {int(i): dict(s) for i, s in doc["optimizer"]["state"].items()}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state[int(i)][k] = v
    optimizer.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
    scaler.load_state_dict(doc["scaler"])
    return doc


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices and convolutions decay, biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda" or None)


def _to_channels_last(net: nn.Module) -> None:
    """Convolution weights to channels-last (NHWC / NDHWC) in place: the convolutions then run and return it."""
    for p in net.parameters():
        if p.dim() in (4, 5):
            fmt = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
            p.data = p.data.contiguous(memory_format=fmt)


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_batch_len(v) for v in items if isinstance(v, torch.Tensor | dict | list | tuple))


def _validate(task: Task, model: nn.Module, loader, precision: str, device: torch.device, step: int, limit) -> dict:
    """task.validate over the val split, or the mean task.loss as val_loss; model in eval mode, no grad."""
    batches = (_to(b, device) for b in itertools.islice(loader, limit))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(precision, device):
            if task.validate is not None:
                metrics = dict(task.validate(model, batches))
            else:
                total, n = 0.0, 0
                for b in batches:
                    k = _batch_len(b)
                    total, n = total + float(task.loss(model, b, step)[0]) * k, n + k
                metrics = {"val_loss": total / max(n, 1)}
    finally:
        model.train(was_training)
    if task.metric not in metrics:
        raise ValueError(f"task {task.name}: validate returned {sorted(metrics)}, without its metric {task.metric!r}")
    return {k: float(v) for k, v in metrics.items()}


def _better(value: float, best: float | None, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def train(model: str | Callable[[Path, dict], Task], manifest: str | Path, opts: TrainOptions | None = None) -> dict:
    """Train a task to opts.max_steps / opts.max_minutes; returns a summary (also what the CLI prints).

    `model` is a model name (sync, lips, seed, render), a dotted `package.module:factory`, or the factory itself
    (`make_task(manifest, overrides) -> Task`). Under torchrun every process calls this; rank 0 logs and saves.
    """
    opts = opts or TrainOptions()
    check(manifest, opts)
    factory = resolve(model) if isinstance(model, str) else model
    d = _init_dist(opts)
    try:
        return _train(factory, Path(manifest), opts, d)
    except LipsyncError:
        if d.rank > 0:  # every process meets the same complaint: rank 0 says it once
            raise SystemExit(1) from None
        raise
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(factory: Callable[[Path, dict], Task], manifest: Path, opts: TrainOptions, d: _Dist) -> dict:
    t_start, cpu_start = time.perf_counter(), os.times()
    if not d.main:
        progress.set_quiet(True)
    precision = _precision(opts.precision, d.device)

    # the model is built from the base seed on every process (DDP also broadcasts rank 0's weights)
    _seed_all(opts.seed)
    try:
        task = factory(manifest, dict(opts.overrides))
    except ValueError as e:  # the task's own complaint about its data or settings
        raise LipsyncError(f"cannot set up the task: {str(e).splitlines()[0]}") from None
    name = opts.name or task.name
    ckpt_dir, run_dir = opts.out_dir / "checkpoints" / name, opts.out_dir / "runs" / name
    batch = opts.batch_size or task.batch_size
    lr = opts.lr if opts.lr is not None else task.lr
    warmup = opts.warmup_steps if opts.warmup_steps is not None else task.warmup_steps
    weight_decay = opts.weight_decay if opts.weight_decay is not None else task.weight_decay
    horizon = opts.schedule_steps or opts.max_steps
    per_step = batch * opts.accumulate * d.world
    if len(task.train_set) == 0:
        raise LipsyncError(f"the train split of {manifest} is empty: prep more clips (see `lipsync data list`)")
    if len(task.train_set) < per_step:
        raise LipsyncError(
            f"the train split has {len(task.train_set)} samples, fewer than one step's "
            f"{batch} x {opts.accumulate} x {d.world} (batch x accumulate x processes): lower --batch-size"
        )
    if task.val_set is not None and len(task.val_set) == 0:
        raise LipsyncError(f"the val split of {manifest} is empty: prep more clips or choose another split scheme")
    state_path = ckpt_dir / "last.state.safetensors"
    _check_checkpoints(ckpt_dir, opts)

    net = task.model.to(d.device)
    if opts.channels_last:
        _to_channels_last(net)
    optimizer = _optimizer(net, lr, weight_decay, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "16")
    gen = torch.Generator(d.device)
    _seed_all(opts.seed + d.rank)  # from here on each process draws its own dropout and augmentation
    gen.manual_seed(opts.seed + d.rank)
    step, best, best_step, samples = 0, None, None, 0
    geometry = {"batch": batch, "accumulate": opts.accumulate, "world": d.world, "n_train": len(task.train_set)}
    if opts.resume:
        doc = _load_state(state_path, optimizer, scaler, d.device)
        weights = json.loads((ckpt_dir / "last.json").read_text()).get("meta", {})
        if weights.get("step") != doc["step"]:
            raise LipsyncError(f"checkpoint {ckpt_dir}/last.* is torn (weights and state disagree): use --fresh")
        unwrap(net).load_state_dict(load_file(str(ckpt_dir / "last.safetensors"), device=str(d.device)))
        step, best, best_step, samples = doc["step"], doc["best"], doc["best_step"], doc["samples"]
        if doc["geometry"] != geometry or doc["seed"] != opts.seed:
            progress.log("[yellow]note[/]: resuming with a different batch/processes/data: data order is not exact")
        if d.rank < len(doc["rng"]):
            _set_rng_state(doc["rng"][d.rank], gen, d.device)
        progress.log(f"resumed {name} at step {step}")
    start_step = step

    model: nn.Module = net
    if d.world > 1:
        ids = [d.local_rank] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=ids, find_unused_parameters=task.find_unused_parameters
        )
    if opts.compile:
        model = torch.compile(model)
    workers = opts.workers if opts.workers is not None else (4 if d.device.type == "cuda" else 0)
    loader_kw = dict(
        collate_fn=task.collate or default_collate,
        num_workers=workers,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator(),  # the loader's own seed draw must not move the global RNG
    )
    sampler = StepBatches(len(task.train_set), batch, opts.accumulate, d.world, d.rank, opts.seed, step)
    train_iter = iter(DataLoader(task.train_set, batch_sampler=sampler, **loader_kw))
    val_loader = None
    if task.val_set is not None and d.main:
        val_loader = DataLoader(task.val_set, batch_size=batch, shuffle=False, **loader_kw)

    writer = None
    if d.main and opts.tensorboard:
        require("tensorboard", "train", "training's logs")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir), purge_step=step if opts.resume else None)

    def save_last(val: dict | None) -> Path | None:
        rngs = _gather_json(_rng_state(gen, d.device), d)  # every process takes part
        if not d.main:
            return None
        meta = {"step": step, "samples": samples, "metric": task.metric, "best": best, "val": val, **geometry}
        meta.update(precision=precision, rank_max_abs_diff=rank_diff)
        doc = {"step": step, "best": best, "best_step": best_step, "samples": samples, "seed": opts.seed}
        _save_state(state_path, optimizer, scaler, {**doc, "geometry": geometry, "rng": rngs})
        return models.save(unwrap(model), task.config, ckpt_dir / "last", meta=meta)

    def stop_now() -> bool:
        done = opts.max_steps is not None and step >= opts.max_steps
        if opts.max_minutes is not None:  # wall time differs per process: rank 0 decides for all
            flag = torch.tensor([float(done or time.perf_counter() - t_start > opts.max_minutes * 60)], device=d.device)
            if d.world > 1:
                dist.broadcast(flag, 0)
            done = bool(flag.item())
        return done

    history: list[dict] = []
    val: dict | None = None
    rank_diff: float | None = None
    win = {"t": time.perf_counter(), "steps": 0, "loss": torch.zeros((), device=d.device), "logs": {}}
    rate = {"samples": 0, "seconds": 0.0, "first": None}  # steady samples/s: log windows after the first
    prog = progress.make_progress()
    bar = prog.add_task(f"train {name}", total=opts.max_steps, completed=step)
    model.train()
    last = stop_now()
    if last:
        progress.log(f"{name}: nothing to do at step {step} (the step or time limit is already reached)")
    with prog:
        while not last:
            loss_sum = torch.zeros((), device=d.device)
            for k in range(opts.accumulate):
                b = _to(next(train_iter), d.device)
                if task.augment is not None:
                    b = task.augment(b, gen)
                sync = model.no_sync() if d.world > 1 and k < opts.accumulate - 1 else contextlib.nullcontext()
                with sync:
                    with _autocast(precision, d.device):
                        loss, logs = task.loss(model, b, step)
                    scaler.scale(loss / opts.accumulate).backward()
                loss_sum += loss.detach().float() / opts.accumulate
                for key, v in logs.items():  # tensors stay on the device: no sync per step (floats work too)
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    win["logs"][key] = win["logs"].get(key, 0.0) + v / opts.accumulate
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, lr, warmup, horizon, opts.min_lr_ratio)
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), opts.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, samples = step + 1, samples + per_step
            win["steps"] += 1
            win["loss"] += loss_sum
            prog.advance(bar)
            last = stop_now()

            if step % opts.log_every == 0 or last:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                seconds = time.perf_counter() - win["t"]
                mean = win["loss"] / win["steps"]
                if d.world > 1:
                    dist.all_reduce(mean)
                    mean /= d.world
                loss_value = float(mean)
                if not math.isfinite(loss_value):
                    raise LipsyncError(f"loss became {loss_value} at step {step}: lower --lr or try --precision 32")
                speed = win["steps"] * per_step / max(seconds, 1e-9)
                if rate["first"] is None:
                    rate["first"] = (win["steps"] * per_step, seconds)
                else:
                    rate["samples"] += win["steps"] * per_step
                    rate["seconds"] += seconds
                row = {
                    **{k: float(v) / win["steps"] for k, v in win["logs"].items()},
                    "step": step,
                    "loss": loss_value,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": speed,
                    "t": time.perf_counter() - t_start,  # when this window ended (for GPU-utilisation sampling)
                }
                history.append(row)
                if writer is not None:
                    for key, v in row.items():
                        if key != "step":
                            writer.add_scalar(f"train/{key}", v, step)
                prog.update(bar, description=f"train {name} loss {loss_value:.4g} {speed:.0f}/s")
                win.update(t=time.perf_counter(), steps=0, loss=torch.zeros((), device=d.device), logs={})

            just_validated = just_saved = False
            if last and d.world > 1:
                rank_diff = _rank_disagreement(net, d)
            if val_loader is not None and (step % opts.val_every == 0 or last):
                val = _validate(task, unwrap(model), val_loader, precision, d.device, step, opts.val_batches)
                value = val[task.metric]
                improved = _better(value, best, task.higher_is_better)
                if improved:
                    best, best_step = value, step
                    meta = {"step": step, "metric": task.metric, "value": value, "val": val, "precision": precision}
                    models.save(unwrap(model), task.config, ckpt_dir / "best", meta=meta)
                if writer is not None:
                    for key, v in val.items():
                        writer.add_scalar(f"val/{key}", v, step)
                shown = ", ".join(f"{k} {v:.4g}" for k, v in val.items())
                progress.log(f"step {step}: {shown}{' [green](best)[/]' if improved else ''}")
                just_validated = True
            if step % opts.save_every == 0 or last:
                save_last(val)
                just_saved = True
            if just_validated or just_saved:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                win["t"] = time.perf_counter()  # checkpoints and validation do not count against samples/s

    if writer is not None:
        writer.close()
    del train_iter
    n, s = (rate["samples"], rate["seconds"]) if rate["seconds"] else (rate["first"] or (0, 0.0))
    cpu = os.times()
    summary = {
        "model": name,
        "steps": step,
        "start_step": start_step,
        "samples": samples,
        "samples_per_s": n / s if s else None,
        "loss": history[-1]["loss"] if history else None,
        "metric": task.metric,
        "best": best,
        "best_step": best_step,
        "val": val,
        "checkpoints": {
            "last": str(ckpt_dir / "last.safetensors"),
            "best": str(ckpt_dir / "best.safetensors") if best_step is not None else None,
        },
        "runs": str(run_dir),
        "precision": precision,
        "device": str(d.device),
        "processes": d.world,
        "batch": {"per_process": batch, "accumulate": opts.accumulate, "effective": per_step},
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": (cpu.user + cpu.system) - (cpu_start.user + cpu_start.system),
        "rank_max_abs_diff": rank_diff,
        "history": history,
    }
    return summary


def _rank_disagreement(net: nn.Module, d: _Dist) -> float | None:
    """Largest parameter difference between any process and rank 0 (DDP keeps them bitwise equal): None alone."""
    if d.world == 1:
        return None
    flat = torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
