"""The dubbing pipeline, as plain functions the CLI (and the benchmark) call.

text --voice.tts--> speech                                        (or --audio FILE, used exactly as given)
video --media.iter_frames (a 25 fps view; the frames the output shows + a mouth pool)--> frames
      --face.track_faces--> landmarks + aligned crops of the pool                                   (pass 1)
speech --voice.convert (towards the person's own speech in the video, or --voice-ref)--> their voice, same timing
       (in its own process, beside pass 1, the engine and the render)
speech (loudness matched to the video's own) + its phones (visemes) + pool --engine.animate-->
       a mouth per 25 fps output frame
frames (again, at the input's own rate, in timing-plan order) + mouths --compositing.composite--> media.VideoWriter
       (+ speech at >= 44.1 kHz, muxed at the end when it was converted) -> output.mp4

Voice conversion keeps the speech sample-exact in length, so the timing plan and piper's phone timings (which
close the mouth on p/b/m) decided before it stay valid, and the engine can follow the TTS speech while the voice is
still converted. Its errors are raised after the face pass, so that a video without a face is reported as such
before its soundtrack is judged; a --voice-ref recording (and XTTS, which needs the voice before it can speak) is
read and checked before any work. Memory and temp disk stay flat in the video's length: frames are streamed,
never stored (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lipsync_cli import background, compositing, face, files, media, progress
from lipsync_cli.audio import SR, match_loudness, resample, voice_activity
from lipsync_cli.background import Prefetch
from lipsync_cli.engine import MouthTrack, SourceFaces, get_engine
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speech import (
    apply_voice,
    check_voice,
    check_words,
    learn_and_convert,
    load_speech_full,
    loudness_target,
    soundtrack,
    speaker_voice,
)


@dataclass
class DubResult:
    """What one dub made: the file, its length, how much of the input had a face, where the time went."""

    output: Path
    frames: int
    duration: float  # seconds of output
    faces_found: float  # fraction of input frames with a tracked face
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    video: Path | None = None  # the input
    engine: str = ""
    voice: str = ""  # where the voice came from (a file name), "tts", or "audio" (--audio, used as given)
    articulation: dict[str, float] | None = None  # figures measured on the output, when a stage computed them
    heard: str | None = None  # the words recognised in --audio (no --transcript): what the mouth was timed by

    def to_json(self) -> dict:
        """Plain JSON types (paths as text, a figure with nothing to measure null): what `lipsync dub --json`
        prints."""
        d = asdict(self)
        return files.json_safe({k: str(v) if isinstance(v, Path) else v for k, v in d.items()})


def default_output(video: Path) -> Path:
    return video.with_name(video.stem + ".dubbed.mp4")


MAX_CROP = 384  # largest aligned crop of a shown mouth: faces up to ~380 px keep their own resolution (was 256: a
# 305 px face's mouth lost 0.04 of its sharpness to the shrink, docs/articulation_engine.md "Crop size")
PAINT_CROP = 256  # the crop the neural and seed engines paint on (every frame's, on disk)
POOL_FRAMES = 1500  # at most 60 s (at 25 fps) of the person's mouths are kept for the engine to show
POOL_MIN_FRAMES = 500  # and at least 20 s where the video has them, even when the output needs fewer frames
POOL_BLOCK = 50  # they are sampled in 2 s stretches: retrieval shows source frames in their own order for free
POOL_BYTES = 360e6  # and their crops take at most this much memory (fewer frames when the face is large)
# A pool frame's mouth is stored as the frame's own pixels under the aligned crop's lower part (rows from STORE_TOP
# down, its whole width: the compositor's mask stays within rows 0.20-0.92 on the shared clips), a box copied
# without resampling: shown, it is resampled once, into the output frame (an aligned crop cut first was a second
# Lanczos pass: -5% of the mouth's Laplacian variance, and 1.5 s of a 19 s dub's analysis). A box has room for
# STORE_ROOM (height, width) sides of the crop, or of the face where it is larger (`store_shape`): a head rolled up
# to ~10 degrees; one rolled further is stored as its aligned crop, at the face's own scale.
STORE_TOP = 0.15
STORE_ROOM = (1.05, 1.15)
# A face larger than the crop keeps its own pixels up to a side that leaves POOL_BYTES room for 10 s of mouths
# (GRID's 3 s clips dub with every p/b/m shut): ~630 px; a larger face's mouths are stored shrunk to that.
STORE_MIN_FRAMES = 250
MAX_STORE_SIDE = int(np.sqrt(POOL_BYTES / (STORE_MIN_FRAMES * 3 * STORE_ROOM[0] * STORE_ROOM[1])))


def crop_size(M: np.ndarray, size: int, most: int = MAX_CROP) -> int:
    """A crop size at or above the face's native resolution (a face shrunk into a smaller crop loses detail that
    no resample gives back), in steps of 16, within [96, most]."""
    return int(np.clip(np.ceil(native_side(M, size) / 16) * 16, 96, most))


def native_side(M: np.ndarray, size: int) -> float:
    """The side, in frame pixels, of the size x size aligned crop that M (frame -> crop) cuts."""
    return size / max(float(np.sqrt(abs(np.linalg.det(M[:, :2])))), 1e-6)


def spread_blocks(frames: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of `frames` (indices in order), as POOL_BLOCK runs spread evenly over them."""
    if len(frames) <= most:
        return frames
    starts = np.linspace(0, len(frames) - POOL_BLOCK, max(most // POOL_BLOCK, 1)).round().astype(int)
    return np.unique(np.concatenate([frames[i : i + POOL_BLOCK] for i in starts]))


def sample_frames(n_src: int, needed: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Which frames (of the working-rate view) to analyse, and which of them form the engine's reference pool.

    Analysed: the frames the output shows (0 .. needed), plus, when those are fewer than POOL_MIN_FRAMES, stretches
    of POOL_BLOCK frames spread over the rest of the video (a short dub of a long clip still sees the person's
    mouth at many moments). Pool: all analysed frames when they are at most POOL_FRAMES, else POOL_FRAMES of them
    in POOL_BLOCK stretches spread evenly: 60 s covers every mouth shape of a speaker many times over, and bounds
    the engine's search (linear in the pool's size); POOL_BYTES bounds its memory once the crop size is known.
    Returns ([start, stop) ranges in order, pool mask over 0 .. the last stop)."""
    needed = min(max(needed, 1), n_src)
    ranges = [(0, needed)]
    want = min(n_src, POOL_MIN_FRAMES) - needed
    if want > 0:
        if n_src - needed <= want + POOL_BLOCK:
            ranges = [(0, n_src)]
        else:
            k = -(-want // POOL_BLOCK)
            starts = np.linspace(needed, n_src - POOL_BLOCK, k).round().astype(int)
            for a in starts:
                a = max(int(a), ranges[-1][1])
                if a < n_src:
                    ranges.append((a, min(a + POOL_BLOCK, n_src)))
    analysed = np.concatenate([np.arange(a, b) for a, b in ranges])
    pool = np.zeros(ranges[-1][1], bool)
    pool[spread_blocks(analysed, POOL_FRAMES)] = True
    return ranges, pool


def store_shape(size: int, native: float, own_pixels: bool = True) -> tuple[int, int]:
    """(height, width) of a stored mouth for aligned crops of `size` of a face `native` pixels across (the crop's
    side in frame pixels): `STORE_ROOM` crop sides, or face sides where the face is larger than the crop (up to
    MAX_STORE_SIDE), so its mouth keeps the frame's own pixels: a 300 px face's mouth through a 192 px crop kept 0.36
    of its Laplacian variance, 0.93 as its own pixels (docs/articulation_engine.md "Session 21"). Not `own_pixels`
    (the painting engines keep every frame's crop on disk and paint a 64 px box): such a face is stored shrunk, as
    its aligned crop."""
    if native > size and not own_pixels:
        return size, size
    side = max(size, min(native, MAX_STORE_SIDE))
    return int(np.ceil(STORE_ROOM[0] * side)), int(np.ceil(STORE_ROOM[1] * side))


def store_mouth(frame: np.ndarray, M: np.ndarray, size: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of `shape`, the 2x3 move from frame pixels to them): what the pool keeps of a frame whose aligned crop
    `M` gives (of `size`). The frame's own pixels under the crop's rows STORE_TOP..1 (edges replicated where the box
    leaves the frame or its room), else, where they do not fit, the aligned crop itself."""
    h, w = shape
    corners = np.array([[0, STORE_TOP], [1, STORE_TOP], [0, 1], [1, 1]]) * size - 0.5
    fc = face.transform_points(corners, face.invert_affine(M))
    (x0, y0), (x1, y1) = np.floor(fc.min(0)).astype(int) - 2, np.ceil(fc.max(0)).astype(int) + 3
    if y1 - y0 > h or x1 - x0 > w:  # its aligned crop, scaled to the room a face larger than the crop was given
        side = max(size, int(min(h / STORE_ROOM[0], w / STORE_ROOM[1])))
        move = np.asarray(M, np.float64) * (side / size)
        block, top, left = face.warp_to_aligned(frame, move, side, face.SHARP), 0, 0
    else:
        H, W = frame.shape[:2]
        block = frame[max(y0, 0) : max(min(y1, H), 0), max(x0, 0) : max(min(x1, W), 0)]  # a stop < 0 would wrap
        top, left, move = max(y0, 0) - y0, max(x0, 0) - x0, np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    if block.size == 0:  # the crop lies wholly off the frame (a face cut by the edge): nothing of it to keep
        return np.zeros((h, w, 3), np.uint8), move
    bottom, right = h - top - block.shape[0], w - left - block.shape[1]
    return cv2.copyMakeBorder(block, top, bottom, left, right, cv2.BORDER_REPLICATE), move


class PoolCrops:
    """The stored mouths (`store_mouth`) of the pool frames only, indexed by source frame like the (T, h, w, 3)
    array it stands for (frames outside the pool read as zeros: engines only show pool mouths,
    `SourceFaces.usable`)."""

    def __init__(self, keep: np.ndarray, shape: tuple[int, int]):
        self.slot = np.full(len(keep), -1, np.int64)
        self.slot[keep] = np.arange(int(keep.sum()))
        self.data = np.zeros((int(keep.sum()) + 1, *shape, 3), np.uint8)  # the last row: zeros
        self.shape = (len(keep), *shape, 3)
        self.dtype = self.data.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        return self.data[self.slot[idx]]

    def __setitem__(self, idx, value) -> None:
        self.data[self.slot[idx]] = value


def check_temp_space(need: float, what: str) -> None:
    """A clear error before the work when the temp folder cannot hold `need` bytes."""
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < need:
        raise LipsyncError(
            f"not enough temp space in {folder} for {what}: needs ~{need / 1e6:.0f} MB, {free / 1e6:.0f} MB free "
            "(set TMPDIR to a folder with more room)"
        )


def crop_policy(engine: str) -> tuple[int, bool]:
    """analyse_video's (max_crop, own_pixels) for an engine: retrieval shows the crops' own pixels (up to MAX_CROP,
    a larger face at its own resolution); the neural and seed engines paint a 64 px box on every frame's crop, for
    which a PAINT_CROP crop is plenty (a larger face is stored shrunk to it)."""
    return (MAX_CROP, True) if engine == "retrieval" else (PAINT_CROP, False)


def analyse_video(
    video: Path,
    info: media.VideoInfo,
    settings: Settings,
    ranges: list[tuple[int, int]],
    pool: np.ndarray,
    workdir: Path | None = None,
    tracker: face.FaceTracker | None = None,
    max_crop: int = MAX_CROP,
    own_pixels: bool = True,
) -> SourceFaces:
    """Pass 1 over the working-rate view (settings.fps): decode the `ranges` (from `sample_frames`), track the face,
    keep aligned crops of the `pool` frames (in memory, at most POOL_BYTES of them), or of every analysed frame when
    `workdir` is given (a disk memmap there: the neural and seed engines paint on the crops of the frames they
    show; they want no more than PAINT_CROP: `crop_policy`). `own_pixels`: a face larger than the crop keeps its
    own resolution (`store_shape`; off for the painting engines, which keep every frame's crop).
    Frames are decoded a few ahead in a thread, never stored. A `tracker` given is reset and reused (its graphs
    stay loaded: the API's Dubber), else one is made for this video."""
    T = ranges[-1][1]
    stored_M = np.full((T, 2, 3), np.nan)  # frame pixels -> stored mouth pixels
    keep = pool.copy()
    if workdir is not None:
        keep[:] = False
        for a, b in ranges:
            keep[a:b] = True
    crops: PoolCrops | np.ndarray | None = None
    size, shape, n = 0, (0, 0), 0

    def stretches() -> Iterator[tuple[int, Iterator[np.ndarray]]]:
        for a, b in ranges:
            make = functools.partial(media.iter_frames, video, settings.fps, settings.ffmpeg, a, b - a)
            with Prefetch(make, size=4) as frames:
                yield a, itertools.islice(frames, b - a)

    def keep_crop(t: int, frame: np.ndarray, lm: np.ndarray | None) -> None:
        """A pool frame's stored mouth (`store_mouth`), while the frame is at hand (frames are never stored)."""
        nonlocal crops, size, shape, n
        n += 1
        if lm is None:
            return
        if crops is None:
            M = face.align_matrix(lm, 128)
            size = crop_size(M, 128, max_crop)
            shape = store_shape(size, native_side(M, 128), own_pixels)
            if workdir is None:
                held = np.flatnonzero(keep)
                keep[:] = False
                keep[spread_blocks(held, max(int(POOL_BYTES // (np.prod(shape) * 3)), POOL_BLOCK))] = True
                crops = PoolCrops(keep, shape)
            else:
                check_temp_space(keep.sum() * np.prod(shape) * 3, "the face crops")
                crops = np.lib.format.open_memmap(
                    workdir / "crops.npy", mode="w+", dtype=np.uint8, shape=(T, *shape, 3)
                )
        if keep[t]:
            crops[t], stored_M[t] = store_mouth(frame, face.align_matrix(lm, size), size, shape)

    with contextlib.closing(stretches()) as parts:
        track = face.track_faces(
            face_index=settings.face_index, smooth_sigma=settings.smooth, total=sum(b - a for a, b in ranges),
            stretches=parts, n_frames=T, tracker=tracker, on_frame=keep_crop, label="analysing video",
        )  # fmt: skip
    if n == 0:
        raise LipsyncError(f"could not decode any frame from {video}")
    found = track.found
    if crops is None or not found.any():
        most = int(track.n_faces.max(initial=0))
        if settings.face_index >= max(most, 1):  # --face counts from 0, largest first
            raise LipsyncError(
                f"no face {settings.face_index} in {video}: it shows at most {most} face{'s' * (most != 1)} at once "
                f"(--face counts from 0, largest first)"
            )
        raise LipsyncError(f"no face found in {video}")

    smoothed, matrices = track.landmarks, track.align(size)
    matrices[~found] = np.nan  # engines and the compositor leave frames without a face alone
    # each stored mouth's move to its aligned coordinates (at the smoothed pose), applied when it is shown
    crop_fix = np.full((T, 2, 3), np.nan)
    for t in np.flatnonzero(found & keep):
        crop_fix[t] = face.compose_affine(matrices[t], face.invert_affine(stored_M[t]))
    own = soundtrack(video, settings) if info.has_audio else None
    return SourceFaces(
        crops=crops,
        landmarks=smoothed,
        found=found,
        matrices=matrices,
        size=size,
        audio=own,
        fps=settings.fps,
        usable=keep if workdir is None else None,
        crop_fix=crop_fix,
    )


def speech_phones(
    speech: np.ndarray, text: str | None, spoken: list | None = None, transcript: str | None = None
) -> list | None:
    """The phones of the new speech, with their timings: what the mouth must show (visemes.py). Piper's own phone
    timings when it spoke (exact); else forced alignment of the known words (`text` for other TTS, `transcript` for
    an audio file); else of the words recognised in it. None when none of these finds anything to go by."""
    if spoken is not None:
        return spoken
    from lipsync_cli import phones

    return phones.join_found([(0.0, phones.find_phones(speech, transcript if transcript is not None else text))])[0]


def mouth_must_close(
    speech: np.ndarray, n_frames: int, fps: float, text: str | None, spoken: list | None = None
) -> np.ndarray:
    """Frames where the mouth has to be shut: pauses, and bilabials p/b/m (what eval's closure metric checks, and
    what an engine without phone targets is told)."""
    close = ~voice_activity(speech, SR, fps=fps, n_frames=n_frames)
    ph = speech_phones(speech, text, spoken)
    if ph is not None:
        from lipsync_cli import phones

        close |= phones.bilabial_frames(ph, n_frames, fps)
    return close


TRANSCRIPT_FILES = (".txt", ".md", ".srt", ".vtt", ".lab", ".text")  # a --transcript ending so names a file


def transcript_path(transcript: str | None) -> Path | None:
    """The file --transcript names, or None when it holds the words themselves. A single word ending in a text
    file's suffix is a file name, so a missing file is an error rather than the words "words.txt"."""
    if transcript is None or len(transcript) >= 4096:
        return None
    path = Path(transcript)
    if path.is_file():
        return path
    if not transcript.strip() or " " in transcript.strip() or path.suffix.lower() not in TRANSCRIPT_FILES:
        return None
    raise LipsyncError(f"--transcript {path}: {'not a file' if path.exists() else 'file not found'}")


FACE_SHOWN_WARN = 0.5  # below this share of the output's frames with the face, the dub says so


def warn_unseen(shown: np.ndarray, found: np.ndarray, fps: float) -> None:
    """Say so when the frames the output shows (`shown`: has a face) mostly have no face: they are left as they
    are, which is right, but not what anyone dubbing a talking head expects. `found`: every analysed frame's."""
    if shown.mean() >= FACE_SHOWN_WARN:
        return
    where = f"; it first shows at {np.argmax(found) / fps:.1f} s of the video" if not shown.any() else ""
    progress.console.print(  # a warning, not chatter: shown even with --quiet
        f"[yellow]warning[/]: the face shows in {shown.mean():.0%} of the frames the output uses{where}; "
        "frames without it are left as they are",
        highlight=False,
        soft_wrap=True,
    )


def output_frames(seconds: float, rate: float) -> int:
    """Frames at `rate` that show all of `seconds` of speech: the last partial frame too (rounding cut the end
    of the speech: up to half a frame, 0.25 s at 2 fps)."""
    return max(1, math.ceil(seconds * rate - 1e-6))


def read_transcript(transcript: str | None) -> str | None:
    """--transcript: the words themselves, or a text file holding them."""
    if transcript is None:
        return None
    path = transcript_path(transcript)
    try:
        if path is not None:
            transcript = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LipsyncError(f"--transcript {path}: {e.strerror}") from None
    if not transcript.strip():
        raise LipsyncError("--transcript is empty")
    return transcript


def retime(plan: np.ndarray, rate: float, n_src: int, fps: float) -> np.ndarray:
    """The timing plan at the working rate `fps` for an output planned at the input's `rate` (`plan`: source frame
    at `rate` behind each output frame): the working-rate source frame nearest in time, for each working frame."""
    n = max(1, int(round(len(plan) / rate * fps)))
    j = np.minimum(np.round(np.arange(n) / fps * rate).astype(np.int64), len(plan) - 1)
    return np.minimum(np.round(plan[j] / rate * fps).astype(np.int64), n_src - 1)


def iter_plan_frames(
    video: Path, plan: np.ndarray, fps: float, ffmpeg: str | None, budget: int = 64
) -> Iterator[np.ndarray]:
    """The frame behind every output frame (`plan`: frame indices at `fps`), decoded again rather than stored:
    forward runs stream from a seek; backward runs (bounce) are decoded forward in chunks of at most `budget`
    frames and played in reverse. Memory: one chunk, whatever the video's length."""
    n, k = len(plan), 0
    last_i, last = -1, None
    while k < n:
        a = int(plan[k])
        if a == last_i:  # a hold (a one-frame video bouncing)
            yield last.copy()
            k += 1
            continue
        backward = k + 1 < n and plan[k + 1] == a - 1
        e = k
        while e + 1 < n and plan[e + 1] == plan[e] + (-1 if backward else 1):
            e += 1
        if not backward:
            for frame in media.iter_frames(video, fps, ffmpeg, start=a, count=e - k + 1):
                last = frame
                yield frame
        else:
            top, lo = a, int(plan[e])
            while top >= lo:
                bottom = max(lo, top - budget + 1)
                chunk = list(media.iter_frames(video, fps, ffmpeg, start=bottom, count=top - bottom + 1))
                last = chunk[0]
                while chunk:
                    yield chunk.pop()
                top = bottom - 1
        last_i, k = int(plan[e]), e + 1


def face_at(source: SourceFaces, x: float) -> np.ndarray | None:
    """Landmarks at fractional working-rate frame `x` (between two tracked frames: interpolated), or None."""
    i0 = min(int(np.floor(x)), source.n_frames - 1)
    i1, w = min(i0 + 1, source.n_frames - 1), x - np.floor(x)
    f0, f1 = source.found[i0], source.found[i1]
    if f0 and f1:
        return (1 - w) * source.landmarks[i0] + w * source.landmarks[i1]
    if f0 or f1:
        return source.landmarks[i0 if (f0 and (w < 0.5 or not f1)) else i1]
    return None


def render_frames(
    video: Path,
    info: media.VideoInfo,
    source: SourceFaces,
    plan: np.ndarray,
    track: MouthTrack,
    settings: Settings,
) -> Iterator[np.ndarray]:
    """The output frames at the input's own rate: each planned input frame with the engine's mouth composited in.
    The engine works at settings.fps; at another input rate each output frame shows the mouth of the working frame
    nearest in time, placed by the face's landmarks interpolated to the frame's own time."""
    rate, fps = info.fps, source.fps
    same = abs(rate - fps) < 1e-6
    budget = int(np.clip(256e6 // (info.width * info.height * 3), 8, 256))  # <= 256 MB of frames for a bounce
    make = functools.partial(iter_plan_frames, video, plan, rate, settings.ffmpeg, budget)
    with Prefetch(make, size=4) as frames:
        for j, frame in enumerate(frames):
            i = j if same else min(int(round(j / rate * fps)), len(track.source_index) - 1)
            if track.source_index[i] < 0:
                yield frame
                continue
            b = int(plan[j])
            if same:
                if not source.found[b]:
                    yield frame
                    continue
                lm, M = source.landmarks[b], source.matrices[b]
            else:
                lm = face_at(source, b / rate * fps)
                if lm is None:
                    yield frame
                    continue
                M = face.align_matrix(lm, source.size)
            pts = face.transform_points(lm, M)  # per frame: no (T, 478, 2) held
            crop, fix = track.mouth(i, source)
            compositing.composite(frame, M, source.size, crop, track.points[i], pts, fix)
            yield frame


def dub(
    video: Path,
    text: str | None,
    audio: Path | None,
    output: Path | None,
    settings: Settings,
    force: bool = False,
    transcript: str | None = None,
    tracker: face.FaceTracker | None = None,
) -> DubResult:
    """Re-animate the mouth in `video` to new speech (TTS of `text` in the person's voice per settings.voice, or the
    file `audio` exactly as given, whose words `transcript` may tell: text or a file) and write the
    result, at the input's own frame rate.

    Stages run side by side: the voice is learned and converted in its own process while the face is tracked, the
    mouths chosen and the frames rendered (the engine follows the TTS speech, which the conversion keeps sample-exact
    in timing); frames are decoded ahead in a thread and encoded by ffmpeg fed from another. With a voice to convert,
    the video is encoded first and the converted speech muxed in at the end (a stream copy).
    `tracker`: a FaceTracker to reuse (see analyse_video)."""
    video = Path(video)
    if not video.exists():
        raise LipsyncError(f"no such file: {video}")
    output = Path(output) if output else default_output(video)
    transcript_file = transcript_path(transcript)
    media.check_output(output, video, force, inputs=(audio, settings.voice_ref, transcript_file))
    check_words(text, audio)
    if transcript is not None and audio is None:
        raise LipsyncError("--transcript tells the words of an --audio file; with text to speak it is not needed")
    transcript = read_transcript(transcript)
    check_voice(audio, settings)
    folder = output.parent if str(output.parent) else Path(".")
    files.sweep_stale(folder)
    files.sweep_stale(tempfile.gettempdir())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = media.probe(video)
    fps, rate = settings.fps, info.fps
    if info.hdr:
        progress.log(f"HDR video ({'PQ' if info.hdr == 'smpte2084' else 'HLG'}): the output is SDR, tone-mapped")

    with contextlib.ExitStack() as stack:
        publish = files.atomic(output, output.suffix.lower(), force=force)  # proves the folder writable, first
        stack.callback(publish.discard)
        # the voice is learned in its own process while the TTS speaks, and converted beside the face pass, unless
        # it is needed to speak (XTTS clones by itself)
        voice, voice_known = None, audio is not None
        if not voice_known and settings.tts == "xtts":
            voice = speaker_voice(settings, soundtrack(video, settings) if info.has_audio else None, video.name)
            voice_known = True
        clone = not voice_known and settings.voice == "clone"
        if clone and settings.voice_ref is None and not info.has_audio:  # nothing to learn from: say so now
            clone = speaker_voice(settings, None, video.name) is not None  # an error, or the fallback's warning
        cloned_from = ""  # where the voice process learned the voice ("tts": it fell back)
        job = (
            stack.enter_context(background.Job(learn_and_convert, settings, video, info.has_audio, feed=True))
            if clone
            else None
        )
        speech = load_speech_full(text, audio, settings, voice)
        timings["speech"] = time.perf_counter() - t0

        plan = compositing.timing_plan(
            info.n_frames(rate), output_frames(len(speech.analysis) / SR, rate), settings.sync_mode
        )
        if len(plan) / rate < len(speech.analysis) / SR - 0.5 / rate:  # `cut`: the output ends with the video
            speech.cut(len(plan) / rate)
        plan_w = retime(plan, rate, info.n_frames(fps), fps)
        if job is not None:
            job.send(speech.analysis)
        hearing = []  # an audio file's phones are found beside the face pass, in parts at once (~0.15 s a second)
        if audio is not None and settings.engine != "seed":
            from lipsync_cli import phones

            x, words = speech.analysis, settings.hear == "words"
            parts = [(0, len(x))] if transcript is not None else phones.parts_at_pauses(x)
            for a, b in parts:
                hearing.append(
                    (a / SR, stack.enter_context(background.Job(phones.find_phones, x[a:b], transcript, words)))
                )
        check_temp_space(2 * len(speech.out) + 16e6, "the speech")
        est = (info.width * info.height * rate * 0.15 + 20e3) * len(plan) / rate  # ~1.2 bits/pixel at crf 18
        free = shutil.disk_usage(folder).free
        if free < est * (2 if clone else 1):
            raise LipsyncError(
                f"not enough space in {folder} for the output: ~{est * (2 if clone else 1) / 1e6:.0f} "
                f"MB needed, {free / 1e6:.0f} MB free"
            )

        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=files.temp_name() + "-")))
        t = time.perf_counter()
        ranges, pool = sample_frames(info.n_frames(fps), int(plan_w.max()) + 2)
        crops_dir = None if settings.engine == "retrieval" else workdir  # retrieval keeps only the pool's, in memory
        most, own = crop_policy(settings.engine)
        source = analyse_video(video, info, settings, ranges, pool, crops_dir, tracker, most, own_pixels=own)
        plan_w = np.minimum(plan_w, source.n_frames - 1)
        warn_unseen(source.found[plan_w], source.found, fps)
        timings["analyse"] = time.perf_counter() - t

        t = time.perf_counter()
        target_db = loudness_target(source.audio)
        if not clone:
            speech.analysis = apply_voice(speech.analysis, voice)  # XTTS / --voice tts / --audio: unchanged
        mouth_speech = match_loudness(speech.analysis, SR, target_db)
        pauses = ~voice_activity(mouth_speech, SR, fps=fps, n_frames=len(plan_w))  # what shuts when no phone is found
        animate = get_engine(settings.engine, settings)
        targets, heard = {}, None  # the seed generates from audio alone
        if hearing:
            targets["phones"], heard = phones.join_found([(t, part.result()) for t, part in hearing])
        elif settings.engine != "seed":
            targets["phones"] = speech_phones(mouth_speech, text, speech.phones)
        track = animate(source, mouth_speech, plan_w, close=pauses, **targets)
        timings["engine"] = time.perf_counter() - t

        t = time.perf_counter()
        wav = workdir / "speech.wav"
        if not clone:
            media.write_wav(wav, match_loudness(speech.out, speech.out_sr, target_db), speech.out_sr)
        silent = output.with_name(files.temp_name(f".{output.name}.", ".video.mp4")) if clone else None
        if silent is not None:  # the video alone, beside the output (same disk: the mux is a stream copy)
            stack.callback(silent.unlink, missing_ok=True)
        with (
            media.VideoWriter(
                silent or output,
                info.width,
                info.height,
                fps=rate,
                audio=None if clone else wav,
                crf=settings.crf,
                ffmpeg=settings.ffmpeg,
                publish=None if clone else publish,
                frames=len(plan),
            ) as writer,
            progress.task("rendering", len(plan)) as adv,
            contextlib.closing(render_frames(video, info, source, plan, track, settings)) as frames,
        ):  # closed on the way out: its decoder thread and ffmpeg stop now, not whenever the generator is collected
            for frame in frames:
                writer.write(frame)
                adv(1)
        timings["render"] = time.perf_counter() - t
        if job is not None:
            t = time.perf_counter()
            converted, cloned_from = job.result()
            timings["voice wait"] = time.perf_counter() - t  # how far the voice process finished after the render
            out = speech.out if converted is None else resample(converted, SR, speech.out_sr)
            media.write_wav(wav, match_loudness(out, speech.out_sr, target_db), speech.out_sr)
            media.mux(silent, wav, publish, len(plan) / rate, ffmpeg=settings.ffmpeg)
            timings["voice"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    spoke = "audio" if audio is not None else cloned_from if clone else voice.source if voice is not None else "tts"
    faces = float(source.found.mean())
    return DubResult(output, len(plan), len(plan) / rate, faces, timings, video, settings.engine, spoke, heard=heard)
