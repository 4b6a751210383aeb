"""The seed model: the user's original design, layer for layer, trained as designed.

    MFCC window (17, 13) --AudioEncoder--> audio tokens (17, 128) ----------------.
    K reference mouths (3, K, 32, 32) --VideoEncoder--> video tokens (K/2*16, 128) --Alignment (cross-attention)
        --> z (128) --Generator--> 32x32 mouth (tanh)          Discriminator: 32x32 mouth -> real/fake logit

Every output frame is generated on its own from its audio window and the references (no temporal model).

The spec's layers are kept literally (tests check every shape and parameter count):
  AudioEncoder   Linear(13 -> 128), TransformerEncoder: 4 layers, d_model 128, 4 heads, feed-forward 512, dropout 0.1
  VideoEncoder   Conv3d(3->64, k3, p1), Conv3d(64->128, k3, p1), Conv3d(128->128, k3, p1), ReLU, MaxPool3d(2)
  Alignment      Linear audio_proj(128->128), Linear video_proj(128->128), MultiheadAttention(128, 4 heads)
  Generator      Linear(128 -> 32768) as 512x8x8, ConvTranspose2d(512->256, k4, s2, p1), ReLU,
                 ConvTranspose2d(256->3, k4, s2, p1), Tanh
  Discriminator  Conv2d(3->64, k4, s2, p1), LeakyReLU(0.2), Conv2d(64->128, k4, s2, p1), LeakyReLU(0.2),
                 Linear(8192->1)

Where the spec is silent, these are the choices (each the plain one):
  * The mouth image is face.MOUTH_BOX (the eval's too) of prep's aligned 128 px lower-face crop (x 0.25-0.75,
    y 0.30-0.68), resized to 32x32 (area), scaled to [-1, 1].
    The engine (engine/seed.py) upsamples it back into that box.
  * Audio input: the MFCC-13 rows (100 Hz) within +-8 rows (+-80 ms) of the frame's row 4i, edge-padded, each row
    standardised with training-set mean/std (stored in the config). Learned position embeddings are added after
    the Linear (a transformer needs them to tell the rows apart).
  * Video input: K = 2 mouths of the same speaker at other moments (training: random frames of the same clip at
    least MIN_GAP frames from every target; inference: frames spread over the reference footage): they carry
    identity, lighting and which mouth shapes this person makes, never the target's own mouth. Conv3d treats the K
    references as its time axis; the pooled (128, K/2, 16, 16) map is average-pooled to 4x4 per pooled step (the
    spatial layout kept for the attention to pick from) plus learned position embeddings -> K/2*16 tokens. K = 2,
    not more, because the 3D convs at 32x32 are nearly all of the model's cost (~4 GFLOP a reference frame with
    the backward pass), and a training item is a group of 8 frames of one clip sharing one reference set, as at
    inference, which divides that cost by 8 in the joint phase.
  * Alignment: queries audio_proj(audio tokens), keys/values video_proj(video tokens); the attended video is added
    to the audio token (residual) and averaged over the 17 rows -> z: the generator sees both what is said and whose
    mouth says it.
  * "Encoders first" (steps < phase1_steps): SyncNet-style contrastive pretraining of the audio and video encoders
    and the two projections: the video encoder sees the K frames around each target (the mouth that goes with the
    audio), InfoNCE over the batch between the mean audio_proj and mean video_proj embeddings. The attention,
    generator and discriminator are idle then (DDP: find_unused_parameters). It is the dearest phase per step
    (the video encoder runs per frame, not per group), so it is kept short.
  * Then everything jointly: L1 reconstruction + adv_weight * non-saturating GAN loss (BCE). One optimiser: the
    discriminator loss is on fake.detach(), the generator's adversarial loss goes through the discriminator with its
    parameters detached (torch.func.functional_call), and the two are summed.
  * Shared clips (imported talking heads, `shared/*` in the manifest) are trained only on source times outside the
    eval's held-out window (the last 40% of each video's first 8 s), the same rule the eval gives every engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lipsync_cli.data.dataset import clip_key, eval_spans, open_shard, split_clips, trainable_frames
from lipsync_cli.face import MOUTH_BOX
from lipsync_cli.models.task import Task, make_config, unwrap

IMG = 32
MIN_GAP = 5  # frames between the target and any reference mouth in training
VAL_ITEMS = 48  # validation groups, spread over the val split


@dataclass
class Config:
    n_mfcc: int = 13
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    audio_ctx: int = 8  # MFCC rows either side of the frame's row
    n_refs: int = 2  # reference mouths (Conv3d time axis); even, MaxPool3d halves it
    gen_channels: int = 512  # Linear(128 -> 512*8*8 = 32768)
    phase1_steps: int = 40  # encoders-first contrastive steps (~4x the CPU of a joint step each)
    adv_weight: float = 0.01
    temperature: float = 0.07
    mfcc_mean: tuple[float, ...] = (0.0,) * 13
    mfcc_std: tuple[float, ...] = (1.0,) * 13


# ----------------------------------------------------------------------------------------------- the model


class AudioEncoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.proj = nn.Linear(c.n_mfcc, c.d_model)
        self.pos = nn.Parameter(torch.zeros(2 * c.audio_ctx + 1, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ff, c.dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:  # (B, R, 13) standardised -> (B, R, 128)
        return self.transformer(self.proj(mfcc) + self.pos)


class VideoEncoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, 64, 3, padding=1),
            nn.Conv3d(64, 128, 3, padding=1),
            nn.Conv3d(128, c.d_model, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
        )
        self.pos = nn.Parameter(torch.zeros(c.n_refs // 2 * 16, c.d_model))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:  # (B, 3, K, 32, 32) in [-1, 1] -> (B, K/2*16, 128)
        x = self.net(clip)  # (B, 128, K/2, 16, 16)
        x = F.adaptive_avg_pool3d(x, (x.shape[2], 4, 4))
        return x.flatten(2).transpose(1, 2) + self.pos


class Alignment(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.audio_proj = nn.Linear(c.d_model, c.d_model)
        self.video_proj = nn.Linear(c.d_model, c.d_model)
        self.attn = nn.MultiheadAttention(c.d_model, c.n_heads, batch_first=True)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:  # -> z (B, 128)
        q, kv = self.audio_proj(audio), self.video_proj(video)
        attended, _ = self.attn(q, kv, kv, need_weights=False)
        return (audio + attended).mean(1)


class Generator(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c.gen_channels
        self.fc = nn.Linear(c.d_model, c.gen_channels * 8 * 8)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c.gen_channels, c.gen_channels // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(c.gen_channels // 2, 3, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, 128) -> (B, 3, 32, 32) in [-1, 1]
        return self.up(self.fc(z).view(-1, self.c, 8, 8))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(8192, 1),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B,) logits
        return self.net(img).squeeze(1)


class Seed(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.audio = AudioEncoder(c)
        self.video = VideoEncoder(c)
        self.align = Alignment(c)
        self.generator = Generator(c)
        self.disc = Discriminator()
        self.register_buffer("mfcc_mean", torch.tensor(c.mfcc_mean, dtype=torch.float32))
        self.register_buffer("mfcc_std", torch.tensor(c.mfcc_std, dtype=torch.float32))

    def encode_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.audio((mfcc - self.mfcc_mean) / self.mfcc_std)

    def forward(self, mfcc: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """mfcc (B, G, 17, 13) raw MFCC rows of G frames, refs (B, 3, K, 32, 32) in [-1, 1]: one reference set per
        group -> mouths (B, G, 3, 32, 32) in [-1, 1]."""
        B, G = mfcc.shape[:2]
        video = self.video(refs).repeat_interleave(G, dim=0)
        return self.generator(self.align(self.encode_audio(mfcc.flatten(0, 1)), video)).view(B, G, 3, IMG, IMG)


def build(config: dict) -> Seed:
    return Seed(make_config(Config, config, "seed"))


# ----------------------------------------------------------------------------------------------- data


def mouth_patch(crops: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 aligned crops -> (T, 32, 32, 3) uint8 mouths (MOUTH_BOX, area-resized)."""
    s = crops.shape[1]
    x0, y0, x1, y1 = (np.array(MOUTH_BOX) * s).round().astype(int)
    return (
        np.stack(
            [cv2.resize(np.ascontiguousarray(c[y0:y1, x0:x1]), (IMG, IMG), interpolation=cv2.INTER_AREA) for c in crops]
        )
        if len(crops)
        else np.zeros((0, IMG, IMG, 3), np.uint8)
    )


