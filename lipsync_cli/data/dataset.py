"""A torch Dataset of aligned windows over prepped shards: N video frames and the mel rows that span them.

Shards store mel at 100 Hz and video at 25 fps on one timeline (frame i, mel row 4i and audio sample 640i are the
same instant), so the window of frames [s, s + N) comes with mel rows [4s, 4s + 4N): row 4j of the window is the
one `audio.frames_to_video` picks for frame s + j. Reads go through safetensors' memory-mapped `safe_open`, so an
item costs the bytes of its window, not of its clip; files are opened per item, which keeps the dataset safe to
use from DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from lipsync_cli.errors import LipsyncError, reason

HOLD_OUT = 0.4  # eval reconstruct: fraction of a media clip re-created (the end); the rest is the reference
MAX_CLIP_S = 8.0  # eval: seconds of each video analysed (training leaves the re-created span out: eval_spans)
FRAME_KEYS = ("crops", "lips", "mouth", "found", "silence", "word_index")


@contextlib.contextmanager
def open_shard(path: Path, framework: str = "numpy") -> Iterator:
    """safe_open of a prepped shard. One that is missing, cut short, not safetensors or lacks a tensor is a user error
    naming the file (the manifest and its shards were copied or edited apart), not a bug report."""
    try:
        with safe_open(str(path), framework=framework) as f:
            yield f
    except (OSError, SafetensorError) as e:
        raise LipsyncError(f"cannot read shard {path} ({reason(e)}): run `lipsync prep` again") from None


def read_manifest(manifest: str | Path) -> dict:
    """A prep manifest.json, checked for the shape training reads (an object with a list of clips, each naming its
    shard, and a table of splits): anything else is one user error naming the file rather than a KeyError later."""
    try:
        meta = json.loads(Path(manifest).read_text())
        _check_manifest(meta)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = reason(e)
        raise LipsyncError(f"manifest {manifest} is not a prep manifest ({why}): run `lipsync prep` again") from None
    return meta


def _check_manifest(meta: object) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    clips, splits = meta.get("clips"), meta.get("splits")
    if not isinstance(clips, list) or not isinstance(splits, dict):
        raise ValueError("it needs a list of 'clips' and a table of 'splits'")
    for c in clips:
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("path", "corpus", "speaker", "id")):
            raise ValueError(f"clip {c!r} lacks its path, corpus, speaker or id")
    for scheme, parts in splits.items():
        if scheme.endswith("_note") or parts is None:  # prep's "speaker": None with a note when it cannot split
            continue
        if not isinstance(parts, dict) or not all(isinstance(v, list) for v in parts.values()):
            raise ValueError(f"split {scheme!r} is not a table of lists of clips")


def clip_key(c: dict) -> str:
    """A manifest entry's name in the splits: corpus/speaker/id."""
    return f"{c['corpus']}/{c['speaker']}/{c['id']}"


def split_clips(manifest: str | Path, split: str, scheme: str = "utterance") -> tuple[Path, dict, list[dict]]:
    """(shard root, manifest, the entries of `split` under `scheme`: "utterance", "speaker" or "disjoint").

    "disjoint" validates and tests on whole held-out speakers and trains on the other speakers' utterance-train
    sentences only (the eval's test sentences stay unseen); with no speaker split (one or two speakers) it is the
    utterance split."""
    meta = read_manifest(manifest)
    if scheme == "disjoint":
        utt, spk = meta["splits"]["utterance"], meta["splits"].get("speaker")
        if spk is None:
            scheme = "utterance"
        else:
            wanted = set(spk.get(split, [])) & (set(utt["train"]) if split == "train" else set(spk.get(split, [])))
            return Path(manifest).parent, meta, [c for c in meta["clips"] if clip_key(c) in wanted]
    splits = meta["splits"].get(scheme)
    if splits is None:
        raise ValueError(f"manifest has no {scheme!r} split ({meta['splits'].get(scheme + '_note', '')})")
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; have {sorted(splits)}")
    wanted = set(splits[split])
    return Path(manifest).parent, meta, [c for c in meta["clips"] if clip_key(c) in wanted]


