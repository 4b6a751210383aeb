"""The dubbing pipeline, as plain functions the CLI (and the benchmark) call.

text --voice.tts--> speech                                        (or --audio FILE, used exactly as given)
video --media.iter_frames--> frames --face.FaceTracker--> landmarks + aligned lower-face crops   (pass 1)
speech --voice.convert (towards the person's own speech in the video, or --voice-ref)--> their voice, same timing
speech (loudness matched to the video's own) + crops --engine.animate--> a mouth per output frame
frames (again, in timing-plan order) + mouths --compositing.composite--> media.VideoWriter (+ speech) -> output.mp4

Voice conversion keeps the speech sample-exact in length, so the timing plan and piper's phone timings (which
close the mouth on p/b/m) decided before it stay valid. It runs after the face pass so that a video without a face
is reported as such before its soundtrack is judged; a --voice-ref recording (and XTTS, which needs the voice
before it can speak) is read and checked before any work.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lipsync_cli import compositing, face, media, progress
from lipsync_cli.audio import SR, voice_activity
from lipsync_cli.engine import MouthTrack, SourceFaces, get_engine
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speech import (
    apply_voice,
    check_voice,
    check_words,
    load_speech,
    match_video_loudness,
    soundtrack,
    speaker_voice,
)


@dataclass
class DubResult:
    output: Path
    frames: int
    duration: float
    faces_found: float  # fraction of input frames with a tracked face
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def default_output(video: Path) -> Path:
    return video.with_name(video.stem + ".dubbed.mp4")


def crop_size(M: np.ndarray, size: int) -> int:
    """A crop size at the face's native resolution (no blur from downscaling), within sane bounds."""
    scale = float(np.sqrt(abs(np.linalg.det(M[:, :2]))))  # crop pixels per frame pixel
    native = size / max(scale, 1e-6)
    return int(np.clip(round(native / 16) * 16, 96, 256))


def analyse_video(
    video: Path,
    info: media.VideoInfo,
    settings: Settings,
    workdir: Path,
    keep_frames: bool,
) -> tuple[SourceFaces, np.ndarray | None]:
    """Pass 1: decode, track the face, store aligned crops (and the frames themselves when the timing plan needs
    random access). Returns the source and the frame store (a disk memmap) or None."""
    fps = settings.fps
    cap = info.n_frames(fps) + 2
    raw = np.full((cap, 478, 2), np.nan, np.float32)
    crops = None
    raw_M = np.full((cap, 2, 3), np.nan)
    frames_store = None
    size = 0
    n = 0
    with (
        face.FaceTracker(face_index=settings.face_index) as tracker,
        progress.task("analysing video", cap - 2) as adv,
    ):
        for frame in media.iter_frames(video, fps=fps, ffmpeg=settings.ffmpeg):
            if n >= cap:
                break
            if keep_frames:
                if frames_store is None:
                    frames_store = np.lib.format.open_memmap(
                        workdir / "frames.npy", mode="w+", dtype=np.uint8, shape=(cap, *frame.shape)
                    )
                frames_store[n] = frame
            lm = tracker.update(frame)
            if lm is not None:
                raw[n] = lm
                if crops is None:
                    size = crop_size(face.align_matrix(lm, 128), 128)
                    crops = np.lib.format.open_memmap(
                        workdir / "crops.npy", mode="w+", dtype=np.uint8, shape=(cap, size, size, 3)
                    )
                raw_M[n] = face.align_matrix(lm, size)
                crops[n] = face.warp_to_aligned(frame, raw_M[n], size)
            n += 1
            adv(1)
    if n == 0:
        raise LipsyncError(f"could not decode any frame from {video}")
    found = ~np.isnan(raw[:n, 0, 0])
    if crops is None or not found.any():
        raise LipsyncError(f"no face found in {video}")

    smoothed, matrices = face.align_track(raw[:n], found, size, settings.smooth)
    matrices[~found] = np.nan  # engines and the compositor leave frames without a face alone
    for t in np.flatnonzero(found):
        # re-align the stored crop from its raw pose to the smoothed one (a sub-pixel correction)
        fix = matrices[t] @ np.vstack([face.invert_affine(raw_M[t]), [0, 0, 1]])
        crops[t] = cv2.warpAffine(
            np.ascontiguousarray(crops[t]),
            fix,
            (size, size),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REPLICATE,
        )
    own = None
    if info.has_audio:
        try:
            own = media.read_audio(video, SR, ffmpeg=settings.ffmpeg)
        except LipsyncError:
            own = None
    source = SourceFaces(
        crops=crops[:n], landmarks=smoothed, found=found, matrices=matrices, size=size, audio=own, fps=fps
    )
    return source, (frames_store[:n] if frames_store is not None else None)


