"""Neural mouth renderer: lower-face inpainting from a reference frame of the same person and a target lip shape.

What it sees, per output frame, all in a BOX of the aligned crop (lips, chin and jaw line) resampled to IMG x IMG:
  - the background frame's box with the HOLE (mouth and chin) blanked: pose, lighting, the skin around the mouth;
  - a reference box of the same person (at dub time the mouth retrieval picked, so nearly the right shape and pose):
    teeth, lip colour, beard;
  - the target lip shape drawn as two soft masks: the lips (outer minus inner contour) and the opening between them.
It paints the hole; outside it the background passes through untouched. A U-Net (skips keep the reference's detail)
against a shape-conditioned patch discriminator, as in pix2pix and Wav2Lip. Losses: L1 + SSIM on the hole, LSGAN
adversarial (after `adv_start` steps of plain reconstruction), and the sync expert (models/sync.py) on 5-frame
windows with speech, which asks the painted mouths to match their audio.

Training is self-reconstruction on prepped shards (the target frame is its own background, its own lips are the
shape); the reference is another frame of the same speaker, half the time the one whose lips look most like the
target's (what retrieval will hand it at dub time), half the time a random one (so it must follow the shape, not
copy). `adapt` fine-tunes a copy on one video's own frames within a time budget: the per-person step that makes
the teeth and lips that person's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lipsync_cli.data.corpus import training_data
from lipsync_cli.data.dataset import (
    balance_speakers,
    clip_key,
    eval_spans,
    open_shard,
    split_clips,
    trainable_frames,
)
from lipsync_cli.models.sync import MOUTH as SYNC_MOUTH
from lipsync_cli.models.task import make_config

BOX = (0.125, 0.25, 0.875, 1.0)  # x0, y0, x1, y1 of the aligned crop: lips (y 0.33-0.56), chin (~0.75), jaw line
HOLE = (0.2, 0.29, 0.8, 0.93)  # the painted region, same units: lips and chin with room to open
FRAMES = 5  # frames per training item: one sync-expert window
MIN_GAP = 10  # frames between a target and a reference from the same clip
SYNC_ROWS = (SYNC_MOUTH[1], SYNC_MOUTH[3])  # the sync expert's mouth rows; its columns are BOX's


@dataclass
class Config:
    model: str = "render"
    img: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 256)
    disc_width: int = 32
    w_ssim: float = 1.0
    w_adv: float = 0.01
    w_sync: float = 0.03
    adv_start: int = 300  # steps of reconstruction before the discriminator's verdict reaches the generator
    nearest_refs: float = 0.5  # share of training references chosen by lip shape (the rest: random)
    repeat_max: int = 8  # small speakers' windows repeat up to this often (data.dataset.balance_speakers)
    split: str = "disjoint"  # manifest split scheme (data.dataset.split_clips): validate on faces never trained on


def config_from(d: dict) -> Config:
    return make_config(Config, d, "render")


# ----------------------------------------------------------------------------- geometry and inputs


def box_px(size: int) -> tuple[int, int, int, int]:
    """BOX in pixels of a size x size aligned crop."""
    x0, y0, x1, y1 = (np.array(BOX) * size).round().astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def cut_boxes(crops: np.ndarray, img: int = 64) -> np.ndarray:
    """(N, S, S, 3) uint8 aligned crops (any S) -> (N, img, img, 3) uint8 boxes."""
    crops = np.asarray(crops)
    x0, y0, x1, y1 = box_px(crops.shape[1])
    out = np.empty((len(crops), img, img, 3), np.uint8)
    for i, c in enumerate(crops):
        out[i] = cv2.resize(np.ascontiguousarray(c[y0:y1, x0:x1]), (img, img), interpolation=cv2.INTER_AREA)
    return out


def to_box(points: np.ndarray, size: int, img: int = 64) -> np.ndarray:
    """Aligned-crop pixel coordinates (..., 2) of a size-S crop -> box pixels."""
    x0, y0, x1, y1 = BOX
    p = np.asarray(points, np.float64) / size
    return np.stack([(p[..., 0] - x0) / (x1 - x0), (p[..., 1] - y0) / (y1 - y0)], -1) * img


def hole_mask(img: int = 64) -> np.ndarray:
    """(img, img) float32: 1 deep inside HOLE, ramping to 0 over its outer 2 px (a soft seam, nothing outside)."""
    bx0, by0, bx1, by1 = BOX
    hx0, hy0, hx1, hy1 = HOLE
    x = (np.arange(img) + 0.5) / img * (bx1 - bx0) + bx0
    y = (np.arange(img) + 0.5) / img * (by1 - by0) + by0
    soft = 2.0 / img * (bx1 - bx0)
    ramp = lambda v, a, b: np.clip(np.minimum(v - a, b - v) / soft, 0, 1)  # noqa: E731
    return (ramp(y, hy0, hy1)[:, None] * ramp(x, hx0, hx1)[None, :]).astype(np.float32)


def shape_maps(lips: np.ndarray, img: int = 64) -> np.ndarray:
    """(N, 40, 2) lip points in box pixels (outer contour, then inner) -> (N, 2, img, img) uint8 soft masks: the lips
    (outer minus inner polygon) and the opening (inner polygon). Filled at 4x resolution and area-averaged, so a
    shut mouth (a flat inner polygon) has no opening at all (anti-aliased drawing would leave a 1 px line)."""
    up = 4
    out = np.zeros((len(lips), 2, img, img), np.uint8)
    for i, p in enumerate(np.asarray(lips)):
        if not np.isfinite(p).all():
            continue
        q = np.round(p * up * 16).astype(np.int32)  # shift=4: 1/16 px precision at the 4x canvas
        outer, inner = np.zeros((img * up, img * up), np.uint8), np.zeros((img * up, img * up), np.uint8)
        cv2.fillPoly(outer, [q[:20]], 255, cv2.LINE_8, shift=4)
        cv2.fillPoly(inner, [q[20:]], 255, cv2.LINE_8, shift=4)
        lips_only = np.clip(outer.astype(np.int16) - inner, 0, 255).astype(np.uint8)
        out[i, 0] = cv2.resize(lips_only, (img, img), interpolation=cv2.INTER_AREA)
        out[i, 1] = cv2.resize(inner, (img, img), interpolation=cv2.INTER_AREA)
    return out


def images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]; float input (already converted) passes through."""
    if x.dtype != torch.uint8:
        return x
    return x.movedim(-1, -3).float().div(127.5).sub(1.0)


