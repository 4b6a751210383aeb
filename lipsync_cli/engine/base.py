"""The small interface every mouth engine speaks.

An engine (`Engine`) receives `SourceFaces` (the input video's tracked face: aligned lower-face crops, landmarks,
the video's own speech) and returns a `MouthTrack`: for every output frame, an aligned lower-face image carrying the
new mouth plus the aligned landmarks of that mouth and jaw (the compositor needs them to shape its mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class SourceFaces:
    crops: np.ndarray  # (T, S, S, 3) uint8 aligned lower-face crops (may be a disk memmap); zeros where no face
    landmarks: np.ndarray  # (T, 478, 2) smoothed full-frame pixel landmarks, NaN where no face
    found: np.ndarray  # (T,) bool
    matrices: np.ndarray  # (T, 2, 3) frame -> crop similarity transforms (NaN where no face)
    size: int  # S
    audio: np.ndarray | None  # the video's own speech, 16 kHz mono, aligned with frame 0 (None: no audio track)
    fps: float = 25.0
    usable: np.ndarray | None = None  # (T,) bool: frames an engine may borrow mouths / fit maps from (None: found)

    @property
    def pool(self) -> np.ndarray:
        """Frames whose mouth and audio the engine may learn from or reuse."""
        return self.found if self.usable is None else (self.found & self.usable)

    @property
    def n_frames(self) -> int:
        return len(self.found)

    def aligned_landmarks(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(T, 478, 2) landmarks in each frame's own aligned crop coordinates (frames start .. stop). Made 1024
        frames at a time (the same numbers): a 10-minute video's in one go took ~0.35 GB of temporaries."""
        stop = self.n_frames if stop is None else stop
        out = np.empty((max(stop - start, 0), *self.landmarks.shape[1:]), np.float64)
        for a in range(start, stop, 1024):
            b = min(a + 1024, stop)
            A, t = self.matrices[a:b, :, :2], self.matrices[a:b, :, 2]
            out[a - start : b - start] = np.einsum("tij,tnj->tni", A, self.landmarks[a:b].astype(np.float64))
            out[a - start : b - start] += t[:, None, :]
        return out


@dataclass
class MouthTrack:
    source_index: np.ndarray  # (N,) source frame whose mouth is shown (-1: leave the background frame untouched;
    # T + j for T source frames: the re-shaped mouth bank[j])
    points: np.ndarray  # (N, 478, 2) aligned landmarks of the shown mouth (for masks and measurement)
    crops: np.ndarray | None = None  # (N, S, S, 3) generated mouths; None: take source.crops[source_index]
    target: np.ndarray | None = None  # (N, D) the mouth-shape targets the engine aimed at (diagnostics)
    bank: np.ndarray | None = None  # (M, 2) (source frame, gap scale): its mouth re-shaped (engine/warp.py)

    def crop(self, i: int, source: SourceFaces) -> np.ndarray:
        if self.crops is not None:
            return self.crops[i]
        j = int(self.source_index[i])
        if j < source.n_frames:
            return np.asarray(source.crops[j])
        from lipsync_cli.engine import warp

        t, scale = int(self.bank[j - source.n_frames][0]), float(self.bank[j - source.n_frames][1])
        M = source.matrices[t]
        pts = source.landmarks[t].astype(np.float64) @ M[:, :2].T + M[:, 2]
        return warp.reshape(np.asarray(source.crops[t]), pts, scale)[0]  # made when shown: no memory held


class Engine(Protocol):
    """What `get_engine` returns: the mouths for len(background) output frames. background[i] is the source frame
    behind output frame i; `phones` (timed Phones of the speech) give the viseme targets (visemes.py), `close`
    marks output frames where the mouth must be shut when there are none (pauses, bilabials). Everything
    else an engine needs (lips choice, adaptation budget) is bound in from the caller's settings, never re-read."""

    def __call__(
        self,
        source: SourceFaces,
        speech: np.ndarray,
        background: np.ndarray,
        close: np.ndarray | None = None,
        sr: int = ...,
        phones: list | None = None,
    ) -> MouthTrack: ...
