"""The retrieval engine: re-use the speaker's own mouth, in the spirit of Video Rewrite (Bregler et al., 1997).

1. Index every source frame's mouth: lip shape in the aligned frame (PCA coefficients) and head pose.
2. Map the new speech to a target lip-shape sequence: the learned generalist (`models/lips.py`, adapted to this
   video's mouth) when its weights are there and the `lips` setting is "model", else `lipmap` (fitted on the
   video's own audio and lips alone). Both end in the coefficients of the map's PCA basis of the source lips.
3. Choose, for each output frame, a source mouth by shape match, pose match and temporal smoothness: a Viterbi pass
   over the best candidates, where playing source frames in their natural order is free and jumps cost what they
   would show. Where the target mouth is shut, an open source mouth costs as much as a cut: by nearest shape alone,
   half-open mouths ran through the pauses the target closes.
The compositor (`compositing.py`) warps the chosen mouth onto each output frame's face and blends it in.
"""

from __future__ import annotations

import functools

import numpy as np

from lipsync_cli import audio, face
from lipsync_cli.engine.base import MouthTrack, SourceFaces
from lipsync_cli.models import lipmap

N_CANDIDATES = 24
POSE_WEIGHT = 4.0  # a mouth from a turned head looks pasted on: pose mismatch costs like shape mismatch
JUMP_COST = 1.0  # in squared shape-std units: the price of a visible cut between two source frames
HOLD_COST = 0.3  # showing the same frame twice looks frozen
OPEN_COST = JUMP_COST  # an open mouth on a frame that must be shut is as visible as a cut


def animate(
    source: SourceFaces,
    speech: np.ndarray,
    background: np.ndarray,
    close: np.ndarray | None = None,
    sr: int = audio.SR,
    lips: str = "model",
) -> MouthTrack:
    """Mouths for len(background) output frames. background[i] is the source frame shown behind output frame i;
    `close` marks output frames where the mouth must be shut (pauses, bilabials). `lips`: "model" | "map"
    (the `lips` setting, bound by get_engine)."""
    aligned, shapes, lm, target = shape_targets(source, speech, len(background), close, sr, lips)
    return choose(source, aligned, shapes, lm, target, background)


def choose(
    source: SourceFaces,
    aligned: np.ndarray,
    shapes: np.ndarray,
    lm: lipmap.LipMap,
    target: np.ndarray,
    background: np.ndarray,
) -> MouthTrack:
    """Step 3: the source mouth shown on each output frame, for `shape_targets`' targets. Where the target's
    inner-lip gap is under the source's closed threshold (eval's definition, on the source's own mouths), open
    source mouths cost OPEN_COST. Dub's `close` flags are not used here: they already pull the target (shape_targets),
    and forcing them in selection too overshot real footage's closure on other voices (docs/lips.md)."""
    src_coef = lipmap.coefficients(lm, np.nan_to_num(shapes)) / lm.scale
    pose = _pose_features(aligned, source.size)
    src_gap = inner_gap(np.nan_to_num(shapes))
    thresh = face.closed_threshold(src_gap[source.pool])
    shut = inner_gap(lipmap.lip_shapes(lm, target)) < thresh
    index = select_mouths(src_coef, pose, source.pool, target / lm.scale, background, shut, src_gap >= thresh)
    index[~source.found[background]] = -1  # no face behind: leave that frame as it was
    points = aligned[np.maximum(index, 0)]
    return MouthTrack(source_index=index, points=points, target=target)


