"""Audio in numbers: resampling, loudness, voice activity and the mel / MFCC features the engines consume.

Everything here is plain numpy/scipy on float arrays so it is fast, deterministic and testable without media files.
Conventions: mono signals are 1-D float32 in [-1, 1]; video frame i is at time i / fps; feature row t of a
spectrogram is centred at time t / feat_rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np
from scipy.ndimage import maximum_filter1d, minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly, sosfilt

SR = 16000
FLOOR_DB = -90.0


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling along the time axis (the longer one), so a tone keeps its frequency exactly."""
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out or x.size == 0:
        return x.copy()
    ratio = Fraction(sr_out) / Fraction(sr_in)
    axis = 0 if x.ndim == 1 else int(np.argmax(x.shape))
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=axis).astype(np.float32)


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels; works for (n,), (n, ch) (soundfile) and (ch, n) (PyAV) layouts."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected 1-D or 2-D audio, got shape {x.shape}")
    return x.mean(axis=int(np.argmin(x.shape))).astype(np.float32)


def _n_frames(n_samples: int, sr: int, fps: float, n_frames: int | None) -> int:
    return int(np.ceil(n_samples / sr * fps - 1e-6)) if n_frames is None else int(n_frames)


def _windowed_rms(x: np.ndarray | Iterable[np.ndarray], n: int, sr: int, times: np.ndarray, win_s: float) -> np.ndarray:
    """RMS in a window of win_s seconds centred on each time (zero outside the signal of `n` samples). `x`: the
    signal, or its successive pieces (`_pieces`): the running sum of squares goes on from piece to piece, so the
    figures are those of the whole signal at once."""
    half = win_s * sr / 2
    lo = np.clip(np.round(times * sr - half).astype(np.int64), 0, n)
    hi = np.clip(np.round(times * sr + half).astype(np.int64), 0, n)
    width = max(int(round(2 * half)), 1)
    c_lo, c_hi = np.zeros(len(lo)), np.zeros(len(hi))  # the running sum at lo and hi (0 before the first sample)
    start, carry = 0, 0.0
    for piece in [x] if isinstance(x, np.ndarray) else x:
        if len(piece) == 0:
            continue
        sq = piece.astype(np.float64) ** 2
        sq[0] += carry
        c = np.cumsum(sq)
        end = start + len(piece)
        for idx, out in ((lo, c_lo), (hi, c_hi)):
            at = (idx > start) & (idx <= end)
            out[at] = c[idx[at] - start - 1]
        start, carry = end, c[-1]
    return np.sqrt(np.maximum(c_hi - c_lo, 0.0) / width)


def _to_db(rms: np.ndarray) -> np.ndarray:
    return np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), FLOOR_DB).astype(np.float32)


def rms_envelope(x: np.ndarray, sr: int, fps: float = 25.0, n_frames: int | None = None) -> np.ndarray:
    """RMS level in dBFS per video frame (a 1/fps window centred on i/fps), floored at -90 dB.

    A full-scale sine reads -3 dB (plain RMS, not the AES17 convention).
    """
    x = to_mono(x)
    n = _n_frames(len(x), sr, fps, n_frames)
    return _to_db(_windowed_rms(x, len(x), sr, np.arange(n) / fps, 1.0 / fps))


def _fill_short_runs(mask: np.ndarray, value: bool, max_len: int) -> np.ndarray:
    """Flip runs of `value` no longer than max_len frames (interior runs only)."""
    out = mask.copy()
    if len(mask) == 0:
        return out
    bounds = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(mask)]])
    for s, e in zip(starts, ends, strict=True):
        if mask[s] == value and e - s <= max_len and s > 0 and e < len(mask):
            out[s:e] = not value
    return out


