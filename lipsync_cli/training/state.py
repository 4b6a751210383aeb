"""Checkpoint state for an exact resume, safetensors + JSON, nothing pickled.

The weights go through `models.save` (last.* and best.*); last.state.{safetensors,json} holds the rest: the
optimiser's tensors (safetensors) and its other fields, the GradScaler, every process's torch/CUDA/numpy/python
RNG states and the run's position (JSON). The data order is a pure function of the step, so it needs no saving.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lipsync_cli.files import atomic, write_json


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """This process's generators as JSON: torch, CUDA (on a GPU), numpy, python and the augmentation generator."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": _b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "augment": _b64(gen.get_state()),
    }


def set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    """Put back what `rng_state` saved."""
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    gen.set_state(_unb64(state["augment"]))


def save_state(path: Path, optimizer: torch.optim.Optimizer, scaler, doc: dict) -> None:
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


def load_state(path: Path, optimizer: torch.optim.Optimizer, scaler) -> dict:
    """Load what `save_state` wrote into `optimizer` and `scaler`; the JSON document."""
    doc = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))  # load_state_dict puts each where its param is
    state = {int(i): dict(s) for i, s in doc["optimizer"]["state"].items()}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state[int(i)][k] = v
    optimizer.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
    scaler.load_state_dict(doc["scaler"])
    return doc
