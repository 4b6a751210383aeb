"""The sync expert: data alignment, training signal, offset conventions, checkpoints (tiny models, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch.utils.data import DataLoader

from lipsync_cli import face, models
from lipsync_cli.errors import LipsyncError
from lipsync_cli.models import sync

TINY = {"video_channels": [8, 16], "audio_channels": [16], "dim": 16, "batch_size": 16, "max_shift": 6}


def _shard(manifest: Path, split: str = "val") -> dict:
    meta = json.loads(manifest.read_text())
    key = meta["splits"]["utterance"][split][0]
    clip = next(c for c in meta["clips"] if f"{c['corpus']}/{c['speaker']}/{c['id']}" == key)
    return load_file(str(manifest.parent / clip["path"]))


def test_windows_are_aligned(tiny_prep):
    cfg = sync.build({"model": "sync", **TINY}).cfg
    ds = sync.SyncWindows(tiny_prep, "train", cfg)
    shard = load_file(str(tiny_prep.parent / ds.clips[0]["path"]))
    assert len(shard["mel"]) == 4 * len(shard["crops"]) + 1  # row 4i is frame i, one extra row closes the clip
    mouths = sync.mouth_frames(shard["crops"], cfg.height, cfg.width)
    k, lags = cfg.max_shift, torch.arange(-cfg.max_shift, cfg.max_shift + 1)
    first = [i for i, (c, _) in enumerate(ds.index) if c == 0]
    for i in (first[0], first[len(first) // 2], first[-1]):  # both edges of the clip and its middle
        s, item = ds.index[i][1], ds[i]
        assert item["video"].shape == (5, cfg.height, cfg.width) and item["video"].dtype == torch.uint8
        assert item["mel"].shape == (8 * k + 20, 80) and item["valid"].shape == (2 * k + 1,)
        assert np.array_equal(item["video"].numpy(), mouths[s : s + 5])
        wins = sync._windows(item["mel"][None], k, lags)[0]  # (2k+1, 20, 80)
        for j, lag in enumerate(lags.tolist()):  # offset `lag`: video window s against audio window s - lag
            u = s - lag
            assert bool(item["valid"][j]) == (u >= 0 and u + 5 <= len(mouths))
            if item["valid"][j]:
                np.testing.assert_array_equal(wins[j].numpy(), shard["mel"][4 * u : 4 * u + 20].astype(np.float32))


def test_loss_decreases_and_validates(tiny_prep):
    torch.manual_seed(0)
    task = sync.make_task(tiny_prep, TINY)
    assert task.metric == "metric" and task.higher_is_better and task.val_set is not None
    batch = next(iter(DataLoader(task.train_set, 16, shuffle=True, generator=torch.Generator().manual_seed(0))))
    opt = torch.optim.Adam(task.model.parameters(), 3e-3)
    losses = []
    for _ in range(12):  # one fixed batch, fixed shifts: it must be learnable
        task.model.train()
        loss, logs = task.loss(task.model, batch, 0)
        assert np.isfinite(loss.item()) and 0 <= logs["acc"] <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    aug = task.augment(batch, torch.Generator().manual_seed(0))
    assert aug["video"].shape == batch["video"].shape and aug["video"].dtype == torch.uint8
    task.model.eval()
    with torch.no_grad():
        res = task.validate(task.model, DataLoader(task.val_set, 64))
    assert 0 <= res["metric"] <= 1 and 0 <= res["clip_acc"] <= 1 and res["windows"] == len(task.val_set)


LIPS = {"video_input": "lips", "lips_hidden": 32, "audio_channels": [16], "dim": 16, "batch_size": 16, "max_shift": 6}


def test_lips_expert_reads_the_mesh_lips(tiny_prep):
    """A "lips" expert's windows are the shard's lip points about the clip's mean shape; it learns, embeds and saves
    as the pixel one does, and refuses to be a pixel loss."""
    torch.manual_seed(0)
    task = sync.make_task(tiny_prep, LIPS)
    ds = task.train_set
    shard = load_file(str(tiny_prep.parent / ds.clips[0]["path"]))
    found = shard["found"]
    lips = face.frontal_lips(shard["landmarks"], found)
    np.testing.assert_allclose(lips[found], shard["lips"][found] / 128, atol=0.05)  # the aligned crop's, but for pose
    want = sync.lip_frames(lips)
    assert want.shape == (len(lips), 80) and np.abs(want[found].mean(0)).max() < 1e-4  # centred on the clip
    np.testing.assert_allclose(
        want[found], (lips[found].reshape(-1, 80) - lips[found].reshape(-1, 80).mean(0)) / 0.01, atol=1e-3
    )
    s, item = ds.index[0][1], ds[0]
    assert item["video"].dtype == torch.float32 and item["video"].shape == (5, 80)
    np.testing.assert_array_equal(item["video"].numpy(), want[s : s + 5])
    batch = next(iter(DataLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(0))))
    opt = torch.optim.Adam(task.model.parameters(), 3e-3)
    losses = []
    for _ in range(12):
        task.model.train()
        loss, _ = task.loss(task.model, batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    aug = task.augment(batch, torch.Generator().manual_seed(0))["video"]
    assert aug.shape == batch["video"].shape and not torch.equal(aug, batch["video"])
    model = task.model.eval()
    v = sync.embed_video(model, None, lips[:30])
    assert v.shape == (26, 16)
    with pytest.raises(ValueError, match="needs lips"):
        sync.embed_video(model, shard["crops"][:30])
    with pytest.raises(ValueError, match="'mouth' sync expert"):
        sync.sync_loss(model, torch.rand(2, 5, 128, 128, 3), torch.zeros(2, 20, 80))


def test_jitter_lips_moves_windows_not_frames():
    gen = torch.Generator().manual_seed(0)
    still = torch.zeros(64, 5, 80)
    still[:, :, 1::2] = torch.linspace(-2, 2, 40)  # one shape, held
    out = sync.jitter_lips(still, gen)
    assert out.shape == still.shape and torch.isfinite(out).all()
    within = (out - out[:, :1]).abs().mean()  # tracker noise only: up to a third of a unit
    between = (out - out[:1]).abs().mean()  # scale, tilt, shift differ per window
    assert within < 0.2 < between


def test_near_shifts_are_in_every_step():
    cfg = sync.build({"model": "sync", "max_shift": 15, "shifts_per_step": 8, "near_shifts": 2}).cfg
    for step in range(5):
        lags = sync.step_lags(cfg, step)
        assert lags[0] == 0 and len(lags) == 1 + 4 + 8 and len(set(lags.tolist())) == len(lags)
        assert {-3, -2, 2, 3} <= set(lags.tolist()) and lags[1:].abs().min() >= 2 and lags.abs().max() <= 15
    plain = sync.build({"model": "sync", "near_shifts": 0}).cfg
    assert len(sync.step_lags(plain, 0)) == 1 + 8 and not (sync.step_lags(plain, 0)[1:].abs() < 2).any()
    small = sync.build({"model": "sync", "max_shift": 5, "near_shifts": 2}).cfg  # 4 near + all 4 others (+-4, 5)
    assert sorted(sync.step_lags(small, 0).tolist()) == [-5, -4, -3, -2, 0, 2, 3, 4, 5]


def test_augment_more_faces_and_noise():
    gen = torch.Generator().manual_seed(0)
    still = torch.full((32, 5, 48, 72), 90, dtype=torch.uint8)
    still[:, :, 20:30, 20:50] = 40  # a dark mouth on skin
    out = sync.jitter_face(still, gen)
    assert out.shape == still.shape and out.dtype == torch.uint8 and (out != still).any()
    # one draw per window: its 5 frames differ by pixel noise only, while windows differ from each other
    assert (out.float() - out[:, :1].float()).abs().mean() < 6
    assert (out.float() - out[:1].float()).abs().mean() > 5
    mel = torch.full((32, 40, 80), sync.LOUD_ROW)
    mel[:, 20:] = -8.0  # silence
    noisy = sync.add_noise(mel, gen)
    loud = noisy[:, :20] - mel[:, :20]  # 10-40 dB under on average over bins, +-10 dB of tilt: <= +100% power
    assert (noisy >= mel).all() and loud.mean() < 0.05 and loud.max() < np.log10(2) + 1e-4
    assert (noisy[:, 20:] - mel[:, 20:]).mean() > 2  # silence now holds the noise floor (-3.8 .. -6.8)


def test_make_task_rejects_unknown_settings(tiny_prep):
    with pytest.raises(LipsyncError, match="unknown sync setting"):
        sync.make_task(tiny_prep, {"layers": 3})


def test_offset_sign_convention():
    """Video window t made equal to audio window t - 4: the video lags the audio by 4 frames -> offset +4."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    for d in (4, -3, 0):
        v = np.roll(a, d, axis=0)  # v[t] = a[t - d]
        r = sync.offset_scores(v, a, max_offset=15)
        assert r["offset"] == d and r["dist_by_offset"][15 + d] < 1e-9
        assert r["confidence"] > 1 and r["min_dist"] < 1e-9 and len(r["dist_by_offset"]) == 31
    ok = np.zeros(60, bool)
    with pytest.raises(LipsyncError):
        sync.offset_scores(a, a, ok=ok)