def shape_targets(
    source: SourceFaces,
    speech: np.ndarray,
    n_out: int,
    close: np.ndarray | None = None,
    sr: int = audio.SR,
    lips: str = "model",
) -> tuple[np.ndarray, np.ndarray, lipmap.LipMap, np.ndarray]:
    """Steps 1-2: (aligned landmarks (T, 478, 2), lip shape vectors (T, 80), the map fitted on the source, target
    coefficients (n_out, k) in the map's PCA basis) for the new speech."""
    valid = source.pool
    if valid.sum() < 2:
        raise ValueError("fewer than two usable face frames in the source video")
    aligned = source.aligned_landmarks()
    shapes = lipmap.shape_vectors(aligned[:, face.LIPS], source.size)
    opening = np.zeros(source.n_frames)
    for t in np.flatnonzero(valid):
        opening[t] = face.mouth_opening(source.landmarks[t])

    lm = lipmap.fit(shapes, opening, source.audio, source.fps, valid, sr)
    model = lips_model(lips)
    if model is None:
        target = lipmap.predict(lm, speech, n_out, source.fps, close=close, sr=sr)
    else:
        from lipsync_cli.models import lips as lips_net

        # `close` is a partial pull here, not the map's override: forcing it costs lip error (models/lips.py)
        target = lips_net.predict(model, lm, shapes, valid, source.audio, speech, n_out, source.fps, sr, close=close)
    return aligned, shapes, lm, target


def lips_model(choice: str = "model"):
    """The learned speech -> lips model, or None for the self-fitted map (`lips` = "map", or no weights)."""
    if choice not in ("model", "map"):
        raise ValueError(f"unknown lips choice {choice!r} (model or map)")
    return _default_lips() if choice == "model" else None


@functools.cache
def _default_lips():
    from lipsync_cli import models

    found = models.default("lips")
    return None if found is None else found[0]


def _pose_features(aligned: np.ndarray, size: int) -> np.ndarray:
    """Where the speech-independent points fall after similarity alignment: what is left encodes yaw/pitch."""
    p = np.nan_to_num(aligned[:, face.STABLE] / size).reshape(len(aligned), -1)
    return p - p.mean(0)


def inner_gap(shapes: np.ndarray) -> np.ndarray:
    """(T, 80) lip shape vectors -> (T,) inner-lip gap: the mean distance over face.INNER_LIP_PAIRS, as
    face.mouth_opening measures it (here in crop units, not over the inter-ocular distance)."""
    pts = shapes.reshape(len(shapes), len(face.LIPS), 2)
    top, bottom = face.INNER_LIP_PAIRS_IN_LIPS.T
    return np.linalg.norm(pts[:, bottom] - pts[:, top], axis=-1).mean(-1)


def select_mouths(
    src: np.ndarray,
    pose: np.ndarray,
    valid: np.ndarray,
    target: np.ndarray,
    background: np.ndarray,
    shut: np.ndarray | None = None,
    src_open: np.ndarray | None = None,
) -> np.ndarray:
    """Viterbi over per-frame candidate source frames. src: (T, k) shape coefficients in std units; pose: (T, P);
    target: (N, k); background: (N,) source frame behind each output frame; shut: (N,) frames whose target mouth is
    closed, src_open: (T,) open source mouths (these cost OPEN_COST there). Returns (N,) source indices."""
    cand_pool = np.flatnonzero(valid)
    T = len(src)
    pose_scale = np.median(np.linalg.norm(pose[cand_pool] - pose[cand_pool].mean(0), axis=1)) + 1e-6
    nxt = np.minimum(np.arange(T) + 1, T - 1)

    def unary(i: int) -> tuple[np.ndarray, np.ndarray]:
        shape_cost = ((src[cand_pool] - target[i]) ** 2).sum(1)
        pose_cost = ((pose[cand_pool] - pose[background[i]]) ** 2).sum(1) / pose_scale**2
        cost = shape_cost + POSE_WEIGHT * pose_cost
        if shut is not None and src_open is not None and shut[i]:
            cost = cost + OPEN_COST * src_open[cand_pool]
        k = min(N_CANDIDATES, len(cand_pool))
        top = np.argpartition(cost, k - 1)[:k]
        return cand_pool[top], cost[top]

    cands, acc = unary(0)
    back: list[np.ndarray] = []
    all_cands = [cands]
    for i in range(1, len(target)):
        c, u = unary(i)
        prev = all_cands[-1]
        follows = c[None, :] == nxt[prev][:, None]
        holds = c[None, :] == prev[:, None]
        seam = ((src[nxt[prev]][:, None, :] - src[c][None, :, :]) ** 2).sum(2)
        trans = np.where(follows, 0.0, np.where(holds, HOLD_COST, JUMP_COST + 0.5 * seam))
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
