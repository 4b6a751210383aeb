"""What a model file hands the training loop (`Task`), kept beside the models so that they never import the loop.

`lipsync_cli.training` runs a Task; each model file's `make_task(manifest, overrides)` builds one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]


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
