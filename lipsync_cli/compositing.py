"""Compositing the new mouth into each frame, and the timing plan that says which input frame sits behind each
output frame.

The mouth is blended in the aligned crop's coordinates with a feathered mask limited to the lower face (both the
shown mouth's and the background's chin, so neither chin peeks out; beside the jaw, where another frame's hair or
collar lies elsewhere, only the face the two share; at the top, below both noses), after a smooth colour
correction learned on the mask's rim (lighting drifts between the frames a mouth is borrowed from and the frame it
lands in). Only the pixels under the mask change; the rest of the frame is left bit-exact.
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

# how far each outline point is pulled in towards the mouth, in JAW_INSET units: the jaw's sides (which, unlike the
# chin, hardly move as the mouth opens) stay the frame's own, so hair, collar or backdrop beside the jaw is never
# borrowed from a frame where it lay elsewhere (hair strands cut into KatieHill's jaw, a collar tip on pcavs')
INSET = np.array([1, 1, 0.75, 0.4, 0.15, 0, 0, 0, 0, 0, 0.15, 0.4, 0.75, 1, 1, 0, 0, 0, 0, 0, 0, 0])
# the top of the outline (the philtrum and the cheeks beside the nose) keeps the edge's feather off both faces'
# nose bottoms and both upper lips under the mask: where the shown mouth's face sat lower, its nostrils came along
# as a faint second pair under the frame's own (liveportrait_d11, 5 px apart in a 256 px crop)
TOP = np.arange(len(MASK_OUTLINE)) >= 15
NOSE_BOTTOM = np.array([98, 97, 2, 326, 327])  # alar base, columella, subnasale: the nose's lower edge, left to right
UPPER_LIP = np.r_[face.LIPS_OUTER[10:], face.LIPS_OUTER[0]]  # the outer lip ring's upper half, corners included
# crop pixels (a face's own pixels, up to dubbing.MAX_CROP): nose bottoms this close count as one, as a ghost this
# near the nostrils hides in their blur (and the re-tracked mouth reads the band above the upper lip: moving the
# edge for every sub-pixel difference opened 4 of sakthivel_input3's 10 closures on the stick); this far apart get
# the whole clearance, in proportion between
NOSE_AGREE, NOSE_APART = 2.0, 4.0
JAW_INSET = 0.06  # crop sides: the mask's growth and feather (GROW + 2 FEATHER) and a margin
JAW_APART = 0.03  # crop sides: jaw lines this far apart get the whole inset, closer ones in proportion
GROW = 1 / 40  # the mask reaches this far (crop sides) beyond the outline
# Gaussian feather of its edge (crop sides). Narrow: the colour match already evens out lighting, and inside the
# feather two different mouths are averaged (a ghost of the upper lip, -5% mouth sharpness at 1/72, twice that at
# 1/36) and the band reached the nose wings (alpha 0.11 at 1/36, 0.01 at 1/72): docs/articulation_engine.md
FEATHER = 1 / 72
FIELD_STEP = 4  # the colour field is measured on images this many times smaller than the crop
OUTLIER_LEVELS = 16.0  # rim pixels further than this from the rim's median shift count less (Cauchy weights)


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
    """Feathered float32 mask (S, S) in aligned coordinates over the lower face: down to the lowest chin of the
    landmark sets given, and beside the jaw inside the innermost of their jaw lines, pulled in by JAW_INSET."""
    mask = np.zeros((size, size), np.uint8)
    outlines = np.stack([pts[MASK_OUTLINE] for pts in points])  # (K, P, 2)
    centre = np.array(face.MOUTH_CENTER) * size  # where alignment puts the mouth
    # the chin of every set (so neither chin peeks out); beside the jaw only the innermost set's, pulled in as far
    # as the sets' jaw lines disagree there (where they agree, so do the hair and collar beside them)
    inner = outlines[np.argmin(np.linalg.norm(outlines - centre, axis=-1), axis=0), np.arange(len(MASK_OUTLINE))]
    apart = np.linalg.norm(outlines - inner, axis=-1).max(0) / size
    pull = centre - inner
    depth = INSET * JAW_INSET * np.clip(apart / JAW_APART, 0, 1) * size
    inner += pull / np.maximum(np.linalg.norm(pull, axis=1, keepdims=True), 1e-9) * depth[:, None]
    side = INSET > 0
    grow = max(1, round(size * GROW))
    sigma = max(1.0, size * FEATHER)
    outlines[:, TOP] = _clear_of_noses(outlines[:, TOP], points, grow, 2 * sigma)
    hull = cv2.convexHull(np.round(np.concatenate([inner[side], *outlines[:, ~side]]) * 4).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=2)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    # a turned head's jaw side can fall outside the crop: the mask must fade out inside it, or its cut at the crop's
    # edge shows as a bright line on the cheek (retalking_face1)
    m = int(np.ceil(3 * sigma)) + 1
    mask[:m], mask[-m:], mask[:, :m], mask[:, -m:] = 0, 0, 0, 0
    return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigma)


def _clear_of_noses(tops: np.ndarray, points: list[np.ndarray], grow: float, clear: float) -> np.ndarray:
    """The outline's top points (K sets, P, 2), moved down where the mask's edge (`grow` above the highest of them
    once dilated) would come within `clear` of the lowest of the sets' nose bottoms, never so far that it comes
    within `clear` of the highest of their upper lips (where both cannot hold: halfway between). Only as far as the
    noses disagree (NOSE_AGREE..NOSE_APART): where they agree, the shown nose bottom lands on the frame's own."""
    x = tops[..., 0].mean(0)

    def line(idx: np.ndarray) -> np.ndarray:  # (K, P): each set's edge through `idx`, at the top points' x
        return np.stack([np.interp(x, *p[idx][np.argsort(p[idx, 0])].T) for p in points])

    noses = line(NOSE_BOTTOM)
    nose, lip = noses.max(0) + clear, line(UPPER_LIP).min(0) - clear
    edge = tops[..., 1].min(0) - grow
    cleared = np.where(nose <= lip, np.clip(edge, nose, lip), (nose + lip) / 2)
    share = np.clip((np.ptp(noses, axis=0) - NOSE_AGREE) / (NOSE_APART - NOSE_AGREE), 0, 1)
    out = tops.copy()
    out[..., 1] = np.maximum(tops[..., 1], edge + share * (cleared - edge) + grow)
    return out


