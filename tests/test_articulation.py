"""The articulation stick (eval/articulation.py): gap and score on synthetic inputs, then real GRID footage, where
the real mouth must score as articulate and the same audio over one held open frame must not."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync_cli import media
from lipsync_cli.eval import articulation as A
from lipsync_cli.phones import SIL, Phone, Word
from tests.conftest import shared_file

GRID_CLIP = "corpus/grid/s1/video/bbaf2n.mpg"
GRID_TEXT = "bin blue at f two now"


def face_with_gap(gap_px: float, eyes_px: float = 100.0) -> np.ndarray:
    """A (478, 2) landmark array whose outer eye corners are eyes_px apart and inner-lip pairs gap_px apart."""
    lm = np.zeros((478, 2))
    lm[33], lm[263] = (0.0, 0.0), (eyes_px, 0.0)
    for k, (up, lo) in enumerate(A.INNER_PAIRS):
        lm[up] = (40.0 + 10 * k, 100.0)
        lm[lo] = (40.0 + 10 * k, 100.0 + gap_px)
    return lm


def test_mouth_gap_scale_and_batch():
    assert A.mouth_gap(face_with_gap(5.0)) == pytest.approx(0.05)
    assert A.mouth_gap(face_with_gap(10.0, eyes_px=200.0)) == pytest.approx(0.05)  # scale-free
    lm = np.stack([face_with_gap(1.0), np.full((478, 2), np.nan), face_with_gap(3.0)])
    g = A.mouth_gap(lm[None])  # any leading shape
    assert g.shape == (1, 3)
    np.testing.assert_allclose(g[0, [0, 2]], [0.01, 0.03])
    assert np.isnan(g[0, 1])
    # the distance is euclidean: a sideways slip of the lower lip counts too
    lm = face_with_gap(3.0)
    lm[14, 0] += 4.0
    assert A.mouth_gap(lm) > A.mouth_gap(face_with_gap(3.0))


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
    s = A.score(gap, phones, fps, words)
    assert s["n_bilabial"] == 4 and s["n_open"] == 2
    assert s["bilabial"] == pytest.approx(2 / 4)  # M (early, within a frame) and the first B
    bil_min = [0.005, 0.02, 0.004, 0.02]  # smallest gap over each phone +-1 frame: 9-12, 14-17, 16-19, 21-24
    open_mean = [0.10, np.mean([0.12, 0.10])]
    assert s["contrast"] == pytest.approx((np.mean(open_mean) + A.EPS) / (np.mean(bil_min) + A.EPS))
    assert s["n_silence"] == 6 and s["silence"] == pytest.approx(5 / 6)
    detail = {(d["word"], d["label"], d["start"]): d for d in s["phones"]}
    assert detail[("map", "M", 0.40)]["closed"] and not detail[("bob", "B", 0.88)]["closed"]
    assert detail[("bob", "AA", 0.76)]["kind"] == "open" and detail[("map", "AE", 0.48)]["kind"] == "open"


def test_score_edge_cases():
    s = A.score(np.full(10, 0.05), [Phone("S", 0.0, 0.4)], 25.0)
    assert np.isnan(s["bilabial"]) and np.isnan(s["contrast"]) and s["n_bilabial"] == 0
    # a phone shorter than a frame period still gets its nearest frame
    s = A.score(np.array([0.05, 0.05, 0.001, 0.05, 0.05, 0.05, 0.05, 0.05]), [Phone("M", 0.085, 0.09)], 25.0)
    assert s["bilabial"] == 1.0
    # the ends of the audio count as pauses when no phone covers them
    assert A.pauses([Phone("AA", 0.5, 0.7)], 1.2) == [(0.0, 0.5), (0.7, 1.2)]
    assert A.pauses([Phone("AA", 0.1, 0.7), Phone(SIL, 0.7, 0.8), Phone("M", 0.8, 1.0)], 1.2) == []


def test_real_grid_footage_articulates(tmp_path):
    """The speaker's own footage closes on its b's and opens on its vowels; the same soundtrack over one held,
    open frame fails bilabial and contrast: the stick tells the two apart."""
    clip = shared_file(GRID_CLIP)
    real = A.measure(clip, GRID_TEXT)
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
    fake = A.measure(held, GRID_TEXT).scores
    assert fake["bilabial"] == 0.0 and fake["contrast"] < 1.2 and fake["silence"] == 0.0
