"""The seed model: the spec's layers literally, its two training phases, learning on real data, checkpoints, engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from lipsync_cli import models
from lipsync_cli.data.dataset import trainable_frames
from lipsync_cli.engine import SourceFaces, get_engine
from lipsync_cli.engine import seed as seed_engine
from lipsync_cli.models import seed

TINY = {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "gen_channels": 64}


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _conv(cin: int, cout: int, k: int, dims: int) -> int:
    return cin * cout * k**dims + cout


def test_full_spec_layers_shapes_and_parameter_counts():
    m = seed.build({"model": "seed"})
    # AudioEncoder: Linear(13 -> 128) + TransformerEncoder 4 x (d 128, 4 heads, ff 512, dropout 0.1)
    assert (m.audio.proj.in_features, m.audio.proj.out_features) == (13, 128)
    layers = m.audio.transformer.layers
    assert len(layers) == 4
    for layer in layers:
        assert layer.self_attn.embed_dim == 128 and layer.self_attn.num_heads >= 4
        assert (layer.linear1.in_features, layer.linear1.out_features) == (128, 512)
        assert layer.dropout.p == 0.1
    per_layer = (3 * 128 * 128 + 3 * 128) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128) + 4 * 128
    assert _n(m.audio.transformer) == 4 * per_layer
    assert _n(m.audio.proj) == 13 * 128 + 128
    # VideoEncoder: Conv3d 3->64->128->128 (k3, p1), ReLU, MaxPool3d(2)
    convs = [x for x in m.video.net if isinstance(x, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 64, (3, 3, 3), (1, 1, 1)),
        (64, 128, (3, 3, 3), (1, 1, 1)),
        (128, 128, (3, 3, 3), (1, 1, 1)),
    ]
    assert isinstance(m.video.net[3], nn.ReLU) and isinstance(m.video.net[4], nn.MaxPool3d)
    assert m.video.net[4].kernel_size == 2
    assert _n(m.video.net) == _conv(3, 64, 3, 3) + _conv(64, 128, 3, 3) + _conv(128, 128, 3, 3)
    # Alignment: audio_proj, video_proj Linear(128->128), MultiheadAttention(128)
    assert _n(m.align.audio_proj) == _n(m.align.video_proj) == 128 * 128 + 128
    assert m.align.attn.embed_dim == 128
    # Generator: Linear(128 -> 32768) -> 512x8x8, ConvT(512->256, k4 s2 p1), ReLU, ConvT(256->3, k4 s2 p1), Tanh
    assert (m.generator.fc.in_features, m.generator.fc.out_features) == (128, 32768)
    up = m.generator.up
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in (up[0], up[2])] == [
        (512, 256, (4, 4), (2, 2), (1, 1)),
        (256, 3, (4, 4), (2, 2), (1, 1)),
    ]
    assert isinstance(up[1], nn.ReLU) and isinstance(up[3], nn.Tanh)
    assert _n(m.generator) == 128 * 32768 + 32768 + _conv(512, 256, 4, 2) + _conv(256, 3, 4, 2)
    # Discriminator: Conv2d(3->64, k4 s2 p1), LeakyReLU(0.2), Conv2d(64->128, k4 s2 p1), LeakyReLU, Linear(8192->1)
    d = m.disc.net
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in (d[0], d[2])] == [
        (3, 64, (4, 4), (2, 2), (1, 1)),
        (64, 128, (4, 4), (2, 2), (1, 1)),
    ]
    assert d[1].negative_slope == 0.2 and (d[5].in_features, d[5].out_features) == (8192, 1)
    assert _n(m.disc) == _conv(3, 64, 4, 2) + _conv(64, 128, 4, 2) + 8192 + 1

    x = m(torch.randn(2, 3, 17, 13), torch.rand(2, 3, 2, 32, 32) * 2 - 1)
    assert x.shape == (2, 3, 3, 32, 32) and x.abs().max() <= 1
    assert m.disc(x.flatten(0, 1)).shape == (6,)
    assert 7.5e6 < _n(m) < 8.5e6  # 6.3 M of it the generator (the 32768-wide Linear and the first ConvT)


def _batch(b: int = 2, g: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "mfcc": torch.randn(b, g, 17, 13),
        "refs": torch.rand(b, 3, 2, 32, 32) * 2 - 1,
        "target": torch.rand(b, g, 3, 32, 32) * 2 - 1,
        "clip": torch.rand(b, g, 3, 2, 32, 32) * 2 - 1,
    }


def _grads(m: nn.Module, batch: dict, step: int) -> dict[str, bool]:
    m.zero_grad()
    loss, logs = seed.loss_fn(m, batch, step)
    loss.backward()
    got = {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
        for name, mod in m.named_children()
    }
    return {**got, "phase": logs["phase"]}


def test_phase_switch_encoders_first_then_everything():
    m = seed.build({**TINY, "phase1_steps": 5})
    b = _batch()
    p1 = _grads(m, b, 4)
    assert p1["phase"] == 1 and p1["audio"] and p1["video"] and p1["align"]
    assert not p1["generator"] and not p1["disc"]
    p2 = _grads(m, b, 5)
    assert p2["phase"] == 2 and all(p2[k] for k in ("audio", "video", "align", "generator", "disc"))


def test_discriminator_gets_only_its_own_loss():
    """One optimiser: the generator's adversarial term must not train the discriminator to be fooled."""
    m = seed.build({**TINY, "phase1_steps": 0, "adv_weight": 1.0}).eval()  # no dropout: both passes see one fake
    b = _batch()
    m.zero_grad()
    seed.joint(m, b)[0].backward()
    got = [p.grad.clone() for p in m.disc.parameters()]
    m.zero_grad()
    with torch.no_grad():
        fake = m(b["mfcc"], b["refs"]).flatten(0, 1)
    real = b["target"].flatten(0, 1)
    ((seed._bce(m.disc(real), True) + seed._bce(m.disc(fake), False)) / 2).backward()
    for g, p in zip(got, m.disc.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_dataset_references_never_show_a_target(tiny_prep):
    task = seed.make_task(tiny_prep, TINY)
    ds = task.train_set
    assert len(ds) > 10 and task.val_set is not None and task.find_unused_parameters
    item = ds[3]
    assert item["mfcc"].shape == (8, 17, 13) and item["refs"].shape == (3, 2, 32, 32)
    assert item["target"].shape == (8, 3, 32, 32) and item["clip"].shape == (8, 3, 2, 32, 32)
    assert item["target"].min() >= -1 and item["target"].max() <= 1
    # the references are real mouths of the clip, none of them the target's (or within MIN_GAP of it)
    k, i = ds.index[3]
    refs = (item["refs"].permute(1, 2, 3, 0) + 1) * 127.5
    dist = [
        (refs[r].round().byte().numpy().astype(int) - ds.mouths[k].astype(int)).__abs__().sum((1, 2, 3)).argmin()
        for r in range(2)
    ]
    assert all(abs(int(t) - i) >= seed.MIN_GAP for t in dist)
    assert np.allclose(task.config["mfcc_std"], np.concatenate(ds.mfcc).std(0), rtol=1e-2)
    v1, v2 = task.val_set[0], task.val_set[0]
    assert torch.equal(v1["refs"], v2["refs"]) and torch.equal(v1["target"], v2["target"])  # deterministic val


def test_shared_clips_skip_the_eval_held_out_window():
    # a segment at 2.0 .. 8.0 s of a 10 s source: eval holds out 4.8 .. 8 s, i.e. 2.8 .. 6.0 s of the segment
    ok = trainable_frames(np.ones(150, bool), (2.8, 6.0))
    t = 2.0 + np.arange(150) / 25
    assert ok[t < 4.2].all() and not ok[(t >= 4.3) & (t < 8.5)].any() and ok[t >= 8.6].all()
    grid = trainable_frames(np.array([True, False, True]), None)
    assert grid.tolist() == [True, False, True]


def test_a_few_steps_reduce_reconstruction_loss_on_real_data(tiny_prep):
    torch.manual_seed(0)
    task = seed.make_task(tiny_prep, {**TINY, "phase1_steps": 1, "group": 4})
    m = task.model.train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=2, shuffle=True, drop_last=True)
    val = list(torch.utils.data.DataLoader(torch.utils.data.Subset(task.val_set, range(4)), batch_size=4))

    def val_l1() -> float:
        m.eval()
        with torch.no_grad():
            r = task.validate(m, val)
        m.train()
        return r["val_l1"]

    before, step = val_l1(), 0
    while step < 25:
        for b in loader:
            loss, _ = task.loss(m, b, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 25:
                break
    after = val_l1()
    assert after < 0.7 * before, (before, after)


def test_checkpoint_round_trip(tmp_path):
    m = seed.build({**TINY, "mfcc_mean": list(range(13)), "mfcc_std": [2.0] * 13}).eval()
    config = {"model": "seed", **{k: v for k, v in TINY.items()}, "mfcc_mean": list(range(13)), "mfcc_std": [2.0] * 13}
    path = models.save(m, config, tmp_path / "seed", meta={"step": 1})
    m2, cfg = models.load(path)
    b = _batch()
    with torch.no_grad():
        assert torch.equal(m(b["mfcc"], b["refs"]), m2(b["mfcc"], b["refs"]))
    assert cfg["meta"]["step"] == 1 and m2.mfcc_mean.tolist() == list(range(13))
    with safe_open(str(path), framework="pt") as f:
        assert "generator.fc.weight" in set(f.keys())


def test_engine_pastes_generated_mouths_into_real_crops(tiny_prep, tmp_path):
    from lipsync_cli.data.prep import SR

    torch.manual_seed(0)
    m = seed.build(TINY).eval()
    ckpt = models.save(m, {"model": "seed", **TINY}, tmp_path / "seed")
    man = json.loads(tiny_prep.read_text())
    with safe_open(str(tiny_prep.parent / man["clips"][0]["path"]), framework="numpy") as f:
        t = {k: f.get_tensor(k) for k in ("crops", "landmarks", "found", "affine", "audio")}
    n = len(t["found"])
    src = SourceFaces(
        t["crops"],
        t["landmarks"],
        t["found"],
        t["affine"],
        128,
        t["audio"] / 32768.0,
        fps=25.0,
        usable=np.arange(n) < n // 2,
    )
    bg = np.arange(n // 2, n)
    speech = src.audio[(n // 2) * SR // 25 : n * SR // 25]
    track = seed_engine.animate(src, speech, bg, checkpoint=ckpt)
    assert track.crops.shape == (len(bg), 128, 128, 3) and (track.source_index == bg).all()
    x0, y0, x1, y1 = (np.array(seed.MOUTH_BOX) * 128).round().astype(int)
    outside = np.ones((128, 128), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(track.crops[:, outside], t["crops"][bg][:, outside])  # only the mouth box changes
    assert (
        np.abs(
            track.crops[:, y0 + 8 : y1 - 8, x0 + 8 : x1 - 8].astype(int)
            - t["crops"][bg][:, y0 + 8 : y1 - 8, x0 + 8 : x1 - 8]
        ).mean()
        > 1
    )
    assert get_engine("seed") is seed_engine.animate
    with pytest.raises(Exception, match="no seed checkpoint"):
        seed_engine.animate(src, speech, bg, checkpoint=tmp_path / "absent")