def test_experts_vote_by_their_mean_curve():
    """Two experts: one sure the video lags by 4, one weakly for -2; the team's curve is the mean of theirs."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    sure = np.roll(a, 4, axis=0)
    weak = 0.3 * np.roll(a, -2, axis=0) + rng.normal(size=a.shape)
    weak /= np.linalg.norm(weak, axis=1, keepdims=True)
    one, two = sync.offset_scores(sure, a), sync.offset_scores(weak, a)
    team = sync.offset_scores([sure, weak], [a, a])
    np.testing.assert_allclose(team["dist_by_offset"], (one["dist_by_offset"] + two["dist_by_offset"]) / 2)
    assert (one["offset"], two["offset"], team["offset"]) == (4, -2, 4)


def test_embeddings_shapes_and_round_trip(tmp_path, tiny_prep):
    torch.manual_seed(0)
    model = sync.build({"model": "sync", **TINY}).eval()
    shard = _shard(tiny_prep)
    crops, mel = shard["crops"][:30], shard["mel"][: 4 * 30 + 1]
    v, a = sync.embed_video(model, crops), sync.embed_audio(model, mel)
    assert v.shape == a.shape == (26, 16)
    np.testing.assert_allclose(v.norm(dim=1).numpy(), 1, atol=1e-5)
    path = models.save(model, {"model": "sync", **TINY}, tmp_path / "sync")
    again, config = models.load(path)
    assert config["dim"] == 16
    torch.testing.assert_close(sync.embed_video(again, crops), v)
    torch.testing.assert_close(sync.embed_audio(again, mel), a)
    with pytest.raises(LipsyncError, match="too short"):
        sync.embed_video(model, crops[:3])


def test_sync_loss_is_differentiable(tiny_prep):
    torch.manual_seed(0)
    model = sync.build({"model": "sync", **TINY}).eval().requires_grad_(False)
    shard = _shard(tiny_prep)
    crops = torch.from_numpy(shard["crops"][10:20].astype(np.float32) / 255).reshape(2, 5, 128, 128, 3)
    mel = torch.from_numpy(shard["mel"][40:80].astype(np.float32)).reshape(2, 20, 80)
    video = crops.clone().requires_grad_(True)
    loss = sync.sync_loss(model, video, mel)
    loss.backward()
    assert 0 <= loss.item() <= 2 and video.grad is not None and video.grad.abs().sum() > 0
    # channels-first input is the same thing; the torch mouth cut matches the numpy one used for training
    same = sync.sync_loss(model, crops.permute(0, 1, 4, 2, 3), mel)
    torch.testing.assert_close(same, loss.detach())
    cut = sync.mouth_tensor(crops[:1], 48, 72)[0] * 255
    ref = torch.from_numpy(sync.mouth_frames(shard["crops"][10:15]).astype(np.float32))
    assert (cut - ref).abs().mean() < 2.0


def test_committed_expert_finds_offsets(tiny_prep):
    """The committed checkpoint on a held-out GRID clip: offset ~0 as recorded, and injected shifts recovered."""
    model = sync.load_default()
    if model is None:
        pytest.skip("no committed sync checkpoint")
    shard = _shard(tiny_prep)
    crops, mel, found = shard["crops"], shard["mel"].astype(np.float32), shard["found"]
    assert abs(sync.offsets(model, crops, mel, found=found)["offset"]) <= 1
    for d in (3, -3):  # video lags audio by d: video frame t shows what the audio said at t - d
        # d > 0: the audio starts d frames into the clip; d < 0: the video starts -d frames in
        r = sync.offsets(model, crops, mel[4 * d :]) if d > 0 else sync.offsets(model, crops[-d:], mel)
        assert abs(r["offset"] - d) <= 1, (d, r["offset"])


def test_eval_route_finds_offsets(shared):
    """eval's route (raw mesh landmarks of full frames -> prepare, as prep does -> offsets) on a held-out GRID
    sentence with its own audio: in sync, and injected shifts found."""
    from lipsync_cli import media
    from lipsync_cli.data import prep
    from lipsync_cli.eval.protocols import track_landmarks

    model = sync.load_default()
    if model is None:
        pytest.skip("no committed sync checkpoint")
    videos = sorted((shared / "corpus" / "grid" / "s1" / "video").glob("*.mpg"))
    video = next(v for v in videos if prep._bucket(v.stem) >= 90)  # the manifest's test split: never trained on
    frames = np.stack(list(media.iter_frames(video, 25)))
    audio, lm = media.read_audio(video, 16000), track_landmarks(frames)
    r = sync.clip_sync(model, frames, lm, audio)
    assert abs(r["offset"]) <= 1 and r["confidence"] > 0.05
    crops, lips, mel, _ = sync.prepare(frames, lm, audio)
    assert crops.shape == (len(frames), 128, 128, 3) and mel.shape == (4 * len(frames) + 1, 80)
    assert lips.shape == (len(frames), 40, 2) and 0.2 < np.nanmean(lips) < 0.8  # crop units
    for d in (4, -4):
        r = sync.offsets(model, crops, mel[4 * d :]) if d > 0 else sync.offsets(model, crops[-d:], mel)
        assert abs(r["offset"] - d) <= 1, (d, r["offset"])
