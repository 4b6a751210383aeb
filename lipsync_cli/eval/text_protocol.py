"""The `text` protocol of `lipsync eval --metric articulation`: does the dub say the words, on the video the user gets?

Each clip is dubbed from every sentence of SENTENCES (fixed: rich in p/b/m and open vowels, with sentence breaks
for pauses) exactly as `lipsync dub` makes it (piper TTS in the person's voice, loudness, timing plan, the engine,
the compositor, an H.264 file with the speech). The OUTPUT file is then decoded and measured like any video
(eval/articulation.py: re-tracked, the sentence force-aligned to its audio), never the engine's own targets. Beside
the articulation scores: `lag` (frames the re-tracked mouth trails the aligned phones), the sync expert's |offset|
and LSE-C, mouth sharpness against the source frames behind it (`sharp`) and against the very source mouth shown
(`sharp (shown)`: blur alone, not which mouth shapes are shown; both cropped from decoded frames the same way), and
`warp`, how far the composite moved points the mouth should never move (WARP_POINTS), and `jaw`, how far it moved
the jaw's sides at mouth level (a mouth from another head pose breaks the jaw line there).

Rows (ROWS, extend freely): one per engine and lips setting, plus `real`, the clip's own footage with its own speech
and transcript (TRANSCRIPTS, or a GRID id's sentence): the ceiling. The face pass, the voice and each sentence's TTS
are done once and shared by every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import cv2
import numpy as np
from pydantic import Field, TypeAdapter, ValidationError
from rich.markup import escape

from lipsync_cli import compositing, dubbing, face, media, progress
from lipsync_cli.audio import SR, match_loudness
from lipsync_cli.engine import SourceFaces, get_engine, retrieval
from lipsync_cli.errors import LipsyncError
from lipsync_cli.eval import articulation
from lipsync_cli.eval.metrics import sharpness_ratio
from lipsync_cli.eval.protocols import files_in, mouth_crops, quiet_bars, sync_expert
from lipsync_cli.files import VIDEO_EXT
from lipsync_cli.settings import Settings
from lipsync_cli.voice import speech as voice_speech

SENTENCES = (
    "Bob bought a pop album at the mall. Maybe Pam will pay him back by Monday.",
    "My mom baked a big apple pie. The boys ate half of it by the pond.",
    "Please pass the map, Tom. The bus stops by the palm park at about five past nine.",
)
REAL = "real"
NEURAL_STEPS = 20  # neural rows adapt the renderer for exactly this many steps: reproducible, and cheap on a CPU
# row name -> (engine, keyword arguments its animate() takes). The lips choice is passed explicitly, never read
# from the settings, so a row means the same whatever the environment says.
ROWS: dict[str, tuple[str, dict]] = {
    "lips model": ("retrieval", {"lips": "model"}),
    "map": ("retrieval", {"lips": "map"}),
    "phone targets": ("retrieval", {"lips": "phones"}),  # the viseme targets alone, nothing between them
    "neural": ("neural", {"lips": "model", "adapt_minutes": 0.0, "adapt_steps": NEURAL_STEPS}),
}
# what an ENGINE:KEY=VALUE row may set (the engines' other keywords, such as the speech and its rate, are the
# protocol's own) and the values each takes, bounded as the settings of the same name are
ROW_KEYS: dict[str, TypeAdapter] = {
    "lips": TypeAdapter(Literal["model", "map", "phones"]),
    "adapt_minutes": TypeAdapter(Annotated[float, Field(ge=0, le=120)]),
    "adapt_steps": TypeAdapter(Annotated[int, Field(ge=0)]),
    "checkpoint": TypeAdapter(str),
    "batch": TypeAdapter(Annotated[int, Field(ge=1)]),
}
DEFAULT_ROWS = ("lips model", "map", "phone targets", REAL)
MEASURE_AT_FACE = 1.25  # a face this much larger than the crop has its mouths measured at its own resolution
MAX_CLIP_S = 20.0  # seconds of each clip analysed (the whole of every shared clip)
TRANSCRIPTS = Path(__file__).with_name("media_transcripts.json")
# Mesh points the composite must not move (inter-ocular units): nose tip 1, nose wings 98 / 327, cheeks beside the
# nose wings 205 / 425 and on the cheekbones 50 / 280. All lie outside the lips' reach but near the mouth mask's edge.
WARP_POINTS = np.array([1, 98, 327, 205, 425, 50, 280], dtype=np.int64)
PATCH_IOD = 0.2  # half-side of the patch around each of them whose pixel motion `warp px` measures (inter-ocular)
# phase-correlation peak a patch shift needs to count: the same texture shifted peaks at 0.8-1.0 (median 0.84-0.99
# per point on tpsmm_driving), a flat cheek under H.264 noise at 0.07 with a random 6 px "shift"
MIN_PEAK = 0.3
SYNC_PX = 128  # the sync expert's aligned crop side: frames are kept only as large as that needs

# (key, label, better: high | low | one, format)
COLUMNS = (
    ("bilabial", "bilabial", "high", "{:.2f}"),
    ("contrast", "contrast", "high", "{:.2f}"),
    ("silence", "silence", "high", "{:.2f}"),
    ("lag", "gap lag", "", "{:+.1f}"),
    ("lse_off", "sync |off|", "low", "{:.1f}"),
    ("lse_c", "LSE-C", "high", "{:.2f}"),
    ("sharpness", "sharp", "one", "{:.2f}"),
    ("sharp_shown", "sharp (shown)", "one", "{:.2f}"),
    ("warp", "warp", "low", "{:.3f}"),
    ("warp_px", "warp px", "low", "{:.3f}"),
    ("jaw", "jaw", "low", "{:.3f}"),
    ("n_bilabial", "n p/b/m", "", "{:.0f}"),
)


def parse_rows(spec: str | Iterable[str] | None) -> list[str]:
    """'lips model,map,real' -> row names; also 'engine:key=value;key=value' for a setting not in ROWS (it is
    added to ROWS under that name). Unknown names are a clear error."""
    items = DEFAULT_ROWS if spec is None else spec.split(",") if isinstance(spec, str) else spec
    out = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name != REAL and name not in ROWS:
            if ":" not in name:
                raise LipsyncError(f"unknown row {name!r}; choose from {', '.join([*ROWS, REAL])} or ENGINE:KEY=VALUE")
            engine, _, opts = name.partition(":")
            ROWS[name] = (engine.strip(), _row_keywords(name, engine.strip(), opts))
        out += [name] if name not in out else []
    if not out:
        raise LipsyncError("no rows to evaluate")
    return out


def _row_keywords(name: str, engine: str, opts: str) -> dict[str, Any]:
    """'key=value;key=value' checked against what the engine takes, before any work (a bad key or value would
    otherwise fail at the first dub, minutes in)."""
    try:
        takes = inspect.signature(get_engine(engine)).parameters
    except ValueError as e:  # an unknown engine
        raise LipsyncError(f"row {name!r}: {e}") from None
    valid = [k for k in ROW_KEYS if k in takes]
    kw = {}
    for kv in filter(None, (kv.strip() for kv in opts.split(";"))):
        k, _, v = (part.strip() for part in kv.partition("="))
        if k not in valid:
            raise LipsyncError(f"row {name!r}: engine {engine} takes no key {k!r}; valid: {', '.join(valid) or 'none'}")
        try:
            kw[k] = ROW_KEYS[k].validate_python(v)
        except ValidationError as e:
            raise LipsyncError(f"row {name!r}: {k}={v!r}: {e.errors()[0]['msg']}") from None
    return kw


@functools.cache
def stored_transcripts() -> dict[str, str]:
    """clip stem -> transcript of its own speech (see the file's _note for how they were made)."""
    data = json.loads(TRANSCRIPTS.read_text(encoding="utf-8"))
    return {k: v["text"] for k, v in data.items() if not k.startswith("_")}


def transcript(path: Path) -> str | None:
    """What the clip's own speaker says: the stored transcript, else a GRID id's sentence, else None."""
    from lipsync_cli.data.grid import sentence

    return stored_transcripts().get(path.stem) or sentence(path.stem)


# ----------------------------------------------------------------------------- results


@dataclass
class RowResult:
    clip: str
    row: str
    sentence: int  # index into the run's sentences; -1: the clip's own speech (real)
    scores: dict[str, float]
    gap: np.ndarray  # (T,) re-tracked mouth gap
    words: list  # phones.Word list: the text aligned to the output audio
    fps: float
    phones: list[dict] = field(default_factory=list)  # per-phone detail (articulation.score)
    mouths: np.ndarray | None = None  # (T, h, w, 3) small mouth crops of the output, for frame strips
    seconds: float = 0.0  # wall time of this row (engine, render, measuring)


@dataclass
class TextRun:
    rows: list[str]
    sentences: list[str]
    results: list[RowResult]
    skipped: list[tuple[str, str]]  # (clip / row, why)
    info: dict = field(default_factory=dict)  # clip -> facts (frames, voice, seconds)

    @property
    def clips(self) -> list[str]:
        return list(dict.fromkeys(r.clip for r in self.results))

    def clip_means(self, clip: str) -> dict[str, dict[str, float]]:
        """row -> column -> mean over the clip's sentences."""
        return {row: _mean([r.scores for r in self.results if r.clip == clip and r.row == row]) for row in self.rows}

    def means(self) -> dict[str, dict[str, float]]:
        """row -> column -> mean over clips of each clip's mean (every clip weighs the same)."""
        per = [self.clip_means(c) for c in self.clips]
        return {row: _mean([p[row] for p in per if p[row]]) for row in self.rows}


def _mean(dicts: list[dict]) -> dict[str, float]:
    out = {}
    for key, *_ in COLUMNS:
        v = np.array([d.get(key, np.nan) for d in dicts], dtype=np.float64)
        out[key] = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
    return out if dicts else {}


# ----------------------------------------------------------------------------- measuring one video


def _scale_for_sync(landmarks: np.ndarray) -> float:
    """Frames can shrink by this much and still give the sync expert's SYNC_PX crop without upsampling."""
    found = np.isfinite(landmarks[:, 0, 0])
    iod = float(np.median(face.inter_ocular(landmarks[found]))) if found.any() else 0.0
    crop_px = face.CROP_SIDE_IOD * iod
    return float(min(1.0, 1.25 * SYNC_PX / crop_px)) if crop_px > 0 else 1.0


class _Tap:
    """Sees every decoded frame once on its way to the tracker: keeps the frames small (for the sync expert) and the
    output's mouth crops (for sharpness and the strips), so no video is held in memory at full size."""

    def __init__(
        self, scale: float, matrices: np.ndarray | None, size: int, small: bool = True, around: np.ndarray | None = None
    ):
        self.scale, self.matrices, self.size, self.keep_small, self.around = scale, matrices, size, small, around
        self.small: list[np.ndarray] = []
        self.mouths: list[np.ndarray] = []
        self.patches: list[np.ndarray | None] = []  # grey patches around `around` (T, P, 2) landmarks, per frame

    def __call__(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for i, f in enumerate(frames):
            if self.keep_small:
                h, w = f.shape[:2]
                dsize = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
                self.small.append(f if self.scale >= 1 else cv2.resize(f, dsize, interpolation=cv2.INTER_AREA))
            if self.matrices is not None and i < len(self.matrices):
                self.mouths.append(mouth_crops(f[None], self.matrices[i : i + 1], self.size)[0][0])
            if self.around is not None and i < len(self.around):
                self.patches.append(patches(f, self.around[i]))
            yield f


def patches(frame: np.ndarray, pts: np.ndarray) -> np.ndarray | None:
    """Grey square patches (P, 2r, 2r) around pts (P + 2, 2): WARP_POINTS then the outer eye corners, which set
    r = PATCH_IOD x their distance (edges replicated); None where the face is missing."""
    if not np.isfinite(pts).all():
        return None
    r = max(4, int(round(PATCH_IOD * np.linalg.norm(pts[-1] - pts[-2]))))
    grey = cv2.copyMakeBorder(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), r, r, r, r, cv2.BORDER_REPLICATE)
    c = np.round(pts[:-2]).astype(np.int64) + r
    c = np.clip(c, r, np.array(grey.shape[::-1]) - r)
    return np.stack([grey[y - r : y + r, x - r : x + r] for x, y in c])


def pixel_warp(out: list, src: list, iod: np.ndarray) -> float:
    """Largest shift of the image content around WARP_POINTS between output and source frames (phase correlation
    of each patch pair), over the outer-eye distance: what a viewer sees move, unlike the mesh's points, which
    the face mesh predicts jointly with the mouth and so moves when only the mouth changed. A pair without a
    clear correlation peak (MIN_PEAK) reads 0: flat skin under codec noise gives random shifts there."""
    worst, win = float("nan"), None
    for a, b, e in zip(out, src, iod, strict=False):
        if a is None or b is None or not np.isfinite(e) or a.shape != b.shape:
            continue
        if win is None or win.shape != a.shape[1:]:
            win = cv2.createHanningWindow(a.shape[1:][::-1], cv2.CV_64F)
        for pa, pb in zip(a, b, strict=True):
            (dx, dy), peak = cv2.phaseCorrelate(pb.astype(np.float64), pa.astype(np.float64), win)
            worst = float(np.nanmax([worst, np.hypot(dx, dy) / e if peak >= MIN_PEAK else 0.0]))
    return worst


def _sync(frames_small: list[np.ndarray], landmarks: np.ndarray, scale: float, audio: np.ndarray) -> dict:
    expert = sync_expert()
    if expert is None or not frames_small:
        return {}
    from lipsync_cli.models.sync import clip_sync

    n = min(len(frames_small), len(landmarks))
    try:
        r = clip_sync(expert, np.stack(frames_small[:n]), landmarks[:n] * scale, audio, max_offset=15)
    except LipsyncError:
        return {"lse_off": float("nan"), "lse_c": float("nan")}
    return {"lse_off": float(abs(r["offset"])), "lse_c": float(r["confidence"])}


def warp(out_lm: np.ndarray, in_lm: np.ndarray, trim: int = 0, points: np.ndarray = WARP_POINTS) -> float:
    """Largest shift of `points` between output and input landmarks of the same frames, over the outer-eye
    distance (frames without a face in either left out); NaN when none. The last `trim` frames are left out: there
    the output's track ends while the input's goes on, so their smoothing windows differ (the source re-tracked
    alone over the same frames reads 0.000 except there: 0.03 on tpsmm_driving's last frame). With the jaw's sides
    (`jaw`: retrieval.JAW_SIDES) it is how far a pasted mouth broke the frame's jaw line (pcavs_741400104 before
    retrieval.JAW_TOL: 0.09, a visible notch; 0.06 after)."""
    n = max(len(out_lm) - trim, 0)
    a, b = out_lm[:n, points], in_lm[:n, points]
    eyes = face.eye_span(in_lm[:n])
    d = np.linalg.norm(a - b, axis=-1).max(-1) / eyes
    d = d[np.isfinite(d)]
    return float(d.max()) if len(d) else float("nan")


def _strip_mouths(mouths: list[np.ndarray], px: int = 96) -> np.ndarray | None:
    if not mouths:
        return None
    h, w = mouths[0].shape[:2]
    size = (px, max(1, round(px * h / w)))
    return np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA) for m in mouths])


