"""The neural engine: retrieval's plan, painted by the neural renderer (models/render.py).

1. The mouth retrieval would show on each output frame (its viseme targets: p/b/m shut, open vowels open; shape
   and pose matched, temporally smooth) and that mouth's lip shape, which the renderer paints.
2. Optionally, `adapt_minutes` of fine-tuning on the video's own frames (`source.pool`): the renderer learns this
   person's teeth, lips and lighting.
3. Per output frame the renderer paints the mouth and chin of the background frame's box from the retrieved
   mouth (the reference) and the target lip shape drawn as masks; the box goes back into the aligned crop with the
   renderer's own feathered hole, so only the hole's pixels change and the compositor blends them in as usual.

Why retrieval's mouth as the reference: it is the nearest real mouth in shape and head pose, so the renderer only
has to close the gap to the target shape (training gives it such references half of the time), and where the
nearest mouth is already right it can pass the person's own pixels through.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch

from lipsync_cli import audio, face, models, progress
from lipsync_cli.engine import retrieval
from lipsync_cli.engine.base import MouthTrack, SourceFaces
from lipsync_cli.errors import LipsyncError
from lipsync_cli.models import render

ADAPT_FRAMES = 3000  # at most this many of the video's frames are held for adaptation (spread evenly)
_cache: dict[str, torch.nn.Module] = {}


def load(checkpoint: str | Path | None = None) -> render.Render:
    """The renderer from `checkpoint` (default lipsync_cli/weights/render.safetensors), loaded once per process."""
    path = Path(checkpoint) if checkpoint else models.WEIGHTS / "render.safetensors"
    key = str(path.with_suffix(".safetensors"))
    if key not in _cache:
        if not Path(key).is_file():
            raise LipsyncError(
                f"no renderer checkpoint at {key}: train one with `lipsync train --model render` and copy "
                "best.safetensors / best.json there"
            )
        _cache[key] = models.load(path)[0]
    return _cache[key]


def source_boxes(source: SourceFaces, frames: np.ndarray, img: int) -> np.ndarray:
    """Renderer boxes of the given source frames (crops of any size)."""
    return render.cut_boxes(source.aligned_crops(frames), img)


def adapt_to(
    model: render.Render, source: SourceFaces, aligned: np.ndarray, minutes: float, steps: int | None = None
) -> render.Render:
    """Fine-tune a copy on the video's own usable frames for `minutes` of wall time, or for exactly `steps` steps
    when given (wall time depends on the machine's load; a step count does not). 0: the model as it is."""
    pool = np.flatnonzero(source.pool)
    if (steps == 0 if steps is not None else minutes <= 0) or len(pool) < 2 * render.MIN_GAP:
        return model
    pool = pool[np.linspace(0, len(pool) - 1, min(len(pool), ADAPT_FRAMES)).round().astype(int)]
    img = model.cfg.img
    boxes = source_boxes(source, pool, img)
    lips = render.to_box(aligned[pool][:, face.LIPS], source.size, img).astype(np.float32)
    if steps is not None:
        with progress.task(f"adapting the renderer to this face ({steps} steps)", steps) as advance:
            return render.adapt(model, boxes, lips, 0.0, max_steps=steps, on_step=lambda *_: advance(1))[0]
    seconds = 60.0 * minutes
    with progress.task(f"adapting the renderer to this face ({minutes:g} min)", seconds) as advance:
        t0, last = time.perf_counter(), 0.0

        def tick(step: int, loss: float) -> None:
            nonlocal last
            now = min(time.perf_counter() - t0, seconds)
            advance(now - last)
            last = now

        return render.adapt(model, boxes, lips, seconds, on_step=tick)[0]


def paste(crop: np.ndarray, box: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The aligned crop (any size) with the painted box resized into BOX, blended through the renderer's hole."""
    x0, y0, x1, y1 = render.box_px(crop.shape[0])
    size = (x1 - x0, y1 - y0)
    big = cv2.resize(box, size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
    mask = cv2.resize(hole, size, interpolation=cv2.INTER_LINEAR)[..., None]
    out = crop.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(region * (1 - mask) + big * mask + 0.5, 0, 255).astype(np.uint8)
    return out


def animate(
    source: SourceFaces,
    speech: np.ndarray,
    background: np.ndarray,
    close: np.ndarray | None = None,
    sr: int = audio.SR,
    lips: str = "model",
    adapt_minutes: float = 2.0,
    adapt_steps: int | None = None,
    checkpoint: str | Path | None = None,
    batch: int = 64,
    phones: list | None = None,
) -> MouthTrack:
    """A painted mouth on every output frame whose background frame has a face. `lips`, `adapt_minutes`,
    `adapt_steps`: the settings of those names (bound by get_engine); `adapt_steps` overrides the minutes."""
    model = load(checkpoint)
    track = retrieval.animate(source, speech, background, close, sr, lips=lips, phones=phones)
    aligned = source.aligned_landmarks()
    model = adapt_to(model, source, aligned, adapt_minutes, adapt_steps)

    img = model.cfg.img
    # the shape to paint is the shape of the mouth retrieval chose: shut on p/b/m, open on open vowels
    shown = render.to_box(np.nan_to_num(track.points[:, face.LIPS]), source.size, img)
    hole = render.hole_mask(img)
    show = np.flatnonzero(track.source_index >= 0)
    crops = np.zeros((len(background), source.size, source.size, 3), np.uint8)
    for i in np.flatnonzero(track.source_index < 0):
        crops[i] = source.aligned_crop(int(background[i]))
    with progress.task("painting mouths", len(show)) as advance:
        for s in range(0, len(show), batch):
            idx = show[s : s + batch]
            bg_crops = source.aligned_crops(background[idx])
            refs = render.cut_boxes(np.array([track.crop(i, source) for i in idx]), img)
            painted = render.paint(model, render.cut_boxes(bg_crops, img), refs, shown[idx])
            for j, i in enumerate(idx):
                crops[i] = paste(bg_crops[j], painted[j], hole)
            advance(len(idx))
    # the bank says which source frame each re-shaped mouth came from (the eval's sharpness reads it)
    return MouthTrack(track.source_index, track.points, crops=crops, target=track.target, bank=track.bank)
