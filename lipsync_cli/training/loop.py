"""The training loop, once for every model: AMP, accumulation, DDP, validation, checkpoints, exact resume.

A model file hands the loop a `Task` (models/task.py): the model, its datasets, a loss and a validation function.
Everything else (optimiser, schedule, precision, devices, logging, checkpoints) lives here. `_train` reads as its
steps: set up the run (`_setup`, `_resume`, `_wrap`, `_loaders`), then per optimiser step (`_loop`): `_step`, `_log`
and `_validate_and_save`; then `_result`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from torch import nn
from torch.utils.data import DataLoader, default_collate

from lipsync_cli import models, progress
from lipsync_cli.errors import LipsyncError, require
from lipsync_cli.files import check_name
from lipsync_cli.models.task import Task, unwrap
from lipsync_cli.training import distributed, state
from lipsync_cli.training.distributed import Dist
from lipsync_cli.training.options import PRECISIONS, TrainOptions, check, check_checkpoints, resolve
from lipsync_cli.training.result import TrainResult
from lipsync_cli.training.schedule import StepBatches, lr_at


def train(
    model: str | Callable[[Path, dict], Task], manifest: str | Path, opts: TrainOptions | None = None
) -> TrainResult:
    """Train a task to opts.max_steps / opts.max_minutes.

    `model` is a model name (sync, lips, seed, render), a dotted `package.module:factory`, or the factory itself
    (`make_task(manifest, overrides) -> Task`). Under torchrun every process calls this; rank 0 logs and saves.
    """
    opts = opts or TrainOptions()
    check(manifest, opts)
    factory = resolve(model) if isinstance(model, str) else model
    d = distributed.init(opts)
    finished = False
    try:
        result = _train(factory, Path(manifest), opts, d)
        finished = True
        return result
    except LipsyncError:
        if d.rank > 0:  # every process meets the same complaint: rank 0 says it once
            raise SystemExit(1) from None
        raise
    finally:
        distributed.close(d, finished)


def start(model: str, manifest: Path, opts: TrainOptions, procs: int | None = None) -> TrainResult | None:
    """What `lipsync train` does: train here, or with several GPUs / --procs re-run the command under torchrun
    (then None: the processes logged their own results)."""
    nproc = max(opts.gpus or 1, procs or 1)
    if nproc == 1 or distributed.launched():
        return train(model, manifest, opts)
    check(manifest, opts, opts.name or (model if ":" not in model else None))
    progress.log(f"starting {nproc} {'GPU' if opts.gpus else 'CPU'} processes under torchrun")
    code = distributed.launch(nproc)
    if code in (1, 3, 130, 143):  # a user error, a bug, Ctrl-C, SIGTERM: the process printed its own line
        raise SystemExit(code)
    if code:  # killed without a word (SIGKILL, SIGABRT, ...)
        raise RuntimeError(f"a training process ended with exit code {code} and no message")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the run's state


@dataclass
class _Window:
    """The current log window: optimiser steps since the last log row, their summed loss and task terms."""

    device: torch.device
    t: float = 0.0
    steps: int = 0
    loss: torch.Tensor = None  # type: ignore[assignment]
    logs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.steps, self.loss, self.logs = time.perf_counter(), 0, torch.zeros((), device=self.device), {}

    def add_logs(self, logs: dict, accumulate: int) -> None:
        for key, v in logs.items():  # tensors stay on the device: no sync per step (floats work too)
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.logs[key] = self.logs.get(key, 0.0) + v / accumulate


@dataclass
class _Run:
    """One run: what the options and the task decided, the objects it trains with, and where it stands."""

    opts: TrainOptions
    d: Dist
    task: Task
    name: str
    precision: str
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    t_start: float  # perf_counter and os.times when train() began
    cpu_start: os.times_result
    net: nn.Module  # the bare model, on its device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # the augmentation's generator, on the device
    model: nn.Module | None = None  # what the loss runs: net, in DDP / compiled when asked (set by _wrap)
    writer: object = None  # TensorBoard SummaryWriter (rank 0)
    # where it stands
    step: int = 0
    start_step: int = 0
    samples: int = 0
    best: float | None = None
    best_step: int | None = None
    val: dict | None = None
    rank_diff: float | None = None
    history: list[dict] = field(default_factory=list)
    rate: dict = field(default_factory=lambda: {"samples": 0, "seconds": 0.0, "first": None})

    @property
    def ckpt_dir(self) -> Path:
        return self.opts.out_dir / "checkpoints" / self.name

    @property
    def run_dir(self) -> Path:
        return self.opts.out_dir / "runs" / self.name

    @property
    def per_step(self) -> int:
        return self.batch * self.opts.accumulate * self.d.world

    @property
    def horizon(self) -> int | None:
        return self.opts.schedule_steps or self.opts.max_steps

    @property
    def geometry(self) -> dict:
        return {"batch": self.batch, "accumulate": self.opts.accumulate, "world": self.d.world,
                "n_train": len(self.task.train_set)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# the steps


def _train(factory: Callable[[Path, dict], Task], manifest: Path, opts: TrainOptions, d: Dist) -> TrainResult:
    t_start, cpu_start = time.perf_counter(), os.times()
    if not d.main:
        progress.set_quiet(True)
    run = _setup(factory, manifest, opts, d, t_start, cpu_start)
    if opts.resume:
        _resume(run)
    run.start_step = run.step
    run.model = _wrap(run)
    train_iter, val_loader = _loaders(run)
    if d.main and opts.tensorboard:
        require("tensorboard", "train", "training's logs")
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir), purge_step=run.step if opts.resume else None)
    _loop(run, train_iter, val_loader)
    if run.writer is not None:
        run.writer.close()
    del train_iter
    return _result(run)


def _setup(
    factory: Callable[[Path, dict], Task], manifest: Path, opts: TrainOptions, d: Dist, t_start: float, cpu_start
) -> _Run:
    """The task (built from the base seed on every process: DDP also broadcasts rank 0's weights), its
    hyper-parameters under the options, the model on its device, the optimiser, scaler and generators."""
    precision = _precision(opts.precision, d.device)
    state.seed_all(opts.seed)
    try:
        task = factory(manifest, dict(opts.overrides))
    except ValueError as e:  # the task's own complaint about its data or settings
        raise LipsyncError(f"cannot set up the task: {str(e).splitlines()[0]}") from None
    if not isinstance(task, Task):  # a callable that takes (manifest, overrides) yet makes something else
        raise LipsyncError(f"the task factory returned {type(task).__name__}, not a Task (models/task.py)")
    name, batch = opts.name or task.name, opts.batch_size or task.batch_size
    check_name("the task's name", name)  # it becomes checkpoints/<name>/: a factory's own name is checked too
    _check_sizes(task, manifest, batch, opts.accumulate, d.world)
    check_checkpoints(opts.out_dir / "checkpoints" / name, opts)

    net = task.model.to(d.device)
    if opts.channels_last:
        _to_channels_last(net)
    weight_decay = opts.weight_decay if opts.weight_decay is not None else task.weight_decay
    lr = opts.lr if opts.lr is not None else task.lr
    optimizer = _optimizer(net, lr, weight_decay, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "16")
    gen = torch.Generator(d.device)
    state.seed_all(opts.seed + d.rank)  # from here on each process draws its own dropout and augmentation
    gen.manual_seed(opts.seed + d.rank)
    warmup = opts.warmup_steps if opts.warmup_steps is not None else task.warmup_steps
    return _Run(
        opts, d, task, name, precision, batch, lr, warmup, weight_decay, t_start, cpu_start, net, optimizer, scaler, gen
    )


def _check_sizes(task: Task, manifest: Path, batch: int, accumulate: int, world: int) -> None:
    n = len(task.train_set)
    if n == 0:
        raise LipsyncError(f"the train split of {manifest} is empty: prep more clips (see `lipsync data list`)")
    if n < batch * accumulate * world:
        raise LipsyncError(
            f"the train split has {n} samples, fewer than one step's "
            f"{batch} x {accumulate} x {world} (batch x accumulate x processes): lower --batch-size"
        )
    if task.val_set is not None and len(task.val_set) == 0:
        raise LipsyncError(f"the val split of {manifest} is empty: prep more clips or choose another split scheme")


def _resume(run: _Run) -> None:
    """Weights, optimiser, scaler, this process's RNG states and the position from last.* and last.state.*."""
    ckpt, d = run.ckpt_dir, run.d
    doc = state.load_state(ckpt / "last.state.safetensors", run.optimizer, run.scaler)
    with state.damaged(ckpt / "last.json"):
        weights = models.read_json_object(ckpt / "last.json").get("meta", {})
    if not isinstance(weights, dict) or weights.get("step") != doc["step"]:
        raise LipsyncError(f"checkpoint {ckpt}/last.* is torn (weights and state disagree): use --fresh")
    with state.damaged(ckpt / "last.safetensors"):
        unwrap(run.net).load_state_dict(models.read_tensors(ckpt / "last.safetensors", d.device))
    run.step, run.best, run.best_step, run.samples = doc["step"], doc["best"], doc["best_step"], doc["samples"]
    if doc.get("geometry") != run.geometry or doc["seed"] != run.opts.seed:
        progress.log("[yellow]note[/]: resuming with a different batch/processes/data: data order is not exact")
    if d.rank < len(doc["rng"]):
        with state.damaged(ckpt / "last.state.json"):
            state.set_rng_state(doc["rng"][d.rank], run.gen, d.device)
    progress.log(f"resumed {escape(run.name)} at step {run.step}")


def _wrap(run: _Run) -> nn.Module:
    """The model as the loss runs it: in DDP with several processes, compiled when asked."""
    model = distributed.wrap(run.net, run.d, run.task.find_unused_parameters)
    return torch.compile(model) if run.opts.compile else model


def _loaders(run: _Run) -> tuple[Iterator, DataLoader | None]:
    """This process's endless train batches from the run's step, and the validation loader (rank 0)."""
    opts, d, task = run.opts, run.d, run.task
    workers = opts.workers if opts.workers is not None else (4 if d.cuda else 0)
    loader_kw = dict(
        collate_fn=task.collate or default_collate,
        num_workers=workers,
        pin_memory=d.cuda,
        generator=torch.Generator(),  # the loader's own seed draw must not move the global RNG
    )
    sampler = StepBatches(len(task.train_set), run.batch, opts.accumulate, d.world, d.rank, opts.seed, run.step)
    train_iter = iter(DataLoader(task.train_set, batch_sampler=sampler, **loader_kw))
    val_loader = None
    if task.val_set is not None and d.main:
        val_loader = DataLoader(task.val_set, batch_size=run.batch, shuffle=False, **loader_kw)
    return train_iter, val_loader


def _loop(run: _Run, batches: Iterator, val_loader: DataLoader | None) -> None:
    """Optimiser steps until the step or time limit; a log row every log_every steps, validation and saves."""
    window = _Window(run.d.device)
    prog = progress.make_progress()
    bar = prog.add_task(f"train {run.name}", total=run.opts.max_steps, completed=run.step)
    run.model.train()
    last = _stop_now(run)
    if last:
        progress.log(
            f"{escape(run.name)}: nothing to do at step {run.step} (the step or time limit is already reached)"
        )
    with prog:
        while not last:
            grad_norm = _step(run, batches, window)
            prog.advance(bar)
            last = _stop_now(run)
            if run.step % run.opts.log_every == 0 or last:
                row = _log(run, window, grad_norm)
                prog.update(bar, description=f"train {run.name} loss {row['loss']:.4g} {row['samples_per_s']:.0f}/s")
            if _validate_and_save(run, val_loader, last):
                run.d.synchronize()
                window.t = time.perf_counter()  # checkpoints and validation do not count against samples/s


def _stop_now(run: _Run) -> bool:
    opts = run.opts
    done = opts.max_steps is not None and run.step >= opts.max_steps
    if opts.max_minutes is not None:
        done = distributed.rank0_says(done or time.perf_counter() - run.t_start > opts.max_minutes * 60, run.d)
    return done


def _step(run: _Run, batches: Iterator, window: _Window) -> torch.Tensor:
    """One optimiser step over `accumulate` micro-batches (DDP syncs gradients on the last); its gradient norm."""
    opts, d, task = run.opts, run.d, run.task
    loss_sum = torch.zeros((), device=d.device)
    for k in range(opts.accumulate):
        b = _to(next(batches), d.device)
        if task.augment is not None:
            b = task.augment(b, run.gen)
        sync = run.model.no_sync() if d.world > 1 and k < opts.accumulate - 1 else contextlib.nullcontext()
        with sync:
            with _autocast(run.precision, d.device):
                loss, logs = task.loss(run.model, b, run.step)
            run.scaler.scale(loss / opts.accumulate).backward()
        loss_sum += loss.detach().float() / opts.accumulate
        window.add_logs(logs, opts.accumulate)
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(run.step, run.lr, run.warmup, run.horizon, opts.min_lr_ratio)
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.net.parameters(), opts.grad_clip or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step, run.samples = run.step + 1, run.samples + run.per_step
    window.steps += 1
    window.loss += loss_sum
    return grad_norm


def _log(run: _Run, window: _Window, grad_norm: torch.Tensor) -> dict:
    """Close the log window: its row (mean loss over every process, speed, the task's terms) to the history and
    TensorBoard. A loss gone NaN/inf stops the run with advice."""
    d = run.d
    d.synchronize()
    seconds = time.perf_counter() - window.t
    loss = float(distributed.mean(window.loss / window.steps, d))
    if not math.isfinite(loss):
        raise LipsyncError(f"loss became {loss} at step {run.step}: lower --lr or try --precision 32")
    seen = window.steps * run.per_step
    if run.rate["first"] is None:  # the first window pays for warm-up: steady speed counts the ones after it
        run.rate["first"] = (seen, seconds)
    else:
        run.rate["samples"] += seen
        run.rate["seconds"] += seconds
    row = {
        **{k: float(v) / window.steps for k, v in window.logs.items()},
        "step": run.step,
        "loss": loss,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm),
        "samples_per_s": seen / max(seconds, 1e-9),
        "t": time.perf_counter() - run.t_start,  # when this window ended (for GPU-utilisation sampling)
    }
    run.history.append(row)
    if run.writer is not None:
        for key, v in row.items():
            if key != "step":
                run.writer.add_scalar(f"train/{key}", v, run.step)
    window.reset()
    return row


