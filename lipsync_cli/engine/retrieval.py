"""The retrieval engine: re-use the speaker's own mouth, in the spirit of Video Rewrite (Bregler et al., 1997).

1. Index every source frame's mouth: lip shape in the aligned frame (PCA coefficients) and head pose.
2. Map the new speech to a target lip-shape sequence: the learned generalist (`models/lips.py`, adapted to this
   video's mouth) when its weights are there and the `lips` setting is "model", else `lipmap` (fitted on the
   video's own audio and lips alone). Both end in the coefficients of the map's PCA basis of the source lips.
3. Choose, for each output frame, a source mouth by shape match, pose match and temporal smoothness: a Viterbi pass
   over the best candidates, where playing source frames in their natural order is free and jumps cost what they
   would show. The viseme targets (visemes.py: p/b/m shut, open vowels open, pauses at rest) are hard: they decide
   which mouths a frame may show at all, and where a head pose has no such mouth, one of the person's own mouths is
   re-shaped (engine/warp.py). Soft costs lost: a learned target regresses to the average mouth, and the nearest
   shape to an average mouth is a half-open one.
The compositor (`compositing.py`) warps the chosen mouth onto each output frame's face and blends it in.
"""

from __future__ import annotations

import functools

import numpy as np

from lipsync_cli import audio, face, models, visemes
from lipsync_cli.engine import warp
from lipsync_cli.engine.base import MouthTrack, SourceFaces
from lipsync_cli.errors import LipsyncError
from lipsync_cli.models import lipmap, lips_infer

N_CANDIDATES = 24
POSE_WEIGHT = 4.0  # a mouth from a turned head looks pasted on: pose mismatch costs like shape mismatch
POSE_TOL = 1.5  # candidates further than this (in median pose deviations) are dropped while nearer ones qualify
POSE_FLOOR = 0.004  # the least pose deviation (crop units, RMS per stable point) that counts: on a still head
# (GRID: 0.002-0.004, 0.3-0.5 px) the median deviation is tracking noise, and a "far" pose there is no visible misfit
JUMP_COST = 1.0  # in squared shape-std units: the price of a visible cut between two source frames
HOLD_COST = 0.3  # showing the same frame twice looks frozen
GAP_WEIGHT = 16.0  # on frames with a viseme target: squared gap error, in units of the person's wide-open gap
SYNTH_COST = 0.5  # a re-shaped mouth only where no real one of that pose does the job
# a re-shaped SHUT mouth costs more: re-tracked on the output, real shut mouths read shut far more often (GRID s33
# 87-92% vs 46% of p/b/m, s4 96% vs 84%: the mesh reads a warped seam as parted), so one is used wherever there is any
SYNTH_SHUT_COST = 5.0
# inner-lip gaps in eval's units (face.mouth_gap): eval counts a mouth as shut under 0.0103
CLOSED_GAP = 0.005  # a shut mouth, with a margin: re-tracked on the output it reads a little wider
NEAR_SHUT_GAP = 0.008  # a video that never shuts tighter than CLOSED_GAP: its tightest mouths up to this count as shut
REST_GAP = 0.025  # a mouth at rest in a pause
MIN_WIDE = 0.08  # the least an "aa" opens, even on a person who mumbles (GRID talkers open 0.1-0.2)
WIDE_PCT = 98  # the person's wide-open mouth: this percentile of their gaps (re-tracked output reads narrower)
OPEN_MIN = 0.85  # an open vowel shows at least this share of its target gap
# a rounded phone (w, uw, ow, oy, uh) shows one of the person's narrowest mouths, at most this percentile of their
# widths. Real footage (10 GRID s1/s4 clips and the 11 shared clips, own speech, re-tracked): the frames of rounded
# phones sit at a median rank of 0.23 among the clip's widths, half of them in its narrowest quarter. At the median
# (50) the dub's sat at 0.37 and 1 of 3 in the narrowest quarter: "you", "blue" showed spread lips
ROUND_PCT = 30
VOWEL_MIN = 0.4  # the other vowels show at least this share of their target gap
APPROACH_GAP = 0.05  # after a closure the lips are at most this far apart (before it: in proportion to
# visemes.APPROACH_IN, 0.02), however wide the person opens: a 40 ms frame is too short to go from wide open to
# shut, and a re-tracked mesh reads a 2-frame closure between two wide-open frames as half open (approach_tops)
POSE_GROUPS = 6  # head poses the bank of re-shaped mouths covers
# The jaw's outline beside the mouth (mesh 58 172 / 288 397; lower points move as the jaw opens) lies inside the
# compositor's mask: a mouth whose jaw sits elsewhere in the aligned crop breaks the frame's jaw line and brings its
# own backdrop or collar (pcavs_741400104: a head tilted down shown a frontal frame's mouth, 0.12-0.15 apart, a
# notch in the cheek and a patch of shirt under the chin; the upper face's pose points rated it near). Mouths further
# than JAW_TOL (largest point distance, crop sides) are dropped while nearer ones qualify; neighbouring frames: 0.01.
# 0.06 also dropped real shut mouths at 0.06-0.07 for re-shaped ones, which re-track parted (sakthivel 0.95 -> 0.91)
JAW_SIDES = np.array([58, 172, 288, 397])
JAW_TOL = 0.08
LIPS = ("model", "map", "phones")  # what shapes the motion between the viseme anchors (`lips`)