# ----------------------------------------------------------------------------- one clip


@dataclass
class _Clip:
    """A clip analysed once: what every row and sentence share."""

    path: Path
    source: SourceFaces
    video: media.VideoInfo  # at the working rate: plans index the 25 fps view, frames are re-decoded from it
    voice: voice_speech.SpeakerVoice | None
    info: dict
    height: int = 0
    width: int = 0
    mouths: np.ndarray | None = None  # (T, h, w, 3) the source frames' mouth boxes, cropped as the output's are
    patches: list | None = None  # per source frame: grey patches around WARP_POINTS (`patches`)


def _source_mouths(clip: _Clip, settings: Settings) -> np.ndarray:
    """The source frames' mouth boxes, decoded once per clip and cropped exactly as the output's (same matrices,
    same interpolation): the sharpness reference. Not the engine's stored crops, whose own resampling would
    be counted as the source's."""
    if clip.mouths is None:
        src = clip.source
        matrices, size = _measuring(src)
        tap = _Tap(1.0, matrices, size, small=False, around=_around(src.landmarks))
        with contextlib.closing(media.iter_frames(clip.path, fps=src.fps, ffmpeg=settings.ffmpeg)) as frames:
            for _ in tap(frames):
                if len(tap.mouths) >= src.n_frames:
                    break
        clip.mouths, clip.patches = np.stack(tap.mouths), tap.patches
    return clip.mouths


