"""The neural renderer (models/render.py) and the neural engine (engine/neural.py) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lipsync_cli import models
from lipsync_cli.engine import SourceFaces, get_engine, neural, retrieval
from lipsync_cli.errors import LipsyncError
from lipsync_cli.models import render
from lipsync_cli.settings import Settings

TINY = {"widths": [8, 16, 32], "disc_width": 8, "img": 32}


def test_geometry_box_hole_and_shape_maps():
    assert render.box_px(128) == (16, 32, 112, 128)
    corners = render.to_box(np.array([[16.0, 32.0], [112.0, 128.0]]), 128, 64)
    assert np.allclose(corners, [[0, 0], [64, 64]])
    hole = render.hole_mask(64)
    assert hole[32, 32] == 1.0 and hole[0, 0] == 0.0 and hole[:, 0].max() == 0.0 and hole[-1].max() == 0.0
    assert 0.3 < hole.mean() < 0.9
    # a mouth 20 px wide: open (inner contour 6 px tall) vs closed (inner contour flat)
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    outer = np.stack([32 + 10 * np.cos(t), 25 + 5 * np.sin(t)], 1)
    open_inner = np.stack([32 + 8 * np.cos(t), 25 + 3 * np.sin(t)], 1)
    closed_inner = np.stack([32 + 8 * np.cos(t), np.full(20, 25.0)], 1)
    maps = render.shape_maps(np.stack([np.concatenate([outer, open_inner]), np.concatenate([outer, closed_inner])]), 64)
    assert maps.shape == (2, 2, 64, 64)
    assert maps[0, 1].sum() > 20 * 255 and maps[1, 1].sum() < maps[0, 1].sum() / 5  # the opening shuts
    assert maps[1, 0].sum() > maps[0, 0].sum()  # closed: the lips cover what the opening showed
    assert render.shape_maps(np.full((1, 40, 2), np.nan), 64).max() == 0  # no face: nothing drawn


def test_only_the_hole_is_painted():
    torch.manual_seed(0)
    m = render.build(TINY).eval()
    bg = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = m(bg, torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 2, 32, 32))
    outside = m.hole[0, 0] == 0
    assert torch.equal(out[:, :, outside], bg[:, :, outside])
    assert (out[:, :, m.hole[0, 0] == 1] - bg[:, :, m.hole[0, 0] == 1]).abs().mean() > 0.05


def test_ssim_is_one_for_equal_images_and_lower_for_noise():
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(render.ssim_map(x, x), torch.ones(1, 3, 32, 32), atol=1e-4)
    assert render.ssim_map(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1)).mean() < 0.8


def test_dataset_items_references_and_deterministic_validation(tiny_prep):
    cfg = render.config_from(TINY)
    ds = render.RenderWindows(tiny_prep, "train", cfg, train=True)
    assert len(ds) > 10
    item = ds[0]
    assert item["target"].shape == (render.FRAMES, 32, 32, 3) and item["target"].dtype == torch.uint8
    assert item["reference"].shape == item["target"].shape
    assert item["shape"].shape == (render.FRAMES, 2, 32, 32) and item["shape"].float().mean() > 0
    assert item["mel"].shape == (20, 80)
    rng = np.random.default_rng(0)
    for g, _ in ds.index[:20]:
        r = ds._reference(g, rng)
        assert ds.speaker[r] == ds.speaker[g]
        assert ds.clip[r] != ds.clip[g] or abs(int(ds.frame[r]) - int(ds.frame[g])) >= render.MIN_GAP
    val = render.RenderWindows(tiny_prep, "val", cfg, train=False)
    a, b = val[0], val[0]
    assert torch.equal(a["reference"], b["reference"])


def test_a_few_steps_reduce_the_hole_error_on_real_data(tiny_prep):
    torch.manual_seed(0)
    task = render.make_task(tiny_prep, {**TINY, "adv_start": 1000})
    m = task.model.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=4, shuffle=True, drop_last=True)
    val = list(torch.utils.data.DataLoader(torch.utils.data.Subset(task.val_set, range(4)), batch_size=4))

    def val_l1() -> float:
        m.eval()
        with torch.no_grad():
            r = task.validate(m, val)
        m.train()
        return r["l1"]

    before, step, gen = val_l1(), 0, torch.Generator().manual_seed(0)
    while step < 30:
        for b in loader:
            loss, logs = task.loss(m, task.augment(b, gen), step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 30:
                break
    assert "sync" in logs  # the committed sync expert is a loss here
    after = val_l1()
    assert after < 0.6 * before, (before, after)


def test_adaptation_fits_one_video_and_leaves_the_model_alone(tiny_prep):
    torch.manual_seed(0)
    cfg = render.config_from(TINY)
    ds = render.RenderWindows(tiny_prep, "train", cfg, train=True)
    first = ds.clip == 0
    boxes, lips = ds.boxes[first], ds.shapes[first]
    m = render.build(TINY)
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def err(model) -> float:
        out = render.paint(model, boxes, boxes[::-1].copy(), lips)
        hole = render.hole_mask(32)[None, ..., None] > 0.5
        return float(np.abs(out.astype(int) - boxes)[np.broadcast_to(hole, out.shape)].mean())

    tuned, steps = render.adapt(m, boxes, lips, seconds=0, max_steps=40, batch=8, lr=3e-3)
    assert steps == 40
    assert err(tuned) < 0.7 * err(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def _source(tiny_prep):
    man = json.loads(tiny_prep.read_text())
    with safe_open(str(tiny_prep.parent / man["clips"][0]["path"]), framework="numpy") as f:
        t = {k: f.get_tensor(k) for k in ("crops", "landmarks", "found", "affine", "audio")}
    n = len(t["found"])
    found = t["found"].copy()
    found[-3:] = False  # frames without a face stay untouched
    src = SourceFaces(
        t["crops"], t["landmarks"], found, t["affine"], 128, t["audio"] / 32768.0, usable=np.arange(n) < n // 2
    )
    return src, t["crops"]


def test_engine_paints_only_the_hole_and_skips_faceless_frames(tiny_prep, tmp_path):
    from lipsync_cli.data.prep import SR

    torch.manual_seed(0)
    ckpt = models.save(render.build(TINY).eval(), {"model": "render", **TINY}, tmp_path / "render")
    src, crops = _source(tiny_prep)
    n = src.n_frames
    bg = np.arange(n // 2, n)
    speech = src.audio[(n // 2) * SR // 25 : n * SR // 25]
    track = neural.animate(src, speech, bg, adapt_minutes=0, checkpoint=ckpt)
    assert track.crops.shape == (len(bg), 128, 128, 3)
    assert (track.source_index[-3:] == -1).all() and (track.source_index[:-3] >= 0).all()
    x0, y0, x1, y1 = (np.array(render.HOLE) * 128).round().astype(int)
    outside = np.ones((128, 128), bool)
    outside[y0 - 4 : y1 + 4, x0 - 4 : x1 + 4] = False  # 4 px: resampling a 32 px box
    assert np.array_equal(track.crops[:, outside], crops[bg][:, outside])  # only the hole changes
    inner = (slice(None), slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))
    assert np.abs(track.crops[inner].astype(int) - crops[bg][inner]).mean() > 1
    assert np.array_equal(track.crops[-3:], crops[bg][-3:])
    tuned = neural.animate(src, speech, bg, adapt_minutes=0, adapt_steps=2, checkpoint=ckpt)  # a fixed step budget
    assert not np.array_equal(tuned.crops, track.crops)
    with pytest.raises(LipsyncError, match="no renderer checkpoint"):
        neural.animate(src, speech, bg, adapt_minutes=0, checkpoint=tmp_path / "absent")


def test_engine_keeps_the_bank_of_re_shaped_mouths(tiny_prep, tmp_path, monkeypatch):
    """The neural engine paints over retrieval's choice, re-shaped mouths included (a source index past the source's
    frames, named by the bank); it dropped the bank, and the articulation eval's neural row crashed on the first
    clip whose plan used one (until 2026-12-07)."""
    from lipsync_cli.eval.text_protocol import _shown_frames

    ckpt = models.save(render.build(TINY).eval(), {"model": "render", **TINY}, tmp_path / "render")
    src, _ = _source(tiny_prep)
    n = src.n_frames
    bg = np.arange(n // 2, n)
    chosen = retrieval.animate

    def with_a_reshaped_mouth(*args, **kw):  # the tiny clip's plan needs none: show one on the first frame
        track = chosen(*args, **kw)
        track.bank = np.array([[int(track.source_index[0]), 1.5]])
        track.source_index[0] = n
        return track

    monkeypatch.setattr(retrieval, "animate", with_a_reshaped_mouth)
    track = neural.animate(src, src.audio[: len(bg) * 640], bg, adapt_minutes=0, checkpoint=ckpt)
    assert track.source_index[0] == n and track.bank is not None
    assert _shown_frames(track, n)[0] == track.bank[0, 0]


def test_get_engine_binds_the_adaptation_budget():
    f = get_engine("neural", Settings(adapt_minutes=0.5))
    assert f.func is neural.animate and f.keywords == {"lips": "model", "adapt_minutes": 0.5, "adapt_steps": None}
    assert get_engine("neural") is neural.animate
    with pytest.raises(ValueError, match="neural"):
        get_engine("nope")


def test_augment_recolours_target_and_reference_alike_and_flips_shapes_with_them():
    g = torch.Generator().manual_seed(3)
    grey = torch.full((8, 1, 4, 4, 3), 100, dtype=torch.uint8)
    grey[..., 0] = 200  # a red-ish image: a channel permutation moves the 200 to another channel
    shape = torch.zeros((8, 1, 2, 4, 4), dtype=torch.uint8)
    shape[..., 0] = 255  # left column marked
    out = render.augment({"target": grey, "reference": grey.clone(), "shape": shape}, g)
    t, r = out["target"], out["reference"]
    assert (t.argmax(2) == r.argmax(2)).all()  # same permutation for both
    assert len({int(c) for c in t.mean((1, 3, 4)).argmax(1)}) > 1  # but not the same for every window
    assert (t - r).abs().max() <= 0.05  # the reference's own shift is small
    flipped = out["shape"][:, 0, 0, :, -1].mean(1) > 0.5
    assert 0 < flipped.sum() < 8


def test_committed_renderer_repaints_a_real_mouth_better_than_copying_the_reference(tiny_prep):
    found = models.default("render")
    if found is None:
        pytest.skip("no committed renderer weights")
    model = found[0]
    ds = render.RenderWindows(tiny_prep, "val", model.cfg, train=False)
    frames = np.arange(0, len(ds.boxes), 7)
    frames = frames[np.isfinite(ds.shapes[frames]).all((1, 2))][:24]
    rng = np.random.default_rng(0)
    refs = np.array([ds._reference(int(t), rng) for t in frames])
    painted = render.paint(model, ds.boxes[frames], ds.boxes[refs], ds.shapes[frames])
    hole = np.broadcast_to((render.hole_mask(model.cfg.img) > 0.5)[None, ..., None], painted.shape)
    err = lambda x: float(np.abs(x.astype(int) - ds.boxes[frames])[hole].mean())  # noqa: E731
    assert err(painted) < 0.6 * err(ds.boxes[refs]), (err(painted), err(ds.boxes[refs]))


def test_lipsync_train_model_render_writes_a_checkpoint_the_engine_loads(tiny_prep, tmp_path):
    from lipsync_cli.training import TrainOptions, train

    opts = TrainOptions(out_dir=tmp_path, max_steps=3, val_every=3, precision="bf16", overrides=TINY)
    result = train("render", tiny_prep, opts)
    assert result.steps == 3
    best = tmp_path / "checkpoints" / "render" / "best.safetensors"
    model = neural.load(best)
    assert isinstance(model, render.Render) and model.cfg.img == 32
    assert json.loads(best.with_suffix(".json").read_text())["data"]["train_windows"] > 0