def voice_activity(
    x: np.ndarray, sr: int, fps: float = 25.0, n_frames: int | None = None, hangover_s: float = 0.08
) -> np.ndarray:
    """True per video frame where someone is speaking (vs. silence or a pause).

    Two relative cues at 10 ms, so it needs no calibration: the mean per-band SNR over 24 mel bands (noise =
    each band's 10th percentile) survives steady noise down to ~0 dB SNR, and a level within 30 dB of the
    utterance's loud frames rejects breaths in the digital silence of TTS. Hysteresis keeps soft word edges but
    drops quiet blips; short pauses (stop closures) are bridged and the edges get a hangover, as mouths move a
    little before and after the sound. On GRID s1 it agrees with the word alignments on ~95% of frames.
    """
    x = to_mono(x)
    n = _n_frames(len(x), sr, fps, n_frames)
    if n == 0 or len(x) == 0:
        return np.zeros(n, dtype=bool)
    hop = 0.01
    power = 10.0 ** mel_spectrogram(x, sr, n_mels=24, hop_s=hop, fmin=100.0, fmax=7600.0).astype(np.float64)
    power = uniform_filter1d(power, 5, axis=0)  # 50 ms smoothing steadies the noise estimate
    band_db = 10 * np.log10(np.maximum(power, 1e-10))
    level_db = 10 * np.log10(np.maximum(power.sum(axis=1), 1e-10))
    snr = np.maximum(band_db - np.percentile(band_db, 10, axis=0), 0).mean(axis=1)
    snr -= np.percentile(snr, 10)
    spread, loud = float(np.percentile(snr, 95)), float(np.percentile(level_db, 95))
    if spread < 1.5 or loud < -40.0:  # nothing stands out from the background, or digital silence
        return np.zeros(n, dtype=bool)
    above = (snr > 0.2 * spread) & (level_db > loud - 30.0)
    strong = (snr > 0.5 * spread) & (level_db > loud - 20.0)
    region = np.cumsum(np.diff(above.astype(np.int8), prepend=0) == 1) * above
    keep = np.unique(region[strong & above])
    active = np.isin(region, keep[keep > 0])
    # a video frame speaks if any 10 ms frame inside its 1/fps window does
    idx = np.clip(np.round(np.arange(n) / fps / hop).astype(np.int64), 0, len(active) - 1)
    half = max(int(round(0.25 / fps / hop)), 0)
    pooled = maximum_filter1d(active.astype(np.uint8), 2 * half + 1)[idx].astype(bool)
    pooled = _fill_short_runs(pooled, False, max(int(round(0.2 * fps)), 1))  # bridge short pauses
    hang = int(round(hangover_s * fps))
    if hang > 0:
        pooled = maximum_filter1d(pooled.astype(np.uint8), 2 * hang + 1).astype(bool)
    return pooled


def _k_weight(sr: int) -> np.ndarray:
    """ITU-R BS.1770 K-weighting (high shelf + high pass), designed for any sample rate: second-order sections."""
    # high shelf (+4 dB above ~1.7 kHz)
    gain_db, q, fc = 3.99984385397, 0.7071752369554193, 1681.9744509555319
    a = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * fc / sr
    alpha, cw = np.sin(w0) / (2 * q), np.cos(w0)
    b = [a * ((a + 1) + (a - 1) * cw + 2 * np.sqrt(a) * alpha), -2 * a * ((a - 1) + (a + 1) * cw)]
    b.append(a * ((a + 1) + (a - 1) * cw - 2 * np.sqrt(a) * alpha))
    den = [(a + 1) - (a - 1) * cw + 2 * np.sqrt(a) * alpha, 2 * ((a - 1) - (a + 1) * cw)]
    den.append((a + 1) - (a - 1) * cw - 2 * np.sqrt(a) * alpha)
    shelf = np.array(b + den) / den[0]
    # high pass (~38 Hz)
    q, fc = 0.5003270373253953, 38.13547087613982
    w0 = 2 * np.pi * fc / sr
    alpha, cw = np.sin(w0) / (2 * q), np.cos(w0)
    hp = np.array([(1 + cw) / 2, -(1 + cw), (1 + cw) / 2, 1 + alpha, -2 * cw, 1 - alpha]) / (1 + alpha)
    return np.stack([shelf, hp])


PIECE = 1 << 20  # samples filtered at once: the loudness of long speech is measured and set piece by piece


def _pieces(x: np.ndarray, sr: int, gain: float = 1.0, peak: float | None = None) -> Iterator[np.ndarray]:
    """`x` times `gain`, through the limiter when `peak` is given (`_limit`, only when some sample exceeds it),
    in float64 pieces of PIECE samples, in order: memory bounded whatever the length. The limiter sees two of its
    windows of context on each side of a piece, so a piece's samples are those of one pass over the whole signal
    (but for the rounding of the limiter's running average: ~1e-13 of the gain)."""
    n = len(x)
    limited = peak is not None and peak / max(float(np.abs(x).max()) * gain, 1e-12) < 1.0
    ctx = 4 * _limit_window(sr) + 2
    for s in range(0, n, PIECE):
        e = min(s + PIECE, n)
        if not limited:
            yield x[s:e].astype(np.float64) * gain
            continue
        a, b = max(0, s - ctx), min(n, e + ctx)
        yield _limit(x[a:b].astype(np.float64) * gain, sr, peak)[s - a : e - a]