def _measuring(src: SourceFaces) -> tuple[np.ndarray, int]:
    """The aligned matrices and crop size the mouth boxes are cut at, for sharpness and strips: the crop's, or the
    face's own resolution where the face is clearly larger (MEASURE_AT_FACE) than the crop: in the smaller crop the
    eval could not see what a large face's mouth lost (docs/articulation_engine.md "Session 21")."""
    ok = np.isfinite(src.matrices[:, 0, 0])
    native = float(np.median([dubbing.native_side(M, src.size) for M in src.matrices[ok]])) if ok.any() else 0.0
    k = native / src.size if native > MEASURE_AT_FACE * src.size else 1.0
    return src.matrices * k, int(round(src.size * k))


def _around(landmarks: np.ndarray) -> np.ndarray:
    """(T, P + 2, 2): WARP_POINTS and the outer eye corners, what `patches` cuts around."""
    return landmarks[:, [*WARP_POINTS, *face.EYE_OUTER]]


def _analyse(path: Path, settings: Settings, workdir: Path) -> _Clip:
    info = media.probe(path)
    info = dataclasses.replace(info, duration=min(info.duration, MAX_CLIP_S))
    n = info.n_frames(settings.fps)
    # every frame analysed and kept (clips are short); crops on disk, where the neural row paints on them; at
    # retrieval's size, as `lipsync dub` makes them (the neural row cuts its 64 px box from these, maybe larger, crops)
    source = dubbing.analyse_video(path, info, settings, [(0, n)], np.ones(n, bool), workdir)
    facts: dict = {"frames": source.n_frames, "faces": float(source.found.mean())}
    try:
        voice = voice_speech.speaker_voice(settings, source.audio, path.name)
    except LipsyncError as e:  # no usable speech: the plain TTS voice, as --voice-fallback would
        voice, facts["voice"] = None, f"tts ({e})"
    facts.setdefault("voice", "tts" if voice is None else "own")
    return _Clip(path, source, dataclasses.replace(info, fps=settings.fps), voice, facts, info.height, info.width)


