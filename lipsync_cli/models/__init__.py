"""The learned models, one readable file each, and how their checkpoints are stored.

    seed.py   the original design (MFCC transformer + 3D-conv video encoder + cross-attention + 32x32 GAN generator)
    sync.py   SyncNet-style audio-visual sync expert (eval --metric sync, and a loss for the others)
    lips.py   audio -> lip shape generalist (replaces the self-fitted map inside dub); lips_infer.py runs it in numpy
    render.py neural mouth renderer: lower-face inpainting from a reference frame + target lip shape

Each model file has a `Config` dataclass, `build(config: dict) -> nn.Module` and `make_task(manifest, overrides)`
returning a `lipsync_cli.models.task.Task`. A checkpoint is `<stem>.safetensors` (weights only: nothing is unpickled)
beside `<stem>.json` (the config, with "model": its name, plus whatever metadata training adds).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from lipsync_cli.errors import LipsyncError, reason
from lipsync_cli.files import atomic, write_json

if TYPE_CHECKING:  # torch is imported where a model is built: `from lipsync_cli.models import lipmap` needs none
    import torch

MODELS = ("seed", "sync", "lips", "render")
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"  # committed default checkpoints: <name>.safetensors


def module(name: str) -> ModuleType:
    """The model file for `name` (imported on first use: torch models stay out of commands that do not need them)."""
    if name not in MODELS:
        raise LipsyncError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return importlib.import_module(f"lipsync_cli.models.{name}")


def save(model: torch.nn.Module, config: dict, path: str | Path, meta: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its .json config atomically; `config["model"]` names the model file."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic(path) as tmp:
        save_file(state, str(tmp))
    write_json(path.with_suffix(".json"), {**config, **({"meta": meta} if meta else {})})
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from `<stem>.json` and load `<stem>.safetensors` into it (strict), in eval mode."""
    path = Path(path).with_suffix(".safetensors")
    cfg_path = path.with_suffix(".json")
    if not path.is_file() or not cfg_path.is_file():
        raise LipsyncError(f"no checkpoint at {path} (needs {path.name} and {cfg_path.name})")
    try:
        config = read_json_object(cfg_path)
        if "model" not in config:
            raise ValueError(f"{cfg_path.name} names no model")
        model = module(config["model"]).build(config)
        model.load_state_dict(read_tensors(path, device))
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's shape or key mismatch
        raise LipsyncError(f"checkpoint {path} does not load: {reason(e)}") from None
    return model.to(device).eval(), config


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a checkpoint's config, its state); ValueError when it does not."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    return doc


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ValueError saying what is wrong when it is not one. Nothing is ever
    unpickled: a torch.save file in its place is named as such and refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive or a bare pickle
            raise ValueError("a pickle (torch.save?), not safetensors: it is never unpickled") from None
        raise ValueError(f"not a readable safetensors file: {reason(e)}") from None


def default(name: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict] | None:
    """The committed checkpoint lipsync_cli/weights/<name>.safetensors, or None when there is none."""
    path = WEIGHTS / f"{name}.safetensors"
    return load(path, device) if path.is_file() else None
