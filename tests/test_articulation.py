"""The articulation stick (eval/articulation.py): gap and score on synthetic inputs, then real GRID footage, where
the real mouth must score as articulate and the same audio over one held open frame must not."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync_cli import face, media
from lipsync_cli.eval import articulation
from lipsync_cli.phones import SIL, Phone, Word
from tests.conftest import shared_file

GRID_CLIP = "corpus/grid/s1/video/bbaf2n.mpg"
GRID_TEXT = "bin blue at f two now"


def face_with_gap(gap_px: float, eyes_px: float = 100.0) -> np.ndarray:
    """A (478, 2) landmark array whose outer eye corners are eyes_px apart and inner-lip pairs gap_px apart."""
    lm = np.zeros((478, 2))
    lm[33], lm[263] = (0.0, 0.0), (eyes_px, 0.0)
    for k, (up, lo) in enumerate(face.GAP_PAIRS):
        lm[up] = (40.0 + 10 * k, 100.0)
        lm[lo] = (40.0 + 10 * k, 100.0 + gap_px)
    return lm


def test_mouth_gap_scale_and_batch():
    assert face.mouth_gap(face_with_gap(5.0)) == pytest.approx(0.05)
    assert face.mouth_gap(face_with_gap(10.0, eyes_px=200.0)) == pytest.approx(0.05)  # scale-free
    lm = np.stack([face_with_gap(1.0), np.full((478, 2), np.nan), face_with_gap(3.0)])
    g = face.mouth_gap(lm[None])  # any leading shape
    assert g.shape == (1, 3)
    np.testing.assert_allclose(g[0, [0, 2]], [0.01, 0.03])
    assert np.isnan(g[0, 1])
    # the distance is euclidean: a sideways slip of the lower lip counts too
    lm = face_with_gap(3.0)
    lm[14, 0] += 4.0
    assert face.mouth_gap(lm) > face.mouth_gap(face_with_gap(3.0))


def _word(name: str, *phones: tuple[str, float, float]) -> Word:
    ph = [Phone(lab, s, e) for lab, s, e in phones]
    return Word(name, ph[0].start, ph[-1].end, ph)


def test_score_on_synthetic_gap():
    fps = 25.0  # frame i at i * 0.04 s
    words = [
        _word(SIL, (SIL, 0.0, 0.40)),  # frames 0-9: a 0.4 s pause, frames 2-7 scored after trimming
        _word("map", ("M", 0.40, 0.48), ("AE", 0.48, 0.60), ("P", 0.60, 0.68)),  # M: 10-11, AE: 12-14, P: 15-16
        _word("bob", ("B", 0.68, 0.76), ("AA", 0.76, 0.88), ("B", 0.88, 0.96)),  # B: 17-18, AA: 19-21, B: 22-23
        _word(SIL, (SIL, 0.96, 1.20)),  # frames 24-29: 0.24 s, too short to be a scored pause
    ]
    phones = [p for w in words for p in w.phones]
    gap = np.full(30, 0.02)
    gap[[2, 3, 4, 5, 6, 7]] = [0.001, 0.001, 0.05, 0.001, 0.001, 0.001]  # one open frame in the pause
    gap[[0, 1, 8, 9]] = 0.2  # trimmed pause edges: ignored
    gap[9] = 0.005  # M closes one frame early (+-1 allowed)
    gap[12:15] = 0.10  # AE open
    gap[15:17] = 0.03  # P stays open...
    gap[18] = 0.004  # first B closes
    gap[19:22] = [0.12, 0.14, 0.10]  # AA open
    gap[20] = np.nan  # no face on one frame: left out
    gap[22:24] = 0.02  # last B open
    gap[25] = 0.001  # ...a closure two frames after it does not count
    s = articulation.score(gap, phones, fps, words)
    assert s["n_bilabial"] == 4 and s["n_open"] == 2
    assert s["bilabial"] == pytest.approx(2 / 4)  # M (early, within a frame) and the first B
    bil_min = [0.005, 0.02, 0.004, 0.02]  # smallest gap over each phone +-1 frame: 9-12, 14-17, 16-19, 21-24
    open_mean = [0.10, np.mean([0.12, 0.10])]
    assert s["contrast"] == pytest.approx(
        (np.mean(open_mean) + articulation.EPS) / (np.mean(bil_min) + articulation.EPS)
    )
    assert s["n_silence"] == 6 and s["silence"] == pytest.approx(5 / 6)
    detail = {(d["word"], d["label"], d["start"]): d for d in s["phones"]}
    assert detail[("map", "M", 0.40)]["closed"] and not detail[("bob", "B", 0.88)]["closed"]
    assert detail[("bob", "AA", 0.76)]["kind"] == "open" and detail[("map", "AE", 0.48)]["kind"] == "open"


def test_score_edge_cases():
    s = articulation.score(np.full(10, 0.05), [Phone("S", 0.0, 0.4)], 25.0)
    assert np.isnan(s["bilabial"]) and np.isnan(s["contrast"]) and s["n_bilabial"] == 0
    # a phone shorter than a frame period still gets its nearest frame
    s = articulation.score(np.array([0.05, 0.05, 0.001, 0.05, 0.05, 0.05, 0.05, 0.05]), [Phone("M", 0.085, 0.09)], 25.0)
    assert s["bilabial"] == 1.0
    # the ends of the audio count as pauses when no phone covers them
    assert articulation.pauses([Phone("AA", 0.5, 0.7)], 1.2) == [(0.0, 0.5), (0.7, 1.2)]
    assert articulation.pauses([Phone("AA", 0.1, 0.7), Phone(SIL, 0.7, 0.8), Phone("M", 0.8, 1.0)], 1.2) == []


def test_real_grid_footage_articulates(tmp_path):
    """The speaker's own footage closes on its b's and opens on its vowels; the same soundtrack over one held,
    open frame fails bilabial and contrast: the stick tells the two apart."""
    clip = shared_file(GRID_CLIP)
    real = articulation.measure(clip, GRID_TEXT)
    s = real.scores
    assert s["n_bilabial"] == 2 and s["aligned"] == 1.0 and s["face_frames"] == 1.0
    assert s["bilabial"] == 1.0 and s["contrast"] > 3.0
    assert [w.word for w in real.words if w.word != SIL] == GRID_TEXT.split()
    labels = real.frame_labels()
    assert len(labels) == len(real.gap) == 75 and ("blue", "B") in labels

    frames = list(media.iter_frames(clip, fps=25.0))
    widest = frames[int(np.nanargmax(real.gap))]
    wav = tmp_path / "own.wav"
    media.write_wav(wav, real.audio, 16000)
    held = tmp_path / "held.mp4"
    with media.VideoWriter(held, widest.shape[1], widest.shape[0], fps=25.0, audio=wav) as w:
        for _ in frames:
            w.write(widest)
    fake = articulation.measure(held, GRID_TEXT).scores
    assert fake["bilabial"] == 0.0 and fake["contrast"] < 1.2 and fake["silence"] == 0.0


# ----------------------------------------------------------------------------- the text protocol


def test_rows_and_transcripts():
    from lipsync_cli.errors import LipsyncError
    from lipsync_cli.eval import text_protocol

    assert text_protocol.parse_rows(None) == ["lips model", "map", "phone targets", "real"]
    assert text_protocol.ROWS["phone targets"] == ("retrieval", {"lips": "phones"})
    assert text_protocol.parse_rows("map, real,map") == ["map", "real"]
    assert text_protocol.parse_rows("retrieval:lips=map") == ["retrieval:lips=map"]
    assert text_protocol.ROWS["retrieval:lips=map"] == ("retrieval", {"lips": "map"})
    row = "neural: lips=phones; adapt_minutes=0.5;adapt_steps=3"
    assert text_protocol.parse_rows(row) == [row]
    assert text_protocol.ROWS[row] == ("neural", {"lips": "phones", "adapt_minutes": 0.5, "adapt_steps": 3})
    for bad, said in (
        ("nope", "unknown row"), ("warp9:lips=map", "unknown engine"), ("", "no rows"),
        # keys animate() does not take, or takes from the protocol itself, and bad values: named before any work
        ("retrieval:lips=map;x=3", "takes no key 'x'; valid: lips"), ("retrieval:crf=20", "no key 'crf'"),
        ("retrieval:sr=8000", "no key 'sr'"), ("seed:lips=map", "valid: checkpoint"),
        ("retrieval:lips=bogus", "'model', 'map' or 'phones'"), ("neural:adapt_steps=-1", "greater than or equal"),
        ("neural:adapt_minutes=nan", "adapt_minutes='nan'"), ("neural:batch=0", "batch='0'"),
    ):  # fmt: skip
        with pytest.raises(LipsyncError, match=said):
            text_protocol.parse_rows(bad)
    assert text_protocol.transcript(Path("x/video/bbaf2n.mpg")) == GRID_TEXT
    assert text_protocol.transcript(Path("retalking_face1.mp4")).startswith("my biggest")
    assert text_protocol.transcript(Path("unknown_clip.mp4")) is None
    for (
        s
    ) in text_protocol.SENTENCES:  # each sentence holds several closures, open vowels and a pause (a sentence break)
        assert s.lower().count("b") + s.lower().count("p") + s.lower().count("m") >= 8 and ". " in s


def test_warp_measures_the_largest_shift():
    from lipsync_cli.eval import text_protocol

    lm = np.stack([face_with_gap(2.0)] * 4)
    assert text_protocol.warp(lm, lm) == 0.0
    moved = lm.copy()
    moved[2, 1] += (3.0, 4.0)  # nose tip 5 px off on one frame, eyes 100 px apart
    moved[3] = np.nan  # no face: left out
    assert text_protocol.warp(moved, lm) == pytest.approx(0.05)
    moved[1, 14] += 50.0  # the lips are free to move
    assert text_protocol.warp(moved, lm) == pytest.approx(0.05)
    assert text_protocol.warp(moved, lm, trim=2) == 0.0  # the last frames (a track's end) left out


def test_mouths_of_a_face_larger_than_the_crop_are_measured_at_its_own_resolution():
    """The eval's sharpness looks at mouth boxes cut from aligned crops: for a 600 px face with a 192 px crop they are
    cut at 600 px (in the crop the loss of a mouth shrunk to it was invisible), for a face that fits, at the crop's."""
    from lipsync_cli.engine import SourceFaces
    from lipsync_cli.eval import text_protocol

    def source(native: float, size: int = 192) -> SourceFaces:
        M = np.array([[size / native, 0.0, 5.0], [0.0, size / native, 7.0]])
        return SourceFaces(crops=None, landmarks=np.zeros((3, 478, 2)), found=np.ones(3, bool),
                           matrices=np.stack([M] * 3), size=size, audio=None)  # fmt: skip

    matrices, size = text_protocol._measuring(source(600.0))
    assert size == 600 and np.allclose(matrices[:, :, :2], np.eye(2))  # frame pixels, unscaled
    matrices, size = text_protocol._measuring(source(200.0))
    assert size == 192 and np.allclose(matrices, source(200.0).matrices)  # as before