def masks(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- model


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class UNet(nn.Module):
    """Inputs (B, 9, H, W): masked background (3), hole (1), reference (3), shape (2) -> (B, 3, H, W) in [-1, 1]."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        w = widths
        self.stem = nn.Sequential(_conv(9, w[0]), _conv(w[0], w[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(_conv(w[i], w[i + 1], 2), _conv(w[i + 1], w[i + 1])) for i in range(len(w) - 1)
        )
        self.mid = _conv(w[-1], w[-1])
        self.ups = nn.ModuleList(
            nn.Sequential(_conv(w[i + 1] + w[i], w[i]), _conv(w[i], w[i])) for i in reversed(range(len(w) - 1))
        )
        self.out = nn.Conv2d(w[0], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = self.mid(skips.pop())
        for up in self.ups:
            h = up(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        return torch.tanh(self.out(h))


class PatchDisc(nn.Module):
    """Box (3) + the shape it should show (2) -> (B, 1, H/8, W/8) real/fake logits, one per ~30 px patch: judging
    texture locally, and whether the mouth drawn is the mouth asked for."""

    def __init__(self, w: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(5, w, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1),
            nn.GroupNorm(8, 2 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
            nn.GroupNorm(8, 4 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 3, 1, 1),
        )

    def forward(self, img: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([img, shape * 2 - 1], 1))


class Render(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.gen = UNet(tuple(cfg.widths))
        self.disc = PatchDisc(cfg.disc_width)
        self.register_buffer("hole", torch.from_numpy(hole_mask(cfg.img))[None, None], persistent=False)

    def forward(self, background: torch.Tensor, reference: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """background, reference (B, 3, H, W) in [-1, 1]; shape (B, 2, H, W) in [0, 1] -> the painted box: the
        generator's pixels in the hole, the background's outside it."""
        hole = self.hole.expand(len(background), 1, -1, -1)
        x = torch.cat([background * (1 - hole), hole, reference, shape], 1)
        return hole * self.gen(x) + (1 - hole) * background


def build(config: dict) -> Render:
    return Render(config_from(config))


# ----------------------------------------------------------------------------- losses


def ssim_map(x: torch.Tensor, y: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Per-pixel SSIM of (B, C, H, W) images in [0, 1] (box window, as in the original paper's fast variant)."""
    pool = lambda t: F.avg_pool2d(t, win, 1, win // 2, count_include_pad=False)  # noqa: E731
    mx, my = pool(x), pool(y)
    sxx, syy, sxy = pool(x * x) - mx * mx, pool(y * y) - my * my, pool(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def hole_mean(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Mean of (B, C, H, W) over the hole (weighted by its soft mask)."""
    w = hole.expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1e-6)


def sync_view(box: torch.Tensor, height: int = 48, width: int = 72) -> torch.Tensor:
    """(B, N, 3, H, W) boxes in [0, 1] -> (B, N, height, width) grayscale mouths as the sync expert cuts them."""
    b, n, _, h, w = box.shape
    y0, y1 = ((np.array(SYNC_ROWS) - BOX[1]) / (BOX[3] - BOX[1]) * h).round().astype(int)
    gray = (box * box.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(2)[:, :, y0:y1]
    out = F.interpolate(gray.reshape(b * n, 1, y1 - y0, w), size=(height, width), mode="bilinear", align_corners=False)
    return out.reshape(b, n, height, width)


def _lsgan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return (logits - float(real)).pow(2).mean()


def recon_losses(fake: torch.Tensor, real: torch.Tensor, hole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, 1 - SSIM) over the hole, images in [-1, 1]."""
    l1 = hole_mean((fake - real).abs(), hole) / 2
    ssim = hole_mean(ssim_map((fake + 1) / 2, (real + 1) / 2), hole)
    return l1, 1 - ssim


# ----------------------------------------------------------------------------- data


class RenderWindows(Dataset):
    """Windows of FRAMES consecutive trainable frames, boxes held in RAM (~12 KB a frame at 64 px: GRID s1 and the
    shared clips are ~0.4 GB). Items: target (5, H, W, 3) uint8, reference (5, H, W, 3) uint8, shape (5, 2, H, W)
    uint8, mel (20, 80) float32 (the expert's audio for the window), speech bool. `train=False` draws references
    from a generator seeded by the item index, so validation is deterministic."""

    def __init__(self, manifest: str | Path, split: str, cfg: Config, train: bool = True, limit: int | None = None):
        root, meta, clips = split_clips(manifest, split, cfg.split)
        clips = clips[:limit]
        spans = eval_spans(meta["clips"], root)
        self.cfg, self.train = cfg, train
        boxes, shapes, clip_of, frame_of, self.mels, self.index = [], [], [], [], [], []
        speaker_of: list[str] = []
        n = 0
        for k, c in enumerate(clips):
            with open_shard(root / c["path"]) as f:
                crops = f.get_tensor("crops")
                size = crops.shape[1]
                lips = f.get_tensor("lips").reshape(len(crops), 40, 2).astype(np.float64)
                found = f.get_tensor("found") & np.isfinite(lips).all((1, 2))
                silence = f.get_tensor("silence")
                mel = f.get_tensor("mel")
            ok = trainable_frames(found, spans.get(clip_key(c)))
            boxes.append(cut_boxes(crops, cfg.img))
            shapes.append(to_box(lips, size, cfg.img).astype(np.float32))
            clip_of.append(np.full(len(crops), k))
            frame_of.append(np.arange(len(crops)))
            speaker_of.append(f"{c['corpus']}/{c['speaker']}")
            self.mels.append(mel)
            if len(ok) >= FRAMES:
                win_ok = np.lib.stride_tricks.sliding_window_view(ok, FRAMES).all(1)
                win_speech = ~np.lib.stride_tricks.sliding_window_view(silence, FRAMES).all(1)
                starts = np.flatnonzero(win_ok & (4 * np.arange(len(win_ok)) + 20 <= len(mel)))
                self.index += [(n + int(s), bool(win_speech[s])) for s in starts[:: FRAMES if train else 25]]
            n += len(crops)
        if not clips:
            self.boxes = np.zeros((0, cfg.img, cfg.img, 3), np.uint8)
            return
        self.boxes, self.shapes = np.concatenate(boxes), np.concatenate(shapes)
        self.clip, self.frame = np.concatenate(clip_of), np.concatenate(frame_of)
        # references: any frame of the same speaker inside a listed window (so: trainable)
        ok_all = np.zeros(n, bool)
        for g, _ in self.index:
            ok_all[g : g + FRAMES] = True
        spk = np.array([speaker_of[k] for k in self.clip])
        self.pool = {s: np.flatnonzero(ok_all & (spk == s)) for s in set(speaker_of)}
        self.speaker = spk
        if train:
            self.index = balance_speakers(self.index, [spk[g] for g, _ in self.index], cfg.repeat_max)
        self.flat = self.shapes.reshape(n, -1)

    def __len__(self) -> int:
        return len(self.index)

    def _reference(self, g: int, rng: np.random.Generator) -> int:
        pool = self.pool[self.speaker[g]]
        far = (self.clip[pool] != self.clip[g]) | (np.abs(self.frame[pool] - self.frame[g]) >= MIN_GAP)
        pool = pool[far]
        if not len(pool):
            return g
        if rng.random() < self.cfg.nearest_refs:  # the closest lips among a sample, as retrieval would choose
            cand = pool[rng.integers(0, len(pool), min(len(pool), 512))]
            return int(cand[np.argmin(((self.flat[cand] - self.flat[g]) ** 2).sum(1))])
        return int(pool[rng.integers(0, len(pool))])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g, speech = self.index[i]
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if self.train else i
        rng = np.random.default_rng(seed)
        frames = np.arange(g, g + FRAMES)
        refs = [self._reference(int(t), rng) for t in frames]
        k = int(self.clip[g])
        s = int(self.frame[g])
        mel = self.mels[k][4 * s : 4 * s + 20].astype(np.float32)
        return {
            "target": torch.from_numpy(self.boxes[frames]),
            "reference": torch.from_numpy(self.boxes[refs]),
            "shape": torch.from_numpy(shape_maps(self.shapes[frames], self.cfg.img)),
            "mel": torch.from_numpy(mel),
            "speech": torch.tensor(speech),
        }


def augment(batch: dict, gen: torch.Generator) -> dict:
    """Train-time: mirror half the windows (images and shapes together); recolour each window strongly (per-channel
    gain and offset, and half the time a permutation of the colour channels), the same for target and reference,
    so that colour must be read from the inputs rather than remembered (GRID s1 is most of the data); then shift
    the reference's colour a little on its own (the frame retrieval lends at dub time was lit differently)."""
    target, ref, shape = images(batch["target"]), images(batch["reference"]), masks(batch["shape"])
    b = target.shape[0]
    dev = target.device
    r = lambda *s: torch.rand(*s, generator=gen, device=gen.device).to(dev)  # noqa: E731 (draws on the generator's device)
    flip = r(b) < 0.5
    f = lambda x: torch.where(flip.view(b, *[1] * (x.ndim - 1)), x.flip(-1), x)  # noqa: E731
    target, ref, shape = f(target), f(ref), f(shape)
    perm = torch.stack([torch.randperm(3, generator=gen, device=gen.device) for _ in range(b)]).to(dev)
    perm = torch.where((r(b) < 0.5)[:, None], perm, torch.arange(3, device=dev))
    shuffle = lambda x: torch.gather(x, 2, perm.view(b, 1, 3, 1, 1).expand_as(x))  # noqa: E731
    gain = (1 + 0.3 * (r(b, 1, 1, 1, 1) - 0.5)) * (1 + 0.4 * (r(b, 1, 3, 1, 1) - 0.5))
    bias = 0.3 * (r(b, 1, 3, 1, 1) - 0.5)
    jitter = lambda x: ((shuffle(x) + 1) * gain - 1 + bias).clamp(-1, 1)  # noqa: E731
    ref_shift = 0.08 * (r(b, 1, 3, 1, 1) - 0.5)
    return {
        **batch,
        "target": jitter(target),
        "reference": (jitter(ref) + ref_shift).clamp(-1, 1),
        "shape": shape,
    }


# ----------------------------------------------------------------------------- training task


def _flat(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 5, ...) windows -> (B*5, ...) frames: target, reference in [-1, 1], shape in [0, 1]."""
    t, r, s = images(batch["target"]), images(batch["reference"]), masks(batch["shape"])
    return t.flatten(0, 1), r.flatten(0, 1), s.flatten(0, 1)


def make_task(manifest: str | Path, overrides: dict | None = None):
    from lipsync_cli import models
    from lipsync_cli.models import sync
    from lipsync_cli.models.task import Task, unwrap

    overrides = dict(overrides or {})
    limit = overrides.pop("limit_clips", None)
    cfg = config_from({**asdict(Config()), **overrides})
    train_set = RenderWindows(manifest, "train", cfg, train=True, limit=limit)
    if not len(train_set):
        from lipsync_cli.errors import LipsyncError

        raise LipsyncError(f"no training windows in {manifest} (the renderer needs runs of {FRAMES} face frames)")
    val_set = RenderWindows(manifest, "val", cfg, train=False, limit=limit)
    found = models.default("sync") if cfg.w_sync > 0 else None
    expert = None if found is None else found[0].requires_grad_(False)

    def loss(m: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal expert
        r = unwrap(m)
        target, ref, shape = _flat(batch)
        fake = m(target, ref, shape)
        l1, dssim = recon_losses(fake, target, r.hole)
        frozen = {k: v.detach() for k, v in r.disc.named_parameters()}
        g_adv = _lsgan(torch.func.functional_call(r.disc, frozen, (fake, shape)), True)
        d_loss = (_lsgan(r.disc(target, shape), True) + _lsgan(r.disc(fake.detach(), shape), False)) / 2
        total = l1 + cfg.w_ssim * dssim + d_loss + (cfg.w_adv * g_adv if step >= cfg.adv_start else 0.0)
        logs = {"l1": l1.detach(), "dssim": dssim.detach(), "g_adv": g_adv.detach(), "d": d_loss.detach()}
        speech = batch["speech"]
        if expert is not None and bool(speech.any()):
            expert = expert.to(fake.device)
            video = sync_view((fake.reshape(-1, FRAMES, *fake.shape[1:])[speech] + 1) / 2)
            s_loss = sync.sync_loss(expert, video, batch["mel"][speech])
            total = total + cfg.w_sync * s_loss
            logs["sync"] = s_loss.detach()
        return total, logs

    @torch.no_grad()
    def validate(m: nn.Module, batches) -> dict[str, float]:
        r = unwrap(m)
        l1 = dssim = mse = n = 0.0
        for b in batches:
            target, ref, shape = _flat(b)
            fake = r(target, ref, shape)
            a, d = recon_losses(fake, target, r.hole)
            k = len(fake)
            l1, dssim, n = l1 + a.item() * k, dssim + d.item() * k, n + k
            mse += hole_mean(((fake - target) / 2) ** 2, r.hole).item() * k
        n = max(n, 1.0)
        return {"l1": l1 / n, "ssim": 1 - dssim / n, "psnr": float(10 * np.log10(1 / max(mse / n, 1e-10)))}

    meta = {"train_windows": len(train_set), **training_data(sorted(train_set.pool) if len(train_set) else [])}
    return Task(
        name="render",
        model=Render(cfg),
        config={**asdict(cfg), "data": meta},
        train_set=train_set,
        val_set=val_set if len(val_set) else None,
        loss=loss,
        validate=validate,
        metric="l1",
        higher_is_better=False,
        augment=augment,
        lr=float(overrides.get("lr", 5e-4)),
        weight_decay=0.0,
        warmup_steps=100,
        batch_size=int(overrides.get("batch_size", 4)),  # windows of 5 frames: 20 frames a step
    )


# ----------------------------------------------------------------------------- per-person adaptation


def adapt(
    model: Render,
    boxes: np.ndarray,
    lips: np.ndarray,
    seconds: float,
    max_steps: int | None = None,
    batch: int = 8,
    lr: float = 2e-4,
    seed: int = 0,
    on_step=None,
) -> tuple[Render, int]:
    """A copy of `model` fine-tuned (generator only, L1 + SSIM) on one video's frames: boxes (N, H, W, 3) uint8 and
    their own lips in box pixels (N, 40, 2). Each step paints a batch of the video's frames from another of its
    frames (half the time the one with the nearest lips), as at dub time. Stops after `seconds` of wall time (or
    `max_steps`). Returns (model, steps taken)."""
    model = copy.deepcopy(model).train()
    n = len(boxes)
    if n < 2 or (seconds <= 0 and not max_steps):
        return model.eval(), 0
    rng = np.random.default_rng(seed)
    gen_params = list(model.gen.parameters())
    opt = torch.optim.Adam(gen_params, lr=lr)
    flat = lips.reshape(n, -1)
    dev = model.hole.device
    t0, step = time.perf_counter(), 0
    while (max_steps is None or step < max_steps) and (seconds <= 0 or time.perf_counter() - t0 < seconds):
        idx = rng.integers(0, n, min(batch, n))
        refs = np.empty_like(idx)
        for j, t in enumerate(idx):
            cand = rng.integers(0, n, min(n, 256))
            cand = cand[np.abs(cand - t) >= MIN_GAP] if (np.abs(cand - t) >= MIN_GAP).any() else cand
            near = rng.random() < 0.5
            refs[j] = cand[np.argmin(((flat[cand] - flat[t]) ** 2).sum(1))] if near else cand[0]
        target = images(torch.from_numpy(boxes[idx]).to(dev))
        ref = images(torch.from_numpy(boxes[refs]).to(dev))
        shape = masks(torch.from_numpy(shape_maps(lips[idx], boxes.shape[1])).to(dev))
        if rng.random() < 0.5:
            target, ref, shape = target.flip(-1), ref.flip(-1), shape.flip(-1)
        with _autocast(dev):
            fake = model(target, ref, shape)
        l1, dssim = recon_losses(fake.float(), target, model.hole)
        opt.zero_grad(set_to_none=True)
        (l1 + model.cfg.w_ssim * dssim).backward()
        opt.step()
        step += 1
        if on_step is not None:
            on_step(step, l1.item())
    return model.eval(), step


@torch.no_grad()
def paint(model: Render, background: np.ndarray, reference: np.ndarray, lips: np.ndarray, batch: int = 64):
    """(N, H, W, 3) uint8 background and reference boxes + (N, 40, 2) target lips in box pixels -> painted boxes."""
    model.eval()
    dev = model.hole.device
    out = np.empty_like(background)
    for s in range(0, len(background), batch):
        bg = images(torch.from_numpy(background[s : s + batch]).to(dev))
        ref = images(torch.from_numpy(reference[s : s + batch]).to(dev))
        shape = masks(torch.from_numpy(shape_maps(lips[s : s + batch], background.shape[1])).to(dev))
        with _autocast(dev):
            y = model(bg, ref, shape).float().add(1).mul(127.5).clamp(0, 255).round().byte()
        out[s : s + batch] = y.permute(0, 2, 3, 1).cpu().numpy()
    return out


def _autocast(dev: torch.device):
    """bf16 autocast where the hardware does bf16 natively (CUDA, or a CPU with AVX512-BF16/AMX: ~2x faster here);
    float32 elsewhere, where emulated bf16 would be slower."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
