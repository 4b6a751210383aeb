"""Audio -> lip shape: a small transformer that replaces the self-fitted map (models/lipmap.py) inside `dub`.

Input: the speech's 80-bin log-mel at 100 Hz, normalised per utterance (cepstral mean/variance per bin, so gain,
channel and spectral tilt cancel) plus one loudness channel relative to the utterance's own loud parts. A strided
conv turns 4 feature rows into one video frame (25 fps), a depthwise conv gives the frames their relative position,
and a 4-layer transformer (d 128, 4 heads, ff 512) attends within +-BAND frames (so any length runs, and the mouth
may lead the sound). Output: the 40 lip points of every frame, speaker-normalised: (shape - speaker mean shape) /
speaker motion scale, in aligned-crop units. At dub time (models/lips_infer.py: the same forward pass in numpy, so
a dub loads no torch) the input video's own mean shape and scale put them back (`predict`), an optional per-video
calibration on the video's own audio adapts the motion to that mouth, and the target eases to the video's closed
mouth where the speech falls silent.

Losses: landmark L1 and velocity L1 (frame-to-frame motion, against jitter and lag); optionally L1 on the inner-lip
gap (`w_gap`, off in the committed weights: it made the target close more but not the shown mouth). The sync expert
(models/sync.py) scores mouth *images*; this model outputs points, and no differentiable points -> pixels renderer
exists here, so its loss is not used. Training data: GRID s1 plus the imported shared clips as extra speakers, with
every frame that `lipsync eval` re-creates cut out (see `eval_spans`), and voice augmentation (mel-axis warp ~
vocal-tract length, additive noise, frequency masks) so that the model holds on voices it never heard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lipsync_cli import face
from lipsync_cli.data.corpus import training_data
from lipsync_cli.data.dataset import clip_key, eval_spans, open_shard, read_manifest
from lipsync_cli.models.lips_infer import N_MELS, ROWS, features, normalise, speaker_stats
from lipsync_cli.models.task import make_config


@dataclass
class Config:
    model: str = "lips"
    n_mels: int = N_MELS
    n_points: int = 40
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    band: int = 25  # frames each side a frame may attend to (1 s)
    window: int = 75  # training crop in frames (3 s: one GRID sentence)
    w_velocity: float = 1.0
    w_gap: float = 0.0  # L1 on the inner-lip gap (the opening); 0.25-1 tried: docs/lips.md
    augment: bool = True


def config_from(d: dict) -> Config:
    return make_config(Config, d, "lips")


# ----------------------------------------------------------------------------- augmentation


def augment_logmel(logmel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another voice, roughly: warp the mel axis (vocal-tract length / pitch), add noise, mask a band."""
    x = logmel.astype(np.float32)
    n = x.shape[1]
    a = rng.uniform(0.88, 1.12)
    src = np.clip(np.arange(n) / a, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).astype(np.float32)
    x = x[:, lo] * (1 - w) + x[:, hi] * w
    if rng.random() < 0.5:  # stationary noise 15-40 dB under the loud frames (added as power)
        peak = np.percentile(x.max(1), 95)
        x = np.log10(10.0**x + 10.0 ** (peak - rng.uniform(1.5, 4.0)) * rng.uniform(0.5, 1.5, n).astype(np.float32))
    if rng.random() < 0.5:
        w0, f0 = int(rng.integers(1, 9)), int(rng.integers(0, n - 8))
        x[:, f0 : f0 + w0] = x[:, f0 : f0 + w0].mean()
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- model


class LipsModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.inp = nn.Linear(cfg.n_mels + 1, d)
        self.down = nn.Conv1d(d, d, kernel_size=2 * ROWS, stride=ROWS)  # 4 rows of context left of each frame
        self.pos = nn.Conv1d(d, d, kernel_size=9, padding=4, groups=d)  # relative position, like wav2vec 2.0
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2 * cfg.n_points)

    def hidden(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, 4T, 81) -> (B, T, d). Padding (short clips in a batch) is edge-repeated features, not masked:
        a key mask would leave padded queries far from real frames with nothing to attend to."""
        x = self.inp(feat).transpose(1, 2)  # (B, d, 4T)
        x = self.down(F.pad(x, (ROWS, 0), mode="replicate"))  # frame i sees rows 4i-4 .. 4i+3
        x = x + F.gelu(self.pos(x))
        x = x.transpose(1, 2)
        i = torch.arange(x.shape[1], device=x.device)
        band = (i[None, :] - i[:, None]).abs() > self.cfg.band  # True = may not attend
        return self.norm(self.encoder(x, mask=band))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, 4T, 81) -> (B, T, 80) speaker-normalised lip points (x0, y0, x1, y1, ...)."""
        return self.head(self.hidden(feat))