def test_lag_finds_a_mouth_that_trails_the_sound():
    fps = 25.0
    ph = [Phone(lab, i * 0.16, i * 0.16 + 0.12) for i, lab in enumerate(["M", "AA", "P", "AE", "B", "AH"] * 3)]
    want = np.full(80, 0.03)
    for p in ph:
        idx = articulation.phone_frames(p, 80, fps)
        want[idx] = 0.12 if p.label.startswith("A") else 0.0
    assert articulation.lag(want, ph, fps) == 0.0
    assert articulation.lag(np.r_[np.full(2, 0.03), want[:-2]], ph, fps) == 2.0  # shown two frames late
    assert np.isnan(articulation.lag(np.full(80, 0.03), ph, fps))  # a frozen mouth: undecidable


def test_pixel_warp_sees_the_image_move_not_the_mesh():
    """A nose patch shifted by 3 px in the output reads 3 px / eye distance; the same pixels read 0."""
    from lipsync_cli.eval import text_protocol

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3)).astype(np.uint8), (0, 0), 2.0)
    lm = face_with_gap(2.0)
    lm[text_protocol.WARP_POINTS] = [(100 + 15 * k, 120 + 5 * k) for k in range(len(text_protocol.WARP_POINTS))]
    pts = text_protocol._around(lm[None])[0]
    eyes = float(np.linalg.norm(pts[-1] - pts[-2]))
    a = text_protocol.patches(img, pts)
    assert a.shape[0] == len(text_protocol.WARP_POINTS)
    assert text_protocol.pixel_warp([a], [a], np.array([eyes])) == pytest.approx(0.0, abs=1e-6)
    shifted = np.roll(img, 3, axis=1)
    b = text_protocol.patches(shifted, pts)
    assert text_protocol.pixel_warp([b], [a], np.array([eyes])) == pytest.approx(3.0 / eyes, rel=0.1)
    assert text_protocol.patches(img, np.full_like(pts, np.nan)) is None


