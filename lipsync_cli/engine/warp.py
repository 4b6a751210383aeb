"""Re-shape one of the person's own mouths: shut it, or open it further, by a piecewise-affine warp of the lips.

Retrieval needs a shut mouth on every p/b/m frame and an open one on every open vowel. Some videos never show one
(a speaker who talks through the whole clip never fully closes; a mumbler never opens wide). Then the nearest real
mouth is warped: the inner lip contours move together (or apart) along their vertical pairs, the lower lip and the
chin ride with the jaw, and the warp fades to nothing on a fixed ring of nose, cheek and jaw-side points, so only
the mouth region moves and the nose and cheeks keep their pixels. Everything outside the ring is bit-exact.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.interpolate import LinearNDInterpolator

from lipsync_cli import face

# inner-lip vertical pairs (upper, lower) from corner to corner, and the corners themselves
INNER_PAIRS = np.array(
    [[191, 95], [80, 88], [81, 178], [82, 87], [13, 14], [312, 317], [311, 402], [310, 318], [415, 324]]
)
INNER_CORNERS = np.array([78, 308])
OUTER_UPPER = np.array([185, 40, 39, 37, 0, 267, 269, 270, 409])
OUTER_LOWER = np.array([146, 91, 181, 84, 17, 314, 405, 321, 375])
OUTER_CORNERS = np.array([61, 291])
CHIN = np.array([18, 200, 199, 175, 152, 148, 176, 377, 400, 83, 313, 201, 421, 208, 428])
# fixed: the nose's base, the cheeks and the jaw's sides stay exactly where they are
RING = np.array([2, 98, 327, 203, 423, 205, 425, 207, 427, 216, 436, 192, 416, 58, 288, 172, 397, 136, 365, 150, 379])
SHUT_PX = 0.1  # half the distance left between the lips of a shut mouth (pixels): a seam, not an overlap
PRESS = 0.25  # a shut mouth's seam shows lip, from this far into each lip: the dark inner rim disappears
# A shut mouth's lips are pressed: each lip's outer edge moves this share of the lip's height towards the seam.
# Re-tracked, a closure that kept the lips' full height often read parted (0.010-0.045) although it looks shut:
# 70 of 87 read shut (11 faces, 8 mouths each; GRID s33 lwbi5s 1 of 8), 84 of 87 with 0.3 (lwbi5s 7). The mesh
# measures real closures at 0.97 of the lips' height, so this over-presses a little: docs/articulation.md
ROLL = 0.3


def reshaped(pts: np.ndarray, scale: float) -> np.ndarray:
    """Aligned landmarks (478, 2) of the same mouth with its inner-lip gap times `scale` (0: shut). Closing lowers
    the upper lip a little and raises the jaw more, and presses the lips (ROLL); opening mostly drops the jaw."""
    pts = np.asarray(pts, np.float64)
    new = pts.copy()
    up, lo = pts[INNER_PAIRS[:, 0]], pts[INNER_PAIRS[:, 1]]
    share_up = 0.4 if scale < 1 else 0.2  # of the change taken by the upper lip; the jaw takes the rest
    change = (scale - 1.0) * (lo - up)  # lower minus upper grows by this
    new_up = up - share_up * change
    new_lo = lo + (1 - share_up) * change
    if scale <= 0:
        mid = (new_up + new_lo) / 2
        new_up, new_lo = mid - [0, SHUT_PX], mid + [0, SHUT_PX]
    d_up, d_lo = new_up - up, new_lo - lo
    new[INNER_PAIRS[:, 0]] += d_up
    new[INNER_PAIRS[:, 1]] += d_lo
    new[OUTER_UPPER] += 0.5 * d_up
    jaw = d_lo.mean(0)
    new[OUTER_LOWER] += d_lo
    if scale <= 0:
        new[OUTER_UPPER] += ROLL * (new[INNER_PAIRS[:, 0]] - new[OUTER_UPPER])
        new[OUTER_LOWER] += ROLL * (new[INNER_PAIRS[:, 1]] - new[OUTER_LOWER])
    new[CHIN] += 0.8 * jaw
    new[INNER_CORNERS] += 0.5 * (d_up.mean(0) + jaw) * [0, 1]
    new[OUTER_CORNERS] += 0.25 * (d_up.mean(0) + jaw) * [0, 1]
    return new


def reshape(crop: np.ndarray, pts: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(a mouth image, its landmarks in its pixels (478, 2)) -> the image with the mouth's inner-lip gap times
    `scale` (0: shut), and the moved landmarks (`reshaped`)."""
    pts = np.asarray(pts, np.float64)
    new = reshaped(pts, scale)
    moved = np.concatenate([INNER_PAIRS.ravel(), INNER_CORNERS, OUTER_UPPER, OUTER_LOWER, OUTER_CORNERS, CHIN])
    ctrl = np.concatenate([moved, RING])
    src = pts.copy()
    if scale <= 0:  # pressed lips: the seam samples the lips' bodies, not their dark inner edges
        src[INNER_PAIRS[:, 0]] += PRESS * (pts[OUTER_UPPER] - pts[INNER_PAIRS[:, 0]])
        src[INNER_PAIRS[:, 1]] += PRESS * (pts[OUTER_LOWER] - pts[INNER_PAIRS[:, 1]])
    return _warp(crop, new[ctrl], src[ctrl]), new


def _warp(img: np.ndarray, dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Piecewise-affine backward warp: the pixel at dst[k] comes from src[k]; identity outside their hull."""
    x0, y0 = np.floor(np.maximum(np.minimum(dst.min(0), src.min(0)), 0)).astype(int)
    x1, y1 = np.ceil(np.minimum(np.maximum(dst.max(0), src.max(0)) + 1, img.shape[1::-1])).astype(int)
    gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
    disp = LinearNDInterpolator(dst, src - dst, fill_value=0.0)(gx, gy)
    map_x = (gx + disp[..., 0]).astype(np.float32)
    map_y = (gy + disp[..., 1]).astype(np.float32)
    out = img.copy()
    out[y0:y1, x0:x1] = cv2.remap(img, map_x, map_y, face.SHARP, borderMode=cv2.BORDER_REPLICATE)
    still = (np.abs(disp) < 1e-6).all(-1)
    out[y0:y1, x0:x1][still] = img[y0:y1, x0:x1][still]  # untouched pixels stay bit-exact
    return out


def eval_gap(pts: np.ndarray) -> np.ndarray:
    """Inner-lip gap as `lipsync eval` measures it: the mean of pairs (13,14), (82,87), (312,317) over the outer eye
    corners' distance (33, 263). pts: (..., 478, 2) in any similarity frame."""
    pairs = np.array([[13, 14], [82, 87], [312, 317]])
    g = np.linalg.norm(pts[..., pairs[:, 1], :] - pts[..., pairs[:, 0], :], axis=-1).mean(-1)
    return g / np.linalg.norm(pts[..., 263, :] - pts[..., 33, :], axis=-1)


def mouth_width(pts: np.ndarray) -> np.ndarray:
    """Distance between the lip corners (61, 291) over the outer eye corners' distance: rounding narrows it."""
    return np.linalg.norm(pts[..., 291, :] - pts[..., 61, :], axis=-1) / np.linalg.norm(
        pts[..., 263, :] - pts[..., 33, :], axis=-1
    )
