"""How to train: `TrainOptions`, the --config file, the task factory by name, and the checks made before any work.

Settings reach the loop only through a TrainOptions; the CLI layers its sources with `merge`:

    TrainOptions(...)                                       every knob of a run, with its default
    read_config(path) -> (model overrides, trainer options) a --config TOML/JSON file
    merge(base, config, flags, ...) -> TrainOptions         settings < config file < flags
    resolve(model) -> factory                               "sync" | "lips" | ... | "pkg.mod:factory"
    check(manifest, opts, name)                             cheap checks before any process starts
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lipsync_cli.data.dataset import read_manifest
from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import check_name
from lipsync_cli.models.task import KIND_NAMES, Task, fits


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
_HINTS = typing.get_type_hints(TrainOptions)
# the bounds a number must keep (None: unset is fine): whole numbers from their least value, floats finite and
# above 0 (or from 0 where 0 means "none")
AT_LEAST = {"batch_size": 1, "accumulate": 1, "max_steps": 1, "schedule_steps": 1, "val_every": 1, "save_every": 1,
            "log_every": 1, "val_batches": 1, "warmup_steps": 0, "workers": 0, "gpus": 0, "seed": 0}  # fmt: skip
POSITIVE = ("max_minutes", "lr", "dist_timeout_min")
NON_NEGATIVE = ("weight_decay", "grad_clip", "min_lr_ratio")


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
    check_kinds(trainer, f"config {path} [train]")
    if "out_dir" in trainer:
        trainer["out_dir"] = Path(trainer["out_dir"])
    return doc, trainer


def check_kinds(values: dict, where: str) -> None:
    """Each of `values` (TrainOptions fields) is of its field's kind: a config file or the Python API can hand over
    anything, and a string where a number belongs would otherwise fail mid-run as a bug."""
    for key, value in values.items():
        kinds = typing.get_args(_HINTS[key]) or (_HINTS[key],)
        if not fits(value, kinds):
            names = " or ".join(KIND_NAMES.get(k, k.__name__) for k in kinds if k is not type(None))
            raise LipsyncError(f"{where}: {key} must be {names}, got {value!r}")


def merge(
    base: TrainOptions,
    config: Path | None,
    flags: dict,
    *,
    procs: int | None = None,
    default_max_steps: int | None = None,
) -> TrainOptions:
    """`base` (the settings), then the --config file's model overrides and [train] table, then the flags given
    (None: not given); --procs means CPU processes, and with no stop given the run stops at `default_max_steps`."""
    overrides, trainer = read_config(config) if config is not None else ({}, {})
    opts = replace(base, overrides={**base.overrides, **overrides}, **trainer)
    opts = replace(opts, **{k: v for k, v in flags.items() if v is not None})
    if procs is not None and procs > 1 and (opts.gpus or 0) > 0:
        raise LipsyncError("--procs is for CPU processes; with GPUs use --gpus N")
    if procs is not None:
        opts = replace(opts, gpus=0)
    if opts.max_steps is None and opts.max_minutes is None:
        opts = replace(opts, max_steps=default_max_steps)
    return opts


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
    except (ImportError, AttributeError, ValueError) as e:  # ValueError: an empty module name (":")
        raise LipsyncError(f"cannot load task factory {model!r}: {e}") from None
    if not callable(factory) or not _takes_two(factory):
        raise LipsyncError(f"{model!r} is not a task factory: make_task(manifest, overrides) -> Task")
    return factory


def _takes_two(fn: Callable) -> bool:
    """Whether `fn` can be called as fn(manifest, overrides) (os:system or json:loads cannot); True when Python
    cannot tell (some builtins have no signature): the loop then checks that what it returns is a Task."""
    try:
        inspect.signature(fn).bind(Path(), {})
    except TypeError:
        return False
    except ValueError:  # no signature to read
        pass
    return True


def check(manifest: str | Path, opts: TrainOptions, name: str | None = None) -> None:
    """Cheap checks of what the user asked for, before any process is started or model built.

    With the run's `name` (known up front for the built-in models) the checkpoint folder is checked too.
    """
    check_kinds({k: getattr(opts, k) for k in _HINTS}, "train options")
    check_values(opts)
    if opts.name is not None:
        check_name("--name", opts.name)
    if not Path(manifest).is_file():
        raise LipsyncError(f"no prepped data at {manifest}: run `lipsync prep` first (or pass --manifest)")
    read_manifest(manifest)  # its shape, before any process starts
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
    if name is not None:
        check_checkpoints(opts.out_dir / "checkpoints" / name, opts)


def check_values(opts: TrainOptions) -> None:
    """Numbers within their bounds: nan or a negative learning rate trains nothing useful, a nan --max-minutes never
    stops, a negative count has no meaning."""
    for key, least in AT_LEAST.items():
        value = getattr(opts, key)
        if value is not None and value < least:
            raise LipsyncError(f"{key} must be at least {least}, got {value}")
    for key in (*POSITIVE, *NON_NEGATIVE):
        value = getattr(opts, key)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and key in POSITIVE):
            bound = "above 0" if key in POSITIVE else "at least 0"
            raise LipsyncError(f"{key} must be a finite number {bound}, got {value}")
    if opts.min_lr_ratio > 1:
        raise LipsyncError(f"min_lr_ratio must be at most 1, got {opts.min_lr_ratio}")


def check_checkpoints(ckpt_dir: Path, opts: TrainOptions) -> None:
    """--resume needs a last.state; without --resume or --fresh an existing last.* is never overwritten."""
    if opts.resume and not (ckpt_dir / "last.state.safetensors").is_file():
        raise LipsyncError(
            f"nothing to resume: no {ckpt_dir / 'last.state.safetensors'} (train without --resume first)"
        )
    if not opts.resume and not opts.fresh and (ckpt_dir / "last.safetensors").is_file():
        raise LipsyncError(f"{ckpt_dir}/last.safetensors exists: pass --resume to continue it or --fresh to start over")
