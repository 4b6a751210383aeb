"""SyncNet-style audio-visual sync expert: is this mouth saying this sound, and how far out of step is it?

Two small towers map 0.2 s of speech (20 rows of the shards' 100 Hz log-mel) and the mouth over the same 5 video
frames to unit vectors that point the same way when the two are in sync. The mouth is read one of two ways
(`video_input`): "mouth", the grayscale MOUTH box of the aligned lower-face crop (frames stacked as channels so the
first layer already sees motion; differentiable, so generators can use it as a loss), or "lips", the face mesh's
40 lip points, frontalised (face.frontal_lips) and centred on the clip's mean shape (the mesh reads them alike on
any face, light or camera, where pixels trained on GRID's one room do not: `eval` reads offsets with both). Window t
covers frames t..t+4 and mel rows 4t..4t+19 (frame i is row 4i), so a clip of T frames has T - 4 windows a side.

Training is contrastive (InfoNCE, learned temperature): a video window's positive is its own audio; its negatives
are the other items' audio in the batch and the same clip's audio shifted by MIN_SHIFT..max_shift frames (+-1 is
left out: lips and sound are not that sharply aligned, so those are not wrong answers; +-2 and +-3 are in every
step, since telling them from 0 is what a +-1 offset reading needs). The shifted negatives are
what teaches it offsets; in-batch ones teach it speakers and words.

    offsets(model, crops, mel)      eval --metric sync: offset over +-15 frames, LSE-C / LSE-D style scores
    sync_loss(model, video, mel)    a differentiable penalty for generators (freeze the expert first)
    embed_video / embed_audio       (T - 4, D) unit embeddings of a clip
    make_task(manifest, overrides)  the training task for `lipsync train --model sync`

Sign convention (as eval.metrics.sync_energy): a POSITIVE offset means the VIDEO LAGS the audio, i.e. video
window t matches audio window t - offset.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lipsync_cli import face
from lipsync_cli.data.corpus import training_data
from lipsync_cli.data.dataset import balance_speakers, open_shard, split_clips
from lipsync_cli.errors import LipsyncError
from lipsync_cli.models.task import Task, make_config, unwrap

FRAMES, ROWS = 5, 20  # 0.2 s: 5 frames at 25 fps, 20 mel rows at 100 Hz
MOUTH = (0.125, 0.28, 0.875, 0.78)  # x0, y0, x1, y1 of the aligned crop: lips (x 0.31-0.70, y 0.33-0.56) and jaw
MIN_SHIFT = 2  # shifted negatives start here
LOUD_ROW = -2.8  # a loud row's mean log10 mel power in the shards (GRID: 95th percentile -2.84, sd 0.24 over clips)
MEL_MEAN, MEL_STD = -5.5, 2.0  # the shards' log10 mel power (GRID s1: mean -5.6, sd 1.9): audio input ~N(0, 1)
LIP_SCALE = 0.01  # crop units: the RMS of lip points about their clip's mean shape (GRID: ~0.01): lips input ~N(0, 1)
VIDEO_INPUTS = ("mouth", "lips")


@dataclass
class Config:
    model: str = "sync"
    video_input: str = "mouth"  # "mouth": grey pixels of the mouth box; "lips": the mesh's lip points (module doc)
    lips_hidden: int = 256  # width of the lips tower's layers
    height: int = 48  # mouth image: the 96 x 64 px box of a 128 px crop, at 3/4 scale
    width: int = 72
    video_channels: tuple[int, ...] = (16, 32, 64, 128)
    audio_channels: tuple[int, ...] = (128, 256)
    dim: int = 128
    max_shift: int = 15  # shifted negatives (training) and the offset search (validation)
    shifts_per_step: int = 8  # how many of the other shifted audios (past the near ones) a step draws, at most all
    # training
    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 100
    val_stride: int = 2  # validation windows every this many frames
    repeat_max: int = 4  # small speakers' windows repeat up to this often (sqrt of the size ratio to the largest)
    split: str = "disjoint"  # manifest split scheme (data.dataset.split_clips): validate on speakers never trained on
    augment_voice_face: bool = True  # mel-axis warp (other voices) and contrast/brightness (other faces, light)
    near_shifts: int = 2  # shifts 2..1 + near_shifts (both signs) are among every step's negatives: the +-1 decision
    augment_more: bool = True  # gamma, zoom, occluding patch, pixel noise (faces) and background noise (voices)


def build(config: dict) -> SyncNet:
    """The model described by a checkpoint's config (unknown keys, such as training metadata, are ignored)."""
    return SyncNet(make_config(Config, config, "sync"))


