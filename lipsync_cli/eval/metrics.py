"""Metrics of `lipsync eval`: pure functions of numpy arrays (no I/O, no models, no mediapipe import; face geometry
from lipsync_cli.face).

Landmarks are mediapipe face-mesh points, (T, 478, 2) float arrays in pixels, NaN rows where no face was
found; frames with NaNs are skipped, never counted as zero error. Images are uint8 RGB, (H, W, 3) or (H, W),
batches (T, H, W, 3).
"""

from __future__ import annotations

import cv2
import numpy as np

from lipsync_cli import face

# Sorted unique indices of mediapipe.solutions.face_mesh_connections.FACEMESH_LIPS (google-ai-edge/mediapipe),
# flattened from its connection pairs; hard-coded so the metrics need no mediapipe.
LIP_IDX = np.array(
    [0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181]
    + [185, 191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415]
)
INNER_LIP_PAIRS = ((13, 14), (82, 87), (312, 317))  # (upper, lower) inner-lip points: centre, right, left

NOT_COMPUTED = {
    "fid": "needs Inception-v3 weights, a download not available offline; ssim/sharpness_ratio stand in",
    "lpips": "needs pretrained AlexNet/VGG backbones and LPIPS linear weights, not available offline",
    "lse_c/lse_d (SyncNet)": "the original SyncNet weights are a download: LSE-C/LSE-D here are our own expert's "
    "(models/sync.py, same recipe), not comparable with published numbers; sync_energy is the fallback",
}

_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # Wang et al. 2004 SSIM constants for 8-bit data
_SSIM_R = 5  # half-width of the 11x11 Gaussian window: the border cropped so only 'valid' windows count


# ----------------------------------------------------------------------------- landmarks


def interocular(landmarks: np.ndarray) -> np.ndarray:
    """face.inter_ocular per frame (eye-corner midpoints: iris points follow gaze), NaN where it is 0: the unit that
    makes errors independent of face size."""
    d = np.asarray(face.inter_ocular(np.asarray(landmarks, dtype=np.float64)), dtype=np.float64)
    return np.where(d > 0, d, np.nan)


