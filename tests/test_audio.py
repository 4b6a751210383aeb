"""audio.py on synthetic signals with known answers, plus VAD against GRID's word alignments."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync_cli import audio

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def vowel(seconds: float, sr: int = SR, f0: float = 120.0, amp: float = 0.3) -> np.ndarray:
    """A crude voiced sound: harmonics of f0 with a formant-ish tilt and a syllable-rate wobble."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 30))
    return (amp * x / np.abs(x).max() * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)).astype(np.float32)


def test_resample_keeps_frequency_and_length():
    x = tone(1000, 1.0, sr=44100)
    y = audio.resample(x, 44100, SR)
    assert len(y) == SR and y.dtype == np.float32
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spec) * SR / len(y) - 1000) <= 1
    assert audio.resample(x, 44100, 44100) is not x


def test_to_mono_layouts():
    st = np.stack([tone(440, 0.1), np.zeros(1600, np.float32)])
    assert audio.to_mono(st).shape == (1600,)  # (ch, n) as PyAV gives
    assert audio.to_mono(st.T).shape == (1600,)  # (n, ch) as soundfile gives
    np.testing.assert_allclose(audio.to_mono(st.T), st[0] / 2, atol=1e-7)


def test_envelope_and_vad_tone_then_silence():
    x = np.concatenate([tone(1000, 1.0), np.zeros(SR, np.float32)])
    env = audio.rms_envelope(x, SR, fps=25, n_frames=50)
    assert env.shape == (50,)
    np.testing.assert_allclose(env[1:24], 20 * np.log10(0.5 / np.sqrt(2)), atol=0.1)
    assert np.all(env[26:] == -90.0)
    vad = audio.voice_activity(x, SR, fps=25, n_frames=50)
    assert vad[:25].all() and not vad[28:].any()


def test_vad_silence_and_pure_noise_are_not_speech():
    assert not audio.voice_activity(np.zeros(2 * SR, np.float32), SR).any()
    noise = np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32) * 0.05
    assert not audio.voice_activity(noise, SR).any()
    assert audio.voice_activity(np.zeros(0, np.float32), SR).shape == (0,)


