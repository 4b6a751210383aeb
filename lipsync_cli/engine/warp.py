"""Re-shape one of the person's own mouths: shut it, or open it further, by a piecewise-affine warp of the lips.

Retrieval needs a shut mouth on every p/b/m frame and an open one on every open vowel. Some videos never show one
(a speaker who talks through the whole clip never fully closes; a mumbler never opens wide). Then the nearest real
mouth is warped: the inner lip contours move together (or apart) along their vertical pairs, the lower lip and the
chin ride with the jaw, and the warp fades to nothing on a fixed ring of nose, cheek and jaw-side points, so only
the mouth region moves and the nose and cheeks keep their pixels. Everything outside the ring is bit-exact.
Opening keeps the teeth (or the tongue) at their own size, riding with their lips: only the parting between them
grows, in the mouth's own dark.
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
SEAM_SPAN = (0.15, 0.85)  # where between the inner lips an open mouth's parting is looked for (not the lips' rims)
SEAM_PX = 0.5  # half the width of the parting an opening warp stretches
SEAM_BEND = 2.0  # grey levels a parting pays per pixel squared of bend between neighbouring lip pairs
INSIDE_PCT = 15  # the darkest share (percent) of a mouth's inside pixels that gives its colour


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
    dst, src = new[ctrl], src[ctrl]
    if scale <= 1:
        return _warp(crop, dst, src), new
    # opening: the teeth ride with their lips, and the parting between them becomes the dark inside of the mouth
    up, lo = pts[INNER_PAIRS[:, 0]], pts[INNER_PAIRS[:, 1]]
    seam_up, seam_lo = teeth_seam(crop, up, lo)
    band_up = seam_up + new[INNER_PAIRS[:, 0]] - up
    band_lo = seam_lo + new[INNER_PAIRS[:, 1]] - lo
    out = _warp(crop, np.concatenate([dst, band_up, band_lo]), np.concatenate([src, seam_up, seam_lo]))
    return _fill(out, _ring(band_up, band_lo, new), _inside_colour(crop, pts)), new


def _ring(upper: np.ndarray, lower: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """The closed outline from the left inner corner along `upper` to the right one and back along `lower`."""
    return np.concatenate([pts[INNER_CORNERS[:1]], upper, pts[INNER_CORNERS[1:]], lower[::-1]])


def _inside_colour(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """The colour of the mouth's dark inside: the mean of the darkest INSIDE_PCT of the pixels within its inner
    lips (teeth, where they show, are the bright rest)."""
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(pts[face.LIPS_INNER] * 4).astype(np.int32)], 1, shift=2)
    px = img[mask > 0].astype(np.float32)
    if len(px) == 0:
        return np.zeros(3, np.float32)
    luma = px.mean(1)
    return px[luma <= np.percentile(luma, INSIDE_PCT)].mean(0)


def _fill(img: np.ndarray, polygon: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """img with `polygon` (sub-pixel) painted `colour`, its edge feathered over about a pixel; only the polygon's
    box (and the feather's reach) is touched."""
    x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int) - 3, 0)
    x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 4, img.shape[1::-1])
    if x1 <= x0 or y1 <= y0:
        return img
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(alpha, [np.round((polygon - [x0, y0]) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    a = cv2.GaussianBlur(alpha, (0, 0), 0.6).astype(np.float32)[..., None] / 255.0
    box = img[y0:y1, x0:x1]
    box[:] = np.clip(box * (1 - a) + colour * a + 0.5, 0, 255).astype(np.uint8)
    return img


def teeth_seam(img: np.ndarray, up: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where an open mouth parts, between each inner-lip pair (K, 2) and (K, 2): a dark line through the middle
    SEAM_SPAN of the segments (between the upper and lower teeth, or the mouth's dark inside), as two points
    SEAM_PX either side of it along each segment. An opening warp that pins these to their lips moves the teeth
    with their lips (the piecewise-affine warp alone stretched the upper teeth long).

    Each segment is read as a band as wide as the pairs' spacing (a dark gap between two teeth is not a parting),
    and the line is the darkest path across the pairs that bends by SEAM_BEND grey levels per pixel squared."""
    n = 32
    u = np.linspace(*SEAM_SPAN, n)
    along = lo - up  # (K, 2)
    length = np.linalg.norm(along, axis=1)
    normal = np.c_[-along[:, 1], along[:, 0]] / np.maximum(length, 1e-9)[:, None]
    half = 0.5 * np.median(np.linalg.norm(np.diff(up, axis=0), axis=1))
    offsets = np.linspace(-half, half, 5)
    pts = up[:, None, None] + u[:, None, None] * along[:, None, None] + offsets[:, None] * normal[:, None, None]
    gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32)
    K = len(up)
    maps = np.ascontiguousarray(pts.reshape(K, -1, 2).transpose(2, 0, 1), np.float32)
    cost = cv2.remap(gray, maps[0], maps[1], cv2.INTER_LINEAR).reshape(K, n, len(offsets)).mean(2)
    bend = SEAM_BEND * ((u[:, None] - u[None, :]) * length.mean()) ** 2  # (n, n): from position i to j
    total, back = cost[0].copy(), np.zeros((K, n), np.int64)
    for k in range(1, K):  # Viterbi over the pairs
        step = total[:, None] + bend
        back[k] = np.argmin(step, axis=0)
        total = step[back[k], np.arange(n)] + cost[k]
    path = [int(np.argmin(total))]
    for k in range(K - 1, 0, -1):
        path.append(int(back[k, path[-1]]))
    at = u[np.array(path[::-1])]  # (K,) share of the way from the upper lip to the lower
    w = np.minimum(SEAM_PX, 0.25 * length) / np.maximum(length, 1e-9)
    return up + (at - w)[:, None] * along, up + (at + w)[:, None] * along


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
