"""The protocols of `lipsync eval`: which clips, what the engine is given, and what its output is compared with.

reconstruct (ground truth): real footage is re-created from its own audio and compared frame by frame.
  media  each video (--videos, at most MAX_CLIP_S analysed): the first 60% is the speaker's reference (the only
         frames the engine may borrow mouths from or fit its audio map on, `SourceFaces.usable`); the last 40% is
         held out: its frames are the background, its audio drives the engine, its real frames are the truth.
  grid   each test clip of a GRID speaker (the `lipsync prep` manifest's test split, else crc32(id) % 10 == 0) is
         re-created from GRID_REFS other (non-test) clips of the same speaker, concatenated as the reference; the
         test clip's frames are appended as background only (usable=False). Its .align words give the transcript
         (forced alignment of the bilabials) and the pauses.
cross (no ground truth): each video is driven by another file's speech (--speech, first MAX_SPEECH_S) or by TTS
  of --text, under the dub timing plan; only reference-free metrics apply.

Every clip also scores three baselines with the same metrics:
  real    the real footage with its own audio: the ceiling (reconstruct: the held-out frames; cross: the input).
  frozen  one closed-mouth reference frame pasted on every output frame (a MouthTrack with a constant index).
  floor   the input video unchanged with the new audio. In reconstruct the held-out frames are played 1 s late
          (circularly, FLOOR_SHIFT_S) against the held-out speech: real mouths that move, but not with these words.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from rich.markup import escape

from lipsync_cli import compositing, dubbing, face, media, progress
from lipsync_cli.audio import SR, rms_envelope, voice_activity
from lipsync_cli.data.dataset import HOLD_OUT, MAX_CLIP_S
from lipsync_cli.engine import MouthTrack, SourceFaces, get_engine
from lipsync_cli.errors import LipsyncError
from lipsync_cli.eval.metrics import (
    LIP_IDX,
    closure,
    closure_gap,
    face_align,
    interocular,
    landmark_jitter,
    lve,
    mouth_opening_series,
    psnr,
    sharpness_ratio,
    ssim,
    stability,
    sync_energy,
)
from lipsync_cli.files import SPEECH_EXT, VIDEO_EXT
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speech import load_speech, match_video_loudness

METRICS = ("lve", "sync", "closure", "psnr", "ssim", "sharpness", "stability")
GROUND_TRUTH_ONLY = ("lve", "psnr", "ssim")  # need the real frames the output should have been
RESERVED = {
    "voice": "the dubbed voice is measured on speech alone, by eval/voice.py (`lipsync eval --metric voice`)",
    "articulation": "dubs of fixed sentences, re-tracked: the text protocol (`lipsync eval --metric articulation`)",
}
PROTOCOLS = ("reconstruct", "cross")
BASELINES = ("real", "frozen", "floor")

MAX_SPEECH_S = 8.0  # cross: driving speech is cut to this
FLOOR_SHIFT_S = 1.0  # reconstruct floor: real frames this late, beyond sync_energy's +-15 frame search
SYNC_TOL = 2  # frames of lag still counted as in sync (the mouth leads the sound by up to ~80 ms)
MEDIAN_KEYS = ("closure_gap",)  # a ratio: one clip whose mouth is near shut during speech would dominate a mean
GRID_REFS = 4  # GRID: other clips of the speaker concatenated as the reference (12 s)
GRID_TEST_MOD = 10  # GRID: crc32(id) % 10 == 0 is the held-out split when there is no prep manifest
FACE_PX = 256  # whole-face metrics: the face box is resized to at most this (long side)

# Table columns: key, the metric that computes it, which way is better (low | high | one / zero: closest to it),
# label (m: mouth region, f: face box). flicker is the excess temporal change outside the lips over the real
# footage's: > 0 adds flicker, < 0 is an unnaturally still lower face (the frozen mouth), so closest to 0 wins.
# AV r is sync_energy's correlation at the best lag within +-SYNC_TOL frames: the mouth moving with the speech
# now. Its confidence (peak - median over +-15 lags) alone cannot tell: on a 2-3 s clip pure noise, like the
# frozen mouth's, peaks somewhere at ~0.3 too, only at a random lag (hence |offset|).
# sync |off|, LSE-C and LSE-D come from the learned sync expert (models/sync.py, when its weights are there), the
# SyncNet recipe: |offset| of least mean embedding distance over +-15 frames, median minus min distance
# (confidence) and the min distance itself. Our expert's own numbers: not comparable with published LSE values.
COLUMNS = (
    ("lve", "lve", "low", "LVE"),
    ("lve_max", "lve", "low", "LVE max"),
    ("lse_off", "sync", "low", "sync |off|"),
    ("lse_c", "sync", "high", "LSE-C"),
    ("lse_d", "sync", "low", "LSE-D"),
    ("sync_r", "sync", "high", "AV r"),
    ("sync_conf", "sync", "high", "energy conf"),
    ("sync_off", "sync", "low", "energy |off|"),
    ("closure", "closure", "high", "closure"),
    ("closure_gap", "closure", "low", "gap"),
    ("psnr_mouth", "psnr", "high", "PSNR m"),
    ("psnr_face", "psnr", "high", "PSNR f"),
    ("ssim_mouth", "ssim", "high", "SSIM m"),
    ("ssim_face", "ssim", "high", "SSIM f"),
    ("sharpness", "sharpness", "one", "sharp"),
    ("flicker", "stability", "zero", "flicker"),
    ("jitter", "stability", "low", "jitter"),
)
EXPERT_KEYS = ("lse_off", "lse_c", "lse_d")  # shown only when the sync expert's weights exist


@functools.cache
def sync_expert():
    """The learned sync experts (lipsync_cli/weights/sync.*, sync_lips.*), loaded once; None without weights
    (energy proxy only)."""
    from lipsync_cli.models import sync

    return sync.load_experts() or None


def parse_metrics(spec: str) -> list[str]:
    """'lve', 'lve,sync' or 'all' -> metric names; anything else is a clear error, not a silent skip."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise LipsyncError(f"no metric given; choose from {', '.join(METRICS)} or all")
    if "all" in names:
        return list(METRICS)
    out: list[str] = []
    for n in names:
        if n in RESERVED:
            raise LipsyncError(f"metric {n!r}: {RESERVED[n]}")
        if n not in METRICS:
            raise LipsyncError(f"unknown metric {n!r}; choose from {', '.join(METRICS)} or all")
        out += [n] if n not in out else []
    return out


