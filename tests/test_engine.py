"""The retrieval engine's pieces on constructed inputs whose answer is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_cli.compositing import colour_field, lower_face_mask
from lipsync_cli.engine import retrieval
from lipsync_cli.engine.retrieval import select_mouths
from lipsync_cli.models import lipmap


def smooth_walk(T: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(T, k)), axis=0)
    return (x - x.mean(0)) / x.std(0)


def test_viterbi_replays_a_source_run_when_asked_for_it():
    src = smooth_walk(200, 4)
    pose = np.zeros((200, 6))
    valid = np.ones(200, bool)
    target = src[50:90] + 0.01
    path = select_mouths(src, pose, valid, target, background=np.arange(40))
    assert path.tolist() == list(range(50, 90))


def test_viterbi_never_picks_invalid_frames_and_prefers_matching_pose():
    src = np.repeat(smooth_walk(100, 3), 2, axis=0)  # every shape twice: frames 2i and 2i+1 look alike
    pose = np.zeros((200, 2))
    pose[1::2] = 5.0  # odd frames: head turned
    valid = np.ones(200, bool)
    valid[:20] = False
    target = src[40:80]
    path = select_mouths(src, pose, valid, target, background=np.full(40, 0))  # background pose: frontal (even)
    assert (path >= 20).all()
    assert np.mean(path % 2 == 0) > 0.8


def test_a_mouth_whose_jaw_line_does_not_fit_is_shown_only_when_none_fits():
    src = np.zeros((3, 2))
    src[1] = 3.0  # mouth 1 has the wrong shape...
    jaw = np.zeros((3, 4, 2))
    jaw[0] = 2 * retrieval.JAW_TOL  # ...mouth 0 the right shape but its jaw elsewhere in the crop
    jaw[2] = 0.5 * retrieval.JAW_TOL  # frame 2 (behind the output) has no mouth usable, only its jaw
    valid = np.array([True, True, False])
    target, behind = np.zeros((4, 2)), np.full(4, 2)
    pose = np.zeros((3, 2))
    assert set(select_mouths(src, pose, valid, target, behind, jaw=jaw).tolist()) == {1}
    assert set(select_mouths(src, pose, valid, target, behind).tolist()) == {0}  # without the rule: the shape wins
    jaw[1] = jaw[0]  # no mouth fits: the best shape, as before
    assert set(select_mouths(src, pose, valid, target, behind, jaw=jaw).tolist()) == {0}


def test_a_still_heads_pose_jitter_is_no_mismatch():
    """On a still head (GRID) the pose features differ by tracking noise alone: a mouth three noise levels away in
    pose is still a match (POSE_FLOOR), where measured in units of the noise it would be dropped as another pose."""
    rng = np.random.default_rng(0)
    pose = rng.normal(scale=1e-4, size=(100, 2 * 38))  # sub-pixel jitter of 38 stable points
    pose[10] += 3e-4 * np.sign(rng.normal(size=76))  # the one mouth that matches: a little further off
    valid = np.ones(100, bool)
    assert retrieval._pose_scale(pose, valid) == retrieval.POSE_FLOOR * np.sqrt(38)
    src = rng.normal(size=(100, 3))  # every mouth its own shape
    assert select_mouths(src, pose, valid, src[10:11], background=np.array([50])).tolist() == [10]


def test_a_video_that_never_quite_shuts_lends_its_tightest_mouths():
    assert retrieval.shut_limit(np.array([0.003, 0.02, 0.1])) == retrieval.CLOSED_GAP  # shuts: the usual bar
    assert retrieval.shut_limit(np.array([0.0071, 0.02, 0.1])) == pytest.approx(0.00781)  # nearly: its tightest
    assert retrieval.shut_limit(np.array([0.02, 0.1])) == retrieval.CLOSED_GAP  # never: re-shaped mouths


def test_a_squeezed_vowel_opens_its_share_of_a_wide_mouth_beside_closures_do_not():
    """Frames beside a closure open at most APPROACH_GAP (in proportion to their cap) however wide the person
    opens; the first frame of a vowel squeezed between closures opens SQUEEZED_CAP of this person's wide mouth."""
    from lipsync_cli import visemes

    cap = np.array([visemes.APPROACH_IN, visemes.APPROACH, visemes.SQUEEZED_CAP, 1.0])
    wide = 0.23  # pcavs_00086
    tops = retrieval.approach_tops(cap, wide)
    assert tops[0] == pytest.approx(retrieval.APPROACH_GAP * visemes.APPROACH_IN / visemes.APPROACH)
    assert tops[1] == pytest.approx(retrieval.APPROACH_GAP) and visemes.APPROACH * wide > retrieval.APPROACH_GAP
    assert tops[2] == pytest.approx(visemes.SQUEEZED_CAP * wide) and tops[2] > 2 * retrieval.APPROACH_GAP
    assert tops[3] == np.inf
    narrow = retrieval.approach_tops(cap, 0.06)  # a mumbler: the share of their own mouth is the smaller limit
    assert narrow[1] == pytest.approx(visemes.APPROACH * 0.06) and narrow[2] == pytest.approx(
        visemes.SQUEEZED_CAP * 0.06
    )


