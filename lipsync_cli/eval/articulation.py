"""The articulation stick: does the mouth the user sees say the words?

Measured on a finished video only: its frames are re-tracked with the face mesh and the words it should be saying are
force-aligned to its own audio track, so nothing an engine believes about itself (its targets, its chosen frames)
enters the score. Three numbers (issue 11):

  bilabial  share of p/b/m phones where the mouth gap falls below CLOSED within +-1 frame of the phone
  contrast  (mean gap over open-vowel phones + EPS) / (mean over p/b/m phones of their smallest gap +-1 frame + EPS)
  silence   share of frames inside pauses of >= PAUSE_S (EDGE frames trimmed at each end) with gap < SILENT_OPEN

Mouth gap (`face.mouth_gap`): the mean distance of the inner-lip pairs face.GAP_PAIRS over the distance between the
outer eye corners (33, 263); about 0.01 shut, 0.05-0.15 on open vowels. Frames without a face are left out of every
count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipsync_cli import face, media, phones
from lipsync_cli.audio import SR
from lipsync_cli.errors import LipsyncError
from lipsync_cli.phones import SIL, Phone, Word

CLOSED = 0.0103  # gap below this: lips shut
SILENT_OPEN = 0.0355  # gap below this in a pause: at rest (closed or barely parted), not held open
EPS = 0.02  # contrast's offset: a mouth shut to 0.000 vs 0.005 is the same closure, not a 10x better one
PAUSE_S = 0.3  # pauses at least this long are scored by `silence`
EDGE = 2  # frames trimmed at each end of a pause (the mouth is still closing / already opening)
WINDOW = 1  # frames either side of a p/b/m phone in which the closure may fall
BILABIALS = ("P", "B", "M")
OPEN_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY")
FPS = 25.0
LAG_MAX = 5  # frames searched either way by `lag`


SMOOTH = 1.5  # landmark smoothing (frames, face.smooth_landmarks): mesh jitter out, a 2-frame closure kept


def track(frames: Iterable[np.ndarray], total: int | None = None, face_index: int = 0, progress: bool = False):
    """face.track_faces over RGB frames at the stick's smoothing: the FaceTrack (landmarks NaN where no face)."""
    return face.track_faces(frames, face_index=face_index, smooth_sigma=SMOOTH, total=total, progress=progress)


def frames_of(video: Path, fps: float = FPS, max_s: float | None = None) -> tuple[Iterator[np.ndarray], int]:
    """The video's frames at fps (at most max_s seconds of them) and how many to expect."""
    video = Path(video)
    if not video.exists():
        raise LipsyncError(f"no such file: {video}")
    total = media.probe(video).n_frames(fps)
    if max_s:
        total = min(total, int(round(max_s * fps)))
    frames = media.iter_frames(video, fps=fps)
    return (f for _, f in zip(range(total), frames, strict=False)), total


