"""Compositing the new mouth into each frame, and the timing plan that says which input frame sits behind each
output frame.

The mouth is blended in the aligned crop's coordinates with a feathered mask limited to the lower face (the union of
the shown mouth's and the background's chin, so neither chin peeks out), after a smooth colour correction learned
on the mask's rim (lighting drifts between the frames a mouth is borrowed from and the frame it lands in). Only the
pixels under the mask change; the rest of the frame is left bit-exact.
"""

from __future__ import annotations

import cv2
import numpy as np

from lipsync_cli import face

# lower face outline: jaw from one mouth-level cheek to the other through the chin, then across the lower cheeks
# and the philtrum, well under the nose: a mouth borrowed from another frame never brings its nostrils or upper
# cheeks along (they showed stretched when the head had turned between the two frames)
MASK_OUTLINE = np.array(
    [58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 436, 391, 393, 164, 167, 165, 216]
)

GROW = 1 / 40  # the mask reaches this far (crop sides) beyond the outline
# Gaussian feather of its edge (crop sides). Narrow: the colour match already evens out lighting, and inside the
# feather two different mouths are averaged (a ghost of the upper lip, -5% mouth sharpness at 1/72, twice that at
# 1/36) and the band reached the nose wings (alpha 0.11 at 1/36, 0.01 at 1/72): docs/articulation_engine.md
FEATHER = 1 / 72


def timing_plan(n_src: int, n_out: int, mode: str) -> np.ndarray:
    """Source frame index behind each output frame. Speech longer than the video: `bounce` plays it forward and
    backward (no jump cut), `loop` starts over, `cut` stops at the video's end; shorter speech always cuts."""
    if n_src <= 0:
        raise ValueError("video has no frames")
    i = np.arange(n_out)
    if n_out <= n_src or mode == "cut":
        return i[: min(n_out, n_src)]
    if mode == "loop":
        return i % n_src
    if mode == "bounce":
        if n_src == 1:
            return np.zeros(n_out, dtype=np.int64)
        period = 2 * (n_src - 1)
        j = i % period
        return np.where(j < n_src, j, period - j)
    raise ValueError(f"unknown sync mode {mode!r}")


def lower_face_mask(points: list[np.ndarray], size: int) -> np.ndarray:
    """Feathered float32 mask (S, S) in aligned coordinates covering the lower face of every landmark set given."""
    mask = np.zeros((size, size), np.uint8)
    for pts in points:
        hull = cv2.convexHull(np.round(pts[MASK_OUTLINE] * 4).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=2)
    grow = max(1, round(size * GROW))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    sigma = max(1.0, size * FEATHER)
    # a turned head's jaw side can fall outside the crop: the mask must fade out inside it, or its cut at the crop's
    # edge shows as a bright line on the cheek (retalking_face1)
    m = int(np.ceil(3 * sigma)) + 1
    mask[:m], mask[-m:], mask[:, :m], mask[:, -m:] = 0, 0, 0, 0
    return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigma)


def colour_field(mouth: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray | float:
    """The smooth low-frequency shift that takes `mouth` towards `target`, measured on the mask's rim, where both
    should show the same skin ((S, S, 3) float32; 0.0 when the rim is too small to tell)."""
    rim = ((mask > 0.05) & (mask < 0.6)).astype(np.float32)
    if rim.sum() < 20:
        return 0.0
    size = mask.shape[0]
    diff = (target.astype(np.float32) - mouth.astype(np.float32)) * rim[..., None]
    overall = diff.sum((0, 1)) / rim.sum()
    # the field is smooth by construction: build it at 1/8 resolution (a wide blur at full size costs ~20 ms)
    small = (max(size // 8, 4),) * 2
    sigma = small[0] / 6
    num = cv2.GaussianBlur(cv2.resize(diff, small, interpolation=cv2.INTER_AREA), (0, 0), sigma)
    den = cv2.GaussianBlur(cv2.resize(rim, small, interpolation=cv2.INTER_AREA), (0, 0), sigma)[..., None]
    field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), overall).astype(np.float32)
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)


def composite(
    frame: np.ndarray,
    M: np.ndarray,
    mouth: np.ndarray,
    mouth_points: np.ndarray,
    frame_points: np.ndarray,
    mouth_fix: np.ndarray | None = None,
) -> np.ndarray:
    """Blend an aligned mouth crop into `frame` (in place, and returned). M: the frame's frame->crop transform;
    mouth_points / frame_points: aligned landmarks of the shown mouth and of the frame's own face; mouth_fix: the
    move from the mouth crop's pixels to its aligned coordinates (SourceFaces.crop_fix), folded into the one
    resample its pixels go through."""
    size = mouth.shape[0]
    mask = lower_face_mask([mouth_points, frame_points], size)
    target = face.warp_to_aligned(frame, M, size)
    field = colour_field(mouth, target, mask)  # built at 1/8 resolution: mouth_fix's sub-pixel move does not count

    # only the bounding box of the mask's footprint in the frame is touched
    Minv = face.invert_affine(M)
    ys, xs = np.nonzero(mask > 1e-3)
    if len(xs) == 0:
        return frame
    corners = np.array(
        [
            [xs.min(), ys.min()],
            [xs.max() + 1, ys.min()],
            [xs.min(), ys.max() + 1],
            [xs.max() + 1, ys.max() + 1],
        ]
    )
    fc = face.transform_points(corners.astype(np.float64), Minv)
    h, w = frame.shape[:2]
    x0, y0 = max(int(np.floor(fc[:, 0].min())) - 2, 0), max(int(np.floor(fc[:, 1].min())) - 2, 0)
    x1, y1 = min(int(np.ceil(fc[:, 0].max())) + 2, w), min(int(np.ceil(fc[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return frame
    to_box = Minv.copy()
    to_box[:, 2] -= (x0, y0)
    dsize = (x1 - x0, y1 - y0)
    from_mouth = to_box if mouth_fix is None else face.compose_affine(to_box, mouth_fix)
    # the background is never resampled, only covered; the mouth's pixels go through one resample, with the
    # sharpest interpolation (face.SHARP); the smooth mask and colour field need none
    alpha = cv2.warpAffine(mask, to_box, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    pixels = cv2.warpAffine(mouth, from_mouth, dsize, flags=face.SHARP, borderMode=cv2.BORDER_REPLICATE)
    shift = cv2.warpAffine(np.broadcast_to(np.float32(field), (size, size, 3)) * mask[..., None], to_box, dsize)
    box = frame[y0:y1, x0:x1].astype(np.float32)
    out = box * (1.0 - alpha) + pixels * alpha + shift
    touched = alpha[..., 0] > 1.0 / 512
    region = frame[y0:y1, x0:x1]
    region[touched] = np.clip(out[touched] + 0.5, 0, 255).astype(np.uint8)
    return frame
