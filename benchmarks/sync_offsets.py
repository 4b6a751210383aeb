"""Does the sync expert find injected offsets, and rank real footage above the floors, on speakers it never saw?

    python benchmarks/sync_offsets.py [--manifest data/prep/128/manifest.json] \\
        --weights lipsync_cli/weights/sync,lipsync_cli/weights/sync+lipsync_cli/weights/sync_lips [--out F.json]

Sets, from the manifest's splits: `unseen` = the speaker split's held-out speakers (val + test), `seen` = the
utterance test sentences of the other speakers, `shared` = the imported shared clips' segments (when the manifest
has them; the pre-issue-15 weights trained on most of them). Each clip is shifted by every --offsets d (video lags
audio by d frames: the first d frames of audio, or of video when d < 0, are dropped) and `models.sync.offsets` must
find d within +-1 frame; `tracked` asks only that the found offset moves with d (found(d) - found(0) = d +-1, over
d != 0), which does not assume the clip itself is in sync (the shared clips are other systems' outputs). Floors,
as `lipsync eval` has them: `frozen` (the first frame's mouth held for the whole
clip) and `other audio` (another clip's speech of the same set); LSE-C (the confidence: median distance over
offsets minus the best) of real footage should clearly beat both. `A+B` in --weights is a team of experts voting by
their mean distance curve, as `lipsync eval` reads offsets (models.sync.load_experts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lipsync_cli import models
from lipsync_cli.data.dataset import clip_key
from lipsync_cli.models import sync

ROOT = Path(__file__).resolve().parents[1]


def clip_sets(manifest: Path) -> dict[str, list[dict]]:
    meta = json.loads(manifest.read_text())
    spk = meta["splits"].get("speaker") or {}
    held = set(spk.get("val", [])) | set(spk.get("test", []))
    test = set(meta["splits"]["utterance"]["test"])
    return {
        "unseen": [c for c in meta["clips"] if clip_key(c) in held],
        "seen": [c for c in meta["clips"] if clip_key(c) in test and clip_key(c) not in held],
        "shared": [c for c in meta["clips"] if c["corpus"] != "grid"],  # imported talking heads (README "Data")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=ROOT / "data/prep/128/manifest.json")
    ap.add_argument(
        "--weights", default=str(models.WEIGHTS / "sync"), help="comma list of checkpoints (no suffix); A+B: a team"
    )
    ap.add_argument("--offsets", default="-10,-6,-3,0,3,6,10")
    ap.add_argument("--sets", default="unseen,seen,shared", help="comma list of unseen, seen, shared")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    offs = [int(x) for x in args.offsets.split(",")]
    sets = {k: v for k, v in clip_sets(args.manifest).items() if k in args.sets.split(",") and v}
    data = {}
    for clips in sets.values():
        for c in clips:
            with safe_open(str(args.manifest.parent / c["path"]), framework="numpy") as f:
                data[clip_key(c)] = (
                    f.get_tensor("crops"),
                    sync.shard_lips(f),
                    f.get_tensor("mel").astype(np.float32),
                    f.get_tensor("found"),
                )
    print({k: len(v) for k, v in sets.items()}, flush=True)
    report = {}
    for w in args.weights.split(","):
        team = [models.load(Path(p).with_suffix(".safetensors"))[0] for p in w.split("+")]
        rep = {}
        for name, clips in sets.items():
            keys = [clip_key(c) for c in clips]
            hits = {d: [] for d in offs}
            tracked = []
            conf = {"real": [], "frozen": [], "other audio": []}
            emb = {}
            for k in keys:  # each clip embedded once: a shift of the inputs is a shift of the window embeddings
                crops, lips, mel, found = data[k]
                v = [sync.embed_video(m, crops, lips).numpy() for m in team]
                a = [sync.embed_audio(m, mel).numpy() for m in team]
                ok = np.lib.stride_tricks.sliding_window_view(found[: len(v[0]) + sync.FRAMES - 1], sync.FRAMES).all(1)
                emb[k] = (v, a, ok)
            for i, k in enumerate(keys):
                v, a, ok = emb[k]
                found = {}
                for d in sorted(offs, key=abs):
                    vs, as_, oks = (v, [x[d:] for x in a], ok) if d > 0 else ([x[-d:] for x in v], a, ok[-d:])
                    r = sync.offset_scores(vs, as_, ok=oks)
                    hits[d].append(abs(r["offset"] - d) <= 1)
                    found[d] = r["offset"]
                    if d == 0:
                        conf["real"].append(r["confidence"])
                if 0 in found:
                    tracked += [abs(found[d] - found[0] - d) <= 1 for d in offs if d]
                held = np.flatnonzero(ok)[0]
                frozen = [np.repeat(x[held][None], len(x), 0) for x in v]  # one window's mouth, held
                conf["frozen"].append(sync.offset_scores(frozen, a)["confidence"])
                other = emb[keys[(i + 1) % len(keys)]][1]
                conf["other audio"].append(sync.offset_scores(v, other, ok=ok)["confidence"])
            all_hits = [h for v in hits.values() for h in v]
            rep[name] = {
                "clips": len(keys),
                "speakers": sorted({k.rsplit("/", 1)[0] for k in keys}),
                "recovered": float(np.mean(all_hits)),
                "recovered_by_offset": {str(d): float(np.mean(v)) for d, v in hits.items()},
                "tracked": float(np.mean(tracked)) if tracked else float("nan"),
                "lse_c": {kind: float(np.mean(v)) for kind, v in conf.items()},
            }
        report[w] = rep
    head = f"{'weights':<40} {'set':<7} {'clips':>5} {'within +-1':>10} {'tracked':>8}"
    print(f"{head}   LSE-C real / frozen / other audio")
    for w, rep in report.items():
        for name, r in rep.items():
            c = r["lse_c"]
            print(
                f"{w:<40} {name:<7} {r['clips']:>5} {r['recovered']:>10.1%} {r['tracked']:>8.1%}   "
                f"{c['real']:.3f} / {c['frozen']:.3f} / {c['other audio']:.3f}"
            )
        for name, r in rep.items():
            print(f"  {name} by offset: " + ", ".join(f"{d}: {v:.0%}" for d, v in r["recovered_by_offset"].items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