def mouth_must_close(
    speech: np.ndarray, n_frames: int, fps: float, text: str | None, spoken: list | None = None
) -> np.ndarray:
    """Frames where the mouth has to be shut: pauses, and bilabials p/b/m from a forced alignment of the speech."""
    close = ~voice_activity(speech, SR, fps=fps, n_frames=n_frames)
    try:
        from lipsync_cli import phones

        ph = spoken if spoken is not None else phones.align_phones(speech, text)
        close |= phones.bilabial_frames(ph, n_frames, fps)
    except LipsyncError:
        pass  # alignment is a refinement; pauses alone still close the mouth
    return close


def iter_plan_frames(
    video: Path, plan: np.ndarray, store: np.ndarray | None, settings: Settings
) -> Iterator[tuple[int, np.ndarray]]:
    """(source index, frame) for every output frame: from the frame store, or re-decoded when the plan only moves
    forward (then memory stays flat whatever the video's length)."""
    if store is not None:
        for b in plan:
            yield int(b), np.array(store[min(int(b), len(store) - 1)])
        return
    last, done = None, 0
    frames = media.iter_frames(video, fps=settings.fps, ffmpeg=settings.ffmpeg)
    for i, frame in zip(range(len(plan)), frames, strict=False):
        last, done = frame, i + 1
        yield int(plan[i]), frame
    frames.close()
    if last is None:
        raise LipsyncError(f"could not decode {video} a second time")
    for i in range(done, len(plan)):
        yield int(plan[i]), last.copy()  # decoding came up a frame short of the probe's count


def render_frames(
    video: Path,
    source: SourceFaces,
    store: np.ndarray | None,
    plan: np.ndarray,
    track: MouthTrack,
    settings: Settings,
) -> Iterator[np.ndarray]:
    """The output frames: each planned input frame with the engine's mouth composited in."""
    aligned = source.aligned_landmarks()
    for i, (b, frame) in enumerate(iter_plan_frames(video, plan, store, settings)):
        s = track.source_index[i]
        if s >= 0 and source.found[b]:
            frame = np.ascontiguousarray(frame)
            compositing.composite(frame, source.matrices[b], track.crop(i, source), track.points[i], aligned[b])
        yield frame


def dub(
    video: Path,
    text: str | None,
    audio: Path | None,
    output: Path | None,
    settings: Settings,
    force: bool = False,
) -> DubResult:
    """Re-animate the mouth in `video` to new speech (TTS of `text` in the person's voice per settings.voice, or the
    file `audio` exactly as given) and write the result."""
    video = Path(video)
    if not video.exists():
        raise LipsyncError(f"no such file: {video}")
    output = Path(output) if output else default_output(video)
    media.check_output(output, video, force)
    check_words(text, audio)
    check_voice(audio, settings)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = media.probe(video)
    fps = settings.fps

    # the voice is learned after the face pass (from the soundtrack it decodes), unless needed before speaking
    voice, voice_known = None, audio is not None
    if not voice_known and (settings.voice_ref is not None or settings.tts == "xtts"):
        own = soundtrack(video, settings) if info.has_audio else None
        voice, voice_known = speaker_voice(settings, own, video.name), True
    speech, spoken = load_speech(text, audio, settings, voice)
    timings["speech"] = time.perf_counter() - t0

    n_src = info.n_frames(fps)
    n_out = max(1, int(round(len(speech) / SR * fps)))
    plan = compositing.timing_plan(n_src, n_out, settings.sync_mode)
    if len(plan) < n_out:  # `cut`: the output ends with the video
        speech = speech[: int(len(plan) / fps * SR)]
    random_access = not np.array_equal(plan, np.arange(len(plan)))

    with tempfile.TemporaryDirectory(prefix="lipsync-") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        source, store = analyse_video(video, info, settings, workdir, keep_frames=random_access)
        plan = np.minimum(plan, source.n_frames - 1)
        timings["analyse"] = time.perf_counter() - t

        t = time.perf_counter()
        if not voice_known:
            voice = speaker_voice(settings, source.audio, video.name)
        speech = apply_voice(speech, voice)  # same length: plan and phone timings stay valid
        timings["voice"] = time.perf_counter() - t

        t = time.perf_counter()
        speech = match_video_loudness(speech, source.audio)
        close = mouth_must_close(speech, len(plan), fps, text if audio is None else None, spoken)
        animate = get_engine(settings.engine, settings)
        track = animate(source, speech, plan, close=close)
        timings["engine"] = time.perf_counter() - t

        t = time.perf_counter()
        wav = workdir / "speech.wav"
        media.write_wav(wav, speech, SR)
        h, w = store.shape[1:3] if store is not None else (info.height, info.width)
        with (
            media.VideoWriter(output, w, h, fps=fps, audio=wav, crf=settings.crf, ffmpeg=settings.ffmpeg) as writer,
            progress.task("rendering", len(plan)) as adv,
        ):
            for frame in render_frames(video, source, store, plan, track, settings):
                writer.write(frame)
                adv(1)
        timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return DubResult(output, len(plan), len(plan) / fps, float(source.found.mean()), timings)
