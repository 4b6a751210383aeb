"""Mouth engines: given what we know of the input video's face and a new speech track, decide the mouth of
every output frame. Each engine is one module exposing `animate(source, speech, background, ...)`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from lipsync_cli.engine.base import MouthTrack, SourceFaces


def get_engine(name: str, settings=None) -> Callable[..., MouthTrack]:
    """The `animate` function of the named engine (imported lazily: engines may pull heavy dependencies), with the
    engine's own settings bound when `settings` is given."""
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
            animate, adapt_minutes=settings.adapt_minutes, adapt_steps=settings.adapt_steps, lips=settings.lips
        )
    raise ValueError(f"unknown engine {name!r} (available: retrieval, neural, seed)")


__all__ = ["MouthTrack", "SourceFaces", "get_engine"]