def eval_spans(clips: list[dict], root: Path) -> dict[str, tuple[float, float]]:
    """Per imported segment (by clip_key), the span in its own seconds that `lipsync eval` re-creates from its
    source clip: training leaves it out.

    The reconstruct protocol re-creates the last HOLD_OUT of the first MAX_CLIP_S seconds of each shared media clip;
    segments carry their start/end in the source. The source's length is taken as the largest segment end seen
    (<= the true length, so the excluded span can only grow)."""
    prov: dict[str, tuple[str, float, float]] = {}
    for c in clips:
        if c["corpus"] == "grid":
            continue
        with open_shard(root / c["path"]) as f:
            imp = json.loads(f.metadata().get("provenance") or "{}").get("import")
        if imp:
            prov[clip_key(c)] = (imp["source"], float(imp["start"]), float(imp["end"]))
    length: dict[str, float] = {}
    for src, _, end in prov.values():
        length[src] = max(length.get(src, 0.0), end)
    spans = {}
    for key, (src, start, _) in prov.items():
        d = min(length[src], MAX_CLIP_S)
        spans[key] = ((1 - HOLD_OUT) * d - start, MAX_CLIP_S - start)
    return spans


def trainable_frames(found: np.ndarray, span: tuple[float, float] | None, fps: float = 25.0) -> np.ndarray:
    """Frames training may use: found, and outside `span` (the seconds of this segment the eval re-creates, from
    `eval_spans`; None for clips the eval does not re-create), with a 0.5 s margin: audio windows reach across."""
    ok = np.asarray(found, bool).copy()
    if span is not None:
        t = np.arange(len(ok)) / fps
        ok &= ~((t >= span[0] - 0.5) & (t < span[1] + 0.5))
    return ok


def balance_speakers(items: list, speakers: list[str], repeat_max: int) -> list:
    """`items` with those of small speakers repeated min(repeat_max, round(sqrt(n_largest / n))) times, so that a
    corpus of one speaker (GRID s1: ~30k frames) does not drown a few seconds each of other faces. speakers[i] is
    item i's speaker."""
    if repeat_max <= 1 or not items:
        return list(items)
    count: dict[str, int] = {}
    for s in speakers:
        count[s] = count.get(s, 0) + 1
    most = max(count.values())
    times = {s: min(repeat_max, max(1, round(np.sqrt(most / n)))) for s, n in count.items()}
    return [w for w, s in zip(items, speakers, strict=True) for _ in range(times[s])]


class WindowDataset(Dataset):
    """Windows of `window` frames from one split of `manifest.json` (scheme "utterance" or "speaker").

    `stride` frames between window starts (default: `window`, no overlap). With `require_face`, windows holding a
    frame without a tracked face are left out. Items are dicts of tensors: crops uint8 (N, S, S, 3), lips (N, 40, 2),
    mouth (N,), found/silence bool (N,), word_index (N,), mel float32 (N * 4, 80), plus clip (index into `clips`)
    and start (first frame).
    """

    def __init__(
        self,
        manifest: str | Path,
        split: str = "train",
        scheme: str = "utterance",
        window: int = 5,
        stride: int | None = None,
        require_face: bool = True,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.root, meta, self.clips = split_clips(manifest, split, scheme)
        self.window, self.rows = window, meta["feat_rate"] // meta["fps"]
        stride = stride or window
        self.index: list[tuple[int, int]] = []  # (clip, start frame)
        for k, c in enumerate(self.clips):
            with open_shard(self.root / c["path"]) as f:
                found = f.get_tensor("found") if require_face else np.ones(c["frames"], bool)
            bad = np.concatenate([[0], np.cumsum(~found)])
            for s in range(0, c["frames"] - window + 1, stride):
                if bad[s + window] == bad[s]:
                    self.index.append((k, s))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, s = self.index[i]
        n = self.window
        with open_shard(self.root / self.clips[k]["path"], "pt") as f:
            item = {key: f.get_slice(key)[s : s + n] for key in FRAME_KEYS}
            r0 = int(f.get_slice("mel_index")[s : s + 1][0])
            item["mel"] = f.get_slice("mel")[r0 : r0 + n * self.rows].float()
        item["clip"], item["start"] = torch.tensor(k), torch.tensor(s)
        return item
