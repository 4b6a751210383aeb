"""The small interface every mouth engine speaks.

An engine (`Engine`) receives `SourceFaces` (the input video's tracked face: aligned lower-face crops, landmarks,
the video's own speech) and returns a `MouthTrack`: for every output frame, an aligned lower-face image carrying the
new mouth plus the aligned landmarks of that mouth and jaw (the compositor needs them to shape its mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from lipsync_cli import face

MADE_KEPT = 16  # re-shaped mouths kept for reuse by MouthTrack.mouth


@dataclass
class SourceFaces:
    # (T, h, w, 3) uint8 stored mouths (may be a disk memmap): aligned crops, or with crop_fix any image of them (each
    # frame's own pixels under its lower face: dubbing.store_mouth); zeros where no face
    crops: np.ndarray
    landmarks: np.ndarray  # (T, 478, 2) smoothed full-frame pixel landmarks, NaN where no face
    found: np.ndarray  # (T,) bool
    matrices: np.ndarray  # (T, 2, 3) frame -> crop similarity transforms (NaN where no face)
    size: int  # S
    audio: np.ndarray | None  # the video's own speech, 16 kHz mono, aligned with frame 0 (None: no audio track)
    fps: float = 25.0
    usable: np.ndarray | None = None  # (T,) bool: frames an engine may borrow mouths / fit maps from (None: found)
    # (T, 2, 3): a stored mouth's pixels -> its aligned coordinates at the smoothed pose (None: the crops are
    # aligned), applied in the one resample that pastes a mouth (compositing), not in a resample of its own
    crop_fix: np.ndarray | None = None

    @property
    def pool(self) -> np.ndarray:
        """Frames whose mouth and audio the engine may learn from or reuse."""
        return self.found if self.usable is None else (self.found & self.usable)

    @property
    def n_frames(self) -> int:
        return len(self.found)

    def crop_at(self, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Frame t's stored crop and the move that aligns it (None: none needed)."""
        fix = None if self.crop_fix is None else self.crop_fix[t]
        return np.asarray(self.crops[t]), None if fix is None or np.isnan(fix).any() else fix

    def aligned_crop(self, t: int) -> np.ndarray:
        """Frame t's crop in its aligned coordinates: for the engines that paint on crops."""
        return _aligned(*self.crop_at(t), self.size)

    def aligned_crops(self, frames: np.ndarray) -> np.ndarray:
        """(len(frames), S, S, 3): `aligned_crop` of each of the frames."""
        frames = np.asarray(frames).ravel()
        out = np.empty((len(frames), self.size, self.size, 3), np.uint8)
        for j, t in enumerate(frames):
            out[j] = self.aligned_crop(int(t))
        return out

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
    # the re-shaped mouths made last (a closure shows one on several frames, and often again): bank row -> crop
    _made: dict = field(default_factory=dict, repr=False, compare=False)

    def mouth(self, i: int, source: SourceFaces) -> tuple[np.ndarray, np.ndarray | None]:
        """Output frame i's mouth crop and the move that aligns it (None: aligned), as the compositor takes them."""
        if self.crops is not None:
            return self.crops[i], None
        j = int(self.source_index[i])
        if j < source.n_frames:
            return source.crop_at(j)
        if j not in self._made:
            from lipsync_cli.engine import warp

            t, scale = int(self.bank[j - source.n_frames][0]), float(self.bank[j - source.n_frames][1])
            crop, fix = source.crop_at(t)
            M = source.matrices[t] if fix is None else face.compose_affine(face.invert_affine(fix), source.matrices[t])
            pts = face.transform_points(source.landmarks[t], M)  # in the stored crop's own pixels
            if len(self._made) >= MADE_KEPT:  # made when shown, a few kept: memory stays small
                del self._made[next(iter(self._made))]
            self._made[j] = warp.reshape(crop, pts, scale)[0], fix
        return self._made[j]

    def crop(self, i: int, source: SourceFaces) -> np.ndarray:
        """Output frame i's mouth crop in aligned coordinates."""
        return _aligned(*self.mouth(i, source), source.size)


def _aligned(crop: np.ndarray, fix: np.ndarray | None, size: int) -> np.ndarray:
    """A stored mouth as its size x size aligned crop (a copy of it when no move is needed)."""
    if fix is None:
        return np.array(crop)
    crop = np.ascontiguousarray(crop)
    return cv2.warpAffine(crop, fix, (size, size), flags=face.SHARP, borderMode=cv2.BORDER_REPLICATE)


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
