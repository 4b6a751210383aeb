"""Carry prepped shards to a machine without the media stack (a rented GPU): crops as one JPEG strip per clip.

    python benchmarks/pack_shards.py pack data/prep/128/manifest.json /tmp/pack --per-speaker 24  # ~0.4 MB a clip
    python benchmarks/pack_shards.py pack-mouths data/prep/128/manifest.json /tmp/mouths  # all clips, sync only
    python benchmarks/pack_shards.py unpack /tmp/pack /tmp/prep                           # -> /tmp/prep/manifest.json

A 128 px shard is ~4 MB, 90% of it raw crops; JPEG (quality 92) keeps them within a grey level or two of the
originals, which is plenty for speed figures and device checks (not for shipping weights). The waveform stays
behind (training reads mel/MFCC), landmarks travel as float16, every other tensor and the metadata as they are.
`unpack` writes ordinary shards and the manifest (a `pack` subset keeps the utterance split only; `pack-mouths`
keeps every split), so `lipsync train --manifest` and `benchmarks/train_speed.py` read them. It needs numpy,
opencv, safetensors: no mediapipe, ffmpeg or PyAV.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def pack(manifest: Path, out: Path, per_speaker: int, quality: int = 92) -> None:
    meta = json.loads(manifest.read_text())
    root, taken, keep = manifest.parent, {}, []
    for c in meta["clips"]:
        spk = f"{c['corpus']}/{c['speaker']}"
        if taken.get(spk, 0) < per_speaker:
            taken[spk] = taken.get(spk, 0) + 1
            keep.append(c)
    for c in keep:
        dst = out / Path(c["path"]).with_suffix("")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with safe_open(str(root / c["path"]), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            header = f.metadata()
        crops = tensors.pop("crops")
        tensors.pop("audio")  # training reads mel and mfcc, never the waveform
        tensors["landmarks"] = tensors["landmarks"].astype(np.float16)  # full-frame pixels: +-0.25 px at 512 px
        strip = crops.reshape(-1, *crops.shape[2:])  # (T * S, S, 3) RGB
        ok, jpg = cv2.imencode(".jpg", strip[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        dst.with_suffix(".jpg").write_bytes(jpg.tobytes())
        np.savez_compressed(dst.with_suffix(".npz"), **tensors)
        dst.with_suffix(".json").write_text(json.dumps({"metadata": header, "crops_shape": list(crops.shape)}))
    kept = {f"{c['corpus']}/{c['speaker']}/{c['id']}" for c in keep}
    meta["clips"] = keep
    meta["splits"] = {"utterance": {p: [k for k in v if k in kept] for p, v in meta["splits"]["utterance"].items()}}
    (out / "manifest.json").write_text(json.dumps(meta))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {len(keep)} clips of {len(taken)} speakers into {out}: {size / 1e6:.1f} MB")


def pack_mouths(manifest: Path, out: Path, quality: int = 95) -> None:
    """Every clip, for the sync expert only: its grey MOUTH boxes (what `sync.mouth_frames` cuts, ~1 KB a frame as
    JPEG) and the tensors SyncWindows reads; the manifest keeps its splits (speaker-disjoint included)."""
    from lipsync_cli.models.sync import mouth_frames

    meta = json.loads(manifest.read_text())
    for c in meta["clips"]:
        dst = out / Path(c["path"]).with_suffix("")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with safe_open(str(manifest.parent / c["path"]), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in ("mel", "mel_index", "found", "silence")}
            mouths = mouth_frames(f.get_tensor("crops"))
            header = f.metadata()
        ok, jpg = cv2.imencode(".jpg", mouths.reshape(-1, mouths.shape[2]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        dst.with_suffix(".jpg").write_bytes(jpg.tobytes())
        np.savez_compressed(dst.with_suffix(".npz"), **tensors)
        dst.with_suffix(".json").write_text(json.dumps({"metadata": header, "mouths_shape": list(mouths.shape)}))
    (out / "manifest.json").write_text(json.dumps(meta))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed the mouths of {len(meta['clips'])} clips into {out}: {size / 1e6:.1f} MB")


def _mouth_crops(mouths: np.ndarray) -> np.ndarray:
    """Grey (T, 48, 72) mouths -> (T, 96, 96, 3) crops whose MOUTH box is exactly those pixels (elsewhere 0), so that
    `sync.mouth_frames` gives them back unchanged."""
    from lipsync_cli.models.sync import MOUTH

    t, h, w = mouths.shape
    s = round(w / (MOUTH[2] - MOUTH[0]))
    x0, y0, x1, y1 = (np.array(MOUTH) * s).round().astype(int)
    assert (x1 - x0, y1 - y0) == (w, h), (s, x0, y0, x1, y1)
    crops = np.zeros((t, s, s, 3), np.uint8)
    crops[:, y0:y1, x0:x1] = mouths[..., None]
    return crops


def unpack(src: Path, out: Path) -> None:
    meta = json.loads((src / "manifest.json").read_text())
    for c in meta["clips"]:
        base = src / Path(c["path"]).with_suffix("")
        doc = json.loads(base.with_suffix(".json").read_text())
        jpg = np.frombuffer(base.with_suffix(".jpg").read_bytes(), np.uint8)
        tensors = dict(np.load(base.with_suffix(".npz")))
        if "mouths_shape" in doc:  # pack_mouths: sync-only shards
            mouths = cv2.imdecode(jpg, cv2.IMREAD_GRAYSCALE).reshape(doc["mouths_shape"])
            tensors["crops"] = _mouth_crops(mouths)
        else:
            strip = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
            tensors["landmarks"] = tensors["landmarks"].astype(np.float32)
            tensors["crops"] = np.ascontiguousarray(strip[..., ::-1]).reshape(doc["crops_shape"])
        dst = out / c["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst), metadata=doc["metadata"])
    if "speaker" not in meta["splits"]:  # a subset (pack): its speaker split would not be the corpus's
        speakers = sorted({f"{c['corpus']}/{c['speaker']}" for c in meta["clips"]})
        meta["splits"]["speaker"] = None
        meta["splits"]["speaker_note"] = f"packed subset of {len(speakers)} speakers: utterance split only"
    (out / "manifest.json").write_text(json.dumps(meta))
    print(f"unpacked {len(meta['clips'])} clips into {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("manifest", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--per-speaker", type=int, default=24)
    p.add_argument("--quality", type=int, default=92)
    pm = sub.add_parser("pack-mouths", help="every clip, sync expert only (grey mouth boxes)")
    pm.add_argument("manifest", type=Path)
    pm.add_argument("out", type=Path)
    pm.add_argument("--quality", type=int, default=95)
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.manifest, args.out, args.per_speaker, args.quality)
    elif args.cmd == "pack-mouths":
        pack_mouths(args.manifest, args.out, args.quality)
    else:
        unpack(args.src, args.out)


if __name__ == "__main__":
    main()
