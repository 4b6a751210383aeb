"""Mouth engines: given what we know of the input video's face and a new speech track, decide the mouth of
every output frame. Each engine is one module exposing `animate(source, speech, background, ...)`; `get_engine`
binds the settings an engine uses to it and returns an `Engine`."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lipsync_cli.engine.base import Engine, MouthTrack, SourceFaces

if TYPE_CHECKING:
    from lipsync_cli.settings import Settings

ENGINES = ("retrieval", "neural", "seed")


def get_engine(name: str, settings: Settings | None = None) -> Engine:
    """The named engine with what it needs from `settings` bound in (lips choice; the neural renderer's adaptation
    budget); None: each engine's own defaults. Engines are imported lazily: they may pull heavy dependencies."""
    if name == "retrieval":
        from lipsync_cli.engine.retrieval import animate

        return animate if settings is None else functools.partial(animate, lips=settings.lips)
    if name == "seed":  # the original design's generator (models/seed.py); needs its checkpoint
        from lipsync_cli.engine.seed import animate

        return animate
    if name == "neural":  # retrieval's plan painted by the neural renderer (models/render.py); needs its checkpoint
        from lipsync_cli.engine.neural import animate

        if settings is None:
            return animate
        return functools.partial(
            animate, lips=settings.lips, adapt_minutes=settings.adapt_minutes, adapt_steps=settings.adapt_steps
        )
    raise ValueError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")


__all__ = ["ENGINES", "Engine", "MouthTrack", "SourceFaces", "get_engine"]
