"""Face detection, 478-point mesh, tracking, temporal smoothing and lower-face alignment.

One face is followed through a video: mediapipe's full-range detector finds it (also small faces in tall
phone video), the face mesh runs on an upscaled square crop around it, and afterwards the previous frame's
landmarks define the next crop (mediapipe's own tracking scheme), so detection only runs when the face is
lost (and every few frames to count faces). Landmarks are in full-frame pixels, cv2 convention: the centre of
pixel (col, row) is (col, row), the same convention cv2.warpAffine uses, so they can be fed straight into
the warps below.

The aligned crop is a similarity transform (no shear) fitted on points that do not move with speech, mapping
the lower face to a square where the mouth always sits at the same place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from lipsync_cli.errors import LipsyncError
from lipsync_cli.progress import log, task

N_LANDMARKS = 478  # face mesh with refine_landmarks=True (468 + 2x5 iris points)

# --- landmark index sets (mediapipe face mesh topology) -------------------------------------------------

# Rings in drawing order, from mp.solutions.face_mesh_connections.FACEMESH_LIPS (tests check the union).
LIPS_OUTER = np.array(
    [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185],
    dtype=np.int64,
)
LIPS_INNER = np.array(
    [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191],
    dtype=np.int64,
)
LIPS = np.concatenate([LIPS_OUTER, LIPS_INNER])

# Face-oval points from ear to ear (image left to right) through the chin: the lower-face mask outline.
JAW = np.array(
    [234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454],
    dtype=np.int64,
)

# The mouth gap the articulation stick reads (issue 11) and the engine chooses in: inner-lip pairs (upper, lower) at
# the centre, right and left, over the outer eye corners' distance (unlike iris points they do not move with gaze)
GAP_PAIRS = np.array([[13, 14], [82, 87], [312, 317]], dtype=np.int64)
EYE_OUTER = (33, 263)
MOUTH_CORNERS = (61, 291)

# Eyes. mediapipe's "right" eye is the subject's right, i.e. on the image left of a non-mirrored face.
# eye_centers() uses the corner midpoints rather than the iris centres, which move with gaze.
RIGHT_EYE_CORNERS = np.array([33, 133], dtype=np.int64)
LEFT_EYE_CORNERS = np.array([362, 263], dtype=np.int64)
RIGHT_EYE_CENTER_IDX = 468  # iris centre (refined mesh)
LEFT_EYE_CENTER_IDX = 473

# Inner-lip vertical pairs (upper, lower) used to measure how far the mouth is open.
INNER_LIP_PAIRS = np.array([[82, 87], [13, 14], [312, 317], [81, 178], [311, 402]], dtype=np.int64)
# The same pairs as rows of a (40, 2) lip array (LIPS order), for code that holds only the lips.
INNER_LIP_PAIRS_IN_LIPS = np.array([[LIPS.tolist().index(p) for p in pair] for pair in INNER_LIP_PAIRS.tolist()])

# Points that do not move with speech (eye corners, nose bridge and sides, between the brows, upper cheeks
# and temples), chosen as the lowest-variance points across talking clips. The alignment and the pose
# used for smoothing are fitted on these. Row order matches _STABLE_FACE below.
STABLE = np.array(
    [33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 9, 8, 3, 248, 236, 456, 51, 281, 134, 363,
     48, 278, 64, 294, 118, 347, 101, 330, 36, 266, 50, 280, 117, 346, 116, 345, 143, 372],
    dtype=np.int64,
)  # fmt: skip

# Mean frontal positions of STABLE, in "face units": origin midway between the eye centres, inter-ocular
# distance 1, y down. Derived once (Procrustes mean of mediapipe meshes over 17 talking clips, mirrored and
# averaged so it is exactly symmetric). In these units the mouth centre is at y=1.185, the nose tip at
# 0.54, the chin at 1.93 (closed mouth), the jaw angles at x=+-1.0 and the ears at x=+-1.15.
_STABLE_FACE = np.array(
    [[-0.721, -0.013], [-0.279, 0.013], [0.279, 0.013], [0.721, -0.013], [0.000, -0.087], [0.000, 0.045],
     [0.000, 0.165], [0.000, 0.278], [0.000, 0.398], [0.000, 0.543], [0.000, -0.367], [0.000, -0.218],
     [-0.083, 0.295], [0.083, 0.295], [-0.159, 0.347], [0.159, 0.347], [-0.089, 0.410], [0.089, 0.410],
     [-0.175, 0.450], [0.175, 0.450], [-0.314, 0.628], [0.314, 0.628], [-0.319, 0.677], [0.319, 0.677],
     [-0.738, 0.317], [0.738, 0.317], [-0.563, 0.432], [0.563, 0.432], [-0.499, 0.573], [0.499, 0.573],
     [-0.797, 0.563], [0.797, 0.563], [-0.864, 0.278], [0.864, 0.278], [-1.042, 0.295], [1.042, 0.295],
     [-1.012, 0.077], [1.012, 0.077]],
    dtype=np.float64,
)  # fmt: skip
_MOUTH_FACE_Y = 1.185

# Aligned lower-face crop layout: a square 2.4 inter-ocular distances wide with the (closed) mouth centre at
# (0.5, 0.45) of the crop. That spans from just below the eyes (y=0.105 face units) to 2.505 (below the chin
# of a wide-open mouth, ~2.3) and x=+-1.2 (jaw angles at +-1.0, ears at +-1.15).
CROP_SIDE_IOD = 2.4
MOUTH_CENTER = (0.5, 0.45)  # fraction of the aligned crop size (x, y)
MOUTH_BOX = (0.25, 0.30, 0.75, 0.68)  # x0, y0, x1, y1 in the aligned crop: lips, teeth, chin (eval, seed)
TEMPLATE = (_STABLE_FACE - [0.0, _MOUTH_FACE_Y]) / CROP_SIDE_IOD + MOUTH_CENTER  # STABLE in crop units (0..1)


# --- small geometry helpers ----------------------------------------------------------------------------


def eye_centers(lm: np.ndarray) -> np.ndarray:
    """(..., 2, 2): image-left eye then image-right eye, as eye-corner midpoints (iris points follow gaze)."""
    return np.stack([lm[..., RIGHT_EYE_CORNERS, :].mean(-2), lm[..., LEFT_EYE_CORNERS, :].mean(-2)], axis=-2)


def inter_ocular(lm: np.ndarray) -> float | np.ndarray:
    """Distance between the eye centres: the face's scale, for normalising distances."""
    e = eye_centers(np.asarray(lm, dtype=np.float64))
    d = np.linalg.norm(e[..., 1, :] - e[..., 0, :], axis=-1)
    return float(d) if d.ndim == 0 else d