def parse_protocols(spec: str) -> list[str]:
    """'reconstruct', 'cross' or 'all'."""
    s = spec.strip().lower()
    if s == "all":
        return list(PROTOCOLS)
    if s not in PROTOCOLS:
        raise LipsyncError(f"unknown protocol {spec!r}; choose reconstruct, cross or all")
    return [s]


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One clip: what the engine is given and what its output is laid over."""

    name: str
    group: str  # "reconstruct/media" | "reconstruct/grid" | "cross"
    source: SourceFaces  # the reference (usable) plus the background frames
    background: np.ndarray  # (N,) source frame behind output frame i
    frames: np.ndarray  # (N, H, W, 3) those frames: also the ground truth in reconstruct
    speech: np.ndarray  # driving speech, 16 kHz, exactly N frames long
    text: str | None = None  # its words when known (GRID transcript, --text): forced alignment of p/b/m
    pauses: np.ndarray | None = None  # (N,) silences from a transcript alignment (GRID .align): must close too
    own: tuple[np.ndarray, np.ndarray | None] | None = None  # cross: the input's own frames and audio (`real`)
    ground_truth: bool = True  # reconstruct: `frames` are what the output should look like
    info: dict = field(default_factory=dict)


@dataclass
class ClipResult:
    name: str
    group: str
    scores: dict[str, dict[str, float]]  # system -> column key -> value (NaN: could not be computed)
    series: dict[str, dict[str, np.ndarray]]  # system -> opening (N,), corr_by_lag (31,)
    envelope: np.ndarray  # driving speech level per frame (dB)
    must_close: np.ndarray  # (N,) frames where the mouth has to be shut
    info: dict = field(default_factory=dict)


@dataclass
class EvalRun:
    engine: str
    metrics: list[str]
    clips: list[ClipResult]
    skipped: list[tuple[str, str, str]]  # (group, clip, why)
    fps: float = 25.0

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.clips))

    def systems(self) -> list[str]:
        return [self.engine, *BASELINES]

    def columns(self, group: str) -> list[tuple[str, str, str, str]]:
        """The table columns for a group: the metrics asked for, minus those it cannot compute."""
        gt, expert = group.startswith("reconstruct"), "sync" in self.metrics and sync_expert() is not None
        return [
            c
            for c in COLUMNS
            if c[1] in self.metrics and (gt or c[1] not in GROUND_TRUTH_ONLY) and (expert or c[0] not in EXPERT_KEYS)
        ]

    def means(self, group: str) -> dict[str, dict[str, float]]:
        """system -> column -> mean over the group's clips (median for MEDIAN_KEYS; NaN clips left out)."""
        clips = [c for c in self.clips if c.group == group]
        out: dict[str, dict[str, float]] = {}
        for s in self.systems():
            out[s] = {}
            for key, *_ in self.columns(group):
                v = np.array([c.scores.get(s, {}).get(key, np.nan) for c in clips], dtype=np.float64)
                agg = np.median if key in MEDIAN_KEYS else np.mean
                out[s][key] = float(agg(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
        return out


def files_in(folder: Path, ext: tuple[str, ...]) -> list[Path]:
    """The files of `folder` with one of the suffixes `ext`, sorted (a file given instead of a folder: itself)."""
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise LipsyncError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in ext and not p.name.startswith("."))


def _fit_audio(x: np.ndarray | None, n_frames: int, fps: float) -> np.ndarray:
    """Audio exactly n_frames long (zero padded or cut), so concatenated clips stay in step with their frames."""
    m = int(round(n_frames / fps * SR))
    x = np.zeros(0, np.float32) if x is None else np.asarray(x, np.float32)
    return np.pad(x[:m], (0, max(0, m - len(x))))


@contextmanager
def quiet_bars() -> Iterator[None]:
    """No inner progress bars while the eval's own bar is live (rich allows one live display)."""
    was = progress.is_quiet()
    progress.set_quiet(True)
    try:
        yield
    finally:
        progress.set_quiet(was)


def analyse(path: Path, settings: Settings, max_s: float | None = MAX_CLIP_S) -> tuple[SourceFaces, np.ndarray]:
    """dubbing.analyse_video on the first max_s seconds; returns the source (in memory) and the frames (T, H, W, 3)."""
    info = media.probe(path)
    if max_s:
        info = dataclasses.replace(info, duration=min(info.duration, max_s))
    n = info.n_frames(settings.fps)
    with tempfile.TemporaryDirectory(prefix="lipsync-eval-") as tmp:
        most, own = dubbing.crop_policy(settings.engine)  # the crops `lipsync dub` would keep
        every = np.ones(n, bool)
        src = dubbing.analyse_video(path, info, settings, [(0, n)], every, Path(tmp), max_crop=most, own_pixels=own)
        frames = np.stack(list(media.iter_frames(path, settings.fps, settings.ffmpeg, count=n)))
        src = SourceFaces(
            crops=np.array(src.crops[:n]),
            crop_fix=src.crop_fix[:n].copy(),
            landmarks=src.landmarks[:n].copy(),
            found=src.found[:n].copy(),
            matrices=src.matrices[:n].copy(),
            size=src.size,
            audio=None if src.audio is None else _fit_audio(src.audio, n, src.fps),
            fps=src.fps,
        )
    return src, frames


def resize_source(src: SourceFaces, frames: np.ndarray, size: int) -> SourceFaces:
    """The same source with crops and matrices at another crop size (re-warped from the frames, no resampling)."""
    if src.size == size:
        return src
    mats = np.full_like(src.matrices, np.nan)
    crops = np.zeros((src.n_frames, size, size, 3), np.uint8)
    for t in np.flatnonzero(src.found):
        mats[t] = face.align_matrix(src.landmarks[t], size)
        crops[t] = face.warp_to_aligned(frames[t], mats[t], size)
    return dataclasses.replace(src, crops=crops, matrices=mats, size=size, crop_fix=None)


def _as_aligned(src: SourceFaces) -> SourceFaces:
    """The same source with every stored mouth as its aligned size x size crop."""
    if src.crop_fix is None:
        return src
    crops = np.zeros((src.n_frames, src.size, src.size, 3), np.uint8)
    for t in np.flatnonzero(src.found):
        crops[t] = src.aligned_crop(int(t))
    return dataclasses.replace(src, crops=crops, crop_fix=None)


def concat_sources(parts: list[SourceFaces], usable: list[bool]) -> SourceFaces:
    """One source from several clips (same crop size), each clip wholly usable or not."""
    if len({p.size for p in parts}) != 1:
        raise ValueError(f"crop sizes differ: {[p.size for p in parts]}; resize_source first")
    if len({np.shape(p.crops)[1:] for p in parts}) > 1:  # stored mouths of other shapes (a resized clip's crops)
        parts = [_as_aligned(p) for p in parts]
    fps = parts[0].fps
    fixes = [np.full((p.n_frames, 2, 3), np.nan) if p.crop_fix is None else p.crop_fix for p in parts]  # NaN: none
    return SourceFaces(
        crops=np.concatenate([np.asarray(p.crops) for p in parts]),
        landmarks=np.concatenate([p.landmarks for p in parts]),
        found=np.concatenate([p.found for p in parts]),
        matrices=np.concatenate([p.matrices for p in parts]),
        crop_fix=np.concatenate(fixes),
        size=parts[0].size,
        audio=np.concatenate([_fit_audio(p.audio, p.n_frames, fps) for p in parts]),
        fps=fps,
        usable=np.concatenate([np.full(p.n_frames, u) for p, u in zip(parts, usable, strict=True)]),
    )


def media_case(path: Path, settings: Settings) -> Case:
    """reconstruct/media: the first 60% of the clip is the reference, the rest is re-created from its audio."""
    src, frames = analyse(path, settings)
    if src.audio is None:
        raise LipsyncError("no audio track: nothing to re-create the mouth from")
    n, fps = src.n_frames, src.fps
    cut = int(round(n * (1 - HOLD_OUT)))
    src = dataclasses.replace(src, usable=np.arange(n) < cut)
    speech = src.audio[int(round(cut / fps * SR)) : int(round(n / fps * SR))]
    info = {"reference_frames": cut, "held_out_frames": n - cut}
    return Case(path.stem, "reconstruct/media", src, np.arange(cut, n), frames[cut:], speech, info=info)


def grid_root(settings: Settings, grid: Path | None = None) -> Path | None:
    """The GRID speaker folder to use: --grid, else the first data/raw/grid/sN, else <shared>/corpus/grid/s1."""
    if grid is not None:
        if not (grid / "video").is_dir():
            raise LipsyncError(f"{grid} is not a GRID speaker folder (no video/ inside)")
        return grid
    raw = sorted((settings.data_dir / "raw" / "grid").glob("s*/video"))
    for cand in [p.parent for p in raw] + [settings.shared_dir / "corpus" / "grid" / "s1"]:
        if (cand / "video").is_dir() and (cand / "align").is_dir():
            return cand
    return None


def manifest_test_ids(data_dir: Path) -> set[str] | None:
    """Test clip ids from a `lipsync prep` manifest (data/prep/<size>/manifest.json), tolerant of its layout:
    {"splits": {"test": [...]}}, {"test": [...]} or {"clips": [{"id"|"name"|"video"|"path": ..., "split": ...}]}."""
    for path in sorted((data_dir / "prep").glob("*/manifest.json")):
        try:
            man = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        items = (man.get("splits") or {}).get("test") or man.get("test")
        if items is None:
            clips = man.get("clips") or []
            items = [c for c in clips if isinstance(c, dict) and c.get("split") == "test"]
        ids = set()
        for it in items or []:
            ref = it if isinstance(it, str) else next((it[k] for k in ("id", "name", "video", "path") if k in it), "")
            ids.add(Path(str(ref)).stem)
        if ids:
            return ids
    return None


def grid_split(root: Path, data_dir: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """(test clip ids, reference clip ids): deterministic, independent of which other clips are on disk."""
    ids = sorted(p.stem for p in (root / "video").glob("*.mpg") if (root / "align" / f"{p.stem}.align").exists())
    listed = manifest_test_ids(data_dir)
    if listed is not None and listed & set(ids):
        test = [i for i in ids if i in listed]
    else:
        test = [i for i in ids if zlib.crc32(i.encode()) % GRID_TEST_MOD == 0]
    refs = sorted((i for i in ids if i not in set(test)), key=lambda i: zlib.crc32(i.encode()))[:GRID_REFS]
    return test[:limit] if limit else test, refs


def _grid_words(path: Path, n: int, fps: float) -> tuple[str, np.ndarray]:
    from lipsync_cli.data.grid import read_align

    words = read_align(path)
    pauses = np.zeros(n, dtype=bool)
    for start, end, w in words:
        if w in ("sil", "sp"):
            pauses[int(np.ceil(start * fps - 1e-9)) : int(np.floor(end * fps + 1e-9))] = True
    return " ".join(w for _, _, w in words if w not in ("sil", "sp")), pauses


def grid_reference(root: Path, refs: list[str], settings: Settings) -> list[SourceFaces]:
    """The speaker's reference clips, analysed, all at the first one's crop size."""
    parts = [analyse(root / "video" / f"{r}.mpg", settings) for r in refs]
    size = parts[0][0].size
    return [resize_source(s, f, size) for s, f in parts]


def grid_case(root: Path, clip: str, ref_src: list[SourceFaces], settings: Settings) -> Case:
    """reconstruct/grid: one test clip re-created with the reference clips as the only mouths."""
    src, frames = analyse(root / "video" / f"{clip}.mpg", settings)
    src = resize_source(src, frames, ref_src[0].size)
    text, pauses = _grid_words(root / "align" / f"{clip}.align", src.n_frames, src.fps)
    speech = _fit_audio(src.audio, src.n_frames, src.fps)
    source = concat_sources([*ref_src, src], [True] * len(ref_src) + [False])
    off = sum(s.n_frames for s in ref_src)
    info = {"reference_frames": off, "held_out_frames": src.n_frames, "text": text}
    bg = off + np.arange(src.n_frames)
    return Case(clip, "reconstruct/grid", source, bg, frames, speech, text=text, pauses=pauses, info=info)


def cross_case(path: Path, speech: np.ndarray, speech_name: str, text: str | None, settings: Settings) -> Case:
    """cross: the video driven by other speech under the dub timing plan (bounce/loop/cut as configured)."""
    src, frames = analyse(path, settings)
    fps = src.fps
    sp = match_video_loudness(speech, src.audio)
    n_out = dubbing.output_frames(len(sp) / SR, fps)
    plan = compositing.timing_plan(src.n_frames, n_out, settings.sync_mode)
    sp = _fit_audio(sp, len(plan), fps)
    info = {"speech": speech_name, "input_frames": src.n_frames, "output_frames": len(plan)}
    name = f"{path.stem} + {speech_name}"
    own = (frames, src.audio)
    return Case(name, "cross", src, plan, frames[plan], sp, text=text, own=own, ground_truth=False, info=info)


# ----------------------------------------------------------------------------- systems


def composite(source: SourceFaces, frames: np.ndarray, background: np.ndarray, track: MouthTrack) -> np.ndarray:
    """The output frames: each background frame with the track's mouth blended in (as dubbing.render_frames)."""
    aligned = source.aligned_landmarks()
    out = np.array(frames)
    for i, b in enumerate(background):
        if track.source_index[i] >= 0 and source.found[b]:
            crop, fix = track.mouth(i, source)
            compositing.composite(out[i], source.matrices[b], source.size, crop, track.points[i], aligned[b], fix)
    return out


def frozen_track(source: SourceFaces, background: np.ndarray) -> MouthTrack:
    """The same closed-mouth reference frame on every output frame (5th percentile of opening: robust to glitches)."""
    pool = np.flatnonzero(source.pool)
    if not len(pool):
        raise ValueError("no usable face frame in the reference")
    opening = np.array([face.mouth_opening(source.landmarks[t]) for t in pool])
    k = int(pool[np.argsort(opening)[len(pool) // 20]])
    index = np.full(len(background), k, dtype=np.int64)
    index[~source.found[background]] = -1
    points = np.repeat(source.aligned_landmarks()[k][None], len(background), axis=0)
    return MouthTrack(source_index=index, points=points)


def floor_frames(frames: np.ndarray, fps: float) -> np.ndarray:
    """reconstruct floor: the real frames FLOOR_SHIFT_S late (circularly), so the mouth moves but not with the audio."""
    n = len(frames)
    shift = int(round(FLOOR_SHIFT_S * fps))
    shift = shift if n >= 2 * shift else n // 2
    return np.roll(frames, shift, axis=0)


def track_landmarks(frames: np.ndarray, face_index: int = 0) -> np.ndarray:
    """(T, 478, 2) raw mesh landmarks of output frames (NaN where no face): every system is measured alike."""
    track = face.track_faces((np.ascontiguousarray(f) for f in frames), face_index, progress=False)
    return track.raw.astype(np.float64).reshape(len(frames), face.N_LANDMARKS, 2)


# ----------------------------------------------------------------------------- measuring


@dataclass
class _Ref:
    """What image metrics compare with: the frames the output was laid over, and where their face is.

    Whole-face metrics work on the union box of the face over the clip, resized so its long side is at most
    FACE_PX (the same for every system, and ~10x faster on HD video)."""

    frames: np.ndarray
    landmarks: np.ndarray  # analysis landmarks of those frames (smoothed)
    matrices: np.ndarray
    size: int
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    scale: float = 1.0
    cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        h, w = self.frames.shape[1:3]
        pts = self.landmarks[np.isfinite(self.landmarks[:, 0, 0])].reshape(-1, 2)
        if len(pts):
            x0, y0 = np.floor(pts.min(0)).astype(int)
            x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
            self.box = (max(x0, 0), max(y0, 0), min(x1, w), min(y1, h))
        else:
            self.box = (0, 0, w, h)
        x0, y0, x1, y1 = self.box
        self.scale = min(1.0, FACE_PX / max(x1 - x0, y1 - y0, 1))

    def face(self, frames: np.ndarray) -> np.ndarray:
        """(T, h, w, 3) face boxes at the working scale."""
        x0, y0, x1, y1 = self.box
        crop = frames[:, y0:y1, x0:x1]
        if self.scale >= 1.0:
            return crop
        size = (max(11, round((x1 - x0) * self.scale)), max(11, round((y1 - y0) * self.scale)))
        return np.stack([cv2.resize(np.ascontiguousarray(f), size, interpolation=cv2.INTER_AREA) for f in crop])

    def real_face(self) -> np.ndarray:
        if "face" not in self.cache:
            self.cache["face"] = self.face(self.frames)
        return self.cache["face"]

    def mouth(self) -> tuple[np.ndarray, np.ndarray]:
        if "mouth" not in self.cache:
            self.cache["mouth"] = mouth_crops(self.frames, self.matrices, self.size)
        return self.cache["mouth"]

    def outside(self) -> np.ndarray:
        """(T, h, w) True in the face box away from the lips (their hull grown by 0.15 inter-ocular distance)."""
        if "outside" not in self.cache:
            h, w = self.real_face().shape[1:3]
            lm = self.landmarks
            masks = np.zeros((len(lm), h, w), np.uint8)
            ok = np.isfinite(lm[:, 0, 0])
            iod = float(np.nanmedian(interocular(lm[ok]))) * self.scale if ok.any() else 0.0
            r = max(1, int(round(0.15 * iod)))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            sx, sy = w / (self.box[2] - self.box[0]), h / (self.box[3] - self.box[1])
            for t in np.flatnonzero(ok):
                pts = (lm[t, LIP_IDX] - self.box[:2]) * (sx, sy)
                cv2.fillConvexPoly(masks[t], cv2.convexHull(np.round(pts).astype(np.int32)), 1)
                masks[t] = cv2.dilate(masks[t], kernel)
            self.cache["outside"] = masks == 0
        return self.cache["outside"]


def mouth_crops(frames: np.ndarray, matrices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, h, w, 3) MOUTH_BOX of each frame's aligned lower-face crop, and (T,) where a face was found."""
    x0, y0, x1, y1 = (np.array(face.MOUTH_BOX) * size).round().astype(int)
    ok = np.isfinite(matrices[:, 0, 0])
    out = np.zeros((len(frames), y1 - y0, x1 - x0, 3), np.uint8)
    for t in np.flatnonzero(ok):
        out[t] = face.warp_to_aligned(np.ascontiguousarray(frames[t]), matrices[t], size)[y0:y1, x0:x1]
    return out, ok


def _must_close(audio: np.ndarray, n: int, fps: float, text: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(must close, speaking) per frame: pauses and p/b/m exactly as dub tells the engine, and voice activity."""
    return dubbing.mouth_must_close(audio, n, fps, text), voice_activity(audio, SR, fps=fps, n_frames=n)


def score_output(
    frames: np.ndarray,
    audio: np.ndarray,
    ref: _Ref,
    metrics: list[str],
    fps: float,
    close: tuple[np.ndarray, np.ndarray] | None,
    thresh: float,
    real_lm: np.ndarray | None,
    lm: np.ndarray | None = None,
    face_index: int = 0,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every asked metric of one system's output frames (+ the audio it plays with) against the reference."""
    nan = float("nan")
    s: dict[str, float] = {}
    series: dict[str, np.ndarray] = {}
    n = len(frames)
    if lm is None and {"lve", "sync", "closure", "stability"} & set(metrics):
        lm = track_landmarks(frames, face_index)
    opening = mouth_opening_series(lm) if lm is not None else None
    if opening is not None:
        series["opening"] = opening
    if "lve" in metrics and real_lm is not None:
        r = face_align(real_lm)[:, LIP_IDX]
        res = lve(face_align(lm)[:, LIP_IDX], r, interocular(real_lm))
        s["lve"], s["lve_max"] = res["mean"], res["max"]
    if "sync" in metrics:
        res = sync_energy(opening, rms_envelope(audio, SR, fps=fps, n_frames=n))
        corr, mid = res["corr_by_lag"], len(res["corr_by_lag"]) // 2
        s["sync_r"] = float(corr[mid - SYNC_TOL : mid + SYNC_TOL + 1].max())
        s["sync_conf"], s["sync_off"] = res["confidence"], float(abs(res["offset"]))
        series["corr_by_lag"] = corr
        if (expert := sync_expert()) is not None:
            from lipsync_cli.models.sync import clip_sync

            try:
                r = clip_sync(expert, frames, lm, audio, max_offset=15)
                s["lse_off"], s["lse_c"], s["lse_d"] = float(abs(r["offset"])), r["confidence"], r["min_dist"]
                series["sync_dist_by_offset"] = r["dist_by_offset"]
            except LipsyncError:  # no face at all, or too short: NaN, as for the other metrics
                s["lse_off"] = s["lse_c"] = s["lse_d"] = nan
    if "closure" in metrics and close is not None:
        must, speaking = close
        s["closure"] = closure(opening, must, thresh)["rate"] if np.isfinite(thresh) else nan
        s["closure_gap"] = closure_gap(opening, must, speaking)
    gen_face = ref.face(frames) if {"psnr", "ssim", "stability"} & set(metrics) else None
    if {"psnr", "ssim", "sharpness"} & set(metrics):
        real_mouth, ok = ref.mouth()
        gen_mouth, _ = mouth_crops(frames, ref.matrices, ref.size)
        every = np.broadcast_to(ok[:, None, None], gen_mouth.shape[:3])
        if real_lm is not None and "psnr" in metrics:
            s["psnr_mouth"] = psnr(gen_mouth, real_mouth, every)
            s["psnr_face"] = psnr(gen_face, ref.real_face())
        if real_lm is not None and "ssim" in metrics:
            s["ssim_mouth"] = ssim(gen_mouth, real_mouth, every)
            s["ssim_face"] = ssim(gen_face, ref.real_face())
        if "sharpness" in metrics:
            s["sharpness"] = sharpness_ratio(gen_mouth[ok], real_mouth[ok]) if ok.any() else nan
    if "stability" in metrics:
        s["flicker"] = stability(gen_face, ref.real_face(), ref.outside())["excess"]
        s["jitter"] = landmark_jitter(lm, LIP_IDX)
    return s, series


def evaluate_case(
    case: Case,
    metrics: list[str],
    engine: str,
    settings: Settings,
    on_clip: Callable[..., None] | None = None,
    step: Callable[[int], None] | None = None,
) -> ClipResult:
    """Run the engine and the baselines on one case and score them all."""
    fps, n = case.source.fps, len(case.background)
    metrics = [m for m in metrics if case.ground_truth or m not in GROUND_TRUTH_ONLY]
    step = step or (lambda k=1: None)
    src = case.source
    ref = _Ref(case.frames, src.landmarks[case.background], src.matrices[case.background], src.size)
    close, speaking = _must_close(case.speech, n, fps, case.text)  # `close` is what the engine gets, as in dub
    must = close | case.pauses[:n] if case.pauses is not None else close  # + transcript pauses for the metric
    close_speech = (must, speaking) if "closure" in metrics else None
    scores: dict[str, dict[str, float]] = {}
    series: dict[str, dict[str, np.ndarray]] = {}

    # real first: its landmarks are the truth for lve and its opening sets the closed threshold for everyone
    if case.ground_truth:
        real_lm = track_landmarks(case.frames, settings.face_index)
        thresh = face.closed_threshold(mouth_opening_series(real_lm))
        scores["real"], series["real"] = score_output(
            case.frames, case.speech, ref, metrics, fps, close_speech, thresh, real_lm, lm=real_lm
        )
    else:
        real_lm = None
        own_frames, own_audio = case.own
        own_lm = track_landmarks(own_frames, settings.face_index)
        thresh = face.closed_threshold(mouth_opening_series(own_lm))
        scores["real"], series["real"] = {}, {"opening": mouth_opening_series(own_lm)}
        if own_audio is not None:  # a silent input has no real row to speak of
            own_close = _must_close(own_audio, len(own_frames), fps, None) if "closure" in metrics else None
            own_ref = _Ref(own_frames, src.landmarks, src.matrices, src.size)
            scores["real"], series["real"] = score_output(
                own_frames, own_audio, own_ref, metrics, fps, own_close, thresh, None, lm=own_lm
            )
    step(1)

    track = get_engine(engine, settings)(src, case.speech, case.background, close=close)
    out = composite(src, case.frames, case.background, track)
    scores[engine], series[engine] = score_output(
        out, case.speech, ref, metrics, fps, close_speech, thresh, real_lm, face_index=settings.face_index
    )
    if on_clip is not None:
        on_clip(case.group, case.name, case.frames, out, case.speech, fps)
    del out
    step(1)

    out = composite(src, case.frames, case.background, frozen_track(src, case.background))
    scores["frozen"], series["frozen"] = score_output(
        out, case.speech, ref, metrics, fps, close_speech, thresh, real_lm, face_index=settings.face_index
    )
    del out
    step(1)

    out = floor_frames(case.frames, fps) if case.ground_truth else case.frames
    scores["floor"], series["floor"] = score_output(
        out, case.speech, ref, metrics, fps, close_speech, thresh, real_lm, face_index=settings.face_index
    )
    step(1)

    return ClipResult(
        name=case.name,
        group=case.group,
        scores=scores,
        series=series,
        envelope=rms_envelope(case.speech, SR, fps=fps, n_frames=n),
        must_close=must,
        info={**case.info, "frames": n, "closed_threshold": thresh},
    )


# ----------------------------------------------------------------------------- the run


def evaluate(
    settings: Settings,
    metrics: list[str],
    protocols: list[str] | tuple[str, ...] = PROTOCOLS,
    engine: str | None = None,
    videos: Path | None = None,
    speech: Path | None = None,
    text: str | None = None,
    grid: Path | None = None,
    limit: int | None = 8,
    on_clip: Callable[..., None] | None = None,
) -> EvalRun:
    """Every protocol asked for, every clip (at most `limit` per group), engine + baselines, the metrics asked for.

    A clip that cannot be evaluated (no face, no audio) is skipped with its reason, never fatal to the run.
    on_clip(group, name, real_frames, engine_frames, speech, fps) sees each engine output (side-by-side videos).
    """
    engine = engine or settings.engine
    get_engine(engine)  # unknown engines fail before any work
    videos = videos if videos is not None else settings.shared_dir / "media"
    run = EvalRun(engine=engine, metrics=list(metrics), clips=[], skipped=[], fps=settings.fps)
    jobs: list[tuple[str, list, Callable]] = []  # (group, items, item -> Case)

    if "reconstruct" in protocols:
        if videos.exists():
            vids = files_in(videos, VIDEO_EXT)[:limit]
            jobs.append(("reconstruct/media", vids, lambda v: media_case(v, settings)))
        else:
            run.skipped.append(("reconstruct/media", str(videos), "no such folder"))
        root = grid_root(settings, grid)
        if root is not None:
            test, refs = grid_split(root, settings.data_dir, limit)
            ref_src: list[SourceFaces] = []  # analysed once, on the first clip

            def make_grid(clip: str, root: Path = root, refs: list[str] = refs) -> Case:
                if not ref_src:
                    ref_src.extend(grid_reference(root, refs, settings))
                return grid_case(root, clip, ref_src, settings)

            if test and refs:
                jobs.append(("reconstruct/grid", test, make_grid))

    if "cross" in protocols and all(m in GROUND_TRUTH_ONLY for m in metrics):
        run.skipped.append(("cross", "all clips", f"{', '.join(metrics)} need ground truth, which cross has not"))
    elif "cross" in protocols:
        if not videos.exists():
            raise LipsyncError(f"no videos for the cross protocol: {videos} does not exist")
        if text:
            drives = [("tts", load_speech(text, None, settings)[0])]
        else:
            folder = speech if speech is not None else settings.shared_dir / "speech"
            drives = [(p.stem, load_speech(None, p, settings)[0]) for p in files_in(folder, SPEECH_EXT)]
            if not drives:
                raise LipsyncError(f"no speech files in {folder} (or give --text)")
        drives = [(name, x[: int(MAX_SPEECH_S * SR)]) for name, x in drives]
        vids = files_in(videos, VIDEO_EXT)[:limit]
        pairs = [(v, *drives[i % len(drives)]) for i, v in enumerate(vids)]
        jobs.append(("cross", pairs, lambda p: cross_case(p[0], p[2], p[1], text, settings)))

    for group, items, make in jobs:
        with progress.task(f"eval {group}", 5 * len(items)) as advance:
            for item in items:
                name = item[0].stem if isinstance(item, tuple) else Path(str(item)).stem
                try:
                    with quiet_bars():
                        case = make(item)
                        advance(1)
                        run.clips.append(evaluate_case(case, metrics, engine, settings, on_clip, advance))
                except (LipsyncError, ValueError) as e:
                    run.skipped.append((group, name, str(e)))
    for group, name, why in run.skipped:
        progress.log(f"[yellow]skipped[/] {escape(f'{group} {name}: {why}')}")
    return run
