"""Shared fixtures: real media from ../shared (tests skip cleanly when it is absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LIPSYNC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """`lipsync --quiet ARGS...` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def torch_blocked_env(folder: Path) -> dict[str, str]:
    """An environment in which `import torch` fails in every Python process started with it (a sitecustomize on
    PYTHONPATH, written into `folder`), children those processes spawn included; checked to block before use."""
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the block works (the tests using it can fail)
    return env


def shared_file(rel: str) -> Path:
    """Path of a file under ../shared, or skip the test when it is not there."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared media absent: {p}")
    return p


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared media absent: {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny_prep(tmp_path_factory) -> Path:
    """manifest.json of 24 real GRID s1 clips at 128 px (~6 s; splits: 22 train, 2 val, 0 test): for training tests."""
    if os.environ.get("LIPSYNC_TINY_PREP"):  # an already prepped manifest (a GPU machine without the media stack)
        return Path(os.environ["LIPSYNC_TINY_PREP"])
    from lipsync_cli import progress
    from lipsync_cli.data.prep import prep

    grid = shared_file("corpus/grid")
    out = tmp_path_factory.mktemp("prep") / "128"
    progress.set_quiet(True)
    prep(None, out, [grid], size=128, workers=2, limit=24)
    return out / "manifest.json"