def _real_row(clip: _Clip, text: str, settings: Settings) -> RowResult:
    """The clip's own footage and speech: its analysis landmarks are what articulation.track gives (same tracker,
    same smoothing), so only the frames are decoded again, for the sync expert."""
    src = clip.source
    t0 = time.perf_counter()
    scale = _scale_for_sync(src.landmarks)
    tap = _Tap(scale, *_measuring(src))
    with contextlib.closing(media.iter_frames(clip.path, fps=src.fps, ffmpeg=settings.ffmpeg)) as frames:
        for _ in tap(frames):
            if len(tap.small) >= src.n_frames:
                break
    audio = src.audio if src.audio is not None else np.zeros(0, np.float32)
    res = articulation.score_landmarks(src.landmarks, audio, text, src.fps, clip.path)
    scores = {k: v for k, v in res.scores.items() if k != "phones"}
    scores |= _sync(tap.small, src.landmarks, scale, audio)
    return RowResult(clip.path.stem, REAL, -1, scores, res.gap, res.words, src.fps, res.scores["phones"],
                     _strip_mouths(tap.mouths), time.perf_counter() - t0)  # fmt: skip


def _dub_row(
    clip: _Clip, row: str, k: int, text: str, speech: tuple[np.ndarray, np.ndarray], plan: np.ndarray,
    close: np.ndarray, settings: Settings, out: Path, keep_mouths: bool, spoken: list | None = None,
) -> RowResult:  # fmt: skip
    """Dub sentence k with the row's engine, write it as `lipsync dub` would, measure the file. `speech`: what the
    output says, and what the engine follows (the TTS before the voice conversion, as in dub)."""
    t0 = time.perf_counter()
    src = clip.source
    engine, kw = ROWS[row]
    speech, mouth = speech
    targets = {} if engine == "seed" else {"phones": dubbing.speech_phones(mouth, text, spoken)}  # as `lipsync dub`
    track = get_engine(engine)(src, mouth, plan, close=close, **targets, **kw)
    with tempfile.TemporaryDirectory(prefix="lipsync-eval-") as tmp:
        wav = Path(tmp) / "speech.wav"
        media.write_wav(wav, speech, SR)
        h, w = clip.height, clip.width
        with media.VideoWriter(out, w, h, fps=src.fps, audio=wav, crf=settings.crf, ffmpeg=settings.ffmpeg) as vw:
            for frame in dubbing.render_frames(clip.path, clip.video, src, plan, track, settings):
                vw.write(frame)
    scale = _scale_for_sync(src.landmarks)
    matrices, size = _measuring(src)
    tap = _Tap(scale, matrices[plan], size, around=_around(src.landmarks[plan]))
    frames, total = articulation.frames_of(out, src.fps)
    audio = media.read_audio(out, SR, ffmpeg=settings.ffmpeg)
    res = articulation.measure_frames(tap(frames), audio, text, src.fps, total, settings.face_index, out)
    scores = {k: v for k, v in res.scores.items() if k != "phones"}
    scores |= _sync(tap.small, res.landmarks, scale, audio)
    n = min(len(tap.mouths), len(plan))
    ok = src.found[plan[:n]]
    if ok.any():
        mouths, own = np.stack(tap.mouths[:n])[ok], _source_mouths(clip, settings)
        scores["sharpness"] = sharpness_ratio(mouths, own[plan[:n][ok]])
        shown = _shown_frames(track, src.n_frames)[:n][ok]
        if (shown >= 0).any():  # the same pixels before and after: blur alone, whatever mouth shapes are shown
            scores["sharp_shown"] = sharpness_ratio(mouths[shown >= 0], own[shown[shown >= 0]])
    m = min(len(res.landmarks), len(plan))
    ends = m < src.n_frames  # the source goes on after the output's last frame
    trim = int(np.ceil(3 * articulation.SMOOTH)) * ends
    scores["warp"] = warp(res.landmarks[:m], src.landmarks[plan[:m]], trim)
    scores["jaw"] = warp(res.landmarks[:m], src.landmarks[plan[:m]], trim, retrieval.JAW_SIDES)
    behind = src.landmarks[plan[:m]]
    eyes = face.eye_span(behind)
    _source_mouths(clip, settings)
    scores["warp_px"] = pixel_warp(tap.patches[:m], [clip.patches[b] for b in plan[:m]], eyes)
    mouths = _strip_mouths(tap.mouths) if keep_mouths else None
    return RowResult(clip.path.stem, row, k, scores, res.gap, res.words, src.fps, res.scores["phones"], mouths,
                     time.perf_counter() - t0)  # fmt: skip