def face_align(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks rotated and translated per frame so the eye midpoint is the origin and the eye line is +x.

    Removes head position and roll so lve compares mouth shapes only; scale is kept because lve divides by
    the inter-ocular distance itself.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    eyes = face.eye_centers(lm)
    right, left = eyes[..., 0, :], eyes[..., 1, :]
    mid, d = (right + left) / 2, left - right
    theta = np.arctan2(d[..., 1], d[..., 0])[..., None]
    c, s = np.cos(theta), np.sin(theta)
    x, y = lm[..., 0] - mid[..., None, 0], lm[..., 1] - mid[..., None, 1]
    return np.stack([c * x + s * y, -s * x + c * y], axis=-1)  # rotation by -theta


def mouth_opening_series(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap / inter-ocular distance per frame (NaN where no face).

    Gap = mean vertical (y) distance of the pairs (13,14), (82,87), (312,317); face.mouth_opening averages five
    pairs: this keeps its three so the published closure figures stay comparable. The scale is face.inter_ocular.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    upper = lm[..., [p[0] for p in INNER_LIP_PAIRS], 1]
    lower = lm[..., [p[1] for p in INNER_LIP_PAIRS], 1]
    return np.abs(lower - upper).mean(-1) / interocular(lm)


def landmark_jitter(landmarks: np.ndarray, idx: np.ndarray) -> float:
    """Mean |second temporal difference| of points idx, over inter-ocular distance: ~0 for smooth motion.

    Acceleration, not velocity, so steady head motion is free while frame-to-frame shake is penalised.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    p = lm[:, np.asarray(idx)]
    if len(p) < 3:
        return float("nan")
    acc = np.linalg.norm(p[2:] - 2 * p[1:-1] + p[:-2], axis=-1).mean(-1) / interocular(lm)[1:-1]
    ok = np.isfinite(acc)
    return float(acc[ok].mean()) if ok.any() else float("nan")


def _lip_errors(gen_lips: np.ndarray, real_lips: np.ndarray, interocular: float | np.ndarray) -> np.ndarray:
    """(T, L) per-vertex L2 error over inter-ocular distance; NaN rows where either side has no face."""
    g, r = np.asarray(gen_lips, dtype=np.float64), np.asarray(real_lips, dtype=np.float64)
    if g.shape != r.shape:
        raise ValueError(f"landmark shapes differ: {g.shape} vs {r.shape}")
    if g.ndim == 2:
        g, r = g[None], r[None]
    iod = np.broadcast_to(np.asarray(interocular, dtype=np.float64), (len(g),))
    iod = np.where(iod > 0, iod, np.nan)
    return np.linalg.norm(g - r, axis=-1) / iod[:, None]


def _summary(per_frame: np.ndarray) -> dict:
    ok = np.isfinite(per_frame)
    mean = float(per_frame[ok].mean()) if ok.any() else float("nan")
    peak = float(per_frame[ok].max()) if ok.any() else float("nan")
    return {"mean": mean, "max": peak, "per_frame": per_frame, "n": int(ok.sum())}


def lve(gen_lips: np.ndarray, real_lips: np.ndarray, interocular: float | np.ndarray) -> dict:
    """Lip vertex error: per frame mean L2 distance of the lip points / inter-ocular distance.

    gen_lips, real_lips: (T, L, 2) in the face-aligned frame (face_align(lm)[:, LIP_IDX]); interocular: scalar
    or (T,). Returns mean and max over frames with a face on both sides, per_frame (T,) with NaNs, and n.
    """
    return _summary(_lip_errors(gen_lips, real_lips, interocular).mean(-1))


def lve_max_vertex(gen_lips: np.ndarray, real_lips: np.ndarray, interocular: float | np.ndarray) -> dict:
    """The LVE variant FaceFormer et al. report: max over lip vertices per frame, then mean over frames."""
    return _summary(_lip_errors(gen_lips, real_lips, interocular).max(-1))


# ----------------------------------------------------------------------------- audio-visual sync


def _pearson(a: np.ndarray, b: np.ndarray, min_n: int) -> float:
    """Correlation over pairs where both are finite; 0 when too few pairs or either side is constant."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < min_n:
        return 0.0
    a, b = a[ok], b[ok]
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def sync_energy(mouth_open: np.ndarray, envelope_db: np.ndarray, max_lag: int = 15, min_overlap: int = 10) -> dict:
    """Audio-visual offset from the normalised cross-correlation of mouth opening and speech envelope.

    Both series are per video frame (the envelope resampled to the video fps; lengths are cut to the shorter).
    corr_by_lag[i] is the correlation of mouth_open[t] with envelope_db[t - k], k = i - max_lag, so a POSITIVE
    offset means the VIDEO LAGS the audio by that many frames. confidence = peak minus median correlation,
    the idea of SyncNet's LSE-C. NaN/inf frames are dropped pairwise; constant signals give offset 0,
    confidence 0.
    """
    m = np.asarray(mouth_open, dtype=np.float64).ravel()
    e = np.asarray(envelope_db, dtype=np.float64).ravel()
    n = min(len(m), len(e))
    m, e = m[:n], e[:n]
    lags = np.arange(-max_lag, max_lag + 1)
    corr = np.zeros(len(lags))
    for i, k in enumerate(lags):
        if abs(k) >= n:
            continue
        a, b = (m[k:], e[: n - k]) if k >= 0 else (m[: n + k], e[-k:])
        corr[i] = _pearson(a, b, min_overlap)
    if not np.any(corr != 0):
        return {"offset": 0, "confidence": 0.0, "peak": 0.0, "corr_by_lag": corr}
    best = min(np.flatnonzero(corr == corr.max()), key=lambda j: abs(lags[j]))  # ties: smallest |lag|
    return {
        "offset": int(lags[best]),
        "confidence": float(corr[best] - np.median(corr)),
        "peak": float(corr[best]),
        "corr_by_lag": corr,
    }


# ----------------------------------------------------------------------------- mouth closure


def closure(mouth_open: np.ndarray, must_close: np.ndarray, closed_thresh: float) -> dict:
    """Fraction of must-close frames (pauses, p/b/m) where the mouth is actually closed (opening < thresh).

    n counts must-close frames that have a face; rate is NaN when there are none.
    """
    m = np.asarray(mouth_open, dtype=np.float64)
    sel = np.asarray(must_close, dtype=bool) & np.isfinite(m)
    n = int(sel.sum())
    return {"rate": float((m[sel] < closed_thresh).mean()) if n else float("nan"), "n": n}


def closure_gap(mouth_open: np.ndarray, must_close: np.ndarray, speech: np.ndarray | None = None) -> float:
    """Mean opening on must-close frames / mean opening on the other speech frames (lower is better).

    Threshold-free complement to closure(): a system that half-closes scores ~0.5 even if never below the
    threshold. speech defaults to every frame not in must_close; NaN when either set is empty.
    """
    m = np.asarray(mouth_open, dtype=np.float64)
    mc = np.asarray(must_close, dtype=bool)
    sp = ~mc if speech is None else np.asarray(speech, dtype=bool) & ~mc
    ok = np.isfinite(m)
    a, b = m[mc & ok], m[sp & ok]
    if not len(a) or not len(b) or b.mean() <= 0:
        return float("nan")
    return float(a.mean() / b.mean())


# ----------------------------------------------------------------------------- images


def _frames(x: np.ndarray) -> np.ndarray:
    """Images as a float64 (T, H, W, C) batch."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        return a[None, ..., None]
    if a.ndim == 3:
        return a[None]
    if a.ndim == 4:
        return a
    raise ValueError(f"expected (H,W), (H,W,C) or (T,H,W,C) images, got shape {a.shape}")


def _masks(mask: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """A (T, H, W) bool mask from None (everything), (H, W) or (T, H, W)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    return np.broadcast_to(np.asarray(mask, dtype=bool), shape)


def _luma(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) -> (T, H, W) BT.601 luma Y in [0, 255] (RGB order; grey passes through)."""
    if frames.shape[-1] == 1:
        return frames[..., 0]
    return frames[..., :3] @ np.array([0.299, 0.587, 0.114])


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fa, fb = _frames(a), _frames(b)
    if fa.shape != fb.shape:
        raise ValueError(f"image shapes differ: {fa.shape} vs {fb.shape}")
    return fa, fb


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, max_db: float = 100.0) -> float:
    """PSNR in dB over all channels of uint8 images, 10*log10(255^2 / MSE), mean over frames.

    mask (H, W) or (T, H, W) selects the pixels. Identical frames score max_db (default 100) rather than inf,
    so per-frame means and JSON reports stay finite.
    """
    fa, fb = _pair(a, b)
    m = _masks(mask, fa.shape[:3])
    vals = []
    for t in range(len(fa)):
        d2 = (fa[t] - fb[t])[m[t]] ** 2
        if d2.size:
            mse = d2.mean()
            vals.append(min(max_db, 10 * np.log10(255.0**2 / mse)) if mse > 0 else max_db)
    return float(np.mean(vals)) if vals else float("nan")


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Wang et al. SSIM map of two float images, 11x11 Gaussian window, sigma 1.5, valid region only."""

    def blur(z: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))
    r = _SSIM_R
    return s[r:-r, r:-r]


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM on luma (Y), Wang et al. 2004 constants and window, mean over frames.

    Only windows fully inside the image count (like MATLAB's ssim_index 'valid'), so images need H, W > 10.
    mask (H, W) or (T, H, W) selects which window centres are averaged.
    """
    fa, fb = _pair(a, b)
    _, h, w, _ = fa.shape
    if min(h, w) <= 2 * _SSIM_R:
        raise ValueError(f"ssim needs images larger than {2 * _SSIM_R}x{2 * _SSIM_R}, got {h}x{w}")
    ya, yb = _luma(fa), _luma(fb)
    m = _masks(mask, ya.shape)[:, _SSIM_R:-_SSIM_R, _SSIM_R:-_SSIM_R]
    vals = [_ssim_map(ya[t], yb[t])[m[t]].mean() for t in range(len(ya)) if m[t].any()]
    return float(np.mean(vals)) if vals else float("nan")


def sharpness(img: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the Laplacian of the grey image (inside mask): falls when a generator blurs the mouth."""
    f = _frames(img)
    if len(f) != 1:
        raise ValueError(f"sharpness takes one image, got shape {np.shape(img)}; see sharpness_ratio")
    grey = _luma(f)[0]
    lap = cv2.Laplacian(grey, cv2.CV_64F)
    vals = lap[_masks(mask, (1, *grey.shape))[0]]
    return float(vals.var()) if vals.size else float("nan")


def sharpness_ratio(gen_imgs: np.ndarray, real_imgs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean sharpness of generated frames / mean of real frames: < 1 means the output is blurrier."""
    g, r = _frames(gen_imgs), _frames(real_imgs)
    mg, mr = _masks(mask, g.shape[:3]), _masks(mask, r.shape[:3])
    sg = np.mean([sharpness(g[t], mg[t]) for t in range(len(g))])
    sr = np.mean([sharpness(r[t], mr[t]) for t in range(len(r))])
    return float(sg / sr) if sr > 0 else float("nan")


def _temporal_change(frames: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean absolute frame-to-frame pixel change inside mask (pixels masked in both frames)."""
    f = _frames(frames)
    m = _masks(mask, f.shape[:3])
    vals = []
    for t in range(len(f) - 1):
        sel = m[t] & m[t + 1]
        if sel.any():
            vals.append(np.abs(f[t + 1] - f[t])[sel].mean())
    return float(np.mean(vals)) if vals else float("nan")


def stability(frames_gen: np.ndarray, frames_ref: np.ndarray, outside_mask: np.ndarray | None) -> dict:
    """Temporal change outside the mouth, generated minus reference video (seams, boxes, flicker).

    outside_mask (H, W) or (T, H, W) is True away from the mouth. The reference's own motion cancels, so
    excess ~0 for a clean paste-back and > 0 when the composite adds flicker.
    """
    gen, ref = _temporal_change(frames_gen, outside_mask), _temporal_change(frames_ref, outside_mask)
    return {"gen": gen, "ref": ref, "excess": gen - ref}