def mouth_opening(lm: np.ndarray) -> float | np.ndarray:
    """Inner-lip gap (mean of a few vertical pairs) / inter-ocular distance: ~0 closed, 0.2-0.5 wide open."""
    lm = np.asarray(lm, dtype=np.float64)
    gap = np.linalg.norm(lm[..., INNER_LIP_PAIRS[:, 1], :] - lm[..., INNER_LIP_PAIRS[:, 0], :], axis=-1)
    r = gap.mean(-1) / inter_ocular(lm)
    return float(r) if np.ndim(r) == 0 else r


def closed_threshold(mouth_open_real: np.ndarray, pct: float = 5.0, margin: float = 0.1) -> float:
    """Opening below which the mouth counts as closed, from the REAL footage so every system shares it.

    Low percentile of the real opening plus margin * its (pct, 100 - pct) percentile range: robust to a few
    landmark glitches and independent of the opening's units.
    """
    v = np.asarray(mouth_open_real, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan")
    lo, hi = np.percentile(v, [pct, 100 - pct])
    return float(lo + margin * (hi - lo))


def nearest_found(found: np.ndarray) -> np.ndarray:
    """For each frame, the nearest frame where `found` (ties go to the earlier one); needs one at least."""
    idx, t = np.flatnonzero(found), np.arange(len(found))
    pos = np.searchsorted(idx, t)
    before, after = idx[np.maximum(pos - 1, 0)], idx[np.minimum(pos, len(idx) - 1)]
    return np.where(np.abs(t - before) <= np.abs(after - t), before, after)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation + uniform scale + translation) mapping src -> dst, as (..., 2, 3).

    In 2-D, Umeyama's solution is a complex linear regression d = a*s + b, which batches over leading axes.
    """
    s = src[..., 0] + 1j * src[..., 1]
    d = dst[..., 0] + 1j * dst[..., 1]
    sm, dm = s.mean(-1, keepdims=True), d.mean(-1, keepdims=True)
    a = ((np.conj(s - sm) * (d - dm)).sum(-1) / (np.abs(s - sm) ** 2).sum(-1))[..., None]
    b = (dm - a * sm)[..., 0]
    a = a[..., 0]
    row0 = np.stack([a.real, -a.imag, b.real], -1)
    row1 = np.stack([a.imag, a.real, b.imag], -1)
    return np.stack([row0, row1], axis=-2)


def align_matrix(lm: np.ndarray, size: int = 128) -> np.ndarray:
    """2x3 similarity mapping full-frame pixels to the aligned size x size lower-face crop.

    Fitted on STABLE points only, so the crop does not move when the mouth does. lm may also be (T, 478, 2),
    giving (T, 2, 3).
    """
    dst = TEMPLATE * size - 0.5  # crop pixel centres: the unit square [0, 1] spans the pixel edges
    return similarity_fit(np.asarray(lm, dtype=np.float64)[..., STABLE, :], dst)


def transform_points(pts: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to (..., 2) points."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ M[:, :2].T + M[:, 2]


def compose_affine(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The 2x3 affine that applies B, then A."""
    return A[:, :2] @ B + np.c_[np.zeros((2, 2)), A[:, 2]]