def test_text_protocol_on_a_grid_clip(tmp_path):
    """One clip, a short sentence, the map row and the real row: the dub is written, re-tracked and scored, the
    report draws its strips and curves."""
    from lipsync_cli import progress
    from lipsync_cli.eval import text_protocol, text_report
    from lipsync_cli.settings import Settings

    clip = shared_file(GRID_CLIP)
    progress.set_quiet(True)
    run = text_protocol.evaluate_text(
        Settings(), clip, ["map", "real"], sentences=["Bob met a pal. Pam paid."], keep=tmp_path
    )
    assert not run.skipped and {r.row for r in run.results} == {"map", "real"}
    real = next(r for r in run.results if r.row == "real")
    assert real.scores["bilabial"] == 1.0 and real.scores["contrast"] > 3
    dubbed = next(r for r in run.results if r.row == "map")
    s = dubbed.scores
    assert s["n_bilabial"] >= 4 and s["aligned"] == 1.0 and s["face_frames"] == 1.0
    assert 0.3 < s["sharpness"] < 1.5 and 0.3 < s["sharp_shown"] < 1.5 and np.isfinite(s["contrast"])
    assert 0 <= s["warp"] < 0.2 and 0 <= s["warp_px"] < 0.05 and abs(s["lag"]) <= articulation.LAG_MAX
    assert (tmp_path / "bbaf2n__map__s0.mp4").exists()
    index = text_report.write_text_report(run, tmp_path / "report")
    assert (tmp_path / "report" / "strip_bbaf2n.png").exists() and (tmp_path / "report" / "gap_bbaf2n.png").exists()
    assert "bilabial" in index.read_text()


def test_cli_rejects_unknown_row_before_any_work():
    from typer.testing import CliRunner

    from lipsync_cli.cli import app
    from lipsync_cli.errors import LipsyncError

    r = CliRunner().invoke(app, ["--quiet", "eval", "--metric", "articulation", "--rows", "map,bogus"])
    assert isinstance(r.exception, LipsyncError) and "unknown row 'bogus'" in str(r.exception)


def test_cli_json_carries_the_articulation_table(tmp_path):
    """`eval --metric articulation --json`: the figures on stdout as JSON (they were only ever printed as tables)."""
    import json

    from tests.conftest import run_cli

    clip = shared_file(GRID_CLIP)
    r = run_cli("eval", "--metric", "articulation", "--videos", clip, "--rows", "real", "--json")
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["articulation"]
    assert "bilabial" in json.dumps(art) and "real" in json.dumps(art)
    assert not art["skipped"] and list(art["clips"]) == [Path(clip).stem]  # the real row alone dubs nothing
