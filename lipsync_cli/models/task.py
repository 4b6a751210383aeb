"""What a model file hands the training loop (`Task`), kept beside the models so that they never import the loop.

`lipsync_cli.training` runs a Task; each model file's `make_task(manifest, overrides)` builds one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]
C = TypeVar("C")


@dataclass
class Task:
    """What a model file gives the training loop.

    loss(model, batch, step) -> (scalar loss, floats to log): batch tensors are already on the device (and
    augmented); `step` is the optimiser step, so staged schedules (the seed's encoders-first phase) can switch on it.
    validate(model, batches) -> metrics incl. `metric`: the model is in eval mode under no_grad, batches on device.
    `model` may be wrapped in DDP when called: use `unwrap(model)` to reach its attributes.
    """

    name: str
    model: nn.Module
    config: dict  # JSON-able; `models.load` rebuilds the model from it (must hold "model": name)
    train_set: Dataset
    val_set: Dataset | None
    loss: Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, float]]]
    validate: Callable[[nn.Module, Iterable[Batch]], dict[str, float]] | None = None
    metric: str = "val_loss"
    higher_is_better: bool = False
    augment: Callable[[Batch, torch.Generator], Batch] | None = None  # train batches only, on the device
    collate: Callable | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 32
    find_unused_parameters: bool = False  # DDP: set when some steps leave modules out (staged training)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def make_config(cls: type[C], values: dict, what: str) -> C:
    """A model's Config dataclass from a dict (a checkpoint's JSON, the user's overrides). Keys it does not know
    (training metadata) are left out and lists become tuples; a value of another kind than the field's default is a
    ValueError naming the setting: a string where a width belongs would otherwise fail deep inside the model."""
    kw = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        value, default = values[f.name], f.default
        if default is not dataclasses.MISSING and not _same_kind(value, default):
            raise ValueError(f"{what} setting {f.name} must be {_kind(default)}, got {value!r}")
        kw[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kw)


def _same_kind(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, tuple):
        return isinstance(value, list | tuple) and (not default or all(_same_kind(v, default[0]) for v in value))
    return fits(value, (type(default),))


def fits(value: object, kinds: tuple) -> bool:
    """Whether a setting's `value` (from JSON, TOML or the Python API) is of one of `kinds`: a bool is no number
    (Python counts it an int, a config does not), a whole number is a float too, and text a Path."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    if isinstance(value, str) and Path in kinds:
        return True
    return any(isinstance(value, k) for k in kinds)


KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path",
              dict: "a table"}  # fmt: skip


def _kind(default: Any) -> str:
    if isinstance(default, tuple):
        return f"a list of {_kind(default[0]).removeprefix('a ')}s" if default else "a list"
    return KIND_NAMES.get(type(default), type(default).__name__)