# ----------------------------------------------------------------------------- inputs


def mouth_frames(crops: np.ndarray, height: int = 48, width: int = 72) -> np.ndarray:
    """(T, S, S, 3) uint8 aligned crops (any S) -> (T, height, width) uint8 grayscale MOUTH boxes."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"crops must be (T, S, S, 3), got {crops.shape}")
    s = crops.shape[1]
    x0, y0, x1, y1 = (np.array(MOUTH) * s).round().astype(int)
    out = np.empty((len(crops), height, width), np.uint8)
    for t, c in enumerate(crops):
        gray = cv2.cvtColor(np.ascontiguousarray(c[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
        out[t] = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    return out


def lip_frames(lips: np.ndarray) -> np.ndarray:
    """(T, 40, 2) frontal lip points (face.frontal_lips; NaN where no face) -> (T, 80) float32 about the clip's
    mean shape, in LIP_SCALE units (0 where no face). Centring on the clip takes out the speaker's own lips
    (thickness, width, resting gap), which say nothing about sync."""
    x = np.asarray(lips, np.float64).reshape(len(lips), -1)
    ok = np.isfinite(x).all(1)
    if ok.any():
        x = (x - x[ok].mean(0)) / LIP_SCALE
    return np.where(ok[:, None], x, 0.0).astype(np.float32)


def video_input(cfg: Config, crops: np.ndarray, lips: np.ndarray) -> np.ndarray:
    """What the expert reads of a clip: (T, H, W) uint8 mouths or (T, 80) float32 lip shapes, from (T, S, S, 3)
    aligned crops and (T, 40, 2) frontal lip points (face.frontal_lips)."""
    return lip_frames(lips) if cfg.video_input == "lips" else mouth_frames(crops, cfg.height, cfg.width)


def mouth_tensor(video: torch.Tensor, height: int = 48, width: int = 72) -> torch.Tensor:
    """Differentiable mouth_frames for generator outputs: (B, N, S, S, 3) or (B, N, 3, S, S) RGB in [0, 1]
    -> (B, N, height, width) in [0, 1]. Already-cut (B, N, height, width) grayscale passes through."""
    if video.ndim == 4 and video.shape[-2:] == (height, width):
        return video
    if video.ndim != 5:
        raise ValueError(f"video must be (B, N, S, S, 3) or (B, N, 3, S, S), got {tuple(video.shape)}")
    if video.shape[-1] == 3:
        video = video.permute(0, 1, 4, 2, 3)
    b, n, _, s, _ = video.shape
    gray = (video * video.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(2)  # cv2's RGB2GRAY weights
    x0, y0, x1, y1 = (np.array(MOUTH) * s).round().astype(int)
    box = gray[..., y0:y1, x0:x1].reshape(b * n, 1, y1 - y0, x1 - x0)
    return F.interpolate(box, size=(height, width), mode="area").reshape(b, n, height, width)


def prepare(frames: np.ndarray, landmarks: np.ndarray, audio: np.ndarray, smooth: float = 1.5) -> tuple:
    """Full frames (T, H, W, 3) + raw mesh landmarks (T, 478, 2, NaN = no face) + 16 kHz speech -> (crops, lips,
    mel, found) made exactly as `lipsync prep` makes a shard's (smoothing, alignment, loudness, mel; lips are
    face.frontal_lips, NaN where no face), for offsets()."""
    from lipsync_cli.audio import match_loudness, mel_spectrogram
    from lipsync_cli.data import shard

    n = len(frames)
    track = face.smooth_track(landmarks, smooth)
    found = track.found
    if not found.any():
        raise LipsyncError("no face in any frame: nothing to measure sync on")
    mats = track.align(128)
    crops = np.stack([face.warp_to_aligned(np.ascontiguousarray(f), m, 128) for f, m in zip(frames, mats, strict=True)])
    lips = face.frontal_lips(track.landmarks, found)
    x = match_loudness(np.asarray(audio, np.float32), shard.SR, shard.TARGET_DB)
    x = np.pad(x, (0, max(0, n * shard.SR // shard.FPS - len(x))))[: n * shard.SR // shard.FPS]
    mel = mel_spectrogram(x, shard.SR, n_mels=80, hop_s=shard.HOP / shard.SR)
    return crops, lips, mel, found


# ----------------------------------------------------------------------------- model


def _block(conv: type[nn.Module], norm: type[nn.Module], cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(inplace=True))


def _mouth_tower(cfg: Config) -> nn.Sequential:
    c0, *rest = cfg.video_channels
    layers, cin = [_block(nn.Conv2d, nn.BatchNorm2d, FRAMES, c0, 1)], c0  # full resolution: lips are thin
    for c in rest:  # each wider stage halves the size, then looks again
        layers += [_block(nn.Conv2d, nn.BatchNorm2d, cin, c, 2), _block(nn.Conv2d, nn.BatchNorm2d, c, c, 1)]
        cin = c
    layers += [_block(nn.Conv2d, nn.BatchNorm2d, cin, cin, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(cin, cfg.dim))


def _lips_tower(cfg: Config) -> nn.Sequential:
    h = cfg.lips_hidden
    return nn.Sequential(
        nn.Linear(FRAMES * 80, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
        nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
        nn.Linear(h, cfg.dim),
    )  # fmt: skip


class SyncNet(nn.Module):
    """The two towers (video: 2D CNN over 5 stacked mouths, or an MLP over 5 lip shapes; audio: 1D CNN over 20 mel
    rows) and the InfoNCE scale."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.video_input not in VIDEO_INPUTS:
            raise LipsyncError(f"video_input must be one of {', '.join(VIDEO_INPUTS)}, not {cfg.video_input!r}")
        self.cfg = cfg
        self.video_net = _lips_tower(cfg) if cfg.video_input == "lips" else _mouth_tower(cfg)
        layers, cin = [], 80  # mel bins are the channels of a 1D conv over the window's 20 rows
        for i, c in enumerate(cfg.audio_channels):
            layers += [_block(nn.Conv1d, nn.BatchNorm1d, cin, c, 1 if i == 0 else 2)]
            layers += [_block(nn.Conv1d, nn.BatchNorm1d, c, c, 2 if i == 0 else 1)]
            cin = c
        steps = ROWS
        for _ in cfg.audio_channels:  # one stride-2 block per width
            steps = -(-steps // 2)
        self.audio_net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * steps, cfg.dim))  # keeps time order
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))  # CLIP's start

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 5, H, W) mouths, uint8 or float in [0, 1], or (B, 5, 80) lip shapes (lip_frames) -> (B, D) unit
        vectors."""
        if self.cfg.video_input == "lips":
            return F.normalize(self.video_net(x.float().flatten(1)), dim=-1)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 0.02)  # light, skin, contrast
        return F.normalize(self.video_net(x), dim=-1)

    def audio(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 20, 80) log10 mel (loudness-normalised speech, as in the shards) -> (B, D) unit vectors."""
        return F.normalize(self.audio_net(((mel.float() - MEL_MEAN) / MEL_STD).transpose(1, 2)), dim=-1)

    def forward(self, video: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video(video), self.audio(mel)


# ----------------------------------------------------------------------------- inference API


def load_default(device: str | torch.device = "cpu") -> SyncNet | None:
    """The committed expert (lipsync_cli/weights/sync.safetensors) in eval mode, or None when there is none."""
    from lipsync_cli import models

    loaded = models.default("sync", device)
    return None if loaded is None else loaded[0]


def load_experts(device: str | torch.device = "cpu") -> list[SyncNet]:
    """The committed experts `eval` reads offsets with, in eval mode: the pixel one (sync.*) and the lip-geometry
    one (sync_lips.*), whichever exist. Together they find the offset on more faces than either alone
    (docs/sync.md, "Two experts")."""
    from lipsync_cli import models

    return [loaded[0] for name in ("sync", "sync_lips") if (loaded := models.default(name, device)) is not None]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _windows_of(x: torch.Tensor) -> torch.Tensor:
    """(T, ...) per-frame inputs -> (T - 4, 5, ...) windows: window t = frames t..t+4."""
    if len(x) < FRAMES:
        raise LipsyncError(f"clip too short for the sync expert: {len(x)} frames (needs {FRAMES})")
    w = x.unfold(0, FRAMES, 1)  # (T-4, ..., 5)
    return w.permute(0, w.ndim - 1, *range(1, w.ndim - 1))


@torch.no_grad()
def embed_video(
    model: SyncNet, crops: np.ndarray | None, lips: np.ndarray | None = None, batch: int = 256
) -> torch.Tensor:
    """(T, S, S, 3) uint8 aligned crops (a "mouth" expert) or (T, 40, 2) lip points in crop units (a "lips"
    expert) -> (T - 4, D): window t = frames t..t+4."""
    cfg = unwrap(model).cfg
    if (lips if cfg.video_input == "lips" else crops) is None:
        raise ValueError(f"a {cfg.video_input!r} sync expert needs {'lips' if cfg.video_input == 'lips' else 'crops'}")
    windows = _windows_of(torch.from_numpy(video_input(cfg, crops, lips)))
    dev = _device(model)
    return torch.cat([unwrap(model).video(windows[i : i + batch].to(dev)) for i in range(0, len(windows), batch)])


@torch.no_grad()
def embed_audio(model: SyncNet, mel: np.ndarray | torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """(4T + 1, 80) log-mel at 100 Hz -> (T - 4, D): window t = rows 4t..4t+19 (the instants of frames t..t+4)."""
    mel = torch.as_tensor(np.asarray(mel, np.float32))
    n = (len(mel) - ROWS) // 4 + 1
    if n < 1:
        raise LipsyncError(f"audio too short for the sync expert: {len(mel)} mel rows (needs {ROWS})")
    windows = mel[: 4 * (n - 1) + ROWS].unfold(0, ROWS, 4).transpose(1, 2)  # (n, 20, 80)
    dev = _device(model)
    return torch.cat([unwrap(model).audio(windows[i : i + batch].to(dev)) for i in range(0, n, batch)])


def offsets(
    model: SyncNet | Sequence[SyncNet],
    crops: np.ndarray | None,
    mel: np.ndarray,
    max_offset: int = 15,
    found: np.ndarray | None = None,
    lips: np.ndarray | None = None,
) -> dict:
    """Audio-visual offset of a clip: (T, S, S, 3) uint8 aligned crops and/or (T, 40, 2) lips (as embed_video),
    (4T + 1, 80) mel, optional `found` (T,) (windows with a frame without a face are left out). `model` may be
    several experts (load_experts): they vote by their mean distance curve. See offset_scores for what comes
    back."""
    experts = [model] if isinstance(model, nn.Module) else list(model)
    v = [embed_video(m, crops, lips).cpu().numpy() for m in experts]
    a = [embed_audio(m, mel).cpu().numpy() for m in experts]
    ok = None
    if found is not None:
        f = np.asarray(found, bool)[: len(v[0]) + FRAMES - 1]
        ok = np.lib.stride_tricks.sliding_window_view(f, FRAMES).all(1)
    return offset_scores(v, a, max_offset, ok)


def offset_scores(
    v: np.ndarray | list[np.ndarray],
    a: np.ndarray | list[np.ndarray],
    max_offset: int = 15,
    ok: np.ndarray | None = None,
) -> dict:
    """SyncNet's scoring of window embeddings v (Tv, D), a (Ta, D): per candidate offset k the mean distance
    between video window t and audio window t - k over every t where both exist (and ok[t]). v and a may be
    lists, one pair per expert: the curve is then the mean of theirs.

    offset = the k of least distance (positive: the video lags the audio; ties go to the smallest |k|);
    min_dist = that distance (LSE-D, lower is better); confidence = median over k minus min_dist (LSE-C, higher
    is better); dist_by_offset (2 * max_offset + 1,) for lags k = -max_offset..max_offset; n_windows used.
    """
    vs, as_ = (v, a) if isinstance(v, list) else ([v], [a])
    n = min(len(x) for x in vs + as_)
    ok = np.ones(n, bool) if ok is None else np.asarray(ok, bool)[:n]
    lags = np.arange(-max_offset, max_offset + 1)
    dists = [  # per expert, dist[t, u] = |v_t - a_u|
        np.linalg.norm(np.asarray(vi[:n], np.float64)[:, None] - np.asarray(ai[:n], np.float64)[None], axis=-1)
        for vi, ai in zip(vs, as_, strict=True)
    ]
    by = np.full(len(lags), np.nan)
    for i, k in enumerate(lags):
        t = np.arange(max(0, k), min(n, n + k))
        t = t[ok[t]]
        if len(t):
            by[i] = np.mean([d[t, t - k].mean() for d in dists])
    if not np.isfinite(by).any():
        raise LipsyncError("no window with a face and audio: nothing to measure sync on")
    best = np.nanmin(by)
    j = min(np.flatnonzero(by == best), key=lambda i: abs(lags[i]))
    return {
        "offset": int(lags[j]),
        "confidence": float(np.nanmedian(by) - best),
        "min_dist": float(best),
        "dist_by_offset": by,
        "lags": lags,
        "n_windows": int(ok.sum()),
    }


def clip_sync(
    model: SyncNet | Sequence[SyncNet], frames: np.ndarray, landmarks: np.ndarray, audio: np.ndarray, **kw
) -> dict:
    """offsets() of full video frames + their raw mesh landmarks + 16 kHz speech (eval's view of a system)."""
    crops, lips, mel, found = prepare(frames, landmarks, audio)
    return offsets(model, crops, mel, found=found, lips=lips, **kw)


def sync_loss(model: SyncNet, video: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between the expert's embeddings of generated mouths and their audio: 0 is in sync.

    video: (B, 5, S, S, 3) or (B, 5, 3, S, S) RGB aligned crops in [0, 1] (or (B, 5, H, W) mouths already cut
    by mouth_tensor); mel: (B, 20, 80), the rows of those 5 frames. Differentiable in video (and mel); call
    `model.eval().requires_grad_(False)` once so the expert itself stays fixed.
    """
    m = unwrap(model)
    if m.cfg.video_input != "mouth":
        raise ValueError("sync_loss needs a 'mouth' sync expert (it differentiates through pixels)")
    v, a = model(mouth_tensor(video, m.cfg.height, m.cfg.width), mel)
    return (1 - (v * a).sum(-1)).mean()


# ----------------------------------------------------------------------------- data


def shard_lips(f) -> np.ndarray:
    """(T, 40, 2) frontal lip points (face.frontal_lips) of an open shard (a safetensors `safe_open` handle)."""
    return face.frontal_lips(f.get_tensor("landmarks"), f.get_tensor("found"))


def shard_video(f, cfg: Config) -> np.ndarray:
    """What the expert reads of an open shard: video_input of its crops or lips."""
    return (
        lip_frames(shard_lips(f))
        if cfg.video_input == "lips"
        else mouth_frames(f.get_tensor("crops"), cfg.height, cfg.width)
    )


class SyncWindows(Dataset):
    """5-frame mouth windows of one manifest split, each with the mel strip that covers every shift up to K.

    Item: video uint8 (5, H, W) (float32 (5, 80) lip shapes for a "lips" expert); mel float32 (4 * 2K + 20, 80)
    where the audio for offset k (video window s vs audio window s - k) is rows [4 (K - k), 4 (K - k) + 20); valid
    bool (2K + 1,) where that audio exists in the clip; clip int. Windows need a face in all 5 frames; with
    `speech_only`, at least one spoken frame (silent windows all look alike: as in-batch negatives they would be
    false ones). With `repeat_max` > 1 a speaker with
    n windows is listed min(repeat_max, round(sqrt(n_largest / n))) times, so a corpus of one speaker (GRID s1:
    ~13k windows) does not drown a few seconds each of other faces. Mouths are cut once, into memory (~3.5 KB a
    frame: GRID s1 and the shared clips are ~120 MB).
    """

    def __init__(
        self,
        manifest: str | Path,
        split: str,
        cfg: Config,
        stride: int = 1,
        speech_only: bool = True,
        limit: int | None = None,
        repeat_max: int = 1,
    ):
        root, _, clips = split_clips(manifest, split, cfg.split)
        clips = clips[:limit]
        self.k, self.clips = cfg.max_shift, clips  # clips: their manifest entries; `clip` in items indexes them
        self.videos, self.mels, self.index = [], [], []
        for c in clips:
            with open_shard(root / c["path"]) as f:
                video, mel = shard_video(f, cfg), f.get_tensor("mel")
                found, silence = f.get_tensor("found"), f.get_tensor("silence")
            ci = len(self.videos)
            self.videos.append(video)
            pad = np.zeros((4 * self.k, mel.shape[1]), np.float16)  # so every strip is one slice
            self.mels.append(np.concatenate([pad, mel, pad]))
            win_found = np.lib.stride_tricks.sliding_window_view(found, FRAMES).all(1)
            win_speech = ~np.lib.stride_tricks.sliding_window_view(silence, FRAMES).all(1)
            keep = win_found & (win_speech if speech_only else True)
            self.index += [(ci, int(s)) for s in np.flatnonzero(keep)[::stride]]
        if not self.index:
            raise LipsyncError(f"split {split!r} of {manifest} has no usable sync windows")
        speaker = [f"{c['corpus']}/{c['speaker']}" for c in clips]
        self.index = balance_speakers(self.index, [speaker[c] for c, _ in self.index], repeat_max)

    def data(self) -> dict:
        """The clips behind these windows, as a checkpoint records them (`data.corpus.training_data`)."""
        return {
            "clips": len(self.clips),
            **training_data(sorted({f"{c['corpus']}/{c['speaker']}" for c in self.clips})),
        }

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c, s = self.index[i]
        k, n = self.k, len(self.videos[c])
        lags = np.arange(-k, k + 1)
        start = s - lags  # first frame of each offset's audio window
        valid = (start >= 0) & (start + FRAMES <= n)
        strip = self.mels[c][4 * s : 4 * s + 8 * k + ROWS]  # padded: row 4k of mels[c] is the clip's row 0
        return {
            "video": torch.from_numpy(self.videos[c][s : s + FRAMES].copy()),
            "mel": torch.from_numpy(strip.astype(np.float32)),
            "valid": torch.from_numpy(valid),
            "clip": torch.tensor(c),
        }


def _windows(strip: torch.Tensor, k: int, lags: torch.Tensor) -> torch.Tensor:
    """(B, 8k + 20, 80) strips -> (B, len(lags), 20, 80) audio windows for those offsets."""
    idx = (4 * (k - lags))[:, None] + torch.arange(ROWS, device=strip.device)  # (L, 20)
    return strip[:, idx]


def augment(batch: dict, gen: torch.Generator, voice_face: bool = False, more: bool = False) -> dict:
    """Train-time: mirror half the mouths, shift each by up to 3 px (same for its 5 frames), +-3 dB audio gain;
    with `voice_face` also `warp_mel` and `jitter_light`, for voices and faces never trained on; with `more` also
    `jitter_face` and `add_noise`."""
    if batch["video"].is_floating_point():  # lip shapes
        return _augment_lips(batch, gen, voice_face, more)
    video = batch["video"]
    b, _, h, w = video.shape
    dev = video.device
    flip = torch.rand(b, generator=gen, device=gen.device).to(dev) < 0.5
    video = torch.where(flip[:, None, None, None], video.flip(-1), video)
    p = 3
    padded = F.pad(video.float(), (p, p, p, p), mode="replicate")
    dx, dy = (torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=gen.device)).tolist()
    video = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]).to(torch.uint8)
    gain = (torch.rand(b, 1, 1, generator=gen, device=gen.device).to(dev) - 0.5) * 0.6  # log10 power: +-3 dB
    mel = batch["mel"] + gain
    if voice_face:
        mel, video = warp_mel(mel, gen), jitter_light(video, gen)
    if more:
        mel, video = add_noise(mel, gen), jitter_face(video, gen)
    return {**batch, "video": video, "mel": mel}


def _augment_lips(batch: dict, gen: torch.Generator, voice_face: bool, more: bool) -> dict:
    """augment() for a "lips" expert: the same audio (gain; warp_mel, add_noise), and jitter_lips."""
    mel = batch["mel"] + (_rand(gen, batch["mel"], len(batch["mel"]), 1, 1) - 0.5) * 0.6  # log10 power: +-3 dB
    if voice_face:
        mel = warp_mel(mel, gen)
    if more:
        mel = add_noise(mel, gen)
    return {**batch, "video": jitter_lips(batch["video"], gen), "mel": mel}


def jitter_lips(lips: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Other mouths, poses and trackers, roughly, for (B, 5, 80) lip shapes (one draw per window, its 5 frames
    alike but for the noise): how much the person moves (x0.6-1.6) and the mouth's proportions (height x0.8-1.25),
    a tilt of up to 8 degrees, a shift of the window's shapes off the clip's mean (a clip that rests open or
    closed) and tracker noise of up to a third of LIP_SCALE a point and frame."""
    b, n, _ = lips.shape
    xy = lips.view(b, n, -1, 2)
    amp = torch.exp(np.log(0.6) + np.log(1.6 / 0.6) * _rand(gen, lips, b))
    tall = torch.exp((_rand(gen, lips, b) * 2 - 1) * np.log(1.25))
    ang = (_rand(gen, lips, b) * 2 - 1) * np.deg2rad(8)
    c, s = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)
    scale = torch.stack([amp, amp * tall], -1)  # (B, 2)
    xy = torch.einsum("bij,bnpj->bnpi", rot, xy * scale[:, None, None])
    shift = torch.randn(b, 1, 1, 2, generator=gen, device=gen.device).to(lips.device) * 0.3
    noise = torch.randn(xy.shape, generator=gen, device=gen.device).to(lips.device) * _rand(gen, lips, b, 1, 1, 1) / 3
    return (xy + shift + noise).reshape(b, n, -1)


def _rand(gen: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device).to(like.device)


def jitter_face(video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Other faces, lenses and trackers, roughly (one draw per window, its 5 frames alike): gamma 0.6-1.6 (skin vs
    lip contrast), zoom x0.9-1.15 about a point up to 4 px off centre (face box scale), a grey patch over up to a
    fifth of the box in half the windows (moustache, hand, shadow), Gaussian noise up to 6 grey levels."""
    b, n, h, w = video.shape
    x = video.float() / 255
    x = x.clamp(min=1e-3) ** torch.exp(np.log(0.6) + np.log(1.6 / 0.6) * _rand(gen, x, b, 1, 1, 1))
    zoom = 0.9 + 0.25 * _rand(gen, x, b)
    shift = (_rand(gen, x, b, 2) * 2 - 1) * 4 / x.new_tensor([w / 2, h / 2])
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / zoom, 1 / zoom, shift
    grid = F.affine_grid(theta, (b, n, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ph, pw = (_rand(gen, x, 2, b) * x.new_tensor([[h / 2.2], [w / 2.2]])).long().unbind(0)
    py, px = (_rand(gen, x, b) * (h - ph)).long(), (_rand(gen, x, b) * (w - pw)).long()
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside = ((ys[None] >= py[:, None]) & (ys[None] < (py + ph)[:, None]))[:, :, None] & (
        (xs[None] >= px[:, None]) & (xs[None] < (px + pw)[:, None])
    )[:, None]
    inside = inside & (_rand(gen, x, b) < 0.5)[:, None, None]
    x = torch.where(inside[:, None], _rand(gen, x, b, 1, 1, 1), x)
    x = x + torch.randn(x.shape, generator=gen, device=gen.device).to(x.device) * _rand(gen, x, b, 1, 1, 1) * 6 / 255
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def add_noise(mel: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Other rooms and microphones, roughly: stationary noise 10-40 dB under loud speech (LOUD_ROW: prep
    normalises loudness, so one level fits; the mean over bins), with a random spectral tilt of up to +-10 dB at
    the band edges, added in power (mel is log10 power) to every row of an item alike."""
    b, n = mel.shape[0], mel.shape[-1]
    level = LOUD_ROW - (1 + 3 * _rand(gen, mel, b))  # 10-40 dB under
    tilt = (_rand(gen, mel, b, 1) * 2 - 1) * torch.linspace(-1, 1, n, device=mel.device)  # +-10 dB across bins
    shape = (b, *[1] * (mel.ndim - 2), n)
    noise = (level[:, None] + tilt).view(shape)
    return torch.logaddexp(mel * np.log(10), noise * np.log(10)) / np.log(10)


def warp_mel(mel: torch.Tensor, gen: torch.Generator, lo: float = 0.88, hi: float = 1.12) -> torch.Tensor:
    """Another voice, roughly: stretch each item's mel axis by a factor in [lo, hi] (vocal-tract length / pitch),
    as `lips.augment_logmel` does for the lips model."""
    b, n = mel.shape[0], mel.shape[-1]
    a = lo + (hi - lo) * torch.rand(b, 1, generator=gen, device=gen.device).to(mel.device)
    src = (torch.arange(n, device=mel.device) / a).clamp(0, n - 1)  # (B, n)
    i0 = src.floor().long()
    i1, w = (i0 + 1).clamp(max=n - 1), (src - i0).to(mel.dtype)
    shape = (b, *[1] * (mel.ndim - 2), n)
    take = lambda i: torch.gather(mel, -1, i.view(shape).expand_as(mel))  # noqa: E731
    return take(i0) * (1 - w.view(shape)) + take(i1) * w.view(shape)


def jitter_light(video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Other faces and light, roughly: per-window contrast x0.7-1.3 about the window's mean and brightness +-25."""
    b = video.shape[0]
    r = lambda: torch.rand(b, *[1] * (video.ndim - 1), generator=gen, device=gen.device).to(video.device)  # noqa: E731
    x = video.float()
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    x = (x - mean) * (0.7 + 0.6 * r()) + mean + 50 * (r() - 0.5)
    return x.round().clamp(0, 255).to(torch.uint8)


def step_lags(cfg: Config, step: int) -> torch.Tensor:
    """A training step's audio offsets: 0 (the positive), then +-2..1 + near_shifts (every step: the near shifts
    are where +-1 is decided), then `shifts_per_step` (or all there are) drawn from the rest of +-2..max_shift,
    fresh each step."""
    k, far = cfg.max_shift, MIN_SHIFT + cfg.near_shifts
    near = torch.arange(MIN_SHIFT, far)
    cand = torch.cat([torch.arange(-k, -far + 1), torch.arange(far, k + 1)])
    pick = torch.randperm(len(cand), generator=torch.Generator().manual_seed(step))[: cfg.shifts_per_step]
    return torch.cat([torch.zeros(1, dtype=torch.long), -near, near, cand[pick]])


def loss(model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE both ways. Video -> audio: the batch's aligned audios plus this item's audio at the step's shifts
    (`step_lags`); audio -> video: the batch's video windows."""
    cfg = unwrap(model).cfg
    k, strip, valid = cfg.max_shift, batch["mel"], batch["valid"]
    b, dev = len(strip), strip.device
    lags = step_lags(cfg, step).to(dev)
    wins = _windows(strip, k, lags)  # (B, 1 + S, 20, 80)
    v, a = model(batch["video"], wins.flatten(0, 1))
    a = a.view(b, len(lags), -1)
    scale = unwrap(model).logit_scale.clamp(max=np.log(100)).exp()
    in_batch = scale * v @ a[:, 0].T  # (B, B)
    shifted = scale * (v[:, None] * a[:, 1:]).sum(-1)  # (B, S); masked after scaling: 0 * inf would be NaN
    logits = torch.cat([in_batch, shifted.masked_fill(~valid[:, k + lags[1:]], -torch.inf)], 1)
    target = torch.arange(b, device=dev)
    loss_v = F.cross_entropy(logits, target)
    loss_a = F.cross_entropy(in_batch.T, target)
    acc = (logits.argmax(1) == target).float().mean()
    return (loss_v + loss_a) / 2, {"loss_v": loss_v.detach(), "loss_a": loss_a.detach(), "acc": acc.detach()}


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Offset accuracy over +-K candidate offsets (right within +-1 frame; chance ~3 / (2K + 1)): `metric` per
    5-frame window, `clip_acc` with each clip's distances averaged over its windows (how eval uses it)."""
    cfg = unwrap(model).cfg
    k = cfg.max_shift
    lags = torch.arange(-k, k + 1)
    hits, total, dist_pos, dist_neg = 0, 0, 0.0, 0.0
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for batch in batches:
        strip, valid = batch["mel"], batch["valid"]
        wins = _windows(strip, k, lags.to(strip.device))
        v, a = model(batch["video"], wins.flatten(0, 1))
        d = (v[:, None] - a.view(len(v), len(lags), -1)).norm(dim=-1).cpu()  # (B, 2K+1)
        valid = valid.cpu()
        best = lags[d.masked_fill(~valid, torch.inf).argmin(1)]
        hits += int((best.abs() <= 1).sum())
        total += len(v)
        dist_pos += float(d[:, k].sum())
        dist_neg += float((d * valid).sum(1).div(valid.sum(1)).sum())
        for c, row, ok in zip(batch["clip"].tolist(), d, valid, strict=True):
            sums[c] = sums.get(c, torch.zeros(len(lags))) + row * ok
            counts[c] = counts.get(c, torch.zeros(len(lags))) + ok
    clip_best = [lags[(sums[c] / counts[c].clamp(min=1)).masked_fill(counts[c] == 0, torch.inf).argmin()] for c in sums]
    return {
        "metric": hits / max(total, 1),
        "clip_acc": float(np.mean([abs(int(b)) <= 1 for b in clip_best])) if clip_best else 0.0,
        "dist_sync": dist_pos / max(total, 1),
        "dist_mean": dist_neg / max(total, 1),
        "windows": float(total),
    }


def make_task(manifest: str | Path, overrides: dict | None = None) -> Task:
    """The sync expert's training task on a prep manifest (utterance split: train / val)."""
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise LipsyncError(f"unknown sync setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    cfg = make_config(Config, overrides, "sync")
    if not 0 <= cfg.near_shifts <= cfg.max_shift - MIN_SHIFT:
        raise LipsyncError(f"near_shifts must be 0..{cfg.max_shift - MIN_SHIFT}")
    if cfg.shifts_per_step < 1:
        raise LipsyncError("shifts_per_step must be at least 1")
    train_set = SyncWindows(manifest, "train", cfg, repeat_max=cfg.repeat_max)
    try:
        val_set = SyncWindows(manifest, "val", cfg, stride=cfg.val_stride)
    except LipsyncError:
        val_set = None
    return Task(
        name="sync",
        model=SyncNet(cfg),
        config={**dataclasses.asdict(cfg), "data": {"train_windows": len(train_set), **train_set.data()}},
        train_set=train_set,
        val_set=val_set,
        loss=loss,
        validate=validate,
        metric="metric",
        higher_is_better=True,
        augment=functools.partial(augment, voice_face=cfg.augment_voice_face, more=cfg.augment_more),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps,
    )