def mfcc_windows(mfcc: np.ndarray, frames: np.ndarray, ctx: int) -> np.ndarray:
    """(N, 2 ctx + 1, 13) MFCC rows around row 4i of each frame i (edge-padded)."""
    rows = np.clip(4 * np.asarray(frames)[:, None] + np.arange(-ctx, ctx + 1)[None], 0, len(mfcc) - 1)
    return mfcc[rows]


class SeedDataset(Dataset):
    """Groups of `group` frames of one clip sharing one set of reference mouths, held in RAM (32x32 mouths: ~3 KB a
    frame). Sharing the references is how inference works too (one set per video) and divides the video encoder's
    cost, the dearest part of the model, by the group size. Items: mfcc (G, 17, 13), refs (3, K, 32, 32),
    target (G, 3, 32, 32), clip (G, 3, K, 32, 32) the K frames around each target, all images in [-1, 1].
    `random_refs=False` (validation) draws from a generator seeded by the item index: the metric is deterministic."""

    def __init__(
        self,
        manifest: str | Path,
        split: str,
        c: Config,
        group: int = 8,
        random_refs: bool = True,
        limit: int | None = None,
    ):
        root, meta, clips = split_clips(manifest, split)
        clips = clips[:limit]
        spans = eval_spans(meta["clips"], root)
        self.c, self.group, self.random_refs = c, group, random_refs
        self.mouths, self.mfcc, self.index, self.pool = [], [], [], []
        for k, clip in enumerate(clips):
            with open_shard(root / clip["path"]) as f:
                found = f.get_tensor("found")
                ok = trainable_frames(found, spans.get(clip_key(clip)))
                self.mouths.append(mouth_patch(f.get_tensor("crops")))
                self.mfcc.append(f.get_tensor("mfcc").astype(np.float32))
            pool = np.flatnonzero(ok)
            self.pool.append(pool)
            if len(pool) >= c.n_refs + group + 2 * MIN_GAP:
                self.index += [
                    (k, int(i)) for i in pool[::group]
                ]  # one item per `group` frames: an epoch sees each once

    def __len__(self) -> int:
        return len(self.index)

    def _img(self, k: int, frames: np.ndarray) -> torch.Tensor:  # -> (n, 3, 32, 32) in [-1, 1]
        x = torch.from_numpy(self.mouths[k][frames]).float().div(127.5).sub(1.0)
        return x.permute(0, 3, 1, 2)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        k, i = self.index[j]
        K, G, pool, n = self.c.n_refs, self.group, self.pool[k], len(self.mouths[k])
        gen = None if self.random_refs else torch.Generator().manual_seed(j)
        far = pool[np.abs(pool - i) >= MIN_GAP]
        refs = np.sort(far[torch.randperm(len(far), generator=gen)[:K].numpy()])
        free = pool[np.abs(pool[:, None] - refs[None]).min(1) >= MIN_GAP]  # no target within MIN_GAP of a reference
        rest = free[free != i]
        targets = np.concatenate([[i], rest[torch.randint(len(rest), (G - 1,), generator=gen).numpy()]])
        around = np.clip(targets[:, None] + np.arange(-(K // 2) + 1, K // 2 + 1)[None], 0, n - 1)
        return {
            "mfcc": torch.from_numpy(mfcc_windows(self.mfcc[k], targets, self.c.audio_ctx)),
            "refs": self._img(k, refs).transpose(0, 1),
            "target": self._img(k, targets),
            "clip": self._img(k, around.ravel()).view(G, K, 3, IMG, IMG).transpose(1, 2),
        }


def mfcc_stats(ds: SeedDataset) -> tuple[list[float], list[float]]:
    rows = np.concatenate(ds.mfcc) if ds.mfcc else np.zeros((1, 13), np.float32)
    return rows.mean(0).round(4).tolist(), np.maximum(rows.std(0), 1e-3).round(4).tolist()


# ----------------------------------------------------------------------------------------------- training


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def contrastive(model: Seed, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Encoders first: InfoNCE between the audio window and the mouths around the same frame (batch negatives)."""
    a = F.normalize(model.align.audio_proj(model.encode_audio(batch["mfcc"].flatten(0, 1))).mean(1), dim=-1)
    v = F.normalize(model.align.video_proj(model.video(batch["clip"].flatten(0, 1))).mean(1), dim=-1)
    logits = a @ v.T / model.config.temperature
    labels = torch.arange(len(a), device=a.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, {"nce": loss.detach(), "sync_acc": acc.detach()}


def joint(model: Seed, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Everything together: L1 + adversarial for the generator path, BCE real/fake for the discriminator."""
    fake = model(batch["mfcc"], batch["refs"]).flatten(0, 1)
    real = batch["target"].flatten(0, 1)
    l1 = (fake - real).abs().mean()
    frozen = {k: v.detach() for k, v in model.disc.named_parameters()}
    g_adv = _bce(torch.func.functional_call(model.disc, frozen, (fake,)), True)
    d_loss = (_bce(model.disc(real), True) + _bce(model.disc(fake.detach()), False)) / 2
    loss = l1 + model.config.adv_weight * g_adv + d_loss
    return loss, {"l1": l1.detach(), "g_adv": g_adv.detach(), "d": d_loss.detach()}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    m = unwrap(model)
    if step < m.config.phase1_steps:
        loss, logs = contrastive(m, batch)
        return loss, {**logs, "phase": 1.0}
    loss, logs = joint(m, batch)
    return loss, {**logs, "phase": 2.0}


@torch.no_grad()
def validate(model: nn.Module, batches) -> dict[str, float]:
    """Mean L1 (in [-1, 1] units) and PSNR of the generated mouths on the val split, and the contrastive accuracy."""
    m = unwrap(model)
    l1 = mse = n = acc = 0.0
    for b in batches:
        fake = m(b["mfcc"], b["refs"])
        l1 += (fake - b["target"]).abs().mean().item() * len(fake)
        mse += ((fake - b["target"]) / 2).pow(2).mean().item() * len(fake)
        acc += contrastive(m, b)[1]["sync_acc"] * len(fake)
        n += len(fake)
    n = max(n, 1.0)
    return {
        "metric": l1 / n,
        "val_l1": l1 / n,
        "val_psnr": float(10 * np.log10(1.0 / max(mse / n, 1e-10))),
        "val_sync_acc": acc / n,
    }


def make_task(manifest: str | Path, overrides: dict | None = None) -> Task:
    """The seed's training task: the prep manifest's utterance split (train / val), staged as described above."""
    overrides = dict(overrides or {})
    limit = overrides.pop("limit_clips", None)
    group = int(overrides.pop("group", 8))
    c = make_config(Config, overrides, "seed")
    train_set = SeedDataset(manifest, "train", c, group, random_refs=True, limit=limit)
    if not len(train_set):
        from lipsync_cli.errors import LipsyncError

        raise LipsyncError(f"no training frames in {manifest} (the seed needs clips with >= {c.n_refs + 1} faces)")
    mean, std = mfcc_stats(train_set)
    c.mfcc_mean, c.mfcc_std = tuple(mean), tuple(std)
    val_set = SeedDataset(manifest, "val", c, group, random_refs=False, limit=limit)
    val_set.index = val_set.index[:: max(1, len(val_set) // VAL_ITEMS)]  # validation stays a few seconds on CPU
    config = {"model": "seed", **asdict(c)}
    return Task(
        name="seed",
        model=Seed(c),
        config=config,
        train_set=train_set,
        val_set=val_set if len(val_set) else None,
        loss=loss_fn,
        validate=validate,
        metric="val_l1",
        higher_is_better=False,
        lr=float(overrides.get("lr", 2e-4)),
        weight_decay=0.0,
        warmup_steps=50,
        batch_size=int(overrides.get("batch_size", 4)),  # groups of 8 frames: 32 frames a step
        find_unused_parameters=True,
    )
