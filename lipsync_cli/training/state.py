"""Checkpoint state for an exact resume, safetensors + JSON, nothing pickled.

The weights go through `models.save` (last.* and best.*); last.state.{safetensors,json} holds the rest: the
optimiser's tensors (safetensors) and its other fields, the GradScaler, every process's torch/CUDA/numpy/python
RNG states and the run's position (JSON). The data order is a pure function of the step, so it needs no saving.
"""

from __future__ import annotations

import base64
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lipsync_cli import models
from lipsync_cli.errors import LipsyncError, reason
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
    """Load what `save_state` wrote into `optimizer` and `scaler`; the JSON document. A file that is missing, not
    what save_state writes or does not fit this run's model is a LipsyncError naming it (see `damaged`)."""
    json_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    with damaged(json_path):
        doc = models.read_json_object(json_path)
        check_doc(doc)
    with damaged(tensor_path):
        tensors = models.read_tensors(tensor_path)  # load_state_dict puts each where its param is
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {int(i): dict(s) for i, s in doc["optimizer"]["state"].items()}
    with damaged(tensor_path):
        for key, v in tensors.items():
            i, k = _tensor_place(key, state, params)
            if v.dim() and v.shape != params[i].shape:  # AdamW's moments are shaped like their parameter
                raise ValueError(f"{key} has shape {tuple(v.shape)}, its parameter {tuple(params[i].shape)}")
            state[i][k] = v
    with damaged(json_path):
        optimizer.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
        scaler.load_state_dict(doc["scaler"])
    return doc


def _tensor_place(key: str, state: dict, params: list) -> tuple[int, str]:
    """(parameter index, state name) of an "optimizer.<i>.<name>" tensor, which the JSON's state must list."""
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != "optimizer" or not parts[1].isdigit():
        raise ValueError(f"unexpected tensor {key!r}")
    i = int(parts[1])
    if i >= len(params) or i not in state:
        raise ValueError(f"tensor {key!r} belongs to no parameter of this model")
    return i, parts[2]


def check_doc(doc: dict) -> None:
    """The JSON fields a resume reads have the kinds save_state wrote (ValueError naming the first that does not):
    a hand-edited or foreign file must not fail later, mid-run, as a bug."""
    kinds = {"step": int, "samples": int, "seed": int, "best": (int, float, type(None)),
             "best_step": (int, type(None)), "rng": list, "optimizer": dict, "scaler": dict}  # fmt: skip
    for key, kind in kinds.items():
        if key not in doc:
            raise ValueError(f"no {key!r}")
        if isinstance(doc[key], bool) or not isinstance(doc[key], kind):
            raise ValueError(f"{key!r} is {doc[key]!r}")
    if doc["step"] < 0 or doc["samples"] < 0:
        raise ValueError(f"step {doc['step']}, samples {doc['samples']}")
    opt = doc["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError("'optimizer' lacks its state or param_groups")
    if not all(isinstance(s, dict) and i.isdigit() for i, s in opt["state"].items()):
        raise ValueError("'optimizer' state is not one table per parameter index")
    if not all(isinstance(r, dict) for r in doc["rng"]):
        raise ValueError("'rng' is not one table per process")


@contextlib.contextmanager
def damaged(path: Path) -> Iterator[None]:
    """Reading or applying a checkpoint file: what goes wrong becomes one user error naming the file (the file is
    the problem: a truncated copy, a hand edit, another model's checkpoint), never a bug report."""
    try:
        yield
    except FileNotFoundError:
        raise LipsyncError(f"checkpoint {path} is missing: start over with --fresh instead of --resume") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        advice = "start over with --fresh instead of --resume"
        raise LipsyncError(f"checkpoint {path} is damaged ({reason(e)}): {advice}") from None