def _gated_loudness(pieces: Iterable[np.ndarray], n: int, sr: int, active: np.ndarray, fps: float) -> float:
    """Loudness of the `active` 1/fps frames of a signal of `n` samples given as its successive pieces."""

    def weighted() -> Iterator[np.ndarray]:
        sos, state = _k_weight(sr), np.zeros((2, 2))
        for piece in pieces:
            out, state = sosfilt(sos, piece, zi=state)
            yield out

    ms = _windowed_rms(weighted(), n, sr, np.arange(len(active)) / fps, 1.0 / fps) ** 2
    ms = ms[active] if active.any() else ms
    return float(max(-0.691 + 10 * np.log10(max(float(ms.mean()), 1e-20)), FLOOR_DB))


def speech_loudness_db(x: np.ndarray, sr: int) -> float:
    """K-weighted loudness (LUFS-style, dB) of the active speech only, so pauses do not drag the figure down.

    Returns -90 for silence. Falls back to the whole signal when no frame is judged active.
    """
    x = to_mono(x)
    if len(x) == 0 or not np.any(x):
        return FLOOR_DB
    return _gated_loudness(_pieces(x, sr), len(x), sr, voice_activity(x, sr, fps=100.0, hangover_s=0.0), 100.0)


def _limit_window(sr: int, window_s: float = 0.005) -> int:
    return max(int(window_s * sr), 1)


def _limit(x: np.ndarray, sr: int, peak: float) -> np.ndarray:
    """Brick-wall limiter with a smooth gain curve: min-filter the needed gain, then box-average it.

    Averaging over a window no wider than the min-filter keeps every sample's gain at or below what it needs,
    so the output never exceeds `peak`, without the harshness of clipping.
    """
    need = np.minimum(1.0, peak / np.maximum(np.abs(x), 1e-12))
    w = _limit_window(sr)
    gain = uniform_filter1d(minimum_filter1d(need, 2 * w + 1, mode="nearest"), 2 * w + 1, mode="nearest")
    return np.clip(x * np.minimum(gain, need), -peak, peak)


def match_loudness(x: np.ndarray, sr: int, target_db: float, peak: float = 0.97) -> np.ndarray:
    """Scale so the active speech reads target_db (see speech_loudness_db), then limit peaks so it never clips.

    The limiter costs a little loudness on peaky signals; a few refinement passes win it back where possible.
    Piece by piece (`_pieces`): 10 minutes at 44.1 kHz took ~1.6 GB at once.
    """
    x = to_mono(x)
    if len(x) == 0 or not np.any(x):
        return x.copy()
    active = voice_activity(x, sr, fps=100.0, hangover_s=0.0)  # level-invariant, so computed once
    gain_db = target_db - _gated_loudness(_pieces(x, sr), len(x), sr, active, 100.0)
    y = np.empty(len(x), np.float32)

    def kept(pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:  # each pass's output is kept as it goes
        s = 0
        for piece in pieces:
            y[s : s + len(piece)] = piece
            s += len(piece)
            yield piece

    for _ in range(4):
        err = target_db - _gated_loudness(kept(_pieces(x, sr, 10 ** (gain_db / 20), peak)), len(x), sr, active, 100.0)
        if abs(err) < 0.05:
            break
        gain_db += err
    return y


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int, n_fft: int, n_mels: int = 80, fmin: float = 55.0, fmax: float = 7600.0) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney area-normalised (matches librosa.filters.mel)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return weights.astype(np.float32)