def animate(
    source: SourceFaces,
    speech: np.ndarray,
    background: np.ndarray,
    close: np.ndarray | None = None,
    sr: int = audio.SR,
    lips: str = "model",
    phones: list | None = None,
) -> MouthTrack:
    """Mouths for len(background) output frames. background[i] is the source frame shown behind output frame i.
    `phones` (Phone list, seconds from the speech's start) give the viseme targets; without them, `close` marks the
    frames that must shut. `lips`: "model" | "map" (the `lips` setting, bound by get_engine)."""
    n = len(background)
    if phones is not None:
        tg = visemes.targets(phones, n, source.fps)
    else:
        tg = visemes.from_close(np.zeros(n, bool) if close is None else np.asarray(close, bool))
    aligned, shapes, lm, target = shape_targets(source, speech, n, sr, lips)
    return choose(source, aligned, shapes, lm, target, background, tg, every_frame=lips == "phones")


def choose(
    source: SourceFaces,
    aligned: np.ndarray,
    shapes: np.ndarray,
    lm: lipmap.LipMap,
    target: np.ndarray,
    background: np.ndarray,
    tg: visemes.Targets,
    every_frame: bool = False,
) -> MouthTrack:
    """Step 3: the mouth shown on each output frame. The lips target shapes the motion; the viseme targets are
    hard: a p/b/m frame may only show a shut mouth, an open vowel only one open at least OPEN_MIN of its target, a
    pause only a resting one. Where no real mouth of a head pose qualifies, the bank supplies one of the person's
    own mouths re-shaped (engine/warp.py). `every_frame`: the viseme openness also steers the frames without a
    hard target (consonants), for when no lips target does."""
    T = source.n_frames
    pool = source.pool.copy()
    gap = np.nan_to_num(face.mouth_gap(aligned), nan=1.0)
    wide = max(float(np.percentile(gap[pool], WIDE_PCT)), MIN_WIDE)
    pose = _pose_features(aligned, source.size)
    # the closures no real shut mouth of that head pose can show: the least open mouth of that pose, shut (the
    # less a warp moves the lips, the better the pixels follow: from a wide-open mouth the smoothed landmarks
    # trail the real lips, and teeth showed between "shut" lips on liveportrait_d11)
    shut_gap = shut_limit(gap[pool])
    shut_real = pool & (gap <= shut_gap)
    scale = _pose_scale(pose, pool)
    lonely = set()
    for b in np.unique(background[tg.kind == visemes.CLOSED]):
        if not source.found[b]:
            continue
        near = ((pose - pose[b]) ** 2).sum(1) <= (POSE_TOL * scale) ** 2
        if not (near & shut_real).any():
            same = np.flatnonzero(near & pool)
            lonely.add(int(same[np.argmin(gap[same])]) if len(same) else int(b))
    bank = make_bank(gap, pose, pool, wide, sorted(lonely), shut_gap)
    bank_pts = np.array([warp.reshaped(aligned[int(t)], k) for t, k in bank]).reshape(len(bank), *aligned.shape[1:])
    bank_shapes = (bank_pts[:, face.LIPS] / source.size).reshape(len(bank), 2 * len(face.LIPS))  # shape_vectors
    src_coef = lipmap.coefficients(lm, np.concatenate([np.nan_to_num(shapes), bank_shapes])) / lm.scale
    gap = np.concatenate([gap, face.mouth_gap(bank_pts)])
    # the mouths' points are `aligned` then `bank_pts`, never joined into one more (T, 478, 2) array
    # a frame without a face keeps its NaN width (no rule selects it); zeros there made a 0 / 0 that numpy warned about
    width = np.concatenate([face.mouth_width(p) for p in (*np.array_split(aligned, 16), bank_pts)])
    pose = np.concatenate([pose, pose[bank[:, 0].astype(np.int64)]])
    jaw = np.nan_to_num(aligned[:, JAW_SIDES] / source.size, nan=1e6)  # no face: fits none; re-shaped: its source's
    jaw = np.concatenate([jaw, jaw[bank[:, 0].astype(np.int64)]])
    valid = np.concatenate([pool, np.ones(len(bank), bool)])

    want = tg.openness * wide  # the gap each frame aims at
    resting = gap[:T][pool & (gap[:T] < REST_GAP)]
    want[tg.kind == visemes.REST] = float(np.median(resting)) if len(resting) else 0.0
    rules, sets = allowed_sets(tg, want, gap, width, valid, wide, shut_gap)
    weight = np.where((tg.kind == visemes.FREE) & ~every_frame, 0.0, GAP_WEIGHT / wide**2)
    extra = np.concatenate([np.zeros(T), np.where(bank[:, 1] == 0, SYNTH_SHUT_COST, SYNTH_COST)])
    index = select_mouths(
        src_coef,
        pose,
        valid,
        target / lm.scale,
        background,
        rules,
        sets,
        (gap, want, weight),
        extra,
        tg.phone_id,
        T,
        jaw,
    )
    index[~source.found[background]] = -1  # no face behind: leave that frame as it was
    shown = np.maximum(index, 0)
    points = aligned[np.minimum(shown, T - 1)]
    points[shown >= T] = bank_pts[shown[shown >= T] - T]
    used = np.unique(index[index >= T]) - T  # only the bank mouths shown travel on, renumbered
    index[index >= T] = T + np.searchsorted(used, index[index >= T] - T)
    return MouthTrack(source_index=index, points=points, target=target, bank=bank[used] if len(used) else None)