def invert_affine(M: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine."""
    return cv2.invertAffineTransform(np.asarray(M, dtype=np.float64))


def _warp(
    img: np.ndarray, M: np.ndarray, dsize: tuple[int, int], border: int, flags: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """cv2.warpAffine, but when shrinking more than 1.5x the covered region is first box-averaged by an
    integer factor (fast in OpenCV), so the output is not aliased."""
    k = round(1 / float(np.sqrt(abs(np.linalg.det(M[:, :2])))))
    if k < 2:
        return cv2.warpAffine(img, M, dsize, flags=flags, borderMode=border)
    w, h = dsize
    corners = transform_points(np.array([[0, 0], [w, 0], [0, h], [w, h]], float) - 0.5, invert_affine(M))
    x0, y0 = np.floor(corners.min(0)).astype(int) - k
    x1, y1 = np.ceil(corners.max(0)).astype(int) + k
    x1, y1 = x0 + -(-(x1 - x0) // k) * k, y0 + -(-(y1 - y0) // k) * k  # whole k x k blocks
    H, W = img.shape[:2]
    if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
        return cv2.warpAffine(img, M, dsize, flags=flags, borderMode=border)
    region = img[max(y0, 0) : min(y1, H), max(x0, 0) : min(x1, W)]
    pad = (max(0, -y0), max(0, y1 - H), max(0, -x0), max(0, x1 - W))
    if any(pad):
        region = cv2.copyMakeBorder(region, *pad, border)
    small = cv2.resize(region, ((x1 - x0) // k, (y1 - y0) // k), interpolation=cv2.INTER_AREA)
    # small pixel i averages region pixels [i*k, (i+1)*k): its centre is frame pixel k*i + (k-1)/2 + x0
    S = np.array([[k, 0, (k - 1) / 2 + x0], [0, k, (k - 1) / 2 + y0], [0, 0, 1]])
    return cv2.warpAffine(small, M @ S, dsize, flags=flags, borderMode=border)


def warp_to_aligned(frame: np.ndarray, M: np.ndarray, size: int, flags: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The aligned size x size crop of frame (edges replicated so the crop never has black borders). `flags`:
    the interpolation; crops whose pixels go back into a video want INTER_LANCZOS4 (SHARP): bilinear at a
    sub-pixel offset is a low-pass filter, and a mouth resampled three times on its way out loses ~25% of its
    Laplacian variance (docs/articulation_engine.md)."""
    return _warp(frame, np.asarray(M, dtype=np.float64), (size, size), cv2.BORDER_REPLICATE, flags)


SHARP = cv2.INTER_LANCZOS4  # the interpolation of every resampling a shown mouth goes through


def warp_from_aligned(crop: np.ndarray, M: np.ndarray, frame_shape: tuple) -> np.ndarray:
    """Place an aligned crop (image or mask) back into a frame-sized canvas; zero outside the crop.

    Exact inverse of warp_to_aligned: each frame pixel samples the crop at M(pixel).
    """
    h, w = frame_shape[:2]
    return cv2.warpAffine(
        crop,
        np.asarray(M, dtype=np.float64),
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def lip_shape(lm: np.ndarray, M: np.ndarray) -> np.ndarray:
    """LIPS points in the aligned crop, (len(LIPS), 2)."""
    return transform_points(np.asarray(lm)[LIPS], M)


def frontal_lips(lm: np.ndarray, found: np.ndarray | None = None) -> np.ndarray:
    """(T, 478, 2) landmarks (any pixel frame) -> (T, len(LIPS), 2) LIPS points in crop units (0..1) after the
    least-squares affine that takes the frame's STABLE points onto TEMPLATE: unlike align_matrix's similarity it
    also undoes the foreshortening of a turned or tilted head, so a mouth reads alike at any pose. NaN where no face
    (not `found`, or NaN landmarks)."""
    lm = np.asarray(lm, np.float64)
    out = np.full((len(lm), len(LIPS), 2), np.nan)
    ok = np.isfinite(lm[:, np.r_[LIPS, STABLE]]).all((1, 2))
    if found is not None:
        ok &= np.asarray(found, bool)
    if ok.any():
        src = lm[ok][:, STABLE]
        A = np.linalg.pinv(np.concatenate([src, np.ones((*src.shape[:2], 1))], -1)) @ TEMPLATE  # (n, 3, 2)
        out[ok] = lm[ok][:, LIPS] @ A[:, :2] + A[:, 2:]
    return out


def _bbox(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([pts.min(0), pts.max(0)]).astype(np.float64)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- detection -----------------------------------------------------------------------------------------


def _insightface_pack() -> Path | None:
    """An insightface model pack already on disk (never downloaded), or None."""
    root = Path.home() / ".insightface" / "models"
    if importlib.util.find_spec("insightface") is None or not root.is_dir():
        return None
    packs = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("det_*.onnx")))
    return packs[0] if packs else None


class _InsightFaceDetector:
    """Optional RetinaFace/SCRFD detector from a local insightface pack (better with occlusions)."""

    def __init__(self, pack: Path, min_confidence: float):
        from insightface.app import FaceAnalysis  # optional dependency, only imported when its pack exists

        self.app = FaceAnalysis(
            name=pack.name, root=str(pack.parent.parent), allowed_modules=["detection"],
            providers=["CPUExecutionProvider"],
        )  # fmt: skip
        self.app.prepare(ctx_id=-1, det_size=(640, 640), det_thresh=min_confidence)

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        faces = self.app.get(np.ascontiguousarray(frame_rgb[..., ::-1]))
        return np.array([f.bbox for f in faces], dtype=np.float64).reshape(-1, 4)

    def close(self) -> None:
        pass


class _MediapipeDetector:
    """mediapipe's full-range detector, with fallbacks tried only when it finds nothing: the short-range
    model (the full-range one misses some close-ups that fill the frame) and, for tall or wide frames,
    overlapping square tiles (the detector letterboxes to 192x192, so a small face in a 1080x1920 frame
    shrinks to a few pixels)."""

    def __init__(self, min_confidence: float):
        import mediapipe as mp

        fd = mp.solutions.face_detection
        with native_logs_filtered():
            self.full = fd.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
            self.short = fd.FaceDetection(model_selection=0, min_detection_confidence=min_confidence)
            blank = np.zeros((64, 64, 3), np.uint8)
            self.full.process(blank)
            self.short.process(blank)

    @staticmethod
    def _run(det, img: np.ndarray, ox: int = 0, oy: int = 0) -> list[np.ndarray]:
        h, w = img.shape[:2]
        out = []
        with native_logs_filtered():
            found = det.process(img).detections or []
        for d in found:
            b = d.location_data.relative_bounding_box
            out.append(np.array([b.xmin * w + ox, b.ymin * h + oy, (b.xmin + b.width) * w + ox,
                                 (b.ymin + b.height) * h + oy]) - 0.5)  # fmt: skip
        return out

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        boxes = self._run(self.full, frame_rgb)
        h, w = frame_rgb.shape[:2]
        if not boxes:
            boxes = self._run(self.short, frame_rgb)
        if not boxes and max(h, w) > 1.3 * min(h, w):
            side = min(h, w)
            n = int(np.ceil((max(h, w) - side) / (side / 2))) + 1
            for s in np.linspace(0, max(h, w) - side, n).round().astype(int):
                tile = frame_rgb[s : s + side] if h > w else frame_rgb[:, s : s + side]
                boxes += self._run(self.full, np.ascontiguousarray(tile), *((0, s) if h > w else (s, 0)))
            boxes = _nms(boxes)
        return np.array(boxes, dtype=np.float64).reshape(-1, 4)

    def close(self) -> None:
        self.full.close()
        self.short.close()


_NATIVE_NOISE = re.compile(rb"^([IWE]\d{4} |INFO: Created TensorFlow|WARNING: All log messages before absl)")
_fd2 = threading.RLock()


@contextlib.contextmanager
def native_logs_filtered() -> Iterator[None]:
    """mediapipe/TFLite's C++ loggers write INFO/WARNING lines straight to fd 2 (no environment variable reaches
    them), at graph start and when a face first appears. Around such a call only, fd 2 goes to a temporary file;
    afterwards it is restored and every line that is not that noise is written on, so nothing else is lost and the
    process's stderr is the same before and after (no thread, no pipe left behind)."""
    with _fd2:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(ValueError, OSError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = b"".join(line for line in tmp if not _NATIVE_NOISE.match(line))
                if kept:
                    os.write(2, kept)


def _nms(boxes: list[np.ndarray], thresh: float = 0.3) -> list[np.ndarray]:
    keep: list[np.ndarray] = []
    for b in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        if all(_iou(b, k) < thresh for k in keep):
            keep.append(b)
    return keep


def _make_detector(min_confidence: float) -> Callable[[np.ndarray], np.ndarray]:
    pack = _insightface_pack()
    if pack is not None:
        try:
            return _InsightFaceDetector(pack, min_confidence)
        except Exception as e:  # a broken optional install must not stop the tool
            log(f"insightface unusable ({e}); using mediapipe face detection")
    return _MediapipeDetector(min_confidence)


# --- tracking ------------------------------------------------------------------------------------------


class FaceTracker:
    """Incremental: feed frames one by one (so the caller can stream and cache in one pass).

    face_index picks the N-th largest face when the face is first acquired (None until there are that many);
    afterwards the same face is followed: the mesh tracks it from its own previous landmarks, and when it
    loses it (mesh face score below min_tracking_confidence, or a jump in place or size) the detector runs
    on that frame and the detection nearest to where the face was is taken. While nothing is tracked the
    detector runs on every frame; only after `reacquire_after` frames without any nearby face does it fall
    back to the N-th largest face again. After each update, `box` (x0, y0, x1, y1, or None) and `n_faces`
    (faces seen by the latest detection, which also runs every `detect_every` frames while tracking)
    describe the frame.
    """

    CROP_PX = (256, 384)  # mesh input crop size range: the mesh model is 192x192, and mediapipe resamples the
    # crop again, so upscale small faces to 256 but shrink big ones only down to 384 (a cheap linear warp)
    CROP_SCALE = 1.9  # crop side / landmark bbox side (mediapipe's own ROI is 1.5x, plus room for motion)
    DET_TO_MESH = 1.05  # landmark bbox side / detector box side (measured: 0.98-1.15 over 17 clips)

    def __init__(
        self,
        face_index: int = 0,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        detect_every: int = 10,
        reacquire_after: int = 25,
    ):
        if face_index < 0:
            raise LipsyncError(f"face index must be >= 0, got {face_index}")
        self.face_index = face_index
        self.min_tracking_confidence = min_tracking_confidence
        self.detect_every = max(1, detect_every)
        self.reacquire_after = reacquire_after
        self._detect = _make_detector(min_detection_confidence)
        self._mesh = self._new_mesh()
        self._mesh_has_face = False  # the mesh graph is currently tracking something
        self._crop: tuple[float, float, float] | None = None  # centre x, centre y, side (frame px)
        self._last_box: np.ndarray | None = None  # landmark bbox of the followed face when last seen
        self._lost_for = 0
        self._i = 0
        self.box: np.ndarray | None = None
        self.n_faces = 0

    def _new_mesh(self):
        import mediapipe as mp

        with native_logs_filtered():
            mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=0.5,
                min_tracking_confidence=self.min_tracking_confidence,
            )
            mesh.process(np.zeros((64, 64, 3), np.uint8))
        return mesh

    def _reset_mesh(self) -> None:
        """Forget the mesh's internal track (it may be on the wrong face); costs ~25 ms, so only on loss."""
        if self._mesh_has_face:
            self._mesh.close()
            self._mesh = self._new_mesh()
            self._mesh_has_face = False

    def reset(self) -> None:
        """Forget the followed face, so one tracker serves clip after clip (a new FaceTracker costs ~0.75 s of
        graph setup, a reset ~25 ms)."""
        self._reset_mesh()
        self._crop = self._last_box = self.box = None
        self._lost_for = self._i = self.n_faces = 0

    def _run_mesh(self, frame: np.ndarray) -> np.ndarray | None:
        cx, cy, side = self._crop
        px = int(np.clip(side, *self.CROP_PX))
        s = px / side
        M = np.array([[s, 0, px / 2 - 0.5 - s * cx], [0, s, px / 2 - 0.5 - s * cy]])
        if s >= 0.5:  # the mesh model resamples the crop anyway: skip the anti-aliasing here
            crop = cv2.warpAffine(frame, M, (px, px), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        else:
            crop = _warp(frame, M, (px, px), cv2.BORDER_CONSTANT)
        with native_logs_filtered():
            res = self._mesh.process(crop)
        if not res.multi_face_landmarks:
            self._mesh_has_face = False
            return None
        self._mesh_has_face = True
        lm = res.multi_face_landmarks[0].landmark
        uv = np.array([(p.x, p.y) for p in lm], dtype=np.float64) * px - 0.5
        return transform_points(uv, invert_affine(M)).astype(np.float32)

    def _set_crop(self, box: np.ndarray, scale: float) -> None:
        side = max(box[2] - box[0], box[3] - box[1]) * scale
        self._crop = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, side)

    def _follow(self, box: np.ndarray) -> None:
        """Recentre the crop only when the face drifted: a crop that stays put is mediapipe's native case."""
        cx, cy, side = self._crop
        want = max(box[2] - box[0], box[3] - box[1]) * self.CROP_SCALE
        drift = np.hypot((box[0] + box[2]) / 2 - cx, (box[1] + box[3]) / 2 - cy)
        if drift > 0.07 * side or not 0.87 < want / side < 1.15:
            self._set_crop(box, self.CROP_SCALE)

    def _choose(self, dets: np.ndarray) -> np.ndarray | None:
        """The detection to (re)acquire: near the face we follow, else the face_index-th largest."""
        if len(dets) == 0:
            return None
        if self._last_box is not None:
            lb = self._last_box
            size = max(lb[2] - lb[0], lb[3] - lb[1])
            c_last = (lb[:2] + lb[2:]) / 2
            c = (dets[:, :2] + dets[:, 2:]) / 2
            ratio = np.maximum(dets[:, 2] - dets[:, 0], dets[:, 3] - dets[:, 1]) * self.DET_TO_MESH / size
            dist = np.linalg.norm(c - c_last, axis=1) / size
            ok = (dist < 0.6) & (ratio > 0.5) & (ratio < 2.0)
            if ok.any():
                return dets[np.argmin(np.where(ok, dist, np.inf))]
            if self._lost_for < self.reacquire_after:
                return None
        order = np.argsort(-(dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1]))
        return dets[order[self.face_index]] if self.face_index < len(dets) else None

    def update(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        """(478, 2) float32 full-frame pixel landmarks of the followed face in this RGB frame, or None."""
        frame = np.asarray(frame_rgb)
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        elif frame.shape[2] == 4:
            frame = frame[..., :3]
        if frame.dtype != np.uint8:
            raise LipsyncError(f"face tracking needs uint8 RGB frames, got {frame.dtype}")
        frame = np.ascontiguousarray(frame)
        periodic = self._i % self.detect_every == 0
        self._i += 1

        dets = None
        tracking = self._crop is not None and self._lost_for == 0
        if periodic or not tracking:
            dets = self._detect(frame)
            self.n_faces = len(dets)

        lm = None
        if tracking:
            lm = self._run_mesh(frame)
            if lm is not None and not self._plausible(_bbox(lm), self._last_box):
                lm = None  # the mesh jumped (to another face, or garbage): re-acquire below
                self._reset_mesh()
        if lm is None:
            if dets is None:
                dets = self._detect(frame)
                self.n_faces = len(dets)
            det = self._choose(dets)
            if det is not None:
                self._reset_mesh()
                self._set_crop(det, self.CROP_SCALE * self.DET_TO_MESH)
                lm = self._run_mesh(frame)
                if lm is not None and not self._plausible(_bbox(lm), det, det_box=True):
                    lm = None
                    self._reset_mesh()

        if lm is None:
            self._lost_for += 1
            self.box = None
            return None
        self._lost_for = 0
        self.box = _bbox(lm)
        self._last_box = self.box
        self._follow(self.box)
        return lm

    def _plausible(self, box: np.ndarray, ref: np.ndarray | None, det_box: bool = False) -> bool:
        """Is the mesh's face the one we expected (same place, similar size)?"""
        if ref is None:
            return True
        size = max(box[2] - box[0], box[3] - box[1])
        ref_size = max(ref[2] - ref[0], ref[3] - ref[1]) * (self.DET_TO_MESH if det_box else 1.0)
        dist = np.hypot(*((box[:2] + box[2:]) / 2 - (ref[:2] + ref[2:]) / 2)) / ref_size
        return bool(dist < 0.5 and 0.6 < size / ref_size < 1.6)

    def close(self) -> None:
        self._mesh.close()
        self._detect.close()

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- smoothing -----------------------------------------------------------------------------------------


def _runs(found: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive True."""
    f = np.concatenate([[False], np.asarray(found, bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    return list(zip(edges[::2], edges[1::2], strict=True))


# Points that move with speech (lips, chin, jaw, lower cheeks): everything below the nose tip.
_TEMPLATE_NOSE_Y = 0.6


def _gauss(z: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter over time (axis 0) of a complex array, holding the ends."""
    return gaussian_filter1d(z.real, sigma, axis=0, mode="nearest") + 1j * gaussian_filter1d(
        z.imag, sigma, axis=0, mode="nearest"
    )


def smooth_landmarks(
    raw: np.ndarray,
    found: np.ndarray,
    sigma: float,
    lip_sigma: float | None = None,
) -> np.ndarray:
    """Remove mesh jitter without flattening speech.

    Each frame is split into a similarity pose (fitted on STABLE points) and the pose-free shape. The pose is
    Gaussian-smoothed over time with `sigma` frames, the shape of the mouth region with the lighter
    `lip_sigma` (default sigma/3: a 2-3 frame lip closure must survive), the rest of the shape with sigma.
    Each run of consecutive found frames is smoothed on its own: never across frames where the face was lost.
    """
    raw = np.asarray(raw, dtype=np.float32)
    out = raw.copy()
    if sigma <= 0:
        return out
    lip_sigma = sigma / 3 if lip_sigma is None else lip_sigma
    for a, b in _runs(found):
        if b - a < 3:
            continue
        L = raw[a:b].astype(np.float64)
        P = similarity_fit(np.broadcast_to(_STABLE_FACE, (b - a, *_STABLE_FACE.shape)), L[:, STABLE])
        za = P[:, 0, 0] + 1j * P[:, 1, 0]  # template -> frame: z = za * shape + zb
        zb = P[:, 0, 2] + 1j * P[:, 1, 2]
        shape = (L[..., 0] + 1j * L[..., 1] - zb[:, None]) / za[:, None]
        log_s = gaussian_filter1d(np.log(np.abs(za)), sigma, mode="nearest")
        ang = gaussian_filter1d(np.unwrap(np.angle(za)), sigma, mode="nearest")
        zb = _gauss(zb, sigma)
        lower = shape.mean(0).imag > _TEMPLATE_NOSE_Y
        for mask, sg in ((lower, lip_sigma), (~lower, sigma)):
            if sg > 0:
                shape[:, mask] = _gauss(shape[:, mask], sg)
        z = np.exp(log_s + 1j * ang)[:, None] * shape + zb[:, None]
        out[a:b] = np.stack([z.real, z.imag], -1)
    return out


# --- whole clip ----------------------------------------------------------------------------------------


@dataclass
class FaceTrack:
    """One face through a clip: what dub, prep, the sync expert and eval all start from."""

    landmarks: np.ndarray  # (T, 478, 2) float32 full-frame pixels, temporally smoothed; NaN where no face
    raw: np.ndarray  # (T, 478, 2) the same before smoothing
    found: np.ndarray  # (T,) bool
    boxes: np.ndarray  # (T, 4) x0, y0, x1, y1 of the tracked face's raw landmarks (NaN where none)
    n_faces: np.ndarray  # (T,) faces seen by the latest detection at each frame (-1: frame not tracked here)

    def __len__(self) -> int:
        return len(self.found)

    def align(self, size: int) -> np.ndarray:
        """(T, 2, 3) frame -> aligned size x size crop matrices from the smoothed landmarks. Frames without a face
        borrow the nearest found frame's matrix; needs one at least."""
        return align_matrix(self.landmarks[nearest_found(self.found)], size)


def smooth_track(raw: np.ndarray, sigma: float, n_faces: np.ndarray | None = None) -> FaceTrack:
    """A FaceTrack from raw mesh landmarks (T, 478, 2; NaN where no face) smoothed over `sigma` frames: the one
    smoothing step, also for landmarks tracked elsewhere (eval hands the sync expert its raw tracks)."""
    raw = np.asarray(raw, dtype=np.float32)
    found = np.isfinite(raw[:, 0, 0])
    return FaceTrack(
        landmarks=smooth_landmarks(raw, found, sigma),
        raw=raw,
        found=found,
        boxes=np.concatenate([raw.min(1), raw.max(1)], -1).astype(np.float64),
        n_faces=np.full(len(raw), -1, np.int64) if n_faces is None else np.asarray(n_faces, np.int64),
    )


def _grown(a: np.ndarray, n: int, fill) -> np.ndarray:
    """`a` with at least n rows along axis 0 (doubling: appends stay cheap), new rows set to `fill`."""
    if n <= len(a):
        return a
    extra = np.full((max(n - len(a), len(a)), *a.shape[1:]), fill, a.dtype)
    return np.concatenate([a, extra])


def track_faces(
    frames: Iterable[np.ndarray] = (),
    face_index: int = 0,
    smooth_sigma: float = 1.5,
    total: int | None = None,
    progress: bool = True,
    *,
    stretches: Iterable[tuple[int, Iterable[np.ndarray]]] | None = None,
    n_frames: int | None = None,
    tracker: FaceTracker | None = None,
    on_frame: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None,
    label: str = "face tracking",
) -> FaceTrack:
    """The face pass (track -> smooth; FaceTrack.align aligns): one face through RGB frames, streamed in one pass
    and never stored, so memory stays flat in the clip's length.

    `frames` run from the clip's start; or `stretches` gives (index of the first frame, its frames) in order, and
    the tracker starts afresh at each one after 0 (a jump in time: dub reads a few stretches of a long video).
    Frames not read count as "no face"; the track is `n_frames` long, or up to the last frame read. `tracker`: one
    to reuse (reset here; its graphs stay loaded), else one is made and closed. `on_frame(index, frame, raw
    landmarks or None)` runs as each frame is tracked, for what needs the frame itself (dub's crops)."""
    parts = [(0, frames)] if stretches is None else stretches
    raw = np.full((n_frames or 0, N_LANDMARKS, 2), np.nan, np.float32)
    n_faces = np.full(len(raw), -1, np.int64)
    last = -1
    bar = task(label, total) if progress else contextlib.nullcontext(lambda n=1: None)
    own = contextlib.nullcontext(tracker) if tracker is not None else FaceTracker(face_index=face_index)
    with own as tr, bar as advance:
        if tracker is not None:
            tr.reset()
            tr.face_index = face_index
        for start, part in parts:
            if start > 0:
                tr.reset()
            for t, frame in enumerate(part, start):
                lm = tr.update(frame)
                raw, n_faces = _grown(raw, t + 1, np.nan), _grown(n_faces, t + 1, -1)
                if lm is not None:
                    raw[t] = lm
                n_faces[t], last = tr.n_faces, max(last, t)
                advance(1)
                if on_frame is not None:
                    on_frame(t, frame, lm)
    n = max(n_frames or 0, last + 1)
    return smooth_track(raw[:n], smooth_sigma, n_faces[:n])


def mouth_gap(lm: np.ndarray) -> np.ndarray:
    """(..., 478, 2) landmarks in any similarity frame -> (...) inner-lip gap over the outer eye corners' distance:
    about 0.01 shut, 0.05-0.15 on open vowels. NaN where there is no face."""
    lm = np.asarray(lm)
    gap = np.linalg.norm(_points(lm, GAP_PAIRS[:, 1]) - _points(lm, GAP_PAIRS[:, 0]), axis=-1).mean(-1)
    return _over_eyes(gap, lm)


def mouth_width(lm: np.ndarray) -> np.ndarray:
    """(..., 478, 2) -> (...) distance between the lip corners over the outer eye corners': rounding narrows it."""
    lm = np.asarray(lm)
    return _over_eyes(np.linalg.norm(_points(lm, MOUTH_CORNERS[1]) - _points(lm, MOUTH_CORNERS[0]), axis=-1), lm)


def _points(lm: np.ndarray, idx) -> np.ndarray:
    return lm[..., idx, :].astype(np.float64)  # only the points used: no float64 copy of a whole video's meshes


def eye_span(lm: np.ndarray) -> np.ndarray:
    """(..., 478, 2) -> (...) distance between the outer eye corners: the scale of the stick's measures."""
    lm = np.asarray(lm)
    return np.linalg.norm(_points(lm, EYE_OUTER[1]) - _points(lm, EYE_OUTER[0]), axis=-1)


def _over_eyes(length: np.ndarray, lm: np.ndarray) -> np.ndarray:
    eyes = eye_span(lm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(eyes > 0, length / eyes, np.nan)