def _shown_frames(track, n_src: int) -> np.ndarray:
    """(N,) the source frame whose mouth each output frame shows (a re-shaped mouth: the frame it was made from;
    -1: none)."""
    idx = np.asarray(track.source_index).copy()
    bank = idx >= n_src
    if bank.any():
        idx[bank] = np.asarray(track.bank)[idx[bank] - n_src, 0].astype(np.int64)
    return idx


# ----------------------------------------------------------------------------- the run


def evaluate_text(
    settings: Settings,
    videos: Path | None = None,
    rows: list[str] | None = None,
    sentences: Iterable[str] = SENTENCES,
    limit: int | None = None,
    keep: Path | None = None,
    on_row: Callable[[RowResult], None] | None = None,
) -> TextRun:
    """Every clip of `videos` (default <shared>/media; at most `limit`), every row, every sentence. A clip or row
    that cannot be measured is skipped with its reason. `keep`: write the first sentence's dubs there."""
    settings = settings.model_copy(update={"smooth": articulation.SMOOTH})  # the source is tracked as the stick tracks
    rows = parse_rows(rows)
    sentences = list(sentences)
    videos = videos if videos is not None else settings.shared_dir / "media"
    if not videos.exists():
        raise LipsyncError(f"no such folder: {videos}")
    clips = files_in(videos, VIDEO_EXT)[: limit or None]
    if not clips:
        raise LipsyncError(f"no videos in {videos}")
    run = TextRun(rows, sentences, [], [])
    dubbed = [r for r in rows if r != REAL]
    with quiet_bars():
        tts = [voice_speech.load_speech(s, None, settings) for s in sentences] if dubbed else []  # once for every clip
    n_steps = len(clips) * (1 + len(dubbed) * len(sentences) + (REAL in rows))
    with progress.task("eval text", n_steps) as advance:
        for path in clips:
            t_clip = time.perf_counter()
            try:
                with quiet_bars(), tempfile.TemporaryDirectory(prefix="lipsync-eval-") as tmp:
                    clip = _analyse(path, settings, Path(tmp))
                    advance(1)
                    _clip_rows(run, clip, rows, sentences, tts, settings, keep, on_row, advance)
            except (LipsyncError, ValueError) as e:
                run.skipped.append((path.stem, str(e)))
                continue
            run.info[path.stem] = {**clip.info, "seconds": round(time.perf_counter() - t_clip, 1)}
    for what, why in run.skipped:
        progress.log(f"[yellow]skipped[/] {escape(f'{what}: {why}')}")
    return run


