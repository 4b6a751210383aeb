"""Face tracking, smoothing and alignment, on real clips from ../shared when present."""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np
import pytest
from conftest import shared_file

from lipsync_cli import face
from lipsync_cli.face import (
    JAW,
    LIPS,
    LIPS_INNER,
    LIPS_OUTER,
    MOUTH_CENTER,
    STABLE,
    TEMPLATE,
    FaceTracker,
    align_matrix,
    eye_centers,
    inter_ocular,
    invert_affine,
    lip_shape,
    mouth_opening,
    smooth_landmarks,
    track_faces,
    transform_points,
    warp_from_aligned,
    warp_to_aligned,
)

GRID_ID = "bbaf2n"


def read_frames(path, n: int) -> list[np.ndarray]:
    """First n frames as RGB uint8 (decoded here: tests must not depend on the media module)."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    assert out, f"could not decode {path}"
    return out


@cache
def tracked(rel: str, n: int = 50) -> tuple[list[np.ndarray], face.FaceTrack]:
    frames = read_frames(shared_file(rel), n)
    return frames, track_faces(frames, progress=False)


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def assert_no_shear(M: np.ndarray) -> None:
    A = M[:, :2]
    assert A[0, 0] == pytest.approx(A[1, 1], abs=1e-9)
    assert A[0, 1] == pytest.approx(-A[1, 0], abs=1e-9)


# --- no media needed -----------------------------------------------------------------------------------


def test_index_sets_match_mediapipe_topology():
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL, FACEMESH_LIPS

    lips = {i for edge in FACEMESH_LIPS for i in edge}
    assert set(LIPS.tolist()) == lips and len(LIPS) == 40
    assert len(set(LIPS_OUTER.tolist()) & set(LIPS_INNER.tolist())) == 0
    assert set(JAW.tolist()) <= {i for edge in FACEMESH_FACE_OVAL for i in edge}
    assert not set(STABLE.tolist()) & (lips | set(JAW.tolist()))
    assert TEMPLATE.shape == (len(STABLE), 2)
    # the crop spans the cheeks; the eyes and brows (y < 0) are above it
    assert (TEMPLATE[:, 0] > 0).all() and (TEMPLATE[:, 0] < 1).all() and TEMPLATE[:, 1].max() < 0.3


def test_align_matrix_is_a_similarity_onto_the_template():
    rng = np.random.default_rng(0)
    lm = rng.uniform(0, 500, (478, 2))
    G = similarity(3.1, 0.4, 200, 120)  # template (crop px) -> a rotated, scaled face in the frame
    lm[STABLE] = transform_points(TEMPLATE * 128 - 0.5, G)
    M = align_matrix(lm, 128)
    assert M.shape == (2, 3)
    assert_no_shear(M)
    np.testing.assert_allclose(transform_points(lm[STABLE], M), TEMPLATE * 128 - 0.5, atol=1e-6)
    np.testing.assert_allclose(M, invert_affine(G), atol=1e-9)
    np.testing.assert_allclose(transform_points(transform_points(lm, M), invert_affine(M)), lm, atol=1e-6)
    assert align_matrix(np.stack([lm, lm]), 64).shape == (2, 2, 3)  # batches over frames
    assert lip_shape(lm, M).shape == (40, 2)


def test_frontal_lips_undoes_any_affine_of_the_face():
    """A face seen through a shear and an uneven scale (a turned, tilted head, roughly) gives the lips it has in
    the template frame; frames without a face stay NaN."""
    rng = np.random.default_rng(1)
    face_tpl = rng.uniform(0.2, 0.8, (478, 2))  # a face in crop units
    face_tpl[STABLE] = TEMPLATE
    A = np.array([[310.0, 60.0, 140.0], [-25.0, 180.0, 90.0]])  # crop units -> frame px, not a similarity
    lm = np.stack([transform_points(face_tpl, A)] * 3)
    lm[1] = np.nan
    out = face.frontal_lips(lm, found=np.array([True, True, False]))
    assert out.shape == (3, 40, 2)
    np.testing.assert_allclose(out[0], face_tpl[face.LIPS], atol=1e-9)
    assert np.isnan(out[1:]).all()


def test_measures_and_batching():
    lm = np.zeros((478, 2))
    lm[[33, 133]] = [[90, 100], [110, 100]]
    lm[[362, 263]] = [[190, 100], [210, 100]]
    assert inter_ocular(lm) == pytest.approx(100)
    np.testing.assert_allclose(eye_centers(lm), [[100, 100], [200, 100]])
    assert mouth_opening(lm) == pytest.approx(0)
    lm[face.INNER_LIP_PAIRS[:, 1], 1] += 20  # lower inner lip 20 px down
    assert mouth_opening(lm) == pytest.approx(0.2)
    assert mouth_opening(np.stack([lm, lm])).shape == (2,)


def test_smoothing_never_crosses_gaps():
    rng = np.random.default_rng(1)
    T = 30
    raw = (np.linspace(0, 50, T)[:, None, None] + rng.normal(0, 2, (T, 478, 2)) + 300).astype(np.float32)
    found = np.ones(T, bool)
    found[12:15] = False
    raw[~found] = np.nan
    out = smooth_landmarks(raw, found, 1.5)
    assert np.isnan(out[~found]).all() and np.isfinite(out[found]).all()
    changed = raw.copy()
    changed[20:] += 40  # a different second run must not change the first one
    np.testing.assert_array_equal(smooth_landmarks(changed, found, 1.5)[:12], out[:12])
    np.testing.assert_array_equal(smooth_landmarks(raw, found, 0), raw)


def test_blank_frame_returns_none():
    with FaceTracker() as tracker:
        for _ in range(3):
            assert tracker.update(np.full((480, 640, 3), 127, np.uint8)) is None
        assert tracker.box is None and tracker.n_faces == 0
    tr = track_faces([np.zeros((64, 64, 3), np.uint8)] * 2, progress=False)
    assert not tr.found.any() and np.isnan(tr.landmarks).all() and np.isnan(tr.boxes).all()


# --- real clips ----------------------------------------------------------------------------------------

CLIPS = [
    "media/retalking_face1.mp4",
    "media/latentsync_demo2_video.mp4",  # 1080x1920 portrait, small face
    "media/sakthivel_input3.mp4",  # hand and phone near the face
    "media/pcavs_00086.mp4",  # 224x224
    f"corpus/grid/s1/video/{GRID_ID}.mpg",
]


@pytest.mark.parametrize("rel", CLIPS)
def test_face_found_in_real_clips(rel):
    frames, tr = tracked(rel)
    assert tr.found.mean() >= 0.9
    assert tr.landmarks.shape == tr.raw.shape == (len(frames), 478, 2)
    assert tr.landmarks.dtype == np.float32
    assert (tr.n_faces[tr.found] >= 1).all()
    h, w = frames[0].shape[:2]
    lm = tr.landmarks[tr.found]
    assert (lm[..., 0] > -0.1 * w).all() and (lm[..., 0] < 1.1 * w).all()
    box = tr.boxes[tr.found]
    assert np.isfinite(box).all() and (box[:, 2] > box[:, 0]).all()


def jitter(lm: np.ndarray) -> float:
    """Mean |second difference| of STABLE points over time, in inter-ocular units."""
    acc = lm[2:, STABLE] - 2 * lm[1:-1, STABLE] + lm[:-2, STABLE]
    return float(np.linalg.norm(acc, axis=-1).mean() / np.nanmean(inter_ocular(lm)))


@pytest.mark.parametrize("rel", ["media/retalking_face1.mp4", f"corpus/grid/s1/video/{GRID_ID}.mpg"])
def test_smoothing_reduces_jitter_but_keeps_speech(rel):
    _, tr = tracked(rel)
    assert tr.found.all()
    assert jitter(tr.landmarks) < 0.7 * jitter(tr.raw)
    opening_raw, opening = mouth_opening(tr.raw), mouth_opening(tr.landmarks)
    assert np.corrcoef(opening_raw, opening)[0, 1] > 0.95
    assert opening.max() > 0.8 * opening_raw.max()  # the widest opening survives


def test_alignment_round_trip_and_template_fit():
    frames, tr = tracked("media/retalking_face1.mp4")
    residuals, mouths, aligned = [], [], []
    for t in range(0, 50, 7):
        lm, frame = tr.landmarks[t], frames[t]
        M = align_matrix(lm, 128)
        assert_no_shear(M)
        stable = transform_points(lm[STABLE], M)
        aligned.append(stable / 128)
        residuals.append(np.linalg.norm(stable - (TEMPLATE * 128 - 0.5), axis=1).mean() / 128)
        mouths.append(transform_points(lm[LIPS], M).mean(0) / 128)
        # the chin and most of the jaw line lie inside the crop
        jaw = transform_points(lm[JAW], M)
        assert 0 < jaw[len(JAW) // 2, 1] < 127
        assert ((jaw >= 0) & (jaw <= 127)).all(1).mean() > 0.8

        for size, tol in ((256, 3.0), (128, 8.0)):  # 128 shrinks the face: allow for the area averaging
            M = align_matrix(lm, size)
            crop = warp_to_aligned(frame, M, size)
            assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
            back = warp_from_aligned(crop, M, frame.shape)
            inside = warp_from_aligned(np.ones((size, size), np.float32), M, frame.shape) > 0.999
            inside = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            assert inside.sum() > 0.5 * (size / np.sqrt(abs(np.linalg.det(M[:, :2])))) ** 2
            err = np.abs(back.astype(np.float32) - frame.astype(np.float32))[inside].mean()
            assert err < tol, (size, err)
            outside = warp_from_aligned(np.ones((size, size), np.float32), M, frame.shape) == 0
            assert not back[outside].any()
    # STABLE points land near the (frontal) template, however the head is turned, and at the same place in
    # every frame
    assert np.mean(residuals) < 0.05
    assert np.linalg.norm(aligned - np.mean(aligned, 0), axis=-1).mean() < 0.01
    np.testing.assert_allclose(np.mean(mouths, 0), MOUTH_CENTER, atol=0.05)


def test_mouth_opens_in_words_not_in_leading_silence():
    align = shared_file(f"corpus/grid/s1/align/{GRID_ID}.align").read_text().split("\n")
    words = [(int(a) // 1000, int(b) // 1000, w) for a, b, w in (ln.split() for ln in align if ln.strip())]
    frames, tr = tracked(f"corpus/grid/s1/video/{GRID_ID}.mpg", 75)
    opening = mouth_opening(tr.landmarks)
    s0, s1, w = words[0]
    assert w == "sil"
    silence = opening[s0 : (s0 + s1) // 2]  # GRID speakers open the mouth (breathe in) well before speaking
    middles = [opening[a + (b - a) // 4 : b - (b - a) // 4 + 1] for a, b, w in words if w != "sil"]
    speech = np.concatenate(middles)
    assert np.nanmean(speech) > np.nanmean(silence) + 0.03
    assert np.nanmax(speech) > 2 * np.nanmax(silence)


def head_crop() -> np.ndarray:
    """A square crop of a real head (1.5x its landmark box), for pasting into synthetic frames."""
    frames, tr = tracked("media/retalking_face1.mp4")
    x0, y0, x1, y1 = tr.boxes[0]
    side = max(x1 - x0, y1 - y0) * 1.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    M = np.array([[1, 0, side / 2 - cx], [0, 1, side / 2 - cy]])
    return cv2.warpAffine(frames[0], M, (int(side), int(side)), borderMode=cv2.BORDER_REPLICATE)


def test_small_face_in_portrait_frame():
    """A ~60 px face in a 1080x1920 frame: too small for the full-range detector on the whole frame."""
    frame = np.full((1920, 1080, 3), 100, np.uint8)
    frame[1300:1390, 700:790] = cv2.resize(head_crop(), (90, 90), interpolation=cv2.INTER_AREA)
    with FaceTracker() as tracker:
        for _ in range(2):
            lm = tracker.update(frame)
            assert lm is not None
            assert np.linalg.norm(lm.mean(0) - [745, 1345]) < 20


def test_face_index_picks_and_keeps_larger_or_smaller_face():
    head = head_crop()

    def canvas(big: int, small: int) -> np.ndarray:
        c = np.full((420, 820, 3), 90, np.uint8)
        c[20 : 20 + big, 20 : 20 + big] = cv2.resize(head, (big, big), interpolation=cv2.INTER_AREA)
        c[60 : 60 + small, 460 : 460 + small] = cv2.resize(head, (small, small), interpolation=cv2.INTER_AREA)
        return c

    frame = canvas(360, 230)
    for index, left in ((0, True), (1, False)):
        with FaceTracker(face_index=index) as tracker:
            for _ in range(3):
                lm = tracker.update(frame)
                assert lm is not None and tracker.n_faces == 2
                assert (lm[:, 0].mean() < 420) == left
    # keep following the small face while it grows bigger than the other one
    with FaceTracker(face_index=1) as tracker:
        sizes = zip(np.linspace(360, 230, 12).astype(int), np.linspace(230, 340, 12).astype(int), strict=True)
        for big, small in sizes:
            lm = tracker.update(canvas(big, small))
            assert lm is not None and lm[:, 0].mean() > 420


def test_track_faces_with_progress_bar():
    frames = read_frames(shared_file("media/pcavs_00086.mp4"), 8)
    tr = track_faces(iter(frames), total=len(frames), progress=True)
    assert len(tr) == 8 and tr.found.all()


def test_track_faces_in_stretches_with_a_reused_tracker():
    """dub's sparse pass: each stretch starts the tracker afresh, frames not read count as no face, a reused tracker
    gives what a new one gives, on_frame sees each frame read with its index, and frames without a face borrow
    the nearest found frame's alignment."""
    frames = read_frames(shared_file("media/pcavs_00086.mp4"), 30)
    seen = []
    with FaceTracker() as tracker:
        tracker.update(frames[-1])  # it was following the face elsewhere: the pass resets it
        tr = track_faces(
            stretches=[(0, frames[:10]), (20, iter(frames[20:30]))], n_frames=35, tracker=tracker, progress=False,
            on_frame=lambda t, frame, lm: seen.append((t, lm is not None and frame is frames[t])),
        )  # fmt: skip
    assert seen == [(t, True) for t in [*range(10), *range(20, 30)]]
    assert len(tr) == 35 and np.flatnonzero(tr.found).tolist() == [*range(10), *range(20, 30)]
    assert (tr.n_faces[10:20] == -1).all() and (tr.n_faces[tr.found] >= 1).all()
    np.testing.assert_array_equal(tr.raw[:10], track_faces(frames[:10], progress=False).raw)
    np.testing.assert_array_equal(tr.raw[20:30], track_faces(frames[20:30], progress=False).raw)
    M = tr.align(64)
    np.testing.assert_allclose(M[9], align_matrix(tr.landmarks[9], 64), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(M[12], M[9])
    np.testing.assert_array_equal(M[17], M[20])
    np.testing.assert_array_equal(M[34], M[29])
