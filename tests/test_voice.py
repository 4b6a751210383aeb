"""Speaking in the on-screen person's voice: `lipsync voice`, dub's voice options, XTTS errors, voice eval.

The conversion itself (pitch, timbre, exact length on synthetic voices) is tested in test_voice_convert.py.
"""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from lipsync_cli import media, progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings
from lipsync_cli.voice import speech, xtts
from lipsync_cli.voice.speaker import SR, similarity, speaker_embedding
from tests.conftest import run_cli, shared_file

SENTENCE = "We need to finish the project before the end of the month."
KATIE = "media/sadtalker_WDA_KatieHill_000.mp4"


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    line = r.stderr.strip()
    assert r.returncode == 1, r.stderr
    assert line.startswith("error:") and len(line.splitlines()) == 1 and "Traceback" not in line, r.stderr
    assert needle in line, line
    return line


def wav_frames(path: Path) -> tuple[int, int]:
    with wave.open(str(path)) as w:
        return w.getnframes(), w.getframerate()


def make_video(path: Path, audio: str | None, seconds: float = 2.0, video: Path | None = None) -> Path:
    """A short clip: a test pattern (or the first seconds of `video`), with lavfi `audio` or none at all."""
    cmd = [media.ffmpeg_exe(), "-y", "-loglevel", "error"]
    if video is None:
        cmd += ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size=320x240:rate=25"]
    else:
        cmd += ["-t", str(seconds), "-i", str(video)]
    if audio is not None:
        cmd += ["-f", "lavfi", "-t", str(seconds), "-i", audio, "-map", "0:v", "-map", "1:a", "-c:a", "aac"]
    else:
        cmd += ["-an"]
    subprocess.run([*cmd, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-shortest", str(path)], check=True)
    return path


@pytest.fixture
def settings() -> Settings:
    progress.set_quiet(True)
    return Settings(quiet=True)


# ----------------------------------------------------------------------------- lipsync voice


def test_voice_output_is_exactly_as_long_as_the_tts(tmp_path, settings):
    clip = shared_file(KATIE)
    out = tmp_path / "speech.wav"
    r = speech.speak(clip, SENTENCE, out, settings)
    n, sr = wav_frames(out)
    assert sr == SR and n == r.samples == r.tts_samples > SR  # conversion kept the timing sample for sample
    assert r.voice == clip.name
    assert [p.name for p in tmp_path.iterdir()] == ["speech.wav"]  # written atomically: no temp file left


def test_cli_voice_writes_a_wav_and_refuses_to_overwrite(tmp_path):
    clip = shared_file(KATIE)
    out = tmp_path / "speech.wav"
    out.write_bytes(b"keep me")
    one_line_error(run_cli("voice", clip, "Hello.", "-o", out), "--force")
    assert out.read_bytes() == b"keep me"
    one_line_error(run_cli("voice", clip, "Hello.", "-o", tmp_path / "speech.mp3"), "must be a .wav file")
    one_line_error(run_cli("voice", clip, "Hello.", "-o", clip), "over the input")
    r = run_cli("voice", clip, "Hello there, my friend.", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    n, sr = wav_frames(out)
    assert sr == SR and n > SR // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]


def test_converted_voice_is_closer_to_held_out_speech_of_the_person(tmp_path, settings):
    """--voice-ref end to end: learn from the first 60% of a real clip, judge against the rest."""
    clip = shared_file(KATIE)
    audio = media.read_audio(clip, SR)
    cut = int(0.6 * len(audio))
    ref = tmp_path / "ref.wav"
    media.write_wav(ref, audio[:cut], SR)
    target = speaker_embedding(audio[cut:])
    cloned = speech.speak(clip, SENTENCE, tmp_path / "c.wav", settings.with_overrides(voice_ref=ref))
    plain = speech.speak(clip, SENTENCE, tmp_path / "p.wav", settings.with_overrides(voice="tts"))
    assert cloned.voice == str(ref) and plain.voice == "tts"
    sim = {r.voice: similarity(speaker_embedding(media.read_audio(r.output, SR)), target) for r in (cloned, plain)}
    assert sim[str(ref)] > sim["tts"] + 0.03, sim


def test_embedding_is_resemblyzers_without_librosa():
    """speaker.mel_frames replaces resemblyzer's librosa call (seconds of start-up) and voice/ge2e.py its torch
    encoder: same numbers, same embedding as resemblyzer's own embed_utterance."""
    pytest.importorskip("librosa")
    from resemblyzer import VoiceEncoder
    from resemblyzer import audio as resemblyzer_audio

    from lipsync_cli.voice import speaker

    x = speaker.speech_only(media.read_audio(shared_file(KATIE), SR))
    ours, theirs = speaker.mel_frames(x), resemblyzer_audio.wav_to_mel_spectrogram(x)
    assert ours.shape == theirs.shape and np.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    level = np.clip(x * (10 ** (-30 / 20) / np.sqrt(np.mean(x.astype(np.float64) ** 2))), -1, 1)
    reference = VoiceEncoder(device="cpu", verbose=False).embed_utterance(level.astype(np.float32))
    assert similarity(speaker.speaker_embedding(x, vad=False), reference) > 0.9999


# ----------------------------------------------------------------------------- no usable speech


def test_no_usable_speech_is_a_clear_error_unless_fallback_is_allowed(tmp_path):
    tone = make_video(tmp_path / "tone.mp4", "sine=frequency=220")  # sound, but not speech
    line = one_line_error(run_cli("voice", tone, "Hello there.", "-o", tmp_path / "a.wav"), "no usable speech")
    assert "tone.mp4" in line and "--voice-ref" in line and "--voice-fallback" in line
    mute = make_video(tmp_path / "mute.mp4", None)
    one_line_error(run_cli("voice", mute, "Hello there.", "-o", tmp_path / "b.wav"), "no audio track")
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*"))

    r = run_cli("voice", tone, "Hello there.", "-o", tmp_path / "c.wav", "--voice-fallback")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "plain TTS voice" in r.stderr  # shown even with --quiet
    assert wav_frames(tmp_path / "c.wav")[0] > SR // 2


def test_voice_ref_problems_are_clear_errors(tmp_path, settings):
    silent, text = tmp_path / "silent.wav", tmp_path / "notes.wav"
    media.write_wav(silent, np.zeros(5 * SR, np.float32), SR)
    clip = make_video(tmp_path / "clip.mp4", "sine=frequency=220")  # the voice would come from --voice-ref
    text.write_text("not audio at all\n" * 50)
    for ref, needle in [
        (tmp_path / "missing.wav", "file not found"),
        (silent, "holds no usable speech"),
        (text, "(cannot read audio|no audio stream)"),
    ]:
        s = settings.with_overrides(voice_ref=ref, voice_fallback=True)  # a reference given is never skipped
        with pytest.raises(LipsyncError, match=f"--voice-ref {ref}.*{needle}"):
            speech.speak(clip, "Hello.", tmp_path / "out.wav", s)
    assert not (tmp_path / "out.wav").exists()
    one_line_error(run_cli("voice", clip, "Hi.", "--voice", "tts", "--voice-ref", silent), "cannot go with --voice tts")


@pytest.mark.slow
def test_dub_without_speech_to_clone_stops_or_falls_back(tmp_path):
    """A real face over a silent soundtrack: a clear error after the face pass, or the TTS voice if allowed."""
    clip = make_video(tmp_path / "quiet.mp4", "anullsrc=r=16000:cl=mono", video=shared_file("media/pcavs_00086.mp4"))
    out = tmp_path / "out.mp4"
    line = one_line_error(run_cli("dub", clip, "Hello there.", "-o", out), "no usable speech in quiet.mp4")
    assert "0.0 s of speech" in line and not out.exists()
    r = run_cli("dub", clip, "Hello there.", "-o", out, "--voice-fallback", "--json")
    assert r.returncode == 0 and "warning" in r.stderr, r.stderr
    assert media.probe(out).duration > 0.5
    assert json.loads(r.stdout)["voice"] == "tts"  # it said the video's name, though the TTS voice spoke


def test_dub_of_a_mute_video_stops_before_any_work(tmp_path, settings, monkeypatch):
    """No soundtrack and no --voice-ref: the voice cannot be cloned, known from the probe: no TTS, no face pass."""
    from lipsync_cli import dubbing

    def no_work(*args, **kwargs):
        raise AssertionError("the dub started working")

    monkeypatch.setattr(dubbing, "load_speech_full", no_work)
    monkeypatch.setattr(dubbing, "analyse_video", no_work)
    mute, out = make_video(tmp_path / "mute.mp4", None), tmp_path / "out.mp4"
    with pytest.raises(LipsyncError, match="no usable speech in mute.mp4 .it has no audio track.*--voice-fallback"):
        dubbing.dub(mute, "Hello there.", None, out, settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mute.mp4"]


@pytest.mark.slow
def test_audio_driven_dub_keeps_the_audio_as_given(tmp_path):
    """--audio is used as it is: no conversion, even with a --voice-ref (here a missing file) in force."""
    clip = make_video(tmp_path / "talk.mp4", "anullsrc", video=shared_file("media/pcavs_00086.mp4"))
    speech = media.read_audio(shared_file("speech/sadtalker_RD_Radio31_000.wav"), SR)[: 2 * SR]
    wav = tmp_path / "drive.wav"
    media.write_wav(wav, speech, SR)
    out = tmp_path / "out.mp4"
    r = run_cli("dub", clip, "--audio", wav, "-o", out, "--voice-ref", tmp_path / "missing.wav")
    assert r.returncode == 0, r.stderr
    got = media.read_audio(out, SR)[: len(speech)]
    corr = np.correlate(got, speech[: len(got)], "full") / (np.linalg.norm(got) * np.linalg.norm(speech) + 1e-9)
    assert corr.max() > 0.9  # the same waveform (one gain, AAC), not a converted voice


# ----------------------------------------------------------------------------- xtts (not installed here)


def test_xtts_errors_say_what_is_missing(tmp_path, settings):
    recording = tmp_path / "talk.wav"  # never read: the XTTS checks come before any work
    media.write_wav(recording, np.zeros(SR, np.float32), SR)
    with pytest.raises(LipsyncError, match="needs --tts-model-dir"):
        xtts.check(None)
    with pytest.raises(LipsyncError, match="does not exist"):
        xtts.check(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LipsyncError, match="incomplete: missing model.pth, vocab.json$"):
        xtts.check(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(LipsyncError, match="missing speakers_xtts.pth"):
        xtts.check(tmp_path, need_speakers=True)
    try:
        import TTS  # noqa: F401
    except ImportError:
        with pytest.raises(LipsyncError, match=r'pip install "lipsync-cli\[xtts\]"'):
            xtts.check(tmp_path)
        s = settings.with_overrides(tts="xtts", tts_model_dir=tmp_path)
        with pytest.raises(LipsyncError, match="coqui-tts"):  # before any work is done
            speech.speak(recording, "Hello.", tmp_path / "out.wav", s)
    r = run_cli("voice", recording, "Hi.", "--tts", "xtts", "-o", tmp_path / "x.wav")
    one_line_error(r, "--tts-model-dir")


# ----------------------------------------------------------------------------- eval --metric voice


def test_wer():
    from lipsync_cli.eval.voice import wer

    assert wer("The cat, sat.", "the cat sat") == 0.0
    assert wer("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert wer("a b", "a b c d") == 1.0  # two insertions
    assert wer("", "") == 0.0


@pytest.mark.slow
def test_eval_voice_report(tmp_path, settings):
    from lipsync_cli.eval import voice as ev

    videos = shared_file(KATIE)
    run = ev.evaluate_voice(settings, videos=videos, limit=1, texts=[SENTENCE], with_grid=False)
    assert [s.name for s in run.speakers] == [videos.stem]
    sp = run.speakers[0]
    assert len(sp.raw) == len(sp.converted) == len(sp.raw_wer) == len(sp.converted_f0_st) == 1
    assert 0.3 < sp.real <= 1.0 and np.isfinite([sp.raw_ltas_db, sp.converted_ltas_db, sp.raw_f0_st]).all()
    assert sp.on_pitch[0] > 0.5 and abs(sp.pitch_bias_st[0]) < 2  # the conversion lands near the pitch it aims at
    m = run.summary("media")
    assert m["gain"] == pytest.approx(m["converted"] - m["raw"]) and m["speakers"] == 1
    index = ev.write_voice_report(run, tmp_path)
    data = json.loads((tmp_path / "voice.json").read_text())
    assert data["summary"]["media"]["converted"] == pytest.approx(m["converted"])
    assert (tmp_path / "voice_f0.png").stat().st_size > 10_000 and "voice_f0.png" in index.read_text()


def test_more_speech_than_a_dub_takes_is_a_clear_error(tmp_path, monkeypatch):
    """Text or audio beyond MAX_SPEECH_S stops before any work, with one message that says how much and what to
    do (the API and batch files take any length; argv stops at 128 KB)."""
    with pytest.raises(LipsyncError, match=r"characters long .* dub it in parts"):
        speech.check_words("word " * (speech.MAX_TEXT_CHARS // 5 + 1), None)
    speech.check_words("word " * 1000, None)
    wav = tmp_path / "three_seconds.wav"
    media.write_wav(wav, np.zeros(3 * SR, np.float32), SR)
    speech.check_words(None, wav)
    monkeypatch.setattr(speech, "MAX_SPEECH_S", 2.0)
    with pytest.raises(LipsyncError, match=r"lasts 0\.0 hours; a dub speaks at most .* dub it in parts"):
        speech.check_words(None, wav)
