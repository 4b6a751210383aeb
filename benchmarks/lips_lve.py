"""Lip vertex error of speech -> lip shape, on prepped shards, under `lipsync eval`'s reconstruct splits.

    python benchmarks/lips_lve.py [--manifest data/prep/128/manifest.json] [--weights lipsync_cli/weights/lips]

Cases, as `lipsync eval` builds them (eval/protocols.py) but from the prepped shards, so no face tracking runs:
  grid    each GRID test clip (manifest utterance test split) re-created with GRID_REFS other clips as the reference
  media   each shared source clip, its imported segments laid end to end on the source's timeline up to MAX_CLIP_S:
          the first 60% is the reference, the last HOLD_OUT is re-created ("unseen" = speakers the model never
          trained on: the manifest's held-out speakers)
Systems: mean (the reference's mean lip shape), map (models/lipmap.py fitted on the reference), model (models/lips.py
de-normalised with the reference's mean shape and scale, eased to the closed mouth in silence), model+adapt (plus
the per-video calibration dub uses).
`target` LVE scores the lip shape each system aims at (in the map's PCA basis, as retrieval receives it); `retrieved`
scores the source mouths retrieval.select_mouths then picks. LVE = mean lip-point distance / inter-ocular distance.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lipsync_cli import audio, dubbing, face, models
from lipsync_cli.data.dataset import clip_key
from lipsync_cli.engine import retrieval
from lipsync_cli.engine.base import SourceFaces
from lipsync_cli.eval.protocols import GRID_REFS, HOLD_OUT, MAX_CLIP_S
from lipsync_cli.models import lipmap, lips_infer

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("mean", "map", "model", "model+adapt")


def load(root: Path, c: dict) -> dict:
    with safe_open(str(root / c["path"]), framework="numpy") as f:
        d = {k: f.get_tensor(k) for k in ("crops", "landmarks", "affine", "found", "audio")}
        meta = f.metadata()
    d["audio"] = d["audio"].astype(np.float32) / 32768.0
    d["found"] = d["found"] & np.isfinite(d["landmarks"]).all((1, 2))
    d["size"] = int(meta["size"])
    d["words"] = json.loads(meta.get("words") or "[]")
    d["import"] = json.loads(meta.get("provenance") or "{}").get("import")
    return d


def concat(parts: list[dict], usable: list[np.ndarray]) -> SourceFaces:
    return SourceFaces(
        crops=np.concatenate([p["crops"] for p in parts]),
        landmarks=np.concatenate([p["landmarks"] for p in parts]).astype(np.float64),
        found=np.concatenate([p["found"] for p in parts]),
        matrices=np.concatenate([p["affine"] for p in parts]).astype(np.float64),
        size=parts[0]["size"],
        audio=np.concatenate([p["audio"] for p in parts]),
        usable=np.concatenate(usable),
    )


def score(src: SourceFaces, bg: np.ndarray, text: str | None, model) -> dict[str, dict[str, float]]:
    """target / retrieved LVE of every system for one case (reference = src.pool, re-created frames = bg)."""
    fps, n = src.fps, len(bg)
    speech = src.audio[int(bg[0] / fps * audio.SR) : int((bg[-1] + 1) / fps * audio.SR)]
    speech = np.pad(speech, (0, max(0, int(n / fps * audio.SR) - len(speech))))
    close = dubbing.mouth_must_close(speech, n, fps, text)
    aligned = src.aligned_landmarks()
    real = aligned[bg][:, face.LIPS]
    right = aligned[bg][:, [33, 133]].mean(1)
    left = aligned[bg][:, [362, 263]].mean(1)
    iod = np.linalg.norm(left - right, axis=-1)
    ok = src.found[bg]

    def lve(pts: np.ndarray) -> float:
        return float((np.linalg.norm(pts - real, axis=-1).mean(-1) / iod)[ok].mean())

    valid = src.pool
    shapes = lipmap.shape_vectors(aligned[:, face.LIPS], src.size)
    opening = np.array([face.mouth_opening(src.landmarks[t]) if src.found[t] else 0.0 for t in range(src.n_frames)])
    lm = lipmap.fit(shapes, opening, src.audio, fps, valid)
    targets = {
        "mean": np.zeros((n, len(lm.basis))),
        "map": lipmap.predict(lm, speech, n, fps, close=close),
        "model": lips_infer.predict(model, lm, shapes, valid, src.audio, speech, n, fps, adapt=False),
        "model+adapt": lips_infer.predict(model, lm, shapes, valid, src.audio, speech, n, fps, adapt=True),
    }
    src_coef = lipmap.coefficients(lm, np.nan_to_num(shapes)) / lm.scale
    pose = retrieval._pose_features(aligned, src.size)
    out = {}
    for name, coef in targets.items():
        pts = lipmap.lip_shapes(lm, coef).reshape(n, -1, 2) * src.size
        index = retrieval.select_mouths(src_coef, pose, valid, coef / lm.scale, bg)
        out[name] = {"target": lve(pts), "retrieved": lve(aligned[index][:, face.LIPS])}
    return out


def grid_cases(root: Path, meta: dict):
    clips = {clip_key(c): c for c in meta["clips"] if c["corpus"] == "grid"}
    test = sorted(k for k in meta["splits"]["utterance"]["test"] if k.startswith("grid/"))
    for key in test:  # the reference: GRID_REFS non-test clips of the same speaker (any when it has fewer)
        speaker = key.rsplit("/", 1)[0]
        own = [k for k in clips if k.rsplit("/", 1)[0] == speaker and k not in set(test)]
        refs = sorted(own, key=lambda k: zlib.crc32(k.rsplit("/", 1)[1].encode()))[:GRID_REFS]
        if not refs:
            continue
        ref = [load(root, clips[r]) for r in refs]
        t = key.rsplit("/", 1)[1] if speaker == "grid/s1" else key.split("/", 1)[1]
        clip = load(root, clips[key])
        src = concat([*ref, clip], [np.ones(len(p["found"]), bool) for p in ref] + [np.zeros(len(clip["found"]), bool)])
        off = sum(len(p["found"]) for p in ref)
        text = " ".join(w for _, _, w in clip["words"] if w not in ("sil", "sp"))
        yield (
            "grid s1" if speaker == "grid/s1" else "grid other talkers",
            t,
            src,
            off + np.arange(len(clip["found"])),
            text,
        )


def media_cases(root: Path, meta: dict):
    held = {s for v in (meta["splits"].get("speaker_held_out") or {}).values() for s in v}
    by_speaker: dict[str, list[dict]] = {}
    for c in meta["clips"]:
        if c["corpus"] != "grid":
            by_speaker.setdefault(f"{c['corpus']}/{c['speaker']}", []).append(c)
    for spk, cs in sorted(by_speaker.items()):
        parts = sorted((load(root, c) for c in cs), key=lambda p: p["import"]["start"])
        d = min(max(p["import"]["end"] for p in parts), MAX_CLIP_S)
        cut = (1 - HOLD_OUT) * d
        keep, usable, bg, off = [], [], [], 0
        for p in parts:
            t = p["import"]["start"] + np.arange(len(p["found"])) / 25.0
            inside = t < d
            if not inside.any():
                continue
            q = {k: (v[inside] if isinstance(v, np.ndarray) and k != "audio" else v) for k, v in p.items()}
            q["audio"] = p["audio"][: int(inside.sum()) * 640]
            keep.append(q)
            usable.append(t[inside] < cut)
            bg.extend(off + np.flatnonzero(t[inside] >= cut))
            off += int(inside.sum())
        group = "media unseen" if spk in held else "media"
        yield group, spk.split("/", 1)[1], concat(keep, usable), np.array(bg), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=ROOT / "data/prep/128/manifest.json")
    ap.add_argument("--weights", type=Path, default=models.WEIGHTS / "lips")
    ap.add_argument("--limit", type=int, default=0, help="GRID test clips (0: all)")
    args = ap.parse_args()
    root, meta = args.manifest.parent, json.loads(args.manifest.read_text())
    model = lips_infer.load(args.weights)
    t0, c0 = time.time(), os.times()
    rows: dict[str, list[dict]] = {}
    cases = list(grid_cases(root, meta))[: args.limit or None] + list(media_cases(root, meta))
    for group, name, src, bg, text in cases:
        r = score(src, bg, text, model)
        rows.setdefault(group, []).append(r)
        print(group, name, {s: round(v["target"], 4) for s, v in r.items()}, flush=True)
    print("\n| cases | n | " + " | ".join(f"{s} target / retrieved" for s in SYSTEMS) + " |")
    print("|---|---|" + "---|" * len(SYSTEMS))
    for group, rs in rows.items():
        cells = []
        for s in SYSTEMS:
            t = np.mean([r[s]["target"] for r in rs])
            q = np.mean([r[s]["retrieved"] for r in rs])
            cells.append(f"{t:.4f} / {q:.4f}")
        print(f"| {group} | {len(rs)} | " + " | ".join(cells) + " |")
    c = os.times()
    cpu = c.user + c.system - c0.user - c0.system
    print(f"\n{time.time() - t0:.0f} s wall, {cpu:.0f} s CPU, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
