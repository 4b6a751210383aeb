"""Voice conversion: make TTS speech sound like the on-screen speaker, keeping its timing sample-exact.

Driven by a few seconds of the speaker's own speech (VAD'd): WORLD analysis (pyworld: harvest F0, CheapTrick
envelope) and the speaker's GE2E embedding (resemblyzer's encoder, in numpy: voice/ge2e.py); nothing is trained
or downloaded.
The TTS waveform itself is modified, never resynthesised, in three steps:

* pitch: voiced log-F0 is mapped to the speaker's centre and spread (median / MAD: octave errors are common), by
  TD-PSOLA on the TTS's own glottal pulses;
* warp: the spectral envelope is frequency-warped (formant scaling) by the factor that maximises GE2E similarity
  to the speaker's reference, and its long-term average is equalised to the speaker's (timbre, mic, room);
* shape: two smooth gain curves (voiced / other frames, 32 cosines on the mel axis each) fitted by gradient
  ascent on the GE2E cosine to the reference embedding, through the encoder itself (see `shaping_gain`).

All are STFT filters on the PSOLA output (hop 5 ms) and keep the input length exactly: lip-sync timing is decided
before this stage. Methods: "shape" (default, all three), "warp" (no shaping gain), "f0" (pitch only).

Why (benchmarks/voice_clone.py: 12 real speakers, GE2E cosine to HELD-OUT speech of each, 3 piper sentences;
mean gain over raw TTS 0.514): pitch alone -0.02, warp + EQ +0.03 (WER -1 point), "shape" +0.19 (every speaker
+0.08..+0.30; WER +2.5 points; 0.46 CPU s per s on 3 s sentences, 0.20 on a 33 s text, as the gains are fitted on
the first EXCERPT_S only). Its freedom was chosen by the held-out score: one curve of 6 / 12 / 20 / 32 cosines gave
+0.08 / +0.12 / +0.14 / +0.16, voiced / other curves +0.02-0.03 more; a strong L2 pull (0.1) only +0.08.
The same encoder family guides and scores "shape", so the benchmark also checks without GE2E: the long-term
spectrum's distance to held-out speech falls from 5.6 dB (raw) and 5.0 (warp) to 4.0 dB (the speaker's own
reference is 3.4 dB from it). Without the spectrum anchor (one 32-cosine curve) it reached +0.19 too, but
5.1 dB away: part of it was encoder-specific, hence SHAPE_LTAS (which costs ~0.015 GE2E).
Tried and dropped (same benchmark): kNN frame selection of the speaker's envelopes (kNN-VC style on INCA-aligned
mel-cepstra: +0.04 alone, +0.06 with warp, at +1 to +10 WER points: 2-8 s of reference hold too few frames per
phone; +0.005 on top of a 12-cosine "shape") and WORLD vocoder resynthesis (piper speech through WORLD alone
loses 0.02-0.05 to every target; +0.04 vs +0.06 for the same envelopes on PSOLA + filter).
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.signal as ss
from scipy.ndimage import gaussian_filter1d, uniform_filter1d

from lipsync_cli.errors import LipsyncError
from lipsync_cli.voice import ge2e
from lipsync_cli.voice.speaker import (
    LEVEL_DBFS,
    MEL_HOP,
    SR,
    hz_to_mel,
    mel_filters,
    mel_frames,
    one_thread,
    power_frames,
    similarity,
    speaker_embedding,
    speech_only,
)

with warnings.catch_warnings():  # pyworld imports pkg_resources and warns about it
    warnings.simplefilter("ignore")
    import pyworld as pw

FRAME_MS = 5.0
HOP = int(SR * FRAME_MS / 1000)  # 80 samples per WORLD frame
FFT = 1024  # CheapTrick FFT at 16 kHz: 513 envelope bins
F0_FLOOR, F0_CEIL = 60.0, 600.0
# the TTS's excursions beyond this many spreads land at the speaker's own this-many-spreads point: piper's start of
# "Bob bought..." reads 240-290 Hz (4.6 spreads over its 110 Hz), which an expressive speaker's spread (sakthivel,
# 6 semitones) sent to the 600 Hz ceiling: PSOLA 5x up, a garbled first word (eval: 1.0 octave low, 55% on pitch)
Z_MAX = 2.0
MAX_REF_S = 60.0  # speech analysed for a profile
MIN_VOICED = 100  # 0.5 s of voiced frames: below this F0 statistics mean nothing
METHODS = ("shape", "warp", "f0")
DEFAULT_METHOD = "shape"
# The formant warp of the (adult male) TTS voice: up only, as for a shorter vocal tract. Down (0.90-0.95) had been
# chosen for two voices (GRID s26, a man; d20, a woman) whose held-out GE2E was no lower at 1.0
ALPHAS = np.round(np.arange(1.0, 1.251, 0.05), 2)
# GE2E similarity a warp must buy per unit of log alpha: on a man's voice the encoder's score over the grid is flat
# within ~0.01 (GRID s1: 0.47-0.51) and a bare argmax landed on the grid's end (1.25), formants moved 25% for
# nothing (held-out GE2E 0.70 vs 0.72 at 1.0; recogniser WER 25 vs 15%); women's and children's scores rise by
# 0.05-0.12 towards 1.2-1.25, and they keep their warp
ALPHA_COST = 0.1
PART_S = 20.0  # longer speech is converted (and analysed) in parts of about this many seconds: `parts`, `pitch`
CUT_S = 3.0  # a part ends on the quietest unvoiced frame within this many seconds of PART_S
BLOCK_MARGIN_S = 1.0  # `pitch` analyses each block with this much of its neighbours on either side
EXCERPT_S = 4.0  # speech the warp and the shaping gain are fitted on; longer input reuses them
SHAPE_COSINES = 32  # each shaping gain curve is a sum of this many cosines along the mel axis (40 mel bands)
SHAPE_STEPS = 15  # Adam steps
SHAPE_LR = 0.1
SHAPE_L2 = 0.01  # pull of the cosine weights towards 0 (flat gain)
SHAPE_MAX_DB = 15.0  # the gain never boosts or cuts more than this
SHAPE_LTAS = 0.003  # weight of the long-term spectrum anchor (per dB^2 of mean squared mel-band deviation)


@dataclass
class VoiceProfile:
    """What conversion needs to know about a speaker, from their own speech (VAD'd)."""

    f0_mean_log: float  # centre of voiced log-F0 (Hz): the median, robust to octave errors
    f0_std_log: float  # its spread (1.48 MAD, i.e. a std when log-F0 is normal)
    envelope_mean: np.ndarray  # (513,) mean log spectral envelope of voiced frames
    embedding: np.ndarray  # (256,) GE2E embedding
    speech_seconds: float
    ltas: np.ndarray  # (40,) long-term average spectrum in the GE2E encoder's mel bands, dB, level removed


def keep_heap() -> None:
    """Have glibc's malloc keep freed memory for reuse in this process: blocks up to 32 MB come from the heap
    (M_MMAP_THRESHOLD) and the heap's free top goes back to the system only past 64 MB (M_TRIM_THRESHOLD).

    harvest allocates and frees FFT buffers of a few MB for each of its ~130 F0 channels; by default each came
    fresh from the system and was zero-filled page by page (a million page faults in a dub). Learning the voice
    and converting the 19 s bench speech: 2.2 -> 0.8 s of system CPU, 8.8 -> 7.0 s in all (docs/speed.md,
    "Session 19"). A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc's, or AttributeError
    except (OSError, AttributeError):
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest)
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


def analyse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WORLD analysis at 5 ms: F0 (`pitch`) and log spectral envelope (`envelope`)."""
    f0 = pitch(x)
    return f0, envelope(x, f0)


def pitch(x: np.ndarray) -> np.ndarray:
    """F0 per 5 ms frame, 0 where unvoiced (harvest: its voicing is cleaner than dio's on TTS). Harvest holds
    ~14 MB per second it analyses at once (3 minutes of speech: 2.6 GB), so speech longer than `PART_S`
    is analysed in blocks of that length, each with `BLOCK_MARGIN_S` of its neighbours on either side (on 34 s of
    TTS: every frame voiced as in one pass, F0 within 0.1 semitone)."""
    x = np.ascontiguousarray(x, np.float64)
    block, margin = (int(s * SR) // HOP * HOP for s in (PART_S, BLOCK_MARGIN_S))
    if len(x) <= block + 2 * margin:
        return pw.harvest(x, SR, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=FRAME_MS)[0]
    n, parts = len(x) // HOP + 1, []
    for a in range(0, len(x), block):
        lo = max(0, a - margin)
        f0 = pitch(x[lo : min(len(x), a + block + margin)])
        parts.append(f0[(a - lo) // HOP :][: min(block // HOP, n - a // HOP)])
    return np.concatenate(parts)


def envelope(x: np.ndarray, f0: np.ndarray) -> np.ndarray:
    """Log spectral envelope (CheapTrick) per 5 ms frame of `x`, whose F0 is `f0`."""
    t = np.arange(len(f0)) * FRAME_MS / 1000
    return np.log(pw.cheaptrick(np.ascontiguousarray(x, np.float64), f0, t, SR, fft_size=FFT) + 1e-16)


def voice_profile(reference16k: np.ndarray) -> VoiceProfile:
    """Profile of the speaker in `reference16k` (their speech frames only; LipsyncError when there are too few)."""
    x = speech_only(reference16k)[: int(MAX_REF_S * SR)]
    f0, L = analyse(x)
    v = f0 > 0
    if v.sum() < MIN_VOICED:
        raise LipsyncError("no usable speech in the reference audio (too little voiced speech to learn the voice from)")
    mu, sd = log_f0_stats(f0)
    return VoiceProfile(
        f0_mean_log=mu,
        f0_std_log=sd,
        envelope_mean=L[v].mean(0).astype(np.float32),
        embedding=speaker_embedding(x, vad=False),
        speech_seconds=len(x) / SR,
        ltas=_ltas_db(mel_frames(x).mean(0)).astype(np.float32),
    )


def log_f0_stats(f0: np.ndarray) -> tuple[float, float]:
    """Centre and spread of voiced log-F0, robustly (median, 1.48 MAD): octave errors of the tracker on noisy or
    high-pitched speech (a child's 300 Hz read as 80 Hz) would drag a plain mean and std far off."""
    lf = np.log(f0[f0 > 0])
    mu = float(np.median(lf))
    return mu, float(np.clip(1.4826 * np.median(np.abs(lf - mu)), 0.03, 0.4))


def map_f0(f0: np.ndarray, profile: VoiceProfile) -> np.ndarray:
    """Voiced frames' log-F0 moved to the speaker's centre and spread (the contour's shape is the TTS's)."""
    v = f0 > 0
    out = f0.copy()
    if v.sum() < 10:
        return out
    mu, sd = log_f0_stats(f0)
    z = np.clip((np.log(f0[v]) - mu) / sd, -Z_MAX, Z_MAX)
    out[v] = np.exp(np.clip(z * profile.f0_std_log + profile.f0_mean_log, np.log(F0_FLOOR), np.log(F0_CEIL)))
    return out


def warp_frequency(L: np.ndarray, alpha: float) -> np.ndarray:
    """Envelope with its frequency axis scaled by `alpha` (>1 moves formants up, as from a shorter vocal tract)."""
    n = L.shape[-1]
    k = np.clip(np.arange(n) / alpha, 0, n - 1)
    i0 = np.floor(k).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = k - i0
    return L[..., i0] * (1 - w) + L[..., i1] * w


def equalise(L: np.ndarray, v: np.ndarray, profile: VoiceProfile) -> np.ndarray:
    """Long-term spectral correction: the voiced average envelope becomes the speaker's (timbre, mic, room)."""
    return L + correction(L[v].mean(0), profile)


def correction(mean: np.ndarray, profile: VoiceProfile) -> np.ndarray:
    """What `equalise` adds to each frame of speech whose voiced average log envelope is `mean`."""
    d = gaussian_filter1d(profile.envelope_mean - mean, 4.0)
    return d - d.mean()  # shape only: loudness stays the source's


def pulse_marks(x: np.ndarray, f0: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """One mark per glottal pulse in voiced runs: the strongest low-passed peak 0.8-1.2 periods after the last.

    Marks must sit on the pulses, not merely a period apart: a grain centred between pulses carries two of them
    and, when pitch is raised a lot (a man's TTS to a child's 280 Hz), leaves the old period audible.
    """
    lp = ss.sosfiltfilt(ss.butter(2, 1000, fs=SR, output="sos"), np.asarray(x, np.float64))
    lp = lp if lp.max() >= -lp.min() else -lp  # follow the waveform's dominant polarity
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    marks = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        m = a + int(np.argmax(lp[a : min(b, a + int(SR / f0[a]) + 1)]))
        while True:
            marks.append(m)
            T = SR / f0[m]
            lo, hi = m + int(0.8 * T), min(b, m + int(1.2 * T) + 1)
            if lo >= hi:
                break
            m = lo + int(np.argmax(lp[lo:hi]))
    return np.asarray(marks, int)


def psola(x: np.ndarray, f0: np.ndarray, f0_new: np.ndarray) -> np.ndarray:
    """TD-PSOLA pitch change from `f0` to `f0_new` (per 5 ms frame); unvoiced parts pass through; same length.

    Output marks are laid a new period apart; each copies the two-period Hann grain around the nearest input
    pulse, so the TTS's own glottal pulses (and the voice quality in them) are kept, unlike a vocoder.
    """
    n = len(x)
    t = np.arange(n) / HOP
    fr = np.arange(len(f0))
    both = (f0 > 0) & (f0_new > 0)
    voiced = np.interp(t, fr, both.astype(float)) > 0.5
    fa = np.where(voiced, np.maximum(np.interp(t, fr, np.where(both, f0, 0)), F0_FLOOR), 0.0)
    fs = np.where(voiced, np.maximum(np.interp(t, fr, np.where(both, f0_new, 0)), F0_FLOOR), 0.0)
    cycles = np.floor(np.cumsum(fs) / SR)
    ana, syn = pulse_marks(x, fa, voiced), np.flatnonzero((np.diff(cycles) > 0) & voiced[1:]) + 1
    if len(ana) < 2 or len(syn) < 2:
        return np.asarray(x, np.float32).copy()
    j = np.clip(np.searchsorted(ana, syn), 1, len(ana) - 1)
    j = np.where(np.abs(ana[j - 1] - syn) < np.abs(ana[j] - syn), j - 1, j)
    pad = int(SR / F0_FLOOR) + 2
    xp = np.pad(np.asarray(x, np.float64), pad)
    yp = np.zeros(n + 2 * pad)
    for s, a in zip(syn, ana[j], strict=True):
        T = int(round(SR / fa[a]))
        yp[s + pad - T : s + pad + T + 1] += xp[a + pad - T : a + pad + T + 1] * np.hanning(2 * T + 1)
    m = uniform_filter1d(voiced.astype(float), 2 * HOP + 1)  # 10 ms cross-fades at voicing edges
    return (m * yp[pad : pad + n] + (1 - m) * x).astype(np.float32)


def voice_floor(profile: VoiceProfile) -> float:
    """The speaker's lowest pitch (Hz): their log-F0 centre less two spreads. The band under it holds none of their
    voice, only hum and what PSOLA left of the TTS's own period, which the envelope and shaping gains lifted (by
    ~13 dB for a child: GE2E rewarded it): a child's dub at 283 Hz read 149 Hz, the octave below, heard as a man;
    over the shared clips the converted voices sat 1.2 semitones flat (docs/voice.md). `apply_envelope` cuts it."""
    return float(np.exp(profile.f0_mean_log - 2 * profile.f0_std_log))


def under_the_voice(gain: np.ndarray, freqs: np.ndarray, floor_hz: float) -> np.ndarray:
    """Log-power gain curves (..., len(freqs)) below `floor_hz` never above their value there, and rolled off as
    a 4th-order high-pass."""
    k = int(np.searchsorted(freqs, floor_hz))
    if k == 0:
        return gain
    roll = -np.log1p((floor_hz / np.maximum(freqs[:k], 1.0)) ** 8)
    return np.concatenate([np.minimum(gain[..., :k], gain[..., k : k + 1]) + roll, gain[..., k:]], -1)


def apply_envelope(
    x: np.ndarray, L_from: np.ndarray, L_to: np.ndarray, floor_hz: float = 0.0, win: int = 512
) -> np.ndarray:
    """Filter `x` so its 5 ms-frame log envelope goes from `L_from` to `L_to` (STFT gain, hop = one frame), with
    the band under `floor_hz` cut (`under_the_voice`)."""
    n = len(x)
    _, _, Z = ss.stft(x, SR, window="hann", nperseg=win, noverlap=win - HOP, nfft=FFT, boundary="even")
    change = under_the_voice(L_to - L_from, np.linspace(0, SR / 2, FFT // 2 + 1), floor_hz)
    gain = np.exp(np.clip(change, -8, 8) / 2).T  # power -> amplitude, at most +-35 dB
    m = min(Z.shape[1], gain.shape[1])
    G = np.concatenate([gain[:, :m], np.repeat(gain[:, m - 1 : m], Z.shape[1] - m, 1)], 1)
    _, y = ss.istft(Z * G, SR, window="hann", nperseg=win, noverlap=win - HOP, nfft=FFT, boundary=True)
    return _fit(y, n)


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y, np.float32)[:n]
    return np.pad(y, (0, n - len(y)))


def _ltas_db(mel_mean: np.ndarray) -> np.ndarray:
    """Mean mel power as dB with the overall level removed: the spectrum's shape only."""
    db = 10 * np.log10(mel_mean + 1e-12)
    return db - db.mean()


def _excerpt(n: int) -> slice:
    """The first EXCERPT_S of a signal of n samples: what the warp and the shaping gain are fitted on."""
    return slice(0, min(n, int(EXCERPT_S * SR)))


def estimate_alpha(
    shifted: np.ndarray, L: np.ndarray, v: np.ndarray, profile: VoiceProfile, floor_hz: float = 0.0
) -> float:
    """Warp factor that makes (an excerpt of) the pitch-shifted speech closest to the speaker by GE2E.

    The profile's embedding depends on the reference only through its average (not frame by frame), so
    maximising similarity to it does not leak the speaker's frames; averaging spectra to estimate the warp
    instead is fooled by microphone and room colouring (it hit the grid's ends on most real clips).
    """
    s = _excerpt(len(shifted))
    nf = min(len(L), s.stop // HOP + 1)
    if v[:nf].sum() < 20 or s.stop < SR:  # too little to embed: leave the formants where they are
        return 1.0
    scores = []
    for a in ALPHAS:
        La = equalise(warp_frequency(L[:nf], a), v[:nf], profile)
        y = apply_envelope(shifted[s], L[:nf], La, floor_hz)
        scores.append(similarity(speaker_embedding(y, vad=False), profile.embedding))
    return float(ALPHAS[int(np.argmax(np.array(scores) - ALPHA_COST * np.log(ALPHAS)))])


def shaping_gain(x: np.ndarray, profile: VoiceProfile, voicing: np.ndarray) -> np.ndarray:
    """(frames, 513) log-power gain that brings the GE2E embedding of `x` closest to the speaker's
    (`shaping_curves`, mixed per frame by `voicing`)."""
    return mix(shaping_curves(x, profile, voicing), voicing)


def mix(curves: np.ndarray, voicing: np.ndarray) -> np.ndarray:
    """(frames, 513) gain: the voiced curve where `voicing` is 1, the other where it is 0."""
    return voicing[:, None] * curves[0] + (1 - voicing[:, None]) * curves[1]


def shaping_curves(x: np.ndarray, profile: VoiceProfile, voicing: np.ndarray) -> np.ndarray:
    """(2, 513) log-power gain curves, for voiced frames and the rest, that bring the GE2E embedding of (the
    first EXCERPT_S of) `x` closest to the speaker's.

    `voicing` (one 0..1 value per 5 ms frame of `x`) mixes two gain curves, one for voiced frames, one for the
    rest (fricatives, breath, pauses): the voice source and the room show differently in each.
    The encoder (resemblyzer's: a 3-layer LSTM over 40-band mel power frames, 25 ms / 10 ms) is differentiable, so
    the curves are fitted by gradient ascent on the cosine, through the encoder's own front end: power STFT, times
    the gain, loudness normalised (as speaker_embedding does), mel filterbank, partial utterances, mean, cosine.
    Only 2 x SHAPE_COSINES weights move, with an L2 pull to a flat gain: a filter per frame class, with no
    time detail of its own, fitted on the TTS's words (not the speaker's), so it can carry little but the
    speaker's overall timbre and channel, which is why it carries over to held-out speech of the speaker. A second term
    keeps the long-term spectrum near the speaker's (`profile.ltas`): without it the gain buys encoder score by
    moving the spectrum away from the speaker's held-out speech (measured: 5.1 dB from it vs 5.0 dB for warp
    alone); with it, both GE2E similarity and the spectrum move towards the speaker (4.0 dB).
    """
    x = np.asarray(x, np.float32)[_excerpt(len(x))]
    if len(x) < SR:
        return np.zeros((2, FFT // 2 + 1))
    fit = Shaping(x, profile, voicing)
    w = np.zeros((2, SHAPE_COSINES), np.float32)
    m, v2 = np.zeros_like(w), np.zeros_like(w)
    with one_thread():
        for step in range(1, SHAPE_STEPS + 1):
            _adam_step(w, fit.loss_and_grad(w)[1], m, v2, step)
    lim = SHAPE_MAX_DB * np.log(10) / 10
    return np.clip(w.astype(np.float64) @ _cosines(np.linspace(0, SR / 2, FFT // 2 + 1)).T, -lim, lim)


class Shaping:
    """The shaping gain's objective on one excerpt `x`, and its gradient (by hand, through `ge2e.backward`).

    loss(w) = -cos(GE2E(x filtered by the gains w), the speaker's) + SHAPE_L2 |w|^2 + SHAPE_LTAS * (long-term
    spectrum's mean squared dB distance to the speaker's), the gains being exp(classes @ w @ basis^T) on the power
    STFT frames (classes: voiced / other weight of each 10 ms frame)."""

    def __init__(self, x: np.ndarray, profile: VoiceProfile, voicing: np.ndarray):
        x = x / max(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), 1e-6) * 10 ** (LEVEL_DBFS / 20)
        self.P = power_frames(x)  # (T, 201)
        self.total = float(self.P.sum())  # the filtered speech keeps the excerpt's loudness
        self.fb = mel_filters()  # (40, 201)
        self.parts = ge2e.partial_slices(len(x))  # as embed_utterance cuts an utterance
        self.pad = max(0, self.parts[-1].stop - len(self.P))
        self.basis = _cosines(np.linspace(0, SR / 2, self.P.shape[1])).astype(np.float32)  # (201, K)
        v10 = np.interp(np.arange(len(self.P)) * MEL_HOP / HOP, np.arange(len(voicing)), voicing)  # 5 ms -> 10 ms
        self.classes = np.stack([v10, 1 - v10], 1).astype(np.float32)  # (T, 2)
        self.target = np.asarray(profile.embedding, np.float32)
        self.ltas = np.asarray(profile.ltas, np.float32)
        self.encoder = ge2e.load()

    def loss_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        P, fb, T = self.P, self.fb, len(self.P)
        Pg = P * np.exp(self.classes @ (w @ self.basis.T))
        filtered = float(Pg.sum())
        scale = self.total / filtered
        mel = (Pg * scale) @ fb.T
        mean = mel.mean(0)
        r = _ltas_db(mean) - self.ltas
        spectrum = SHAPE_LTAS * float(np.mean(r * r))
        padded = np.concatenate([mel, np.zeros((self.pad, mel.shape[1]), np.float32)])
        emb, kept = ge2e.forward(self.encoder, np.stack([padded[s] for s in self.parts]), keep=True)
        e = emb.mean(0)
        n = float(np.linalg.norm(e))
        cos = float(e @ self.target) / n
        loss = -cos + SHAPE_L2 * float(np.sum(w * w)) + spectrum
        # back: cosine -> partial embeddings -> encoder -> mel frames (+ the spectrum term) -> gains -> w
        d_e = -(self.target / n - cos * e / (n * n))
        d_parts = ge2e.backward(self.encoder, kept, np.broadcast_to(d_e / len(emb), emb.shape).astype(np.float32))
        d_mel = np.zeros_like(padded)
        for s, d in zip(self.parts, d_parts, strict=True):
            d_mel[s] += d
        d_db = SHAPE_LTAS * 2 * r / len(r)
        d_mean = (d_db - d_db.mean()) * 10 / (np.log(10) * (mean + 1e-12))
        d_scaled = (d_mel[:T] + d_mean / T) @ fb
        d_Pg = scale * d_scaled - float(np.sum(d_scaled * Pg)) * self.total / filtered**2
        d_w = self.classes.T @ (d_Pg * Pg) @ self.basis + 2 * SHAPE_L2 * w
        return loss, d_w.astype(np.float32)


def _adam_step(w, grad, m, v, step: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step on `w` (moments `m`, `v`, all updated in place), as torch.optim.Adam takes it."""
    m += (1 - b1) * (grad - m)
    v *= b2
    v += (1 - b2) * grad * grad
    w -= SHAPE_LR / (1 - b1**step) * m / (np.sqrt(v) / (1 - b2**step) ** 0.5 + eps)


def _cosines(freqs: np.ndarray) -> np.ndarray:
    """(len(freqs), SHAPE_COSINES) cosines 1..K over the mel axis (the constant, i.e. loudness, left out)."""
    u = hz_to_mel(freqs) / hz_to_mel(SR / 2)
    return np.stack([np.cos(np.pi * k * u) for k in range(1, SHAPE_COSINES + 1)], 1)


def convert(
    tts16k: np.ndarray, profile: VoiceProfile, method: str = DEFAULT_METHOD, alpha: float | None = None
) -> np.ndarray:
    """`tts16k` spoken in the profiled voice: float32, exactly as long as the input.

    method "shape" (default: pitch, formant warp + EQ, then the GE2E-fitted shaping gain), "warp" (pitch,
    formant warp + EQ; `alpha` None = estimated) or "f0" (pitch only). The warp and the shaping gain are fitted
    on the opening EXCERPT_S; speech longer than `PART_S` is then converted part by part (`parts`), so memory
    stays flat however long it is.
    """
    if method not in METHODS:
        raise LipsyncError(f"unknown voice conversion method {method!r}; use one of {', '.join(METHODS)}")
    x = np.asarray(tts16k, np.float32).ravel()
    if len(x) < 4 * HOP or not np.any(x):
        return x.copy()
    f0 = pitch(x)
    v, f0_new = f0 > 0, map_f0(f0, profile)
    voicing = uniform_filter1d(v.astype(float), 5)  # 25 ms cross-fades between the two gain curves
    spans = parts(x, v)

    def samples(span: slice) -> slice:
        return slice(span.start * HOP, span.stop * HOP if span.stop < len(f0) else len(x))

    def part(span: slice) -> tuple[np.ndarray, np.ndarray]:
        """A part's log envelope and pitch-shifted samples."""
        xs = x[samples(span)]
        return envelope(xs, f0[span]), psola(xs, f0[span], f0_new[span])

    floor = voice_floor(profile)
    first = part(spans[0])
    eq = None  # the long-term correction: the speaker's average envelope for the TTS's, after the warp
    if method != "f0" and v.sum() >= 10:
        alpha = estimate_alpha(first[1], first[0], v[spans[0]], profile, floor) if alpha is None else alpha
        if len(spans) == 1:
            eq = correction(warp_frequency(first[0], alpha)[v].mean(0), profile)
        else:  # the voiced average over every part, each part's envelope taken again (CheapTrick is cheap)
            total = sum(warp_frequency(envelope(x[samples(s)], f0[s]), alpha)[v[s]].sum(0) for s in spans)
            eq = correction(total / v.sum(), profile)

    def target(L: np.ndarray) -> np.ndarray:
        return L if eq is None else warp_frequency(L, alpha) + eq

    curves = None
    if method == "shape":
        curves = shaping_curves(apply_envelope(first[1], first[0], target(first[0]), floor), profile, voicing)
    y = np.empty_like(x)
    for span in spans:
        L, shifted = first if span is spans[0] else part(span)
        L_new = target(L) if curves is None else target(L) + mix(curves, voicing[span])
        y[samples(span)] = apply_envelope(shifted, L, L_new, floor)
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2)) + 1e-9
    y *= rms_in / rms_out  # same loudness as the TTS; the dub matches it to the video later
    peak = np.abs(y).max()
    return (y * (0.99 / peak) if peak > 0.99 else y).astype(np.float32)


def parts(x: np.ndarray, voiced: np.ndarray) -> list[slice]:
    """The 5 ms frames of `x` in parts of about PART_S, each cut on the quietest unvoiced frame within CUT_S of
    the mark (one part when `x` is no longer than that): converted one at a time, a part's envelopes and
    PSOLA buffers are all the memory conversion needs. Cut where nothing is voiced, the parts join where
    PSOLA passes the speech through unchanged and the filter works on near silence."""
    n, size, search = len(voiced), int(PART_S * 1000 / FRAME_MS), int(CUT_S * 1000 / FRAME_MS)
    if n <= size + search:
        return [slice(0, n)]
    x = np.asarray(x, np.float64)
    energy = np.add.reduceat(x * x, np.arange(0, len(x), HOP))[:n]
    cuts = [0]
    while n - cuts[-1] > size + search:
        lo = cuts[-1] + size - search
        quiet = energy[lo : lo + 2 * search] + np.where(voiced[lo : lo + 2 * search], np.inf, 0.0)
        cuts.append(lo + int(np.argmin(quiet if np.isfinite(quiet).any() else energy[lo : lo + 2 * search])))
    return [slice(a, b) for a, b in zip(cuts, [*cuts[1:], n], strict=True)]


def clone_voice(tts16k: np.ndarray, reference16k: np.ndarray, method: str = DEFAULT_METHOD, **kw) -> np.ndarray:
    """`tts16k` in the voice of the speaker in `reference16k` (e.g. the video's own soundtrack)."""
    return convert(tts16k, voice_profile(reference16k), method=method, **kw)
