"""Speech -> mouth shape, fitted in seconds on the input video itself.

The video's own audio and its own tracked lips give a few hundred (audio window, lip shape) pairs; a ridge regression
from per-utterance-normalised cepstra and a normalised loudness envelope to the lip-shape PCA coefficients is enough
to know when the mouth opens, how wide, and roughly how round. The driving speech is usually another voice (TTS), so
every feature is normalised per utterance, the predicted motion is re-scaled to the source's own range (ridge shrinks
towards the mean), and speaker-independent cues override it: silence and bilabials (p/b/m) close the mouth.

This is the function boundary a learned generalist (`models/lips.py`) replaces: `fit(...)` then `predict(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipsync_cli import audio

N_CEPS = 20
CONTEXT = 2  # video frames either side (+-80 ms at 25 fps): coarticulation and the mouth leading the sound


@dataclass
class LipMap:
    mean: np.ndarray  # (D,) mean flattened lip shape
    basis: np.ndarray  # (k, D) PCA basis (rows)
    scale: np.ndarray  # (k,) std of each coefficient over the source
    closed: np.ndarray  # (k,) coefficients of the source's closed mouth
    weights: np.ndarray | None  # (F+1, k) ridge weights incl. bias; None: loudness-only map
    x_mean: np.ndarray | None
    x_std: np.ndarray | None
    open_dir: np.ndarray  # (k,) coefficients per unit of loudness drive (loudness-only fallback)
    fitted_on: int  # frames used for the audio map (0: loudness-only)


def speech_features(speech: np.ndarray, n_frames: int, fps: float, sr: int = audio.SR) -> np.ndarray:
    """(n_frames, F) speaker-normalised features per video frame, with +-CONTEXT frames stacked."""
    ceps = audio.normalise_utterance(audio.mfcc(speech, sr, n_mfcc=N_CEPS))
    per_frame = audio.frames_to_video(ceps, n_frames, fps=fps, context=2).reshape(n_frames, 5, N_CEPS).mean(1)
    drive = loudness_drive(speech, n_frames, fps, sr)[:, None]
    feat = np.concatenate([per_frame, drive], axis=1)
    padded = np.pad(feat, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([padded[i : i + n_frames] for i in range(2 * CONTEXT + 1)], axis=1)


def loudness_drive(speech: np.ndarray, n_frames: int, fps: float, sr: int = audio.SR) -> np.ndarray:
    """Loudness per frame mapped to 0 (silence) .. 1 (the utterance's loud vowels): voice-independent."""
    env = audio.rms_envelope(speech, sr, fps=fps, n_frames=n_frames)
    # relative to the utterance's own loud parts, but an utterance never louder than -45 dBFS is silence, not speech
    peak = max(float(np.percentile(env, 95)), -45.0) if len(env) else 0.0
    return np.clip((env - (peak - 30.0)) / 30.0, 0.0, 1.0)


def shape_vectors(aligned_lips: np.ndarray, size: int) -> np.ndarray:
    """(T, L, 2) aligned lip points -> (T, 2L) in crop units, so maps transfer between crop sizes."""
    return (aligned_lips / size).reshape(len(aligned_lips), -1)


def fit(
    shapes: np.ndarray,
    opening: np.ndarray,
    speech: np.ndarray | None,
    fps: float,
    valid: np.ndarray,
    sr: int = audio.SR,
) -> LipMap:
    """Fit the map on the source video. shapes: (T, D) lip vectors; opening: (T,) mouth opening; valid: frames with
    a tracked face. `speech` is the video's own audio (None or near-silent: a loudness-only map is used)."""
    X_shape = shapes[valid]
    mean = X_shape.mean(0)
    _, s, vt = np.linalg.svd(X_shape - mean, full_matrices=False)
    var = s**2 / max(len(X_shape) - 1, 1)
    k = int(np.clip(np.searchsorted(np.cumsum(var) / var.sum(), 0.97) + 1, 2, 10))
    basis = vt[:k]
    coef = (shapes - mean) @ basis.T  # (T, k); rows of invalid frames are meaningless
    scale = coef[valid].std(0) + 1e-9

    op = opening[valid]
    closed_rows = valid & (opening <= np.percentile(op, 10))
    closed = coef[closed_rows].mean(0)
    wide_rows = valid & (opening >= np.percentile(op, 90))
    open_dir = coef[wide_rows].mean(0) - closed

    weights = x_mean = x_std = None
    fitted = 0
    if speech is not None and len(speech) > sr:
        T = len(shapes)
        feats = speech_features(speech, T, fps, sr)
        usable = valid & (np.arange(T) < int(len(speech) / sr * fps))
        speaking = loudness_drive(speech, T, fps, sr)[usable] > 0.05
        if usable.sum() >= 50 and speaking.mean() > 0.2:
            X, Y = feats[usable], coef[usable]
            x_mean, x_std = X.mean(0), X.std(0) + 1e-6
            weights = _ridge_cv((X - x_mean) / x_std, Y)
            fitted = int(usable.sum())
    return LipMap(mean, basis, scale, closed, weights, x_mean, x_std, open_dir, fitted)


def _ridge_cv(X: np.ndarray, Y: np.ndarray, folds: int = 5) -> np.ndarray:
    """Ridge with the penalty chosen by contiguous-block cross-validation (neighbouring frames are not independent)."""
    n = len(X)
    Xb = np.concatenate([X, np.ones((n, 1))], axis=1)
    blocks = np.array_split(np.arange(n), folds)
    best, best_err = 1.0, np.inf
    for lam in (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0):
        err = 0.0
        for b in blocks:
            tr = np.setdiff1d(np.arange(n), b)
            W = _ridge(Xb[tr], Y[tr], lam)
            err += float(((Xb[b] @ W - Y[b]) ** 2).sum())
        if err < best_err:
            best, best_err = lam, err
    return _ridge(Xb, Y, best)


def _ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    reg = lam * np.eye(X.shape[1])
    reg[-1, -1] = 0.0  # do not shrink the bias
    return np.linalg.solve(X.T @ X + reg, X.T @ Y)


def predict(
    lm: LipMap,
    speech: np.ndarray,
    n_frames: int,
    fps: float,
    close: np.ndarray | None = None,
    sr: int = audio.SR,
) -> np.ndarray:
    """(n_frames, k) target lip-shape coefficients for the new speech. `close`: frames where the mouth must be shut
    (silence, bilabials) regardless of what the regression says."""
    drive = loudness_drive(speech, n_frames, fps, sr)
    by_loudness = lm.closed + drive[:, None] * lm.open_dir
    if lm.weights is None:
        coef = by_loudness
    else:
        X = (speech_features(speech, n_frames, fps, sr) - lm.x_mean) / lm.x_std
        coef = np.concatenate([X, np.ones((n_frames, 1))], axis=1) @ lm.weights
        # ridge under-predicts motion for an unseen voice: restore the source's own range on speech frames
        speaking = drive > 0.1
        if speaking.sum() > 5:
            mu = coef[speaking].mean(0)
            sd = coef[speaking].std(0) + 1e-9
            target_sd = np.minimum(lm.scale, np.maximum(sd, 0.8 * lm.scale))
            coef = mu + (coef - mu) * (target_sd / sd)
        # a voice the map never heard can fool the cepstra, never the loudness: keep half of the opening from it
        coef = 0.5 * coef + 0.5 * by_loudness
        # no sound, no articulation: fade towards the closed mouth as the loudness drive vanishes
        coef = lm.closed + np.clip(4.0 * drive, 0.0, 1.0)[:, None] * (coef - lm.closed)
    if close is not None and close.any():
        c = close.astype(np.float64)
        # ease in and out of closures over ~2 frames so selection does not snap
        kernel = np.array([0.25, 0.5, 1.0, 0.5, 0.25])
        c = np.clip(np.convolve(c, kernel / kernel.max(), mode="same"), 0.0, 1.0)
        coef = coef * (1 - c[:, None]) + lm.closed * c[:, None]
    return coef


def coefficients(lm: LipMap, shapes: np.ndarray) -> np.ndarray:
    """Project lip vectors onto the map's PCA basis."""
    return (shapes - lm.mean) @ lm.basis.T


def lip_shapes(lm: LipMap, coef: np.ndarray) -> np.ndarray:
    """Coefficients in the map's PCA basis -> lip vectors (crop units), the inverse of `coefficients`."""
    return lm.mean + coef @ lm.basis
