"""The seed engine: the original design (models/seed.py) generating a 32x32 mouth per output frame.

The model sees the new speech (MFCC rows around each frame) and SEED_REFS mouths of the video's own reference
footage (spread evenly over `source.pool`, the frames an engine may learn from). Each generated mouth is resized
into the eval's mouth box of the background frame's aligned crop, shifted to that crop's mean colour on the box's
rim (the generator's lighting is a guess), and feathered in; the compositor then warps the crop back into the frame
like any other engine's. The `close` hint is ignored: the model decides the mouth from the audio alone.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from lipsync_cli import audio, models
from lipsync_cli.engine.base import MouthTrack, SourceFaces
from lipsync_cli.errors import LipsyncError
from lipsync_cli.face import MOUTH_BOX
from lipsync_cli.models.seed import IMG, mfcc_windows, mouth_patch

TARGET_DB = -23.0  # prep's loudness for the training audio: MFCC level depends on it
BATCH = 256
_cache: dict[str, tuple[torch.nn.Module, dict]] = {}


def load(checkpoint: str | Path | None = None) -> torch.nn.Module:
    """The seed model from `checkpoint` (default lipsync_cli/weights/seed.safetensors), loaded once per process."""
    path = Path(checkpoint) if checkpoint else models.WEIGHTS / "seed.safetensors"
    if str(path) not in _cache:
        if not path.with_suffix(".safetensors").is_file():
            raise LipsyncError(
                f"no seed checkpoint at {path}: train one with `lipsync train --model seed` and copy it there"
            )
        _cache[str(path)] = models.load(path)
    return _cache[str(path)][0]


def speech_mfcc(speech: np.ndarray, sr: int = audio.SR) -> np.ndarray:
    """MFCC-13 at 100 Hz exactly as prep computes it for training (loudness-normalised first)."""
    x = audio.match_loudness(np.asarray(speech, np.float32), sr, TARGET_DB)
    return audio.mfcc(x, sr, n_mfcc=13, n_mels=80, hop_s=0.01)


@torch.no_grad()
def generate(model: torch.nn.Module, speech: np.ndarray, n_frames: int, refs: np.ndarray) -> np.ndarray:
    """(n_frames, 32, 32, 3) uint8 mouths for the speech, given (K, 32, 32, 3) uint8 reference mouths."""
    c = model.config
    windows = torch.from_numpy(mfcc_windows(speech_mfcc(speech), np.arange(n_frames), c.audio_ctx))
    r = torch.from_numpy(refs).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]  # (1, 3, K, 32, 32)
    out = [model(windows[s : s + BATCH][None], r)[0] for s in range(0, n_frames, BATCH)]
    imgs = torch.cat(out).add(1.0).mul(127.5).clamp(0, 255).round().byte()
    return imgs.permute(0, 2, 3, 1).numpy()


def paste(crop: np.ndarray, mouth: np.ndarray) -> np.ndarray:
    """The aligned crop with the 32x32 mouth resized into MOUTH_BOX, colour-matched on the box rim, feathered."""
    s = crop.shape[0]
    x0, y0, x1, y1 = (np.array(MOUTH_BOX) * s).round().astype(int)
    w, h = x1 - x0, y1 - y0
    big = cv2.resize(mouth, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    box = crop[y0:y1, x0:x1].astype(np.float32)
    rim = np.ones((h, w), bool)
    b = max(1, min(w, h) // 10)
    rim[b:-b, b:-b] = False
    big += box[rim].mean(0) - big[rim].mean(0)
    mask = np.zeros((h, w), np.float32)
    mask[b:-b, b:-b] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), b / 2)[..., None]
    out = crop.copy()
    out[y0:y1, x0:x1] = np.clip(box * (1 - mask) + big * mask + 0.5, 0, 255).astype(np.uint8)
    return out


def animate(
    source: SourceFaces,
    speech: np.ndarray,
    background: np.ndarray,
    close: np.ndarray | None = None,
    checkpoint: str | Path | None = None,
) -> MouthTrack:
    """A generated mouth on every output frame whose background frame has a face."""
    model = load(checkpoint)
    k = model.config.n_refs
    pool = np.flatnonzero(source.pool)
    if len(pool) < k:
        raise ValueError(f"the seed needs {k} reference frames with a face, the video has {len(pool)}")
    refs = pool[np.linspace(0, len(pool) - 1, k).round().astype(int)]
    mouths = generate(model, speech, len(background), mouth_patch(source.aligned_crops(refs)))
    aligned = source.aligned_landmarks()
    index = np.where(source.found[background], background, -1)
    crops = np.zeros((len(background), source.size, source.size, 3), np.uint8)
    for i, b in enumerate(background):
        if index[i] >= 0:
            crops[i] = paste(source.aligned_crop(int(b)), mouths[i])
    points = np.nan_to_num(aligned[background])
    return MouthTrack(source_index=index, points=points, crops=crops)


__all__ = ["IMG", "animate", "generate", "load", "paste", "speech_mfcc"]