def test_lipmap_closes_the_mouth_where_told_and_opens_with_loudness():
    rng = np.random.default_rng(1)
    T, sr, fps = 250, 16000, 25.0
    opening = np.clip(np.sin(np.arange(T) / 4.0), 0, None)
    shapes = np.stack([opening, 0.2 * opening, rng.normal(0, 0.01, T)], 1)
    shapes = shapes + rng.normal(0, 0.001, shapes.shape)
    # the video's own audio: noise bursts whose loudness follows the opening
    env = np.repeat(opening, sr // int(fps))
    speech = (rng.normal(size=len(env)) * (0.01 + 0.3 * env)).astype(np.float32)
    m = lipmap.fit(shapes, opening, speech, fps, np.ones(T, bool))
    pred = lipmap.predict(m, speech, T, fps)
    pred_open = (pred @ m.basis + m.mean)[:, 0]
    assert np.corrcoef(pred_open, opening)[0, 1] > 0.7
    shut = np.zeros(T, bool)
    shut[100:140] = True
    closed = lipmap.predict(m, speech, T, fps, close=shut)
    np.testing.assert_allclose(closed[105:135], np.broadcast_to(m.closed, (30, len(m.closed))), atol=1e-9)
    silent = lipmap.predict(m, np.zeros_like(speech), T, fps)
    assert np.abs((silent @ m.basis + m.mean)[:, 0]).max() < 0.5 * opening.max()


def test_mask_is_feathered_and_colour_match_removes_a_lighting_offset():
    size = 128
    pts = np.zeros((478, 2))
    # a crude lower face: every mask point on a circle around (64, 80)
    ang = np.linspace(0, 2 * np.pi, 478)
    pts[:, 0], pts[:, 1] = 64 + 30 * np.cos(ang), 80 + 30 * np.sin(ang)
    mask = lower_face_mask([pts], size)
    assert mask[80, 64] > 0.99 and mask[5, 5] == 0.0
    soft = ((mask[80, 64:] > 0.05) & (mask[80, 64:] < 0.95)).sum()
    assert 2 <= soft <= 128 / 12  # a soft edge, a few pixels wide: inside it two different mouths are averaged
    rng = np.random.default_rng(0)
    target = rng.integers(60, 200, (size, size, 3)).astype(np.uint8)
    mouth = np.clip(target.astype(int) - 30, 0, 255).astype(np.uint8)  # same content, darker
    field = cv2.resize(colour_field(mouth, target, mask), (size, size), interpolation=cv2.INTER_LINEAR)
    fixed = mouth + field  # the mouth's own detail is kept, its lighting evened out
    inner = mask > 0.9
    assert np.abs(fixed[inner] - target[inner].astype(float)).mean() < 3.0


def test_mask_covers_both_chins_but_beside_the_jaw_stays_on_the_frames_own_face():
    """A mouth shown from a frame where the head was turned has its jaw's side elsewhere, and beside it that frame's
    hair, collar or backdrop: pasted, they cut strands into KatieHill's jaw line and put a collar tip on
    pcavs_741400104's (until 2026-12-07). The chin, which drops as the mouth opens, is still covered for both."""
    from lipsync_cli import face, media
    from tests.conftest import shared_file

    frame = next(media.iter_frames(shared_file("media/retalking_face2.mp4"), start=30, count=1))
    lm = face.track_faces([frame]).landmarks[0]
    size = 256
    pts = face.transform_points(lm, face.align_matrix(lm, size))
    centre = pts[[61, 291, 0, 17]].mean(0)
    shown = pts.copy()
    shown[:, 0] = centre[0] + 0.85 * (pts[:, 0] - centre[0])  # a narrower jaw: the head turned a little
    below = pts[:, 1] > centre[1]
    shown[below, 1] += 0.05 * size  # and the jaw dropped: the mouth opens
    mask = lower_face_mask([shown, pts], size)

    def at(p: np.ndarray) -> float:
        return float(mask[int(round(p[1])), int(round(p[0]))])

    for side in (58, 172, 288, 397):  # between the shown jaw's side and the frame's: the frame's own pixels
        assert at((pts[side] + shown[side]) / 2) < 0.05
    assert at((pts[152] + shown[152]) / 2) > 0.9  # between the two chins: covered
    assert at(centre) > 0.99


def test_mask_leaves_both_noses_out_when_they_disagree():
    """A mouth shown from a frame where the face sat lower in the crop brought its nostrils along, as a dark second
    pair under the frame's own (KatieHill, liveportrait_d11, until 2026-12-07). Where the noses disagree the mask's
    top clears both, and still covers both upper lips; where they agree within NOSE_AGREE it is as it was."""
    from lipsync_cli import face, media
    from lipsync_cli.compositing import NOSE_AGREE
    from tests.conftest import shared_file

    frame = next(media.iter_frames(shared_file("media/retalking_face2.mp4"), start=30, count=1))
    lm = face.track_faces([frame]).landmarks[0]
    size = 256
    pts = face.transform_points(lm, face.align_matrix(lm, size))
    lower = pts + [0, 6]  # the shown face 6 px lower: its nose bottom where the frame's philtrum is
    mask = lower_face_mask([lower, pts], size)

    def at(p: np.ndarray) -> float:
        return float(mask[int(round(p[1])), int(round(p[0]))])

    for nose in (2, 97, 326):
        assert at(lower[nose]) < 0.1 and at(pts[nose]) < 0.1
    for lip in (0, 37, 267):
        assert at(lower[lip]) > 0.98 and at(pts[lip]) > 0.98
    mask = lower_face_mask([pts, pts], size)
    alone = at(pts[2])  # one face: the mask's feather reaches its nose bottom
    mask = lower_face_mask([pts + [0, NOSE_AGREE / 2], pts], size)  # noses that agree: as with one face
    assert abs(at(pts[2]) - alone) < 0.03


def test_colour_match_ignores_backdrop_on_the_rim():
    """Where the borrowed frame's jaw line sits elsewhere, its rim shows backdrop where the frame shows skin: that is
    no lighting change, and it tinted the whole chin (red backdrop: a cyan-grey chin)."""
    size = 128
    pts = np.zeros((478, 2))
    ang = np.linspace(0, 2 * np.pi, 478)
    pts[:, 0], pts[:, 1] = 64 + 30 * np.cos(ang), 80 + 30 * np.sin(ang)
    mask = lower_face_mask([pts], size)
    target = np.random.default_rng(0).integers(60, 200, (size, size, 3)).astype(np.uint8)
    mouth = np.clip(target.astype(int) - 30, 0, 255).astype(np.uint8)  # darker: a real lighting change
    yy, xx = np.mgrid[:size, :size]
    jaw = (yy > 90) & (xx < 60)
    mouth[jaw] = (230, 20, 20)  # red backdrop over part of the lower rim
    field = cv2.resize(colour_field(mouth, target, mask), (size, size), interpolation=cv2.INTER_LINEAR)
    err = np.abs(mouth + field - target)[(mask > 0.9) & ~jaw].max(-1)
    assert err.mean() < 2.0 and np.percentile(err, 95) < 5.0  # equal weights: 18.8 and 48


def test_a_large_face_keeps_its_mouth_detail_through_the_crop_and_back():
    """Retrieval's path for a mouth's pixels (frame -> stored mouth at the raw pose -> composite into the frame at
    the smoothed pose, a sub-pixel move apart) on a 305 px face: a crop at the face's own resolution keeps more of
    the mouth's Laplacian variance than the 256 px crop it used to be shrunk to; folding the sub-pixel move into
    the composite's resample keeps more than a resample of its own (the dub until 2026-12-05); and storing the
    frame's own pixels (a box, no resample: dubbing.store_mouth) more than storing an aligned crop (until
    2026-12-07). A face larger than the crop (here a 192 px cap, as a 600 px phone-video face meets 384) keeps its
    own pixels too: stored shrunk, as its aligned crop (until 2026-12-07), it kept 0.36."""
    import cv2

    from lipsync_cli import face, media
    from lipsync_cli.compositing import composite
    from lipsync_cli.dubbing import crop_size, store_mouth, store_shape
    from lipsync_cli.eval.metrics import sharpness
    from tests.conftest import shared_file

    frames = list(media.iter_frames(shared_file("media/retalking_face2.mp4"), start=30, count=4))
    track = face.track_faces(frames)
    kept = {}
    for way in ((256, "resampled"), (384, "resampled"), (384, "folded"), (384, "stored"), (192, "stored"),
                (192, "shrunk")):  # fmt: skip
        ratios = []
        for frame, lm in zip(frames, track.landmarks, strict=True):
            size = crop_size(face.align_matrix(lm, 128), 128, way[0])
            raw = face.align_matrix(lm, size)
            if way[1] in ("stored", "shrunk"):
                native = size / np.sqrt(np.linalg.det(raw[:, :2]))
                crop, stored = store_mouth(frame, raw, size, store_shape(size, native, way[1] == "stored"))
                # a box as it is; shrunk: the aligned crop
                assert np.allclose(stored[:, :2], np.eye(2)) == (way[1] == "stored"), way
            else:
                crop, stored = face.warp_to_aligned(frame, raw, size, face.SHARP), raw
            M = raw.copy()
            M[:, 2] += 0.3  # the smoothed pose: a sub-pixel move
            fix = face.compose_affine(M, face.invert_affine(stored))
            pts = face.transform_points(lm, M)
            # shown on a frame whose head sits a little turned and moved (as another frame of the video would)
            there = face.compose_affine(cv2.getRotationMatrix2D((size / 2, size / 2), 2.0, 1.01), M)
            there[:, 2] += (0.37, -0.21)
            if way[1] == "resampled":
                crop = cv2.warpAffine(crop, fix, (size, size), flags=face.SHARP, borderMode=cv2.BORDER_REPLICATE)
                out = composite(frame.copy(), there, size, crop, pts, pts)
            else:
                out = composite(frame.copy(), there, size, crop, pts, pts, fix)
            (x0, y0), (x1, y1) = lm[face.LIPS].min(0).astype(int), lm[face.LIPS].max(0).astype(int)
            box = np.zeros(frame.shape[:2], bool)
            box[y0:y1, x0:x1] = True
            ratios.append(sharpness(out, box) / sharpness(frame, box))
        kept[way] = (size, float(np.mean(ratios)))
    print(f"crop size and mouth-box Laplacian variance kept: {kept}")
    assert kept[256, "resampled"][0] == 256 and kept[384, "resampled"][0] > 300
    assert kept[384, "resampled"][1] > kept[256, "resampled"][1] + 0.05, kept
    assert kept[384, "folded"][1] > kept[384, "resampled"][1] + 0.01, kept
    assert kept[384, "stored"][1] > kept[384, "folded"][1] + 0.015, kept
    assert kept[192, "stored"][1] > kept[384, "stored"][1] - 0.02 and kept[192, "shrunk"][1] < 0.5, kept


def test_a_rolled_face_larger_than_the_crop_is_stored_at_its_own_scale():
    """A head rolled too far for a box (dubbing.store_mouth stores its aligned crop instead): a 600 px face with a
    192 px crop is not shrunk to 192 but kept near its own scale (MAX_STORE_SIDE allows 630 px), unless the engine
    paints on crops (own_pixels off)."""
    import cv2

    from lipsync_cli.dubbing import MAX_STORE_SIDE, store_mouth, store_shape

    frame = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3)).astype(np.uint8)
    size, native = 192, 600.0
    M = cv2.getRotationMatrix2D((700.0, 700.0), 20.0, size / native)  # frame -> aligned crop, face centred
    M[:, 2] += size / 2 - 700.0
    for own, scale in ((True, 1.0), (False, size / native)):
        shape = store_shape(size, native, own)
        crop, move = store_mouth(frame, M, size, shape)
        assert abs(move[0, 1]) > 0.2 * scale, own  # rolled: stored as its aligned crop, not as a box
        assert crop.shape[:2] == shape and abs(np.sqrt(np.linalg.det(move[:, :2])) - scale) < 0.05 * scale, own
    assert store_shape(size, 2000.0)[0] < 1.1 * MAX_STORE_SIDE  # a huge face: its mouths shrunk to that, memory kept