def colour_field(mouth: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The smooth low-frequency shift that takes `mouth` towards `target`, measured on the mask's rim, where both
    should show the same skin: (S/2, S/2, 3) float32 for S x S inputs (None when the rim is too small to tell).
    The field is smooth by construction, so `composite` measures it on quarter-resolution images (a full-size
    field cost ~2 ms a frame to build and warp) and samples it only where it blends."""
    rim = (mask > 0.05) & (mask < 0.6)
    if rim.sum() < 2:  # a rim of a pixel or two tells nothing
        return None
    diff = target.astype(np.float32) - mouth.astype(np.float32)
    # where the two frames' jaw lines differ, the rim holds backdrop on one side and skin on the other: a lighting
    # shift is a few levels, those are a hundred, and they tinted the chin (red backdrop -> a cyan-grey chin)
    dev = np.abs(diff - np.median(diff[rim], axis=0)).max(-1)
    rim = rim / (1.0 + (dev / OUTLIER_LEVELS) ** 2)
    diff *= rim[..., None]
    overall = diff.sum((0, 1)) / rim.sum()
    small = (max(mask.shape[0] // 2, 4),) * 2
    sigma = small[0] / 6
    num = cv2.GaussianBlur(cv2.resize(diff, small, interpolation=cv2.INTER_AREA), (0, 0), sigma)
    den = cv2.GaussianBlur(cv2.resize(rim, small, interpolation=cv2.INTER_AREA), (0, 0), sigma)[..., None]
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), overall).astype(np.float32)


def _scale(f: float) -> np.ndarray:
    """The 2x3 affine from pixels of an image to pixels of the same image resized by `f` (pixel centres kept)."""
    return np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5]])


def _sample(img: np.ndarray, A: np.ndarray, x: np.ndarray, y: np.ndarray, flags: int) -> np.ndarray:
    """`img` at the points A(x, y) (a 2x3 affine of pixel coordinates): (N, channels) float32. What warpAffine
    gives at those pixels, without computing the rest of its box."""
    width = 512  # remap wants maps under 32767 a side
    rows = -(-len(x) // width)
    pad = rows * width - len(x)
    mx = np.pad((A[0, 0] * x + A[0, 1] * y + A[0, 2]).astype(np.float32), (0, pad)).reshape(rows, width)
    my = np.pad((A[1, 0] * x + A[1, 1] * y + A[1, 2]).astype(np.float32), (0, pad)).reshape(rows, width)
    out = cv2.remap(img, mx, my, flags, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * width, -1)[: len(x)].astype(np.float32)


def composite(
    frame: np.ndarray,
    M: np.ndarray,
    size: int,
    mouth: np.ndarray,
    mouth_points: np.ndarray,
    frame_points: np.ndarray,
    mouth_fix: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a mouth into `frame` (in place, and returned). M: the frame's frame -> aligned crop transform (crops of
    `size`); mouth_points / frame_points: aligned landmarks of the shown mouth and of the frame's own face; mouth:
    an aligned crop, or with `mouth_fix` (the move from its pixels to aligned coordinates, SourceFaces.crop_fix)
    any image of it (a stored mouth: a box of its own frame), the move folded into the one resample its pixels go
    through."""
    mask = lower_face_mask([mouth_points, frame_points], size)

    # only the pixels under the mask's footprint in the frame are touched (its bounding box: ~half of them)
    Minv = face.invert_affine(M)
    bx, by, bw, bh = cv2.boundingRect((mask > 1e-3).view(np.uint8))
    if bw == 0:
        return frame
    corners = np.array([[bx, by], [bx + bw, by], [bx, by + bh], [bx + bw, by + bh]], np.float64)
    fc = face.transform_points(corners, Minv)
    h, w = frame.shape[:2]
    x0, y0 = max(int(np.floor(fc[:, 0].min())) - 2, 0), max(int(np.floor(fc[:, 1].min())) - 2, 0)
    x1, y1 = min(int(np.ceil(fc[:, 0].max())) + 2, w), min(int(np.ceil(fc[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return frame
    to_box = Minv.copy()
    to_box[:, 2] -= (x0, y0)
    alpha = cv2.warpAffine(mask, to_box, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)
    ty, tx = np.nonzero(alpha > 1.0 / 512)
    if not len(tx):
        return frame
    a = np.minimum(alpha[ty, tx], 1.0)[:, None]
    # the background is never resampled, only covered; the mouth's pixels go through one resample, with the
    # sharpest interpolation (face.SHARP); the smooth mask and colour field need none
    from_mouth = to_box if mouth_fix is None else face.compose_affine(to_box, mouth_fix)
    region = frame[y0:y1, x0:x1]
    out = (
        region[ty, tx].astype(np.float32) * (1.0 - a)
        + _sample(mouth, face.invert_affine(from_mouth), tx, ty, face.SHARP) * a
    )

    q = max(size // FIELD_STEP, 8)
    to_q = _scale(q / size)
    field = colour_field(
        face.warp_to_aligned(mouth, to_q if mouth_fix is None else face.compose_affine(to_q, mouth_fix), q),
        face.warp_to_aligned(frame, face.compose_affine(to_q, M), q),
        cv2.resize(mask, (q, q), interpolation=cv2.INTER_AREA),
    )
    if field is not None:
        to_field = face.compose_affine(_scale(field.shape[0] / size), face.invert_affine(to_box))
        out += _sample(field, to_field, tx, ty, cv2.INTER_LINEAR) * a
    region[ty, tx] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return frame
