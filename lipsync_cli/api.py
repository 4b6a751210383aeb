"""The Python API, in the spirit of whisper: one call for one video, a `Dubber` to keep the models loaded.

    import lipsync_cli as lipsync
    result = lipsync.dub("in.mp4", "Hello there.", output="out.mp4", voice="clone", engine="retrieval")

    with lipsync.Dubber(engine="retrieval") as dubber:  # models load once
        for video, text in jobs:
            print(dubber.dub(video, text).output)

Settings are keyword arguments (the names `lipsync config show` lists); nothing is read from ./lipsync.toml or the
LIPSYNC_* environment unless asked (`config=`, `env=True`). Nothing process-wide changes: quiet mode and the
progress listener hold for the call only, and stderr is never re-routed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lipsync_cli import progress
from lipsync_cli.dubbing import DubResult
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speech import SpeechResult


class Dubber:
    """Loads the models once (face tracker graphs, mouth engine, TTS voice, voice encoder) and dubs many inputs.
    One dub at a time per Dubber (a lock), so one object can serve a queue of requests.

    `config`: a lipsync.toml to start from; `env`: also read LIPSYNC_* variables; `quiet`: no progress bars
    (default: quiet, as a library should be); `**settings`: any setting by name (`engine="neural"`, `crf=20`).
    """

    def __init__(self, config: str | Path | None = None, *, env: bool = False, quiet: bool = True, **settings: Any):
        self.settings = Settings.load(config, env=env, quiet=quiet, **settings)
        self._tracker = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Dubber:
        """A Dubber with a ready Settings object (the CLI's: config file, environment and flags already applied)."""
        dubber = cls.__new__(cls)
        dubber.settings = settings
        dubber._tracker = None
        dubber._lock = threading.Lock()
        return dubber

    def load(self) -> Dubber:
        """Load every model the settings will need now rather than on the first dub (a server's start-up)."""
        s = self.settings
        with self._lock, progress.scope(quiet=s.quiet):
            self._face_tracker()
            from lipsync_cli.engine import retrieval

            retrieval.lips_model(s.lips)
            if s.engine == "neural":
                from lipsync_cli.engine import neural

                neural.load()
            if s.tts == "piper":
                from lipsync_cli.voice import tts

                if tts.piper_available():
                    tts.piper_voice()
            if s.voice == "clone" and s.tts != "xtts":
                from lipsync_cli.voice import ge2e

                ge2e.load()
        return self

    def _face_tracker(self):
        if self._tracker is None:
            from lipsync_cli.face import FaceTracker

            self._tracker = FaceTracker(face_index=self.settings.face_index)
        return self._tracker

    def dub(
        self,
        video: str | Path,
        text: str | None = None,
        *,
        audio: str | Path | None = None,
        output: str | Path | None = None,
        force: bool = False,
        transcript: str | None = None,
        measure: bool = False,
        on_progress: progress.Listener | None = None,
        **settings: Any,
    ) -> DubResult:
        """Make the person in `video` say `text` (or the speech in `audio`, whose words `transcript` may give: text
        or a text file); writes `output` (default <video>.dubbed.mp4). `measure`: re-track the output and fill
        `result.articulation` (see measure_articulation). `on_progress(stage, done, total)` is called as each stage
        advances; `**settings` override this Dubber's settings for this call. Raises LipsyncError with a one-line
        reason on bad input."""
        from lipsync_cli.dubbing import dub, read_transcript

        s = self.settings.with_overrides(**settings)
        words = text if audio is None else read_transcript(transcript)
        if measure and not (words or "").strip():  # before any work
            raise LipsyncError("measuring articulation needs the words: give text, or a transcript with the audio")
        with self._lock, progress.scope(quiet=s.quiet, listener=on_progress):
            result = dub(
                Path(video),
                text,
                None if audio is None else Path(audio),
                None if output is None else Path(output),
                s,
                force=force,
                transcript=transcript,
                tracker=self._face_tracker(),
            )
            return measure_articulation(result, words) if measure else result

    def speak(
        self, video: str | Path, text: str, *, output: str | Path | None = None, force: bool = False, **settings: Any
    ) -> SpeechResult:
        """`text` spoken in the voice of the person in `video`, as a wav (what `dub` puts on its soundtrack)."""
        from lipsync_cli.voice.speech import speak

        s = self.settings.with_overrides(**settings)
        with self._lock, progress.scope(quiet=s.quiet):
            return speak(Path(video), text, None if output is None else Path(output), s, force=force)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def __enter__(self) -> Dubber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_articulation(result: DubResult, words: str | None) -> DubResult:
    """Does the output say the words? The articulation stick of `lipsync eval --metric articulation` on the OUTPUT
    video (face mesh re-tracked, `words` force-aligned to its own soundtrack): share of p/b/m closed (`bilabial`),
    open-vowel / closure aperture (`contrast`), pauses at rest (`silence`), in `result.articulation`.
    LipsyncError when the words are unknown (an --audio dub without a transcript)."""
    from lipsync_cli.eval.articulation import measure

    if not (words or "").strip():
        raise LipsyncError("measuring articulation needs the words: give text, or a transcript with the audio")
    scores = measure(result.output, words).scores
    keys = ("bilabial", "contrast", "silence", "n_bilabial", "n_open", "n_silence", "face_frames")
    result.articulation = {k: float(scores[k]) for k in keys}
    return result


def dub(
    video: str | Path,
    text: str | None = None,
    *,
    audio: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    transcript: str | None = None,
    measure: bool = False,
    config: str | Path | None = None,
    quiet: bool = True,
    **settings: Any,
) -> DubResult:
    """One dub with the given settings (see Dubber.dub); for many inputs, a Dubber keeps the models loaded."""
    with Dubber(config, quiet=quiet, **settings) as dubber:
        return dubber.dub(video, text, audio=audio, output=output, force=force, transcript=transcript, measure=measure)


def speak(
    video: str | Path,
    text: str,
    *,
    output: str | Path | None = None,
    force: bool = False,
    config: str | Path | None = None,
    quiet: bool = True,
    **settings: Any,
) -> SpeechResult:
    """`text` in the voice of the person in `video`, as a wav (see Dubber.speak)."""
    with Dubber(config, quiet=quiet, **settings) as dubber:
        return dubber.speak(video, text, output=output, force=force)
