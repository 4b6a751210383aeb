"""Shared fixtures: real media from ../shared (tests skip cleanly when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LIPSYNC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


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
