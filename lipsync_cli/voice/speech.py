"""The new speech a dub speaks: an audio file as given, or the text spoken by TTS and moved into the on-screen
person's own voice (learned from their speech in the video, or from --voice-ref). `dub`, `lipsync voice` and
`lipsync eval --metric voice` all go through these functions.

    load_speech(text, audio, settings, voice)  -> 16 kHz speech (+ piper's phones with their timings)
    load_speech_full(...)                      -> the same, plus the speech at its own rate (>= 44.1 kHz) for output
    speaker_voice(settings, own, where)         -> the person's voice (None: the plain TTS voice)
    apply_voice(speech, voice)                  -> the speech in that voice, sample-exact in length
    speak(video, text, output, settings)        -> `lipsync voice`: the speech alone, as a wav

Conversion keeps the length, so a timing plan and phone timings made on the TTS speech stay valid after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape

from lipsync_cli import media, progress
from lipsync_cli.audio import SR, match_loudness, resample, speech_loudness_db, voice_activity
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speaker import MIN_SPEECH_S, speech_mask

TTS_SR = 22050  # piper's (and espeak's) native rate: synthesised there, resampled for analysis and for the output
# the most speech one dub takes: the speech at both rates and the per-frame plans stay in memory (peak RSS grows
# ~0.04 GB a minute of speech: 2.2 GB at 10 minutes, so ~7 GB at this limit; docs/speed.md)
MAX_SPEECH_S = 2 * 3600.0
TTS_CHARS_PER_S = 22  # piper's joe voice, measured on English prose (410 characters: 18.8 s)
MAX_TEXT_CHARS = int(MAX_SPEECH_S * TTS_CHARS_PER_S * 0.95)

if TYPE_CHECKING:
    from lipsync_cli.voice.convert import VoiceProfile


def check_words(text: str | None, audio: Path | None, audio_ok: bool = True) -> None:
    """Exactly one of the new words or an audio file (`audio_ok`: the command takes one), and no more speech than a
    dub takes (MAX_SPEECH_S)."""
    if text is not None and not isinstance(text, str):  # the Python API: dub("talk.mp4", 123)
        raise LipsyncError(f"the words to speak must be text (str), got {type(text).__name__}")
    if audio is not None and text:
        raise LipsyncError("give either text or --audio, not both")
    if audio is None and (text is None or not text.strip()):
        raise LipsyncError("no text to speak: give the new words" + (", or --audio FILE" if audio_ok else ""))
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise LipsyncError(
            f"the text is {len(text):,} characters long (~{len(text) / TTS_CHARS_PER_S / 3600:.1f} hours of speech); "
            f"a dub speaks at most {MAX_TEXT_CHARS:,} (~{MAX_SPEECH_S / 3600:.0f} hours): dub it in parts"
        )
    seconds = media.audio_info(audio)[1] if audio is not None and Path(audio).is_file() else None
    if seconds is not None and seconds > MAX_SPEECH_S:
        raise LipsyncError(
            f"{audio} lasts {seconds / 3600:.1f} hours; a dub speaks at most {MAX_SPEECH_S / 3600:.0f} hours: "
            "dub it in parts"
        )


def output_rate(sr: int) -> int:
    """The output's audio rate for speech at `sr`: its own when that is >= 44.1 kHz, else an easy multiple."""
    return sr if sr >= 44100 else (48000 if 48000 % sr == 0 else 44100)


@dataclass
class Speech:
    analysis: np.ndarray  # 16 kHz mono: what the engine, the voice and the aligner work on
    out: np.ndarray  # the same speech at `out_sr` (>= 44.1 kHz): what the output plays
    out_sr: int
    phones: list | None  # piper's own phones with their timings (exact), else None

    def cut(self, seconds: float) -> None:
        self.analysis = self.analysis[: int(round(seconds * SR))]
        self.out = self.out[: int(round(seconds * self.out_sr))]


def load_speech(
    text: str | None, audio: Path | None, settings: Settings, voice: SpeakerVoice | None = None
) -> tuple[np.ndarray, list | None]:
    """The new speech at 16 kHz (an audio file as given, or TTS of the text) and, for piper TTS, the phones it
    spoke with their timings (exact, so no recogniser is needed to find p/b/m). Only XTTS uses `voice` here
    (it speaks in it directly); piper and espeak speak in their own voice, converted later by `apply_voice`."""
    sp = load_speech_full(text, audio, settings, voice)
    return sp.analysis, sp.phones