def shut_limit(gap: np.ndarray) -> float:
    """The widest inner-lip gap that counts as a shut mouth in this video (gaps of its pool): CLOSED_GAP, or, where
    the video never shuts that far, its tightest mouths up to NEAR_SHUT_GAP (10% above its tightest): re-tracked on
    the output, a real mouth that nearly shuts reads shut more often than a re-shaped one (GRID s33 lwbi5s, tightest
    0.0071: p/b/m closed 0.22 -> 0.72)."""
    tight = float(np.min(gap)) if len(gap) else np.inf
    return 1.1 * tight if CLOSED_GAP < tight <= NEAR_SHUT_GAP else CLOSED_GAP


def allowed_sets(
    tg: visemes.Targets,
    want: np.ndarray,
    gap: np.ndarray,
    width: np.ndarray,
    valid: np.ndarray,
    wide: float,
    shut_gap: float = CLOSED_GAP,
) -> tuple[np.ndarray, np.ndarray]:
    """(rule per output frame (N,), candidate sets (R, T') bool): the mouths each frame may show, as a gap range
    per viseme kind (and narrow mouths for rounded ones, ROUND_PCT; shut: up to shut_gap). Where no mouth falls in
    the range, the N_CANDIDATES nearest to it."""
    narrow = width <= np.percentile(width[valid], ROUND_PCT)
    tops = approach_tops(tg.cap, wide)
    rows, keys = [], {}
    rules = np.empty(len(tg.kind), np.int64)
    for i, (k, w, top) in enumerate(zip(tg.kind, want, tops, strict=True)):
        key = (int(k), round(float(w), 4), float(top))
        if key not in keys:
            lo, hi, shape = 0.0, np.inf, valid
            if k == visemes.CLOSED:
                hi = shut_gap
            elif k == visemes.REST:
                hi = REST_GAP
            elif k == visemes.OPEN:
                lo = OPEN_MIN * w
            elif k == visemes.LABIODENTAL:
                hi = max(w, REST_GAP)
            elif k == visemes.ROUND:
                hi, shape = max(2 * w, REST_GAP), valid & narrow
            if k in (visemes.FREE, visemes.ROUND) and w > visemes.CONSONANT_OPENNESS * wide:
                lo = VOWEL_MIN * w  # a vowel (ih, iy, ow...) never shows a shut mouth
            hi = min(hi, top)
            lo = min(lo, 0.5 * hi)  # an open vowel squeezed between closures opens as far as they allow
            ok = shape & (gap >= lo) & (gap <= hi)
            if not ok.any():
                miss = np.where(valid, np.maximum(lo - gap, 0) + np.maximum(gap - hi, 0), np.inf)
                ok = valid & (miss <= np.sort(miss)[min(N_CANDIDATES, int(valid.sum())) - 1])
            keys[key] = len(rows)
            rows.append(ok)
        rules[i] = keys[key]
    return rules, np.array(rows)