def _clip_rows(run, clip, rows, sentences, tts, settings, keep, on_row, advance) -> None:
    src, fps, name = clip.source, clip.source.fps, clip.path.stem
    for row in rows:
        if row != REAL:
            continue
        text = transcript(clip.path)
        if text is None:
            run.skipped.append((f"{name} / real", "no transcript (add it to eval/media_transcripts.json)"))
        elif src.audio is None:
            run.skipped.append((f"{name} / real", "no audio track"))
        else:
            _add(run, _real_row(clip, text, settings), on_row)
        advance(1)
    if not tts:  # the real row alone: nothing is dubbed
        return
    level = voice_speech.loudness_target(src.audio)  # the video's own speech: once per clip, as dub measures it
    for k, (text, (tts_speech, spoken)) in enumerate(zip(sentences, tts, strict=True)):
        # as `lipsync dub`: the output speaks the converted voice, the engine follows the TTS speech (the
        # conversion keeps its timing; dub runs them side by side), both as loud as the video's own speech
        n_out = dubbing.output_frames(len(tts_speech) / SR, fps)
        plan = np.minimum(compositing.timing_plan(src.n_frames, n_out, settings.sync_mode), src.n_frames - 1)
        cut = int(round(len(plan) / fps * SR))
        speech = match_loudness(voice_speech.apply_voice(tts_speech, clip.voice), SR, level)[:cut]
        mouth = match_loudness(tts_speech, SR, level)[:cut]
        close = dubbing.mouth_must_close(mouth, len(plan), fps, text, spoken)
        for row in rows:
            if row == REAL:
                continue
            folder = keep if keep is not None and k == 0 else None
            with tempfile.TemporaryDirectory(prefix="lipsync-eval-") as tmp:
                out = (folder or Path(tmp)) / f"{name}__{row.replace(' ', '_').replace(':', '_')}__s{k}.mp4"
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    res = _dub_row(clip, row, k, text, (speech, mouth), plan, close, settings, out, k == 0, spoken)
                    _add(run, res, on_row)
                except (LipsyncError, ValueError) as e:
                    run.skipped.append((f"{name} / {row} / sentence {k}", str(e)))
            advance(1)


def _add(run: TextRun, res: RowResult, on_row) -> None:
    run.results.append(res)
    if on_row is not None:
        on_row(res)