def retrack(
    video: Path, fps: float = FPS, face_index: int = 0, max_s: float | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Re-track a finished video with the face mesh at `fps`: (gap (T,), landmarks (T, 478, 2) NaN where no face,
    fps). Landmarks are face.track_faces' (mesh jitter smoothed, lips only lightly: a 2-frame closure survives)."""
    frames, total = frames_of(video, fps, max_s)
    t = track(frames, total, face_index, progress)
    if not len(t):
        raise LipsyncError(f"could not decode any frame from {video}")
    return face.mouth_gap(t.landmarks), t.landmarks, fps


# ----------------------------------------------------------------------------- scoring


def phone_frames(p: Phone, n: int, fps: float, pad: int = 0) -> np.ndarray:
    """Frame indices whose time i/fps falls in [start, end) of the phone (its nearest frame when it holds none),
    grown by `pad` frames each side, clipped to [0, n)."""
    lo = int(np.ceil(p.start * fps - 1e-9))
    hi = int(np.ceil(p.end * fps - 1e-9))
    if hi <= lo:
        lo = int(round((p.start + p.end) / 2 * fps))
        hi = lo + 1
    return np.arange(max(lo - pad, 0), min(hi + pad, n))


def pauses(phone_list: Sequence[Phone], duration: float, min_s: float = PAUSE_S) -> list[tuple[float, float]]:
    """(start, end) of stretches no speech phone covers, at least min_s long (the ends of the audio included)."""
    speech = sorted((p.start, p.end) for p in phone_list if p.label != SIL)
    out, t = [], 0.0
    for s, e in [*speech, (duration, duration)]:
        if s - t >= min_s:
            out.append((t, s))
        t = max(t, e)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def _nanmin(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.min()) if len(x) else float("nan")


def lag(gap: np.ndarray, phone_list: Sequence[Phone], fps: float = FPS, max_lag: int = LAG_MAX) -> float:
    """Frames the mouth trails the sound (negative: leads): the shift that best correlates the gap with the
    phones' openness (+1 on open vowels, -1 on p/b/m, 0 elsewhere). A sync check from the face mesh and the
    aligned phones alone, independent of the sync expert (which has not seen these faces); NaN if undecidable."""
    gap = np.asarray(gap, dtype=np.float64)
    n = len(gap)
    want = np.zeros(n)
    for p in phone_list:
        sign = 1.0 if p.label in OPEN_VOWELS else -1.0 if p.label in BILABIALS else 0.0
        if sign:
            want[phone_frames(p, n, fps)] = sign
    best, best_r = float("nan"), -np.inf
    for k in range(-max_lag, max_lag + 1):
        a, b = want[max(0, -k) : n - max(0, k)], gap[max(0, k) : n - max(0, -k)]  # gap[i + k] against want[i]
        ok = np.isfinite(b) & (a != 0)
        if ok.sum() < 4 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
            continue
        r = float(np.corrcoef(a[ok], b[ok])[0, 1])
        if r > best_r:
            best, best_r = float(k), r
    return best


def score(gap: np.ndarray, phone_list: Sequence[Phone], fps: float = FPS, words: Sequence[Word] | None = None) -> dict:
    """bilabial, contrast and silence of a gap series (T,) against timed phones (see the module docstring), with
    counts (n_bilabial, n_open, n_silence: items that had a face) and `phones`: per-phone detail for reports
    (label, word, start, end, kind, gap_mean over the phone, gap_min over +-WINDOW frames, closed)."""
    gap = np.asarray(gap, dtype=np.float64)
    n = len(gap)
    word_of = {}
    for w in words or []:
        for p in w.phones:
            word_of[id(p)] = w.word
    detail, bil_min, bil_closed, open_mean = [], [], [], []
    for p in phone_list:
        if p.label == SIL:
            continue
        inside = gap[phone_frames(p, n, fps)]
        around = gap[phone_frames(p, n, fps, WINDOW)]
        kind = "bilabial" if p.label in BILABIALS else "open" if p.label in OPEN_VOWELS else "other"
        d = {"label": p.label, "word": word_of.get(id(p), ""), "start": p.start, "end": p.end, "kind": kind,
             "gap_mean": _nanmean(inside), "gap_min": _nanmin(around)}  # fmt: skip
        if kind == "bilabial" and np.isfinite(d["gap_min"]):
            d["closed"] = bool(d["gap_min"] < CLOSED)
            bil_min.append(d["gap_min"])
            bil_closed.append(d["closed"])
        elif kind == "open" and np.isfinite(d["gap_mean"]):
            open_mean.append(d["gap_mean"])
        detail.append(d)

    rest = []
    for s, e in pauses(phone_list, n / fps):
        idx = phone_frames(Phone(SIL, s, e), n, fps)[EDGE:-EDGE] if EDGE else phone_frames(Phone(SIL, s, e), n, fps)
        rest.append(gap[idx])
    rest_gap = np.concatenate(rest) if rest else np.zeros(0)
    rest_gap = rest_gap[np.isfinite(rest_gap)]

    nan = float("nan")
    bilabial = float(np.mean(bil_closed)) if bil_closed else nan
    contrast = (np.mean(open_mean) + EPS) / (np.mean(bil_min) + EPS) if open_mean and bil_min else nan
    silence = float((rest_gap < SILENT_OPEN).mean()) if len(rest_gap) else nan
    return {
        "bilabial": bilabial,
        "contrast": float(contrast),
        "silence": silence,
        "lag": lag(gap, phone_list, fps),
        "n_bilabial": len(bil_closed),
        "n_open": len(open_mean),
        "n_silence": len(rest_gap),
        "open_gap": float(np.mean(open_mean)) if open_mean else nan,
        "bilabial_gap": float(np.mean(bil_min)) if bil_min else nan,
        "face_frames": float(np.isfinite(gap).mean()) if n else nan,
        "phones": detail,
    }


# ----------------------------------------------------------------------------- one video


@dataclass
class ArticulationResult:
    video: Path
    text: str
    fps: float
    gap: np.ndarray  # (T,) re-tracked mouth gap per frame, NaN where no face
    landmarks: np.ndarray  # (T, 478, 2) re-tracked landmarks, NaN where no face
    words: list[Word]  # the text force-aligned to the video's own audio (Word "" = stretch it could not fit)
    audio: np.ndarray  # the video's audio, 16 kHz mono
    scores: dict = field(default_factory=dict)  # score()'s dict, plus "aligned": share of phones from the aligner

    @property
    def phones(self) -> list[Phone]:
        return [p for w in self.words for p in w.phones]

    def frame_labels(self) -> list[tuple[str, str]]:
        """(word, phone) shown at each frame (the phone whose span holds the frame time; "" where none)."""
        out = [("", "")] * len(self.gap)
        for w in self.words:
            for p in w.phones:
                for i in phone_frames(p, len(self.gap), self.fps):
                    out[i] = (w.word if w.word != SIL else "", p.label if p.label != SIL else "")
        return out


def align(audio16k: np.ndarray, text: str) -> list[Word]:
    """`text` force-aligned to the speech (phones.align_words); a stretch it cannot fit comes back recognised."""
    return phones.align_words(audio16k, text)


def measure_frames(
    frames: Iterable[np.ndarray],
    audio16k: np.ndarray,
    text: str,
    fps: float = FPS,
    total: int | None = None,
    face_index: int = 0,
    video: Path | None = None,
) -> ArticulationResult:
    """The stick on decoded frames (RGB, at fps) and the audio they play with: re-track, align `text`, score."""
    t = track(frames, total, face_index)
    if not len(t):
        raise LipsyncError(f"could not decode any frame from {video or 'the video'}")
    return score_landmarks(t.landmarks, audio16k, text, fps, video)


def score_landmarks(
    landmarks: np.ndarray, audio16k: np.ndarray, text: str, fps: float = FPS, video: Path | None = None
) -> ArticulationResult:
    """The stick on landmarks already tracked as track() does: align `text` to the audio, score."""
    gap = face.mouth_gap(landmarks)
    audio = np.asarray(audio16k, np.float32)
    words = align(audio, text)
    result = ArticulationResult(Path(video or ""), text, fps, gap, landmarks, words, audio)
    ph = result.phones
    result.scores = score(gap, ph, fps, words)
    speech = [p for w in words if w.word != "" for p in w.phones if p.label != SIL]
    result.scores["aligned"] = len(speech) / max(1, sum(p.label != SIL for p in ph))
    return result


def measure(
    video: Path, text: str, fps: float = FPS, face_index: int = 0, max_s: float | None = None
) -> ArticulationResult:
    """Re-track `video`, force-align `text` to its own audio track, score. LipsyncError when it has no audio."""
    video = Path(video)
    frames, total = frames_of(video, fps, max_s)
    try:
        audio = media.read_audio(video, SR)
    except LipsyncError as e:
        raise LipsyncError(f"{video.name}: no audio to align the words to ({e})") from None
    if max_s:
        audio = audio[: int(max_s * SR)]
    return measure_frames(frames, audio, text, fps, total, face_index, video)
