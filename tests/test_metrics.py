"""Metrics of `lipsync eval` on constructed inputs whose answer is known."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from lipsync_cli.eval.metrics import (
    INNER_LIP_PAIRS,
    LIP_IDX,
    NOT_COMPUTED,
    closure,
    closure_gap,
    face_align,
    interocular,
    landmark_jitter,
    lve,
    lve_max_vertex,
    mouth_opening_series,
    psnr,
    sharpness,
    sharpness_ratio,
    ssim,
    stability,
    sync_energy,
)
from lipsync_cli.face import LEFT_EYE_CORNERS, RIGHT_EYE_CORNERS, closed_threshold, eye_centers

IOD = 60.0


def face(t: int = 10, seed: int = 0) -> np.ndarray:
    """(t, 478, 2) landmarks: random points, irises (and eye corners) centred at (170, 200) and (230, 200)."""
    rng = np.random.default_rng(seed)
    lm = 200 + 20 * rng.standard_normal((t, 478, 2))
    ring = np.array([[0, 0], [3, 0], [0, 3], [-3, 0], [0, -3]], dtype=float)
    for centre, iris, corners in (
        ((170, 200), slice(468, 473), RIGHT_EYE_CORNERS),
        ((230, 200), slice(473, 478), LEFT_EYE_CORNERS),
    ):
        lm[:, iris] = np.array(centre) + ring
        lm[:, corners[0]] = np.array(centre) + [-8, 1]
        lm[:, corners[1]] = np.array(centre) + [8, -1]
    return lm


def rotate(lm: np.ndarray, deg: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return lm @ rot.T + np.array(shift)


# ----------------------------------------------------------------------------- landmarks


def test_lip_idx_is_facemesh_lips() -> None:
    assert len(LIP_IDX) == 40
    assert np.all(np.diff(LIP_IDX) > 0)
    assert {0, 13, 14, 17, 61, 78, 82, 87, 291, 308, 312, 317} <= set(LIP_IDX.tolist())


def test_interocular_is_eye_corners_not_irises() -> None:
    lm = face(4)
    np.testing.assert_allclose(interocular(lm), IOD)
    np.testing.assert_allclose(interocular(lm[:, :468]), IOD)  # a mesh without irises: the same
    gaze = lm.copy()
    gaze[:, 468:478] += [6.0, 0.0]  # irises follow the gaze; the scale must not
    np.testing.assert_allclose(interocular(gaze), IOD)
    right, left = eye_centers(lm[0])
    np.testing.assert_allclose(right, [170, 200])
    np.testing.assert_allclose(left, [230, 200])


def test_face_align_removes_roll_and_translation() -> None:
    lm = face(3)
    moved = rotate(lm, 25.0, (40.0, -13.0))
    np.testing.assert_allclose(face_align(moved), face_align(lm), atol=1e-9)
    eyes = eye_centers(face_align(moved))
    right, left = eyes[:, 0], eyes[:, 1]
    np.testing.assert_allclose(right, [[-IOD / 2, 0]] * 3, atol=1e-9)
    np.testing.assert_allclose(left, [[IOD / 2, 0]] * 3, atol=1e-9)


def test_mouth_opening_series() -> None:
    lm = face(5)
    for k, (up, lo) in enumerate(INNER_LIP_PAIRS):
        lm[:, up, 1] = 300.0
        lm[:, lo, 1] = 300.0 + 3.0 * (k + 1)  # gaps 3, 6, 9 -> mean 6
    lm[2] = np.nan
    lm[3, 14, 1] = lm[3, 13, 1]  # centre pair closed: gaps 0, 6, 9 -> mean 5
    got = mouth_opening_series(lm)
    np.testing.assert_allclose(got[[0, 1, 4]], 6.0 / IOD)
    assert np.isnan(got[2])
    assert got[3] == pytest.approx(5.0 / IOD)
    assert mouth_opening_series(lm[0]) == pytest.approx(6.0 / IOD)


def test_landmark_jitter_smooth_quadratic_and_noise() -> None:
    t = 400
    lm = np.repeat(face(1), t, axis=0)
    idx = LIP_IDX
    steps = np.arange(t, dtype=float)[:, None]
    lm[:, idx] += np.array([0.7, -0.3]) * steps[..., None]  # constant velocity
    assert landmark_jitter(lm, idx) == pytest.approx(0.0, abs=1e-9)
    quad = lm.copy()
    quad[:, idx, 0] += 0.05 * steps**2  # second difference 0.1 px
    assert landmark_jitter(quad, idx) == pytest.approx(0.1 / IOD)
    sigma = 0.5
    noisy = lm.copy()
    noisy[:, idx] += sigma * np.random.default_rng(1).standard_normal((t, len(idx), 2))
    # second difference of iid noise: N(0, 6 sigma^2) per axis; mean 2-D norm = sqrt(6) sigma sqrt(pi/2)
    expected = np.sqrt(6) * sigma * np.sqrt(np.pi / 2) / IOD
    assert landmark_jitter(noisy, idx) == pytest.approx(expected, rel=0.03)
    noisy[5] = np.nan  # frames without a face are skipped, not propagated
    assert landmark_jitter(noisy, idx) == pytest.approx(expected, rel=0.03)


# ----------------------------------------------------------------------------- lve


def test_lve_identical_is_zero() -> None:
    lips = face_align(face(6))[:, LIP_IDX]
    r = lve(lips, lips, IOD)
    assert r["mean"] == 0.0 and r["max"] == 0.0 and r["n"] == 6
    assert r["per_frame"].shape == (6,)


def test_lve_shift_of_tenth_interocular() -> None:
    t = 8
    real = face_align(face(t))[:, LIP_IDX]
    ang = np.random.default_rng(2).uniform(0, 2 * np.pi, real.shape[:2])
    shift = 0.1 * IOD * np.stack([np.cos(ang), np.sin(ang)], axis=-1)  # every vertex moved by 0.1 IOD
    gen = real + shift
    r = lve(gen, real, np.full(t, IOD))
    assert r["mean"] == pytest.approx(0.1) and r["max"] == pytest.approx(0.1)
    gen[3, 0] = real[3, 0] + [0.3 * IOD, 0]  # one vertex at 0.3 IOD in frame 3
    gen[5] = np.nan  # no face in generated frame 5
    r = lve(gen, real, IOD)
    assert r["n"] == t - 1 and np.isnan(r["per_frame"][5])
    assert r["max"] == pytest.approx((0.3 + 39 * 0.1) / 40)
    assert r["mean"] == pytest.approx(((t - 2) * 0.1 + (0.3 + 39 * 0.1) / 40) / (t - 1))
    v = lve_max_vertex(gen, real, IOD)
    assert v["max"] == pytest.approx(0.3)
    assert v["mean"] == pytest.approx(((t - 2) * 0.1 + 0.3) / (t - 1))


def test_lve_per_frame_interocular_and_shape_check() -> None:
    real = np.zeros((2, 40, 2))
    gen = real + [3.0, 4.0]  # 5 px everywhere
    np.testing.assert_allclose(lve(gen, real, np.array([50.0, 100.0]))["per_frame"], [0.1, 0.05])
    assert lve(gen[0], real[0], 50.0)["mean"] == pytest.approx(0.1)  # single frame (L, 2)
    with pytest.raises(ValueError):
        lve(gen, real[:, :30], IOD)


# ----------------------------------------------------------------------------- sync


def smooth_signal(n: int, seed: int) -> np.ndarray:
    return gaussian_filter1d(np.random.default_rng(seed).standard_normal(n), 2.0)


@pytest.mark.parametrize("lag", [3, -5, 0, 15, -15])
def test_sync_energy_recovers_injected_lag(lag: int) -> None:
    n, pad = 300, 20
    base = smooth_signal(n + 2 * pad, seed=3)
    env = base[pad : pad + n]
    mouth = 0.3 * base[pad - lag : pad - lag + n] + 0.1  # mouth[t] = env[t - lag]: video lags audio by lag
    r = sync_energy(mouth, 20 * env - 40)
    assert r["offset"] == lag
    assert r["corr_by_lag"].shape == (31,)
    assert r["corr_by_lag"][lag + 15] == pytest.approx(1.0)
    assert r["peak"] == pytest.approx(1.0)
    assert 0.5 < r["confidence"] <= 2.0


def test_sync_energy_nan_inf_and_length_mismatch() -> None:
    base = smooth_signal(340, seed=4)
    env, mouth = base[20:320].copy(), base[17:317].copy()  # lag +3
    mouth[[10, 50, 51, 52, 200]] = np.nan  # no face
    env[[0, 99]] = -np.inf  # log of digital silence
    r = sync_energy(mouth, np.concatenate([env, [0.0, 0.0]]))
    assert r["offset"] == 3 and np.all(np.isfinite(r["corr_by_lag"]))


def test_sync_energy_constant_and_degenerate() -> None:
    env = smooth_signal(200, seed=5)
    for mouth in (np.full(200, 0.1), np.full(200, np.nan), np.zeros(5)):
        r = sync_energy(mouth, env[: len(mouth)])
        assert r["offset"] == 0 and r["confidence"] == 0.0
        assert r["corr_by_lag"].shape == (31,)
    assert sync_energy(env, np.full(200, -30.0))["confidence"] == 0.0
    assert sync_energy(env, env, max_lag=4)["corr_by_lag"].shape == (9,)


# ----------------------------------------------------------------------------- closure


def test_closure_rate_and_gap() -> None:
    mouth = np.array([0.01, 0.02, 0.20, 0.30, 0.01, np.nan, 0.10])
    must = np.array([True, True, True, False, False, True, False])
    r = closure(mouth, must, closed_thresh=0.05)
    assert r["n"] == 3 and r["rate"] == pytest.approx(2 / 3)  # the NaN frame does not count
    assert closure(mouth, np.zeros(7, bool), 0.05) == {"rate": pytest.approx(np.nan, nan_ok=True), "n": 0}
    closed_mean, speech_mean = (0.01 + 0.02 + 0.20) / 3, (0.30 + 0.01 + 0.10) / 3
    assert closure_gap(mouth, must) == pytest.approx(closed_mean / speech_mean)
    speech = np.array([False, False, False, True, False, False, True])  # frame 4 is a pause, not speech
    assert closure_gap(mouth, must, speech) == pytest.approx(closed_mean / 0.20)
    assert np.isnan(closure_gap(mouth, np.ones(7, bool)))


def test_closed_threshold() -> None:
    real = np.concatenate([np.linspace(0.0, 1.0, 101), [np.nan, np.nan]])
    assert closed_threshold(real) == pytest.approx(0.05 + 0.1 * 0.90)
    assert closed_threshold(real, pct=10, margin=0.0) == pytest.approx(0.10)
    assert np.isnan(closed_threshold(np.full(4, np.nan)))


# ----------------------------------------------------------------------------- images


def image(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """Textured uint8 RGB image: smooth blobs plus fine detail."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)), (0, 0), 3) * 3 - 250
    return np.clip(img + rng.uniform(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def test_psnr_identical_and_known_noise() -> None:
    a = image()
    assert psnr(a, a) == 100.0
    assert psnr(a, a, max_db=np.inf) == np.inf
    b = np.clip(a + np.random.default_rng(1).normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-12)
    # batch: mean of per-frame PSNR; mask restricts the pixels
    assert psnr(np.stack([a, a]), np.stack([b, a])) == pytest.approx((psnr(a, b) + 100.0) / 2)
    mask = np.zeros(a.shape[:2], bool)
    mask[:20] = True
    c = a.copy()
    c[30:] = 255 - c[30:]
    assert psnr(a, c, mask=mask) == 100.0
    mse_top = np.mean((a[:20].astype(np.float64) - b[:20]) ** 2)
    assert psnr(a, b, mask=mask) == pytest.approx(10 * np.log10(255.0**2 / mse_top))
    with pytest.raises(ValueError):
        psnr(a, a[:10])


def ssim_bruteforce(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM written out window by window (no cv2), valid windows only."""
    x, y = (im.astype(np.float64) @ [0.299, 0.587, 0.114] for im in (a, b))
    g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            px, py = x[i - 5 : i + 6, j - 5 : j + 6], y[i - 5 : i + 6, j - 5 : j + 6]
            mx, my = (win * px).sum(), (win * py).sum()
            vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
            cxy = (win * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_known_values() -> None:
    a = image(0, 24, 30)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a + np.random.default_rng(2).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    got = ssim(a, b)
    assert got == pytest.approx(ssim_bruteforce(a, b), abs=1e-10)
    assert 0.0 < got < 0.95
    # flat grey images: the structure terms are C2/C2, the luminance term is analytic
    flat_a, flat_b = np.full((20, 20, 3), 100, np.uint8), np.full((20, 20, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(flat_a, flat_b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    assert ssim(np.stack([a, a]), np.stack([a, b])) == pytest.approx((1 + got) / 2)
    assert ssim(a[..., 0], a[..., 0]) == pytest.approx(1.0)  # grey input
    with pytest.raises(ValueError):
        ssim(a[:10], a[:10])


def test_ssim_mask_selects_region() -> None:
    a = image(3)
    b = a.copy()
    b[:, 40:] = 255 - b[:, 40:]
    mask = np.zeros(a.shape[:2], bool)
    mask[:, :25] = True  # window centres whose 11x11 windows never reach column 40
    assert ssim(a, b, mask=mask) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) < 0.9


def test_ssim_matches_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    a, b = image(4), image(5)
    ya, yb = (im.astype(np.float64) @ [0.299, 0.587, 0.114] for im in (a, b))
    ref = metrics.structural_similarity(
        ya, yb, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_sharpness_and_ratio() -> None:
    real = np.stack([image(s) for s in range(3)])
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in real])
    assert sharpness(blurred[0]) < sharpness(real[0])
    assert sharpness(np.full((30, 30, 3), 77, np.uint8)) == 0.0
    assert sharpness_ratio(real, real) == pytest.approx(1.0)
    assert sharpness_ratio(blurred, real) < 0.5
    flat = real[0].copy()
    flat[:, :32] = 128
    mask = np.zeros(flat.shape[:2], bool)
    mask[:, 2:30] = True  # Laplacian is zero more than one pixel inside the flat half
    assert sharpness(flat, mask) == 0.0
    with pytest.raises(ValueError):
        sharpness(real)


def test_stability_flicker_outside_mouth() -> None:
    t, h, w = 6, 40, 50
    ref = np.repeat(image(6, h, w)[None], t, axis=0)
    outside = np.ones((h, w), bool)
    outside[25:35, 15:35] = False  # mouth box
    r = stability(ref, ref, outside)
    assert r == {"gen": 0.0, "ref": 0.0, "excess": 0.0}
    gen = ref.copy()
    gen[:, 25:35, 15:35] = np.random.default_rng(7).integers(0, 256, (t, 10, 20, 3))  # mouth changes: ignored
    assert stability(gen, ref, outside)["excess"] == 0.0
    gen[:, 0:10, 0:10] = np.minimum(ref[:, 0:10, 0:10], 200)  # a pasted box, brightened by 20 every other frame
    gen[1::2, 0:10, 0:10] += 20
    expected = 20 * 100 / outside.sum()  # a 10x10 box changes by 20 between every pair of frames
    assert stability(gen, ref, outside)["excess"] == pytest.approx(expected)
    moving = np.minimum(ref, 240) + np.arange(t, dtype=np.uint8)[:, None, None, None]  # own motion cancels
    assert stability(moving, moving, None)["excess"] == 0.0
    assert stability(moving, np.minimum(ref, 240), None)["excess"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- misc


def test_not_computed_names_reasons() -> None:
    assert set(NOT_COMPUTED) == {"fid", "lpips", "lse_c/lse_d (SyncNet)"}
    assert all(isinstance(v, str) and v for v in NOT_COMPUTED.values())


def test_metrics_do_not_import_mediapipe() -> None:
    code = "import sys, lipsync_cli.eval.metrics; print('mediapipe' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