def _validate_and_save(run: _Run, val_loader: DataLoader | None, last: bool) -> bool:
    """Validate (best.* when the metric improved) and save last.* when due; whether either happened."""
    opts, step = run.opts, run.step
    if last and run.d.world > 1:
        run.rank_diff = distributed.rank_disagreement(run.net, run.d)
    validated = val_loader is not None and (step % opts.val_every == 0 or last)
    if validated:
        task = run.task
        run.val = _validate(task, unwrap(run.model), val_loader, run.precision, run.d.device, step, opts.val_batches)
        value = run.val[task.metric]
        improved = _better(value, run.best, task.higher_is_better)
        if improved:
            run.best, run.best_step = value, step
            meta = {"step": step, "metric": task.metric, "value": value, "val": run.val, "precision": run.precision}
            models.save(unwrap(run.model), task.config, run.ckpt_dir / "best", meta=meta)
        if run.writer is not None:
            for key, v in run.val.items():
                run.writer.add_scalar(f"val/{key}", v, step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in run.val.items())
        progress.log(f"step {step}: {shown}{' [green](best)[/]' if improved else ''}")
    saved = step % opts.save_every == 0 or last
    if saved:
        _save_last(run)
    return validated or saved


def _save_last(run: _Run) -> None:
    """last.* (weights through models.save) and last.state.*: every process hands rank 0 its RNG states."""
    d = run.d
    rngs = distributed.gather_json(state.rng_state(run.gen, d.device), d)  # every process takes part
    if not d.main:
        return
    geometry = run.geometry
    meta = {"step": run.step, "samples": run.samples, "metric": run.task.metric, "best": run.best, "val": run.val}
    meta.update(geometry, precision=run.precision, rank_max_abs_diff=run.rank_diff)
    doc = {"step": run.step, "best": run.best, "best_step": run.best_step, "samples": run.samples,
           "seed": run.opts.seed, "geometry": geometry, "rng": rngs}  # fmt: skip
    state.save_state(run.ckpt_dir / "last.state.safetensors", run.optimizer, run.scaler, doc)
    models.save(unwrap(run.model), run.task.config, run.ckpt_dir / "last", meta=meta)


def _result(run: _Run) -> TrainResult:
    rate = run.rate
    n, s = (rate["samples"], rate["seconds"]) if rate["seconds"] else (rate["first"] or (0, 0.0))
    cpu = os.times()
    return TrainResult(
        name=run.name,
        steps=run.step,
        start_step=run.start_step,
        samples=run.samples,
        samples_per_s=n / s if s else None,
        loss=run.history[-1]["loss"] if run.history else None,
        metric=run.task.metric,
        best=run.best,
        best_step=run.best_step,
        val=run.val,
        last=run.ckpt_dir / "last.safetensors",
        best_checkpoint=run.ckpt_dir / "best.safetensors" if run.best_step is not None else None,
        run_dir=run.run_dir,
        precision=run.precision,
        device=str(run.d.device),
        processes=run.d.world,
        batch=run.batch,
        accumulate=run.opts.accumulate,
        effective_batch=run.per_step,
        wall_s=time.perf_counter() - run.t_start,
        cpu_s=(cpu.user + cpu.system) - (run.cpu_start.user + run.cpu_start.system),
        rank_max_abs_diff=run.rank_diff,
        history=run.history,
    )


# ---------------------------------------------------------------------------------------------------------------------
# pieces


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