def approach_tops(cap: np.ndarray, wide: float) -> np.ndarray:
    """The widest gap each frame may show (N,): its cap's share of the wide-open mouth, and beside a closure (cap
    up to visemes.APPROACH) at most APPROACH_GAP in proportion. A squeezed vowel's first frame (visemes.SQUEEZED_CAP)
    has no absolute limit: on a wide-opening face 0.07 was a third of its "a" (pcavs_00086's "map": 0.05 re-tracked,
    its wide 0.23); lifting the limit there cost no closure (12 clips x 5 sentences: bilabial 0.966 -> 0.967)."""
    near = np.where(cap <= visemes.APPROACH, APPROACH_GAP * cap / visemes.APPROACH, np.inf)
    return np.where(cap < 1, np.minimum(cap * wide, near), np.inf)


def make_bank(
    gap: np.ndarray, pose: np.ndarray, pool: np.ndarray, wide: float, shut: list[int], shut_gap: float = CLOSED_GAP
) -> np.ndarray:
    """The person's own mouths to re-shape, as (source frame, gap scale) rows (M, 2): each frame in `shut` shut,
    and per head-pose group that never shows a shut (or a wide-open) mouth its nearest one shut (or opened to
    `wide`). Only their landmarks are computed here; the pixels are warped when a mouth is shown."""
    frames = np.flatnonzero(pool)
    groups = _pose_groups(pose[frames], POSE_GROUPS)
    jobs = [(t, 0.0) for t in shut]
    for g in np.unique(groups):
        members = frames[groups == g]
        g_gap = gap[members]
        if g_gap.min() > shut_gap:
            jobs.append((members[np.argmin(g_gap)], 0.0))
        if REST_GAP < g_gap.max() < OPEN_MIN * wide:
            t = members[np.argmax(g_gap)]
            jobs.append((t, min(wide / gap[t], 2.5)))
    return np.array(jobs, np.float64).reshape(-1, 2)


def _pose_scale(pose: np.ndarray, pool: np.ndarray) -> float:
    """Median distance of the pool's poses from their mean, at least POSE_FLOOR: the unit of pose mismatch."""
    p = pose[pool]
    floor = POSE_FLOOR * np.sqrt(pose.shape[1] / 2)
    return max(float(np.median(np.linalg.norm(p - p.mean(0), axis=1))), floor)