def load_speech_full(
    text: str | None, audio: Path | None, settings: Settings, voice: SpeakerVoice | None = None
) -> Speech:
    """`load_speech`, keeping also the speech at its own rate for the output (an audio file's own rate, TTS at its
    native rate), raised to at least 44.1 kHz."""
    check_words(text, audio)
    if audio is not None:
        speech = media.read_audio(audio, SR, ffmpeg=settings.ffmpeg)
        if len(speech) < SR // settings.fps:
            raise LipsyncError(f"{audio} holds no audio")
        sr = output_rate(media.audio_info(audio)[0] or SR)
        return Speech(speech, media.read_audio(audio, sr, ffmpeg=settings.ffmpeg), sr, None)
    from lipsync_cli import phones
    from lipsync_cli.voice import tts

    spoken = None
    if settings.tts == "xtts":
        from lipsync_cli.voice import xtts

        native, rate = xtts.synthesize(text, settings.tts_model_dir, None if voice is None else voice.speech, sr=SR), SR
    elif settings.tts == "piper":
        native, ipa = tts.synthesize_with_phones(text, sr=TTS_SR, progress=not progress.is_quiet())
        rate, spoken = TTS_SR, phones.from_ipa(ipa)
    else:
        native, rate = tts.synthesize(text, sr=TTS_SR, backend=settings.tts, progress=not progress.is_quiet()), TTS_SR
    analysis, sr = resample(native, rate, SR), output_rate(rate)
    if spoken is not None:
        spoken = phones.settle_stops(spoken, analysis)
    return Speech(analysis, resample(native, rate, sr), sr, spoken)


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
            f"[yellow]warning[/]: {escape(why)}; speaking in the plain TTS voice instead (--voice-fallback)",
            highlight=False,
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
    if len(out) != len(speech):  # the timing plan and phone timings were made for the TTS speech's length
        raise RuntimeError(f"voice conversion changed the length: {len(speech)} -> {len(out)} samples")
    return out


def soundtrack(video: Path, settings: Settings) -> np.ndarray | None:
    """The input's own audio at 16 kHz, or None when it has no audio stream (a file nothing can read is an
    error: `lipsync voice notes.txt` said "it has no audio track")."""
    try:
        return media.read_audio(video, SR, ffmpeg=settings.ffmpeg)
    except LipsyncError:
        if media.has_audio(video) is None:
            raise
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


def learn_and_convert(
    settings: Settings, video: Path, has_audio: bool, receive: Callable[[], np.ndarray]
) -> tuple[np.ndarray | None, str]:
    """Learn the person's voice (from --voice-ref, else `video`'s soundtrack), then convert the speech `receive()`
    gives (16 kHz) into it: (converted, where the voice came from), or (None, "tts") for the plain TTS voice
    (--voice-fallback). `dub` runs this in its own process from its start: the voice is learned while the TTS
    speaks, and converted beside the face pass. It imports only what the voice needs."""
    from lipsync_cli.voice.convert import keep_heap

    keep_heap()  # this process's own malloc: harvest's buffers reused, not faulted in afresh
    own = soundtrack(video, settings) if has_audio else None
    voice = speaker_voice(settings, own, video.name)
    if voice is None:
        return None, "tts"
    return apply_voice(receive(), voice), voice.source


@dataclass
class SpeechResult:
    output: Path
    samples: int  # as many as the TTS spoke: conversion never changes the length
    tts_samples: int
    voice: str  # where the voice came from, or "tts"

    def to_json(self) -> dict:
        """Plain JSON types: what `lipsync voice --json` prints."""
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
    media.check_output(output, video, force, suffixes=(".wav",), inputs=(settings.voice_ref,))
    check_words(text, None, audio_ok=False)
    check_voice(None, settings)
    own = soundtrack(video, settings)
    voice = speaker_voice(settings, own, video.name)
    speech, _ = load_speech(text, None, settings, voice)
    n_tts = len(speech)
    speech = match_video_loudness(apply_voice(speech, voice), own)
    media.write_wav(output, speech, SR)
    return SpeechResult(output, len(speech), n_tts, voice.source if voice is not None else "tts")


def loudness_target(own: np.ndarray | None) -> float:
    """The loudness (dB) of the video's own speech, or a sensible level when the video is silent."""
    if own is not None and voice_activity(own, SR).mean() > 0.05:
        return speech_loudness_db(own, SR)
    return -20.0


def match_video_loudness(speech: np.ndarray, own: np.ndarray | None, sr: int = SR) -> np.ndarray:
    """The new speech (at `sr`) as loud as the video's own speech (or a sensible level when the video is silent)."""
    return match_loudness(speech, sr, loudness_target(own))