def build(config: dict) -> LipsModel:
    return LipsModel(config_from(config))


# ----------------------------------------------------------------------------- data


def load_clip(root: Path, c: dict) -> dict:
    """What training reads of one shard: log-mel rows, lips (T, 80) in crop units, found, inter-ocular px."""
    with open_shard(root / c["path"]) as f:
        size = int(f.metadata()["size"])
        lips = f.get_tensor("lips").reshape(-1, 80) / size
        found = f.get_tensor("found") & np.isfinite(lips).all(1)
        lm, aff = f.get_tensor("landmarks"), f.get_tensor("affine")
        mel = f.get_tensor("mel").astype(np.float32)
        r0 = int(f.get_tensor("mel_index")[0])
    eyes = np.einsum("tij,tnj->tni", aff[:, :, :2], lm[:, [33, 133, 362, 263]]) + aff[:, None, :, 2]
    iod = np.linalg.norm(eyes[:, 2:].mean(1) - eyes[:, :2].mean(1), axis=-1)
    iod = float(np.nanmedian(iod[found])) if found.any() else float(size) * 0.5
    return {"mel": mel[r0:], "lips": lips, "found": found, "iod": iod, "size": size, "key": clip_key(c)}


class ClipWindows(Dataset):
    """Fixed-length windows over whole clips held in memory. Items: feat (4W, 81), lips (W, 80) speaker-normalised,
    valid (W,), unit () = crop units per normalised unit / inter-ocular (so |error| * unit is LVE)."""

    def __init__(self, clips: list[dict], stats: dict, window: int, train: bool, augment: bool = True):
        self.clips, self.stats, self.window, self.train, self.augment = clips, stats, window, train, augment
        if train:  # clips drawn in proportion to their length
            self.index = [(k, -1) for k, c in enumerate(clips) for _ in range(max(1, len(c["lips"]) // window))]
        else:  # every frame once
            self.index = [(k, s) for k, c in enumerate(clips) for s in range(0, len(c["lips"]), window)]
        self.feats = None if train else [features(c["mel"]) for c in clips]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, s = self.index[i]
        c, W = self.clips[k], self.window
        T = len(c["lips"])
        if self.train:  # torch's generator: seeded by the loop, distinct in every DataLoader worker
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
            feat = features(augment_logmel(c["mel"], rng) if self.augment else c["mel"])
            s = int(rng.integers(0, max(1, T - W + 1)))
        else:
            feat = self.feats[k]
        mean, scale = self.stats[c["speaker"]]
        n = min(W, T - s)
        lips = np.zeros((W, 80), np.float32)
        lips[:n] = np.nan_to_num(normalise(c["lips"][s : s + n], mean, scale))
        valid = np.zeros(W, bool)
        valid[:n] = c["found"][s : s + n]
        rows = feat[ROWS * s : ROWS * (s + W)]
        rows = np.pad(rows, ((0, ROWS * W - len(rows)), (0, 0)), mode="edge")
        return {
            "feat": torch.from_numpy(np.ascontiguousarray(rows)),
            "lips": torch.from_numpy(lips),
            "valid": torch.from_numpy(valid),
            "unit": torch.tensor(scale * c["size"] / c["iod"], dtype=torch.float32),
        }


def prepare(manifest: str | Path, cfg: Config) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train, val, test clips, speaker stats). Train: the utterance split's train clips minus the speaker split's
    held-out speakers (voices never heard, for val/test) and minus every frame `lipsync eval` re-creates."""
    root = Path(manifest).parent
    meta = read_manifest(manifest)
    by_key = {clip_key(c): c for c in meta["clips"]}
    utt = meta["splits"]["utterance"]
    held = {s for v in (meta["splits"].get("speaker_held_out") or {}).values() for s in v}
    spans = eval_spans(meta["clips"], root)
    fps = meta["fps"]

    def spk(c: dict) -> str:
        return f"{c['corpus']}/{c['speaker']}"

    train, val, test = [], [], []
    for key in utt["train"]:
        c = by_key[key]
        if spk(c) in held:
            continue
        clip = load_clip(root, c)
        a, b = spans.get(key, (np.inf, np.inf))
        t = np.arange(len(clip["lips"])) / fps
        cut = (t + 1 / fps > a) & (t < b)  # frames overlapping the re-created span
        for part in _runs(~cut):
            if len(part) >= 25:
                train.append(_slice(clip, part[0], part[-1] + 1))
    for name, out in (("val", val), ("test", test)):
        for key in utt.get(name, []):
            if spk(by_key[key]) not in held:
                out.append(load_clip(root, by_key[key]))
    for name, out in (("val", val), ("test", test)):
        for key in (meta["splits"].get("speaker") or {}).get(name, []):
            if spk(by_key[key]) in held:
                out.append(load_clip(root, by_key[key]))
    for c in train + val + test:
        c["speaker"] = c["key"].rsplit("/", 1)[0]
    stats = {}
    for s in {c["speaker"] for c in train + val + test}:
        # a speaker's statistics from its training frames when it has any (GRID), else from its own clips
        own = [c for c in train if c["speaker"] == s] or [c for c in val + test if c["speaker"] == s]
        stats[s] = speaker_stats(np.concatenate([c["lips"] for c in own]), np.concatenate([c["found"] for c in own]))
    return train, val, test, stats


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    idx = np.flatnonzero(mask)
    return [r for r in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(r)]


def _slice(clip: dict, a: int, b: int) -> dict:
    return {**clip, "lips": clip["lips"][a:b], "found": clip["found"][a:b], "mel": clip["mel"][ROWS * a : ROWS * b + 1]}


# ----------------------------------------------------------------------------- training task


def lip_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    err = torch.where(valid[..., None], (pred - target).abs(), 0.0)
    return err.sum() / (valid.sum() * pred.shape[-1]).clamp_min(1)


GAP_Y = 2 * face.INNER_LIP_PAIRS_IN_LIPS + 1  # (x0, y0, x1, y1, ...) columns of the pairs' y: upper, lower


def inner_gap(y: torch.Tensor) -> torch.Tensor:
    """(..., 80) lip points -> (...) mean vertical inner-lip gap (speaker-normalised units: 0 = the mean gap)."""
    return (y[..., GAP_Y[:, 1]] - y[..., GAP_Y[:, 0]]).mean(-1)


def gap_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return lip_l1(inner_gap(pred)[..., None], inner_gap(target)[..., None], valid)


def velocity_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = valid[:, 1:] & valid[:, :-1]
    return lip_l1(pred[:, 1:] - pred[:, :-1], target[:, 1:] - target[:, :-1], v)


def lve(pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(sum of per-frame lip vertex errors / inter-ocular distance, frames) over the batch's valid frames."""
    d = (pred - batch["lips"]).reshape(*pred.shape[:2], -1, 2).norm(dim=-1).mean(-1) * batch["unit"][:, None]
    v = batch["valid"]
    return float(d[v].sum()), float(v.sum())


def make_task(manifest: str | Path, overrides: dict | None = None):
    from lipsync_cli.models.task import Task, unwrap

    cfg = config_from({**asdict(Config()), **(overrides or {})})
    train, val, _, stats = prepare(manifest, cfg)
    model = LipsModel(cfg)

    def loss(m: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pred = m(batch["feat"])
        l1 = lip_l1(pred, batch["lips"], batch["valid"])
        vel = velocity_l1(pred, batch["lips"], batch["valid"])
        gap = gap_l1(pred, batch["lips"], batch["valid"])
        total = l1 + cfg.w_velocity * vel + cfg.w_gap * gap
        return total, {"l1": l1.detach(), "vel": vel.detach(), "gap": gap.detach()}

    def validate(m: nn.Module, batches) -> dict[str, float]:
        err = n = l1 = 0.0
        for b in batches:
            with torch.no_grad():
                pred = unwrap(m)(b["feat"])
            e, k = lve(pred, b)
            err, n, l1 = err + e, n + k, l1 + float(lip_l1(pred, b["lips"], b["valid"])) * k
        return {"lve": err / max(n, 1.0), "l1": l1 / max(n, 1.0)}

    speakers = sorted({c["speaker"] for c in train})
    meta = {"train_clips": len(train), **training_data(speakers)}
    return Task(
        name="lips",
        model=model,
        config={**asdict(cfg), "data": meta},
        train_set=ClipWindows(train, stats, cfg.window, train=True, augment=cfg.augment),
        val_set=ClipWindows(val, stats, cfg.window, train=False) if val else None,
        loss=loss,
        validate=validate,
        metric="lve",
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=200,
        batch_size=32,
    )


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
