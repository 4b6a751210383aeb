"""The dubbing pipeline, as plain functions the CLI (and the benchmark) call.

text --voice.tts--> speech                                        (or --audio FILE, used exactly as given)
video --media.iter_frames--> frames --face.FaceTracker--> landmarks + aligned lower-face crops   (pass 1)
speech --voice.convert (towards the person's own speech in the video, or --voice-ref)--> their voice, same timing
speech (loudness matched to the video's own) + crops --engine.animate--> a mouth per output frame
frames (again, in timing-plan order) + mouths --render.composite--> media.VideoWriter (+ speech) -> output.mp4

Voice conversion keeps the speech sample-exact in length, so the timing plan and piper's phone timings (which
close the mouth on p/b/m) decided before it stay valid. It runs after the face pass so that a video without a face
is reported as such before its soundtrack is judged; a --voice-ref recording (and XTTS, which needs the voice
before it can speak) is read and checked before any work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from lipsync_cli import audio as A
from lipsync_cli import face, media, progress, render
from lipsync_cli.engine import MouthTrack, SourceFaces, get_engine
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speaker import MIN_SPEECH_S, speech_mask

if TYPE_CHECKING:
    from lipsync_cli.voice.convert import VoiceProfile

SR = A.SR
VIDEO_OUT = (".mp4", ".m4v", ".mov")


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

    def to_json(self) -> dict:
        """Plain JSON types (paths as text): what `lipsync dub --json` prints."""
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def default_output(video: Path) -> Path:
    return video.with_name(video.stem + ".dubbed.mp4")


def check_output(output: Path, video: Path, force: bool, suffixes: tuple[str, ...] = VIDEO_OUT) -> None:
    """Refuse before any work is done: overwriting without --force, writing over the input, unwritable folder."""
    if output.resolve() == video.resolve():
        raise LipsyncError(f"refusing to write the output over the input {video}")
    if output.suffix.lower() not in suffixes:
        kind = "an .mp4 (or .mov)" if suffixes == VIDEO_OUT else " or ".join(suffixes)
        raise LipsyncError(f"output must be {kind} file, got {output.name}")
    if output.exists() and not force:
        raise LipsyncError(f"{output} exists; use --force to overwrite it")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise LipsyncError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise LipsyncError(f"output folder {folder} is not writable")


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
    tracker: face.FaceTracker | None = None,
) -> tuple[SourceFaces, np.ndarray | None]:
    """Pass 1: decode, track the face, store aligned crops (and the frames themselves when the timing plan needs
    random access). Returns the source and the frame store (a disk memmap) or None. A `tracker` given is reset
    and reused (its graphs stay loaded: the API's Dubber), else one is made for this video."""
    fps = settings.fps
    cap = info.n_frames(fps) + 2
    raw = np.full((cap, 478, 2), np.nan, np.float32)
    crops = None
    raw_M = np.full((cap, 2, 3), np.nan)
    frames_store = None
    size = 0
    n = 0
    if tracker is not None:
        tracker.reset()
        tracker.face_index = settings.face_index
    with (
        contextlib.nullcontext(tracker) if tracker is not None else face.FaceTracker(settings.face_index) as tracker,
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

    smoothed = face.smooth_landmarks(raw[:n], found, settings.smooth)
    matrices = np.full((n, 2, 3), np.nan)
    for t in np.flatnonzero(found):
        matrices[t] = face.align_matrix(smoothed[t], size)
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


def check_words(text: str | None, audio: Path | None) -> None:
    """Exactly one of the new words or an audio file."""
    if audio is not None and text:
        raise LipsyncError("give either text or --audio, not both")
    if audio is None and (text is None or not text.strip()):
        raise LipsyncError("no text to speak: give the new words, or --audio FILE")


def load_speech(
    text: str | None, audio: Path | None, settings: Settings, voice: SpeakerVoice | None = None
) -> tuple[np.ndarray, list | None]:
    """The new speech at 16 kHz (an audio file as given, or TTS of the text) and, for piper TTS, the phones it
    spoke with their timings (exact, so no recogniser is needed to find p/b/m). Only XTTS uses `voice` here
    (it speaks in it directly); piper and espeak speak in their own voice, converted later by `apply_voice`."""
    check_words(text, audio)
    if audio is not None:
        speech = media.read_audio(audio, SR, ffmpeg=settings.ffmpeg)
        if len(speech) < SR // settings.fps:
            raise LipsyncError(f"{audio} holds no audio")
        return speech, None
    from lipsync_cli import phones
    from lipsync_cli.voice import tts

    if settings.tts == "xtts":
        from lipsync_cli.voice import xtts

        return xtts.synthesize(text, settings.tts_model_dir, None if voice is None else voice.speech, sr=SR), None
    if settings.tts == "piper":
        speech, spoken = tts.synthesize_with_phones(text, sr=SR, progress=not progress.is_quiet())
        return speech, phones.from_ipa(spoken)
    return tts.synthesize(text, sr=SR, backend=settings.tts, progress=not progress.is_quiet()), None


# ---------------------------------------------------------------------------------------------------- voice


@dataclass
class SpeakerVoice:
    """The on-screen person's voice, learned from their own speech."""

    speech: np.ndarray  # their speech frames only (VAD'd, 16 kHz): what XTTS clones from
    profile: VoiceProfile | None  # what voice.convert needs (None with XTTS, which clones by itself)
    source: str  # where it was learned from, for messages


def read_voice_ref(path: Path, settings: Settings) -> np.ndarray:
    """The --voice-ref recording at 16 kHz; a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise LipsyncError(f"--voice-ref {path}: {'not a file' if path.exists() else 'file not found'}")
    try:
        return media.read_audio(path, SR, ffmpeg=settings.ffmpeg)
    except LipsyncError as e:
        raise LipsyncError(f"--voice-ref {path}: {e}") from None


def learn_voice(audio: np.ndarray, source: str, settings: Settings) -> SpeakerVoice:
    """The voice in `audio` (its speech frames only: silence and music are not the speaker).
    LipsyncError with the reason when there is too little speech to learn from."""
    mask = speech_mask(audio)
    seconds = mask.sum() / SR
    if seconds < MIN_SPEECH_S:
        raise LipsyncError(f"{seconds:.1f} s of speech found, need {MIN_SPEECH_S:g} s")
    if settings.tts == "xtts":
        return SpeakerVoice(audio[mask], None, source)
    from lipsync_cli.voice.convert import voice_profile

    with progress.task("learning the voice", 1) as advance:
        try:
            profile = voice_profile(audio)  # VADs the audio itself, as the benchmarks measured it
        except LipsyncError:
            raise LipsyncError(f"{seconds:.1f} s of speech found, but too little of it voiced") from None
        advance(1)
    return SpeakerVoice(audio[mask], profile, source)


def speaker_voice(settings: Settings, own: np.ndarray | None, where: str) -> SpeakerVoice | None:
    """The voice to speak in: learned from --voice-ref, else from `own` (the soundtrack of `where`). None means
    the plain TTS voice: --voice tts, or no usable speech when --voice-fallback allows it (with a warning)."""
    if settings.voice == "tts":
        return None
    if settings.voice_ref is not None:  # asked for explicitly: its problems are always errors
        ref = read_voice_ref(settings.voice_ref, settings)
        try:
            return learn_voice(ref, str(settings.voice_ref), settings)
        except LipsyncError as e:
            raise LipsyncError(f"--voice-ref {settings.voice_ref} holds no usable speech ({e})") from None
    try:
        if own is None:
            raise LipsyncError("it has no audio track")
        return learn_voice(own, where, settings)
    except LipsyncError as e:
        why = f"cannot speak in the person's voice: no usable speech in {where} ({e})"
    if settings.voice_fallback:
        progress.console.print(  # a warning, not chatter: shown even with --quiet
            f"[yellow]warning[/]: {why}; speaking in the plain TTS voice instead (--voice-fallback)", highlight=False
        )
        return None
    raise LipsyncError(f"{why}; pass --voice-ref FILE (a recording of the person), --voice tts or --voice-fallback")


def apply_voice(speech: np.ndarray, voice: SpeakerVoice | None) -> np.ndarray:
    """TTS speech converted to the person's voice, exactly as long as it was (None / XTTS: unchanged)."""
    if voice is None or voice.profile is None:
        return speech
    from lipsync_cli.voice.convert import convert

    with progress.task("converting the voice", 1) as advance:
        out = convert(speech, voice.profile)
        advance(1)
    assert len(out) == len(speech), "voice conversion must keep the timing"
    return out


def soundtrack(video: Path, settings: Settings) -> np.ndarray | None:
    """The input's own audio at 16 kHz, or None when it has none."""
    try:
        return media.read_audio(video, SR, ffmpeg=settings.ffmpeg)
    except LipsyncError:
        return None


def check_voice(audio: Path | None, settings: Settings) -> None:
    """Problems with the voice settings that need no decoding: before any work."""
    if audio is None and settings.tts == "xtts":
        from lipsync_cli.voice import xtts

        xtts.check(settings.tts_model_dir, need_speakers=settings.voice == "tts")
    if audio is None and settings.voice == "clone" and settings.voice_ref is not None:
        p = Path(settings.voice_ref)
        if not p.is_file():
            raise LipsyncError(f"--voice-ref {p}: {'not a file' if p.exists() else 'file not found'}")


@dataclass
class SpeechResult:
    output: Path
    samples: int  # as many as the TTS spoke: conversion never changes the length
    tts_samples: int
    voice: str  # where the voice came from, or "tts"

    def to_json(self) -> dict:
        return {"output": str(self.output), "seconds": self.samples / SR, "samples": self.samples, "voice": self.voice}


def default_speech_output(video: Path) -> Path:
    return video.with_name(video.stem + ".voice.wav")


def speak(video: Path, text: str, output: Path | None, settings: Settings, force: bool = False) -> SpeechResult:
    """`lipsync voice`: `text` spoken in the voice of the person in `video` (any file with their speech), as a
    16-bit wav as loud as their own speech, written atomically. What `dub` would put on its audio track."""
    video = Path(video)
    if not video.exists():
        raise LipsyncError(f"no such file: {video}")
    output = Path(output) if output else default_speech_output(video)
    check_output(output, video, force, suffixes=(".wav",))
    check_words(text, None)
    check_voice(None, settings)
    own = soundtrack(video, settings)
    voice = speaker_voice(settings, own, video.name)
    speech, _ = load_speech(text, None, settings, voice)
    n_tts = len(speech)
    speech = match_video_loudness(apply_voice(speech, voice), own)
    media.write_wav(output, speech, SR)
    return SpeechResult(output, len(speech), n_tts, voice.source if voice is not None else "tts")


def match_video_loudness(speech: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """The new speech as loud as the video's own speech (or a sensible level when the video is silent)."""
    target = -20.0
    if own is not None and A.voice_activity(own, SR).mean() > 0.05:
        target = A.speech_loudness_db(own, SR)
    return A.match_loudness(speech, SR, target)


def mouth_must_close(
    speech: np.ndarray, n_frames: int, fps: float, text: str | None, spoken: list | None = None
) -> np.ndarray:
    """Frames where the mouth has to be shut: pauses, and bilabials p/b/m from a forced alignment of the speech."""
    close = ~A.voice_activity(speech, SR, fps=fps, n_frames=n_frames)
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
            render.composite(frame, source.matrices[b], track.crop(i, source), track.points[i], aligned[b])
        yield frame


def dub(
    video: Path,
    text: str | None,
    audio: Path | None,
    output: Path | None,
    settings: Settings,
    force: bool = False,
    tracker: face.FaceTracker | None = None,
) -> DubResult:
    """Re-animate the mouth in `video` to new speech (TTS of `text` in the person's voice per settings.voice, or the
    file `audio` exactly as given) and write the result. `tracker`: a FaceTracker to reuse (see analyse_video)."""
    video = Path(video)
    if not video.exists():
        raise LipsyncError(f"no such file: {video}")
    output = Path(output) if output else default_output(video)
    check_output(output, video, force)
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
    plan = render.timing_plan(n_src, n_out, settings.sync_mode)
    if len(plan) < n_out:  # `cut`: the output ends with the video
        speech = speech[: int(len(plan) / fps * SR)]
    random_access = not np.array_equal(plan, np.arange(len(plan)))

    with tempfile.TemporaryDirectory(prefix="lipsync-") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        source, store = analyse_video(video, info, settings, workdir, keep_frames=random_access, tracker=tracker)
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
    spoke = "audio" if audio is not None else voice.source if voice is not None else "tts"
    return DubResult(
        output, len(plan), len(plan) / fps, float(source.found.mean()), timings, video, settings.engine, spoke
    )