def _stft_mel(x: np.ndarray, n_fft: int, hop: int, win: int, fb: np.ndarray) -> np.ndarray:
    """|STFT|^2 projected on the filters `fb` (n_fft//2+1, M): (T, M) float64; frames centred at t*hop (zero
    padding), Hann window of `win` inside n_fft. Computed in blocks of 4096 frames, so long audio never holds its
    whole spectrogram (10 min at 44.1 kHz: 0.25 GB, and twice that in float64 for the projection); the blocks
    follow the BLAS's own row blocking, so the numbers are those of one product over all frames."""
    window = np.zeros(n_fft, dtype=np.float32)
    off = (n_fft - win) // 2
    window[off : off + win] = np.hanning(win + 1)[:-1]  # periodic Hann
    xp = np.pad(x.astype(np.float32), (n_fft // 2, n_fft // 2))
    n = 1 + len(x) // hop
    if len(xp) < n_fft + (n - 1) * hop:
        xp = np.pad(xp, (0, n_fft + (n - 1) * hop - len(xp)))
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop][:n]
    out = np.empty((n, fb.shape[1]), dtype=np.result_type(np.float32, fb.dtype))
    for s in range(0, n, 4096):
        spec = np.fft.rfft(frames[s : s + 4096] * window, axis=1)
        out[s : s + 4096] = (spec.real**2 + spec.imag**2).astype(np.float32) @ fb  # float32 power, as before
    return out


def mel_spectrogram(
    x: np.ndarray,
    sr: int = SR,
    n_mels: int = 80,
    hop_s: float = 0.01,
    win_s: float = 0.025,
    fmin: float = 55.0,
    fmax: float = 7600.0,
) -> np.ndarray:
    """(T, n_mels) log10 mel power; row t is centred at t * hop_s (100 rows/s by default), T = 1 + n // hop."""
    x = to_mono(x)
    hop, win = int(round(hop_s * sr)), int(round(win_s * sr))
    n_fft = 1 << int(np.ceil(np.log2(win)))
    mel = _stft_mel(x, n_fft, hop, win, mel_filterbank(sr, n_fft, n_mels, fmin, min(fmax, sr / 2)).T)
    return np.log10(np.maximum(mel, 1e-10)).astype(np.float32)


def mfcc(x: np.ndarray, sr: int = SR, n_mfcc: int = 13, n_mels: int = 80, **mel_kw: float) -> np.ndarray:
    """(T, n_mfcc) orthonormal DCT-II of the log-mel in dB (librosa's convention)."""
    logmel = 10.0 * mel_spectrogram(x, sr, n_mels=n_mels, **mel_kw)  # log10 power -> dB
    k = np.arange(n_mfcc)[:, None]
    m = np.arange(n_mels)[None, :]
    dct = np.cos(np.pi * k * (2 * m + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    dct[0] /= np.sqrt(2.0)
    return (logmel @ dct.T).astype(np.float32)


def frames_to_video(
    feat: np.ndarray, n_frames: int, fps: float = 25.0, feat_rate: float = 100.0, context: int = 0
) -> np.ndarray:
    """Features per video frame: the row nearest time i / fps, plus `context` rows either side (edge-padded).

    Returns (n_frames, (2 * context + 1) * D), rows ordered t-k .. t+k.
    """
    feat = np.asarray(feat)
    if feat.ndim == 1:
        feat = feat[:, None]
    if len(feat) == 0:
        raise ValueError("no feature rows to map onto video frames")
    centre = np.round(np.arange(n_frames) * feat_rate / fps).astype(np.int64)
    rows = np.clip(centre[:, None] + np.arange(-context, context + 1)[None, :], 0, len(feat) - 1)
    return feat[rows].reshape(n_frames, -1)


def _two_level_split(level: np.ndarray, min_separation: float = 8.0) -> np.ndarray | None:
    """Rows above Otsu's threshold on a 1-D level, or None when the levels are not clearly two groups
    (squared gap between the group means under min_separation x the sum of their variances)."""
    order = np.sort(level.astype(np.float64))
    n = len(order)
    k = np.arange(1, n)
    c1, c2 = np.cumsum(order)[:-1], np.cumsum(order**2)[:-1]
    m0, m1 = c1 / k, (order.sum() - c1) / (n - k)
    best = int(np.argmax(k * (n - k) * (m0 - m1) ** 2))
    v0 = c2[best] / k[best] - m0[best] ** 2
    v1 = (np.sum(order**2) - c2[best]) / (n - k[best]) - m1[best] ** 2
    if (m1[best] - m0[best]) ** 2 < min_separation * (max(v0, 0) + max(v1, 0) + 1e-12):
        return None
    return level > (order[best] + order[best + 1]) / 2


def normalise_utterance(feat: np.ndarray, active: np.ndarray | None = None, eps: float = 1e-3) -> np.ndarray:
    """Zero mean, unit variance per dimension over this utterance, for speaker and channel robustness.

    Statistics come from the non-silent rows, as long pauses (TTS, slow speakers) would otherwise dominate:
    `active` if given, else the louder group when row means (which track energy for log-mel and MFCC) fall
    clearly into two groups. Falls back to all rows when too few are active.
    """
    feat = np.asarray(feat, dtype=np.float32)
    if feat.ndim != 2 or len(feat) < 2:
        return feat
    if active is None:
        active = _two_level_split(feat.mean(axis=1))
    active = np.ones(len(feat), bool) if active is None else np.asarray(active, dtype=bool)
    rows = feat[active] if active.sum() >= max(10, 0.1 * len(feat)) else feat
    mu, sd = rows.mean(axis=0), rows.std(axis=0)
    return ((feat - mu) / np.maximum(sd, eps)).astype(np.float32)