def _pose_groups(pose: np.ndarray, k: int) -> np.ndarray:
    """k-means (a few Lloyd steps from a farthest-point start) on the pose features: which group each frame is in."""
    k = min(k, len(pose))
    centres = [pose[0]]
    for _ in range(1, k):
        d = np.min([((pose - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(pose[int(d.argmax())])
    centres = np.array(centres)
    for _ in range(10):
        label = ((pose[:, None] - centres[None]) ** 2).sum(2).argmin(1)
        centres = np.array([pose[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
    return ((pose[:, None] - centres[None]) ** 2).sum(2).argmin(1)


def shape_targets(
    source: SourceFaces,
    speech: np.ndarray,
    n_out: int,
    sr: int = audio.SR,
    lips: str = "model",
) -> tuple[np.ndarray, np.ndarray, lipmap.LipMap, np.ndarray]:
    """Steps 1-2: (aligned landmarks (T, 478, 2), lip shape vectors (T, 80), the map fitted on the source, target
    coefficients (n_out, k) in the map's PCA basis) for the new speech: the motion between the viseme anchors."""
    valid = source.pool
    if valid.sum() < 2:
        raise LipsyncError(
            "the face shows on fewer than two frames of the video (a still image?): lipsync re-animates a talking "
            "video, whose own mouths it re-uses"
        )
    aligned = source.aligned_landmarks()
    shapes = lipmap.shape_vectors(aligned[:, face.LIPS], source.size)
    opening = np.zeros(source.n_frames)
    for t in np.flatnonzero(valid):
        opening[t] = face.mouth_opening(source.landmarks[t])

    lm = lipmap.fit(shapes, opening, source.audio, source.fps, valid, sr)
    model = lips_model(lips)
    if lips == "phones":  # no speech -> lips mapping at all: the person's mean lip shape, the phones do the rest
        target = np.zeros((n_out, lm.basis.shape[0]))
    elif model is None:
        target = lipmap.predict(lm, speech, n_out, source.fps, sr=sr)
    else:
        target = lips_infer.predict(model, lm, shapes, valid, source.audio, speech, n_out, source.fps, sr)
    return aligned, shapes, lm, target


def lips_model(choice: str = "model") -> lips_infer.LipsNet | None:
    """The learned speech -> lips model (its numpy form: no torch at dub time), or None for the self-fitted map
    (`lips` = "map", or no weights) and for "phones" (the viseme targets alone: the ablation that shows what the
    lips model or map adds between them)."""
    if choice not in LIPS:
        raise ValueError(f"unknown lips choice {choice!r} ({', '.join(LIPS)})")
    return _default_lips() if choice == "model" else None


@functools.cache
def _default_lips() -> lips_infer.LipsNet | None:
    path = models.WEIGHTS / "lips.safetensors"
    return lips_infer.load(path) if path.is_file() else None


def _pose_features(aligned: np.ndarray, size: int) -> np.ndarray:
    """Where the speech-independent points fall after similarity alignment: what is left encodes yaw/pitch."""
    p = np.nan_to_num(aligned[:, face.STABLE] / size).reshape(len(aligned), -1)
    return p - p.mean(0)


def select_mouths(
    src: np.ndarray,
    pose: np.ndarray,
    valid: np.ndarray,
    target: np.ndarray,
    background: np.ndarray,
    rules: np.ndarray | None = None,
    sets: np.ndarray | None = None,
    gaps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    extra: np.ndarray | None = None,
    phone_id: np.ndarray | None = None,
    n_real: int | None = None,
    jaw: np.ndarray | None = None,
) -> np.ndarray:
    """Viterbi over per-frame candidate mouths. src: (T', k) shape coefficients in std units; pose: (T', P);
    target: (N, k); background: (N,) source frame behind each output frame. Optional: sets[rules[i]] (T',) bool:
    the only mouths frame i may show (hard); gaps = (gap (T',), wanted gap (N,), weight (N,)): a squared-gap cost;
    extra (T',): a fixed cost per mouth; phone_id (N,): holding one mouth across two phones costs a cut; n_real:
    mouths from n_real on are not video frames (nothing follows them); jaw (T', P, 2): the jaw's sides, mouths
    further than JAW_TOL from the frame behind dropped while nearer ones qualify. Returns (N,) mouth indices."""
    T = len(src)
    n_real = T if n_real is None else n_real
    cand_all = np.flatnonzero(valid)
    real = cand_all[cand_all < n_real]
    pose_scale = _pose_scale(pose, real)
    nxt = np.concatenate([np.minimum(np.arange(n_real) + 1, n_real - 1), np.full(T - n_real, -1)])

    def unary(i: int) -> tuple[np.ndarray, np.ndarray]:
        pool = cand_all if sets is None else np.flatnonzero(sets[rules[i]] & valid)
        pose_cost = ((pose[pool] - pose[background[i]]) ** 2).sum(1) / pose_scale**2
        near = pose_cost <= POSE_TOL**2
        if near.any():  # a mouth from another head pose only when no near one qualifies
            pool, pose_cost = pool[near], pose_cost[near]
        if jaw is not None:  # ...and from another jaw line only when no matching one does
            near = np.linalg.norm(jaw[pool] - jaw[background[i]], axis=-1).max(-1) <= JAW_TOL
            if near.any():
                pool, pose_cost = pool[near], pose_cost[near]
        cost = ((src[pool] - target[i]) ** 2).sum(1) + POSE_WEIGHT * pose_cost
        if gaps is not None:
            cost = cost + gaps[2][i] * (gaps[0][pool] - gaps[1][i]) ** 2
        if extra is not None:
            cost = cost + extra[pool]
        k = min(N_CANDIDATES, len(pool))
        top = np.argpartition(cost, k - 1)[:k]
        return pool[top], cost[top]

    cands, acc = unary(0)
    back: list[np.ndarray] = []
    all_cands = [cands]
    for i in range(1, len(target)):
        c, u = unary(i)
        prev = all_cands[-1]
        follows = c[None, :] == nxt[prev][:, None]
        holds = c[None, :] == prev[:, None]
        hold = HOLD_COST
        if phone_id is not None and phone_id[i] != phone_id[i - 1]:
            hold = JUMP_COST + HOLD_COST  # one mouth across two phones is a frozen mouth
        seam = ((src[nxt[prev]][:, None, :] - src[c][None, :, :]) ** 2).sum(2)
        trans = np.where(follows, 0.0, np.where(holds, hold, JUMP_COST + 0.5 * seam))
        total = acc[:, None] + trans
        arg = total.argmin(0)
        acc = total[arg, np.arange(len(c))] + u
        back.append(arg)
        all_cands.append(c)

    path = np.empty(len(target), dtype=np.int64)
    j = int(acc.argmin())
    for i in range(len(target) - 1, -1, -1):
        path[i] = all_cands[i][j]
        if i > 0:
            j = int(back[i - 1][j])
    return path