@pytest.mark.parametrize("snr_db", [30, 10])
def test_vad_finds_voiced_bursts_in_noise(snr_db):
    gap = np.zeros(SR // 2, np.float32)
    x = np.concatenate([gap, vowel(1.0), gap, vowel(0.6), gap])
    truth = np.abs(x) > 0
    noise = np.random.default_rng(1).standard_normal(len(x)).astype(np.float32)
    x = x + noise * np.sqrt(np.mean(x[truth] ** 2) / 10 ** (snr_db / 10))
    n = int(len(x) / SR * 25)
    ref = truth[(np.arange(n) * SR / 25).astype(int)]
    assert (audio.voice_activity(x, SR, n_frames=n, hangover_s=0.0) == ref).mean() >= 0.9
    vad = audio.voice_activity(x, SR, n_frames=n)  # default: a hangover of ~2 frames either side
    assert vad[ref].all() and (vad & ~ref).sum() <= 4 * 3


def test_match_loudness_hits_target_and_never_clips():
    x = np.concatenate([np.zeros(SR // 2, np.float32), vowel(1.5, amp=0.05), np.zeros(SR, np.float32)])
    for target in (-30.0, -20.0, -12.0):
        y = audio.match_loudness(x, SR, target)
        assert abs(audio.speech_loudness_db(y, SR) - target) < 0.5
        assert np.abs(y).max() <= 0.97 + 1e-6
    y = audio.match_loudness(x, SR, -3.0, peak=0.5)  # unreachable without limiting hard
    assert np.abs(y).max() <= 0.5 + 1e-6


def test_loudness_piecewise_is_one_pass(monkeypatch):
    """Long speech is measured and limited in pieces (bounded memory): the result is that of one pass over the
    whole signal, limiter included where a peak sits on a piece boundary (up to its running average's rounding)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([vowel(1.0, amp=a) for a in rng.uniform(0.05, 0.3, 8)])
    x[::3001] *= 3.0  # isolated peaks everywhere, some on the boundaries of 5000-sample pieces
    x[5000] = 0.9
    whole = audio.match_loudness(x, SR, -12.0), audio.speech_loudness_db(x, SR)
    monkeypatch.setattr(audio, "PIECE", 5000)
    pieces = audio.match_loudness(x, SR, -12.0), audio.speech_loudness_db(x, SR)
    assert pieces[1] == whole[1]  # no limiter: exact
    assert np.abs(pieces[0] - whole[0]).max() <= 1e-7
    assert np.mean(pieces[0] != whole[0]) < 1e-3


def test_speech_loudness_ignores_pauses():
    v = vowel(1.0)
    short = np.concatenate([v, np.zeros(SR // 4, np.float32)])
    long = np.concatenate([np.zeros(2 * SR, np.float32), v, np.zeros(3 * SR, np.float32)])
    assert abs(audio.speech_loudness_db(short, SR) - audio.speech_loudness_db(long, SR)) < 0.5
    assert audio.speech_loudness_db(np.zeros(SR, np.float32), SR) == -90.0


def test_mel_of_tone_peaks_in_its_band():
    m = audio.mel_spectrogram(tone(1000, 1.0))
    assert m.shape == (101, 80)  # 100 rows/s, centred frames: 1 + n // hop
    fb = audio.mel_filterbank(SR, 512, 80, 55, 7600)
    centres = np.argmax(fb, axis=1) * SR / 512
    band = int(np.argmax(m[20:80].mean(axis=0)))
    assert abs(centres[band] - 1000) < 60


def test_mel_and_mfcc_match_librosa():
    librosa = pytest.importorskip("librosa")
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    ref = librosa.feature.melspectrogram(
        y=x, sr=SR, n_fft=512, win_length=400, hop_length=160, n_mels=80, fmin=55, fmax=7600, pad_mode="constant"
    )
    np.testing.assert_allclose(audio.mel_spectrogram(x), np.log10(np.maximum(ref.T, 1e-10)), atol=1e-4)
    ref_mfcc = librosa.feature.mfcc(S=librosa.power_to_db(ref, ref=1.0, top_db=None), n_mfcc=13)
    np.testing.assert_allclose(audio.mfcc(x), ref_mfcc.T, atol=1e-2)


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_frames_to_video_alignment_is_exact(fps):
    x = np.zeros(3 * SR, np.float32)
    x[SR] = 1.0  # an impulse at t = 1.0 s
    feat = audio.mel_spectrogram(x)
    n = int(3 * fps)
    per_frame = audio.frames_to_video(feat, n, fps=fps)
    assert per_frame.shape == (n, 80)
    assert int(np.argmax(per_frame.mean(axis=1))) == int(fps)  # the frame at t = 1.0 s
    ctx = audio.frames_to_video(feat, n, fps=fps, context=2)
    assert ctx.shape == (n, 5 * 80)
    np.testing.assert_array_equal(ctx[:, 2 * 80 : 3 * 80], per_frame)
    np.testing.assert_array_equal(ctx[0, :80], feat[0])  # edge-padded before the start


def test_normalise_utterance_uses_speech_rows():
    rng = np.random.default_rng(0)
    speech = rng.normal(3.0, 2.0, size=(200, 13)).astype(np.float32)
    silence = np.full((300, 13), -10.0, np.float32)
    a = audio.normalise_utterance(speech)
    b = audio.normalise_utterance(np.concatenate([silence, speech]))[300:]
    np.testing.assert_allclose(a.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(a.std(axis=0), 1, atol=1e-3)
    np.testing.assert_allclose(a, b, atol=1e-4)  # the pauses did not shift the statistics


def grid_audio(video) -> np.ndarray:
    """The soundtrack of a GRID .mpg as 16 kHz mono float32."""
    av = pytest.importorskip("av")
    with av.open(str(video)) as c:
        stream = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray() for f in c.decode(stream)], axis=1)
        rate = stream.rate
    x = x.astype(np.float32) / 32768 if x.dtype.kind == "i" else x.astype(np.float32)
    return audio.resample(audio.to_mono(x), rate, SR)


def grid_words(align) -> list[tuple[float, float, str]]:
    rows = [line.split() for line in align.read_text().splitlines() if line.strip()]
    return [(int(a) / 25000, int(b) / 25000, w) for a, b, w in rows]


@pytest.mark.parametrize("clip", ["bbaf2n", "lbak3a", "sbaa6p"])
def test_vad_agrees_with_grid_alignment(shared, clip):
    video, align = shared / f"corpus/grid/s1/video/{clip}.mpg", shared / f"corpus/grid/s1/align/{clip}.align"
    if not video.exists() or not align.exists():
        pytest.skip(f"GRID clip {clip} absent")
    truth = np.zeros(75, bool)
    for s, e, w in grid_words(align):
        if w not in ("sil", "sp"):
            truth[int(np.floor(s * 25 + 0.5)) : int(np.floor(e * 25 + 0.5))] = True
    vad = audio.voice_activity(grid_audio(video), SR, fps=25, n_frames=75)
    assert (vad == truth).mean() >= 0.85
