"""Phones -> viseme targets: what the mouth must show on each output frame.

A few facts about a mouth that speaks are not negotiable, whoever speaks: the lips shut on p/b/m, the jaw opens on
open vowels (aa more than ae/ah/ay/aw/ao, more than eh, more than ih/iy), w/uw/ow/oy round the lips, f/v tuck the
lower lip under the upper teeth, and in a pause the mouth rests. Spectral features blur these (a learned model
trained for average lip error regresses towards the average mouth), phone timings do not. Each output frame gets
a kind (what it must show) and an openness (0 shut .. 1 the person's own wide-open mouth); the engine turns them
into mouths of the person (engine/retrieval.py), so the targets live in the person's own lip-shape range.

The mouth moves before the sound it makes (closing for /m/ starts before the nasal murmur): frame i shows what is
heard at i / fps + LEAD_S. The lead was measured on GRID (docs/articulation_engine.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lipsync_cli.phones import BILABIALS, SIL, Phone

LEAD_S = 0.02  # seconds the lips lead the sound (GRID s1, 40 clips: docs/articulation_engine.md)
MIN_REST_S = 0.15  # a pause shorter than this is a breath between words: no rest shape
MIN_CLOSED = 2  # frames a p/b/m keeps the lips shut at least (a 1-frame closure at 25 fps reads as a flicker)
APPROACH = 0.5  # the most the frame after a closure opens: the lips are on their way out (a release is fast)
APPROACH_IN = 0.2  # the most the frame before a closure opens: the lips come together over more than a frame
# (GRID, 44 p/b/m of 5 speakers re-tracked: the frame before the closure's minimum has a median gap of 0.005
# inter-ocular, 90th percentile 0.017; the frame after 0.010 and 0.054: docs/articulation_engine.md)
SQUEEZED_VOWEL_S = 0.08  # an open vowel this long opens even where closures leave it only frames beside them
SQUEEZED_CAP = 0.7  # ...and opens this far (a share of the wide-open mouth): docs/articulation_engine.md
# a vowel this long left one frame between two closures opens as a release does (APPROACH), not as an approach:
# the AE of "bamboo" (70 ms) stayed shut; schwas ("a", "the": 35-52 ms) stay near shut
LONE_VOWEL_S = 0.06

FREE, REST, CLOSED, LABIODENTAL, ROUND, OPEN = range(6)
KIND_NAMES = ("free", "rest", "closed", "labiodental", "round", "open")

LABIODENTALS = {"F", "V"}
ROUNDED = {"W", "UW", "OW", "OY", "UH"}
# jaw opening of each vowel, as a share of the person's own wide-open mouth
OPENNESS = {
    "AA": 1.0,
    "AE": 0.9, "AH": 0.9, "AY": 0.9, "AW": 0.9, "AO": 0.9,
    "EH": 0.6, "EY": 0.55, "ER": 0.45,
    "IH": 0.4, "IY": 0.35,
    "OW": 0.45, "OY": 0.45, "UH": 0.35, "UW": 0.25, "W": 0.15,
}  # fmt: skip
OPEN_VOWELS = {p for p, v in OPENNESS.items() if v >= 0.55}  # these must show an open mouth
CONSONANT_OPENNESS = 0.25  # t, d, s, n, k, l...: the teeth near together, the lips apart


@dataclass
class Targets:
    kind: np.ndarray  # (N,) int: FREE, REST, CLOSED, LABIODENTAL, ROUND or OPEN
    openness: np.ndarray  # (N,) 0 shut .. 1 the person's wide-open mouth
    cap: np.ndarray  # (N,) the most the frame may open (APPROACH_IN before a closure, APPROACH after, else 1)
    phone: list[str]  # (N,) the phone each frame shows ("" none), for labels and reports
    phone_id: np.ndarray  # (N,) index of that phone (-1 none): a mouth is never held across two phones


def kind_of(label: str) -> int:
    if label in BILABIALS:
        return CLOSED
    if label in LABIODENTALS:
        return LABIODENTAL
    if label in OPEN_VOWELS:
        return OPEN
    if label in ROUNDED:
        return ROUND
    return FREE


def targets(phones: Sequence[Phone], n_frames: int, fps: float, lead: float = LEAD_S) -> Targets:
    """Per-frame viseme targets for `phones` (seconds from the speech's start). Frames no phone covers, and pauses
    of MIN_REST_S or more, rest. Every bilabial shuts at least MIN_CLOSED frames however short it is (the one
    nearest its middle and the next towards its less open neighbour: `_closure_frames`); the frame before a closure
    opens at most APPROACH_IN, the one after at most APPROACH."""
    kind = np.full(n_frames, REST, np.int64)
    openness = np.zeros(n_frames)
    label = [""] * n_frames
    pid = np.full(n_frames, -1, np.int64)
    t = np.arange(n_frames) / fps + lead + 1e-9  # frame i shows what is heard `lead` later
    for j, p in enumerate(phones):
        rest = p.label == SIL and p.end - p.start >= MIN_REST_S
        covered = np.flatnonzero((t >= p.start) & (t < p.end))
        if len(covered) < MIN_CLOSED and p.label in BILABIALS:  # never lose a closure between two frames
            covered = _closure_frames(phones, j, n_frames, fps, lead)
        for i in covered:
            if kind[i] == CLOSED and p.label not in BILABIALS:
                continue  # a closure is never overwritten by its neighbour
            label[i], pid[i] = p.label, j
            if rest:
                kind[i], openness[i] = REST, 0.0
            elif p.label == SIL:  # a breath between words: the mouth moves on
                kind[i], openness[i] = FREE, CONSONANT_OPENNESS
            else:
                kind[i] = kind_of(p.label)
                openness[i] = 0.0 if kind[i] == CLOSED else OPENNESS.get(p.label, CONSONANT_OPENNESS)
    shut = kind == CLOSED
    before, after = ~shut & np.r_[shut[1:], False], ~shut & np.r_[False, shut[:-1]]
    cap = np.where(before, APPROACH_IN, np.where(after, APPROACH, 1.0))
    # a full vowel squeezed between closures still opens: its first frame (the release is fast) may open to
    # SQUEEZED_CAP. Else the 128 ms "o" of "Bob" (2 frames left between the closures) stayed shut on every clip.
    # Reduced one-frame vowels ("apple", "album") stay capped: a wide frame beside a closure blurs it open.
    for j in np.unique(pid[kind == OPEN]):
        frames = np.flatnonzero((pid == j) & (kind == OPEN))
        dur = phones[j].end - phones[j].start
        if len(frames) >= 2 and dur >= SQUEEZED_VOWEL_S and (cap[frames] < 1).all():
            cap[frames[0]] = SQUEEZED_CAP
        elif len(frames) == 1 and dur >= LONE_VOWEL_S and before[frames[0]] and after[frames[0]]:
            cap[frames[0]] = APPROACH  # a full vowel with one frame between two closures ("bamboo") parts the lips
    return Targets(kind, np.minimum(openness, cap), cap, label, pid)


def _closure_frames(phones: Sequence[Phone], j: int, n_frames: int, fps: float, lead: float) -> np.ndarray:
    """The MIN_CLOSED frames that bilabial j, too short to hold them, shuts: the frame nearest its middle, grown
    towards its less open neighbour (a vowel keeps its frames; the lips close as readily during a consonant or a
    pause), towards the nearer frame on a tie. A neighbour shorter than a frame counts in proportion to its length:
    it has less of a frame to lose (the schwa of "apple", 35 ms, gives the P its frame, not the 122 ms AE, which
    then opens on two frames where it showed one: 0.006-0.014 -> 0.04-0.06 re-tracked on GRID s30 and s33)."""
    p = phones[j]
    mid = ((p.start + p.end) / 2 - lead) * fps

    def opening(k: int) -> float:
        if not 0 <= k < len(phones) or phones[k].label == SIL or phones[k].label in BILABIALS:
            return 0.0
        share = min(1.0, (phones[k].end - phones[k].start) * fps)
        return share * OPENNESS.get(phones[k].label, CONSONANT_OPENNESS)

    lo = hi = int(round(mid))
    if not 0 <= lo < n_frames:  # heard before the first frame or after the last: no frame of it to shut
        return np.arange(0)
    before, after = opening(j - 1), opening(j + 1)
    while hi - lo + 1 < min(MIN_CLOSED, n_frames):
        back = before < after or (before == after and mid - (lo - 1) < (hi + 1) - mid)
        if lo == 0 or (hi < n_frames - 1 and not back):
            hi += 1
        else:
            lo -= 1
    return np.arange(lo, hi + 1)


def from_close(close: np.ndarray) -> Targets:
    """Targets when only the frames that must shut are known (no phones): those close, the rest is free."""
    n = len(close)
    kind = np.where(close, CLOSED, FREE).astype(np.int64)
    openness = np.where(close, 0.0, CONSONANT_OPENNESS)
    return Targets(kind, openness, np.ones(n), [""] * n, np.full(n, -1, np.int64))
