"""models/lips.py: shapes, speaker normalisation, leakage guard, learning on real shards, and its use in retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from lipsync_cli import face, models
from lipsync_cli.engine import retrieval
from lipsync_cli.engine.base import SourceFaces
from lipsync_cli.models import lips, lips_infer

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "band": 5, "window": 25, "dropout": 0.0}


def test_model_maps_feature_rows_to_frames_at_any_length():
    model = lips.build({**TINY, "model": "lips"}).eval()
    for T in (1, 7, 40):
        assert model(torch.randn(2, 4 * T, 81)).shape == (2, T, 80)
    speech = np.random.default_rng(0).normal(0, 0.1, 16000 * 3).astype(np.float32)
    net = lips_infer.from_module(model)
    out = lips_infer.run(net, speech, 60)  # 60 frames of 3 s of speech: cut features; 90: padded
    assert out.shape == (60, 80) and np.isfinite(out).all()
    assert lips_infer.run(net, speech, 90).shape == (90, 80)


def test_speaker_normalisation_round_trips_and_removes_mean_and_scale():
    rng = np.random.default_rng(0)
    shapes = 0.5 + 0.02 * rng.normal(size=(200, 80))
    valid = np.ones(200, bool)
    valid[:10] = False
    shapes[:10] = np.nan  # frames without a face are ignored
    mean, scale = lips_infer.speaker_stats(shapes, valid)
    y = lips_infer.normalise(shapes[10:], mean, scale)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
    assert np.sqrt((y**2).mean()) == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(lips_infer.denormalise(y, mean, scale), shapes[10:], atol=1e-12)


def _shard(path, start, end, source):
    prov = {"import": {"source": source, "start": start, "end": end}}
    save_file({"found": np.ones(1, bool)}, str(path), metadata={"provenance": json.dumps(prov)})


def test_eval_spans_cover_what_lipsync_eval_recreates(tmp_path):
    # one 6 s source cut in two segments: eval re-creates [0.6 * 6, 6] = [3.6, 6.0] of the source
    (tmp_path / "a.safetensors").parent.mkdir(exist_ok=True)
    _shard(tmp_path / "a.safetensors", 0.0, 3.0, "/src/x.mp4")
    _shard(tmp_path / "b.safetensors", 3.0, 6.0, "/src/x.mp4")
    clips = [{"corpus": "shared", "speaker": "x", "id": i, "path": f"{i}.safetensors"} for i in ("a", "b")] + [
        {"corpus": "grid", "speaker": "s1", "id": "g", "path": "none"}
    ]
    spans = lips.eval_spans(clips, tmp_path)
    assert set(spans) == {"shared/x/a", "shared/x/b"}
    assert spans["shared/x/a"][0] == pytest.approx(3.6)  # in segment a's own seconds: after its end, nothing cut
    assert spans["shared/x/b"][0] == pytest.approx(0.6)  # segment b from its 0.6 s on
    assert spans["shared/x/b"][1] >= 3.0


def test_gap_loss_measures_the_inner_lip_opening():
    rng = np.random.default_rng(0)
    opening = np.abs(rng.normal(0, 1, 50)).astype(np.float32)
    real = np.zeros((1, 50, 80), np.float32)
    real[0][:, lips.GAP_Y[:, 1]] += opening[:, None]  # the lower inner lip drops, the upper stays
    real[0][:, 0::2] += rng.normal(0, 1, (50, 40)).astype(np.float32)  # sideways motion: not the opening
    real = torch.from_numpy(real)
    valid = torch.ones(1, 50, dtype=torch.bool)
    np.testing.assert_allclose(lips.inner_gap(real)[0].numpy(), opening, atol=1e-5)
    assert lips.gap_l1(real, real, valid) == 0
    hedged = real * 0.3 + real.mean(1, keepdim=True) * 0.7  # a third of the motion around the mean
    assert float(lips.gap_l1(hedged, real, valid)) > 0.3 * float(opening.std())
    valid[0, :] = False
    assert lips.gap_l1(hedged, real, valid) == 0  # frames without a face do not count


def test_loss_decreases_on_real_clips(tiny_prep):
    torch.manual_seed(0)
    task = lips.make_task(tiny_prep, {**TINY, "augment": False})
    batch = torch.utils.data.default_collate([task.train_set[i] for i in range(8)])
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, logs = task.loss(task.model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and set(logs) == {"l1", "vel", "gap"}
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    val = task.validate(task.model.eval(), torch.utils.data.DataLoader(task.val_set, batch_size=4))
    assert 0 < val["lve"] < 0.2  # lip error per inter-ocular distance: a few percent once it has learned anything


def _source(tiny_prep) -> tuple[SourceFaces, np.ndarray]:
    """Two real clips: the first is the reference, the second only the background (as eval's GRID protocol)."""
    from safetensors import safe_open

    meta = json.loads(tiny_prep.read_text())
    parts = []
    for c in meta["clips"][:2]:
        with safe_open(str(tiny_prep.parent / c["path"]), framework="numpy") as f:
            parts.append({k: f.get_tensor(k) for k in ("crops", "landmarks", "affine", "found", "audio")})
    src = SourceFaces(
        crops=np.concatenate([p["crops"] for p in parts]),
        landmarks=np.concatenate([p["landmarks"] for p in parts]).astype(np.float64),
        found=np.concatenate([p["found"] for p in parts]),
        matrices=np.concatenate([p["affine"] for p in parts]).astype(np.float64),
        size=meta["size"],
        audio=np.concatenate([p["audio"] for p in parts]).astype(np.float32) / 32768,
        usable=np.arange(sum(len(p["found"]) for p in parts)) < len(parts[0]["found"]),
    )
    return src, len(parts[0]["found"]) + np.arange(len(parts[1]["found"]))


def test_retrieval_uses_the_model_and_keeps_the_maps_target_space(tiny_prep, monkeypatch):
    src, bg = _source(tiny_prep)
    speech = src.audio[bg[0] * 640 : (bg[-1] + 1) * 640]
    tiny = lips.build({**TINY, "model": "lips"}).eval()
    monkeypatch.setattr(retrieval, "_default_lips", lambda: lips_infer.from_module(tiny))
    close = np.zeros(len(bg), bool)
    close[:5] = True
    by_model = retrieval.animate(src, speech, bg, close=close, lips="model")
    by_map = retrieval.animate(src, speech, bg, close=close, lips="map")
    assert by_model.target.shape == by_map.target.shape  # the map's PCA basis: select_mouths works unchanged
    assert not np.allclose(by_model.target, by_map.target)
    assert np.isfinite(by_model.target).all()
    real = by_model.source_index[by_model.source_index < src.n_frames]
    assert src.pool[real].all()  # real mouths only from the reference (the rest: its mouths re-shaped)
    assert (face.mouth_gap(by_map.points[:5]) <= retrieval.CLOSED_GAP).all()  # `close` frames show a shut mouth
    with pytest.raises(ValueError, match="lips"):
        retrieval.animate(src, speech, bg, lips="learned")


def test_model_target_rests_closed_in_silence(tiny_prep):
    from lipsync_cli.models import lipmap

    src, bg = _source(tiny_prep)
    valid = src.pool
    shapes = lipmap.shape_vectors(src.aligned_landmarks()[:, face.LIPS], src.size)
    opening = np.array([face.mouth_opening(src.landmarks[t]) if src.found[t] else 0.0 for t in range(src.n_frames)])
    lm = lipmap.fit(shapes, opening, src.audio, src.fps, valid)
    speech = src.audio[bg[0] * 640 : (bg[-1] + 1) * 640].copy()
    n, half = len(bg), len(bg) // 2
    speech[half * 640 :] = 0.0  # the second half is silence
    tiny = lips.build({**TINY, "model": "lips"}).eval()
    free = lips_infer.predict(lips_infer.from_module(tiny), lm, shapes, valid, src.audio, speech, n, src.fps)
    np.testing.assert_allclose(free[half + 3 + lips_infer.REST_LAG :] - lm.closed, 0.0, atol=1e-9)
    assert np.abs(free[:half] - lm.closed).max() > 1e-3  # speech still moves it


def test_committed_weights_load_and_are_small():
    path = models.WEIGHTS / "lips.safetensors"
    model, config = models.load(path)
    assert config["model"] == "lips" and isinstance(model, lips.LipsModel)
    assert path.stat().st_size < 8 << 20


def test_numpy_forward_is_the_torch_models():
    """Dub runs the committed weights in numpy (lips_infer: no torch import); training runs the torch module. On real
    speech, at lengths under and over the attention band, the two give the same lip points."""
    model, _ = models.load(models.WEIGHTS / "lips.safetensors")
    net = lips_infer.load(models.WEIGHTS / "lips.safetensors")
    rng = np.random.default_rng(0)
    for T in (7, 60):
        feat = rng.normal(size=(4 * T, 81)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(feat)[None])[0].numpy()
        got = lips_infer.forward(net, feat)
        assert got.shape == want.shape == (T, 80)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert np.abs(want).max() > 0.1  # a real output, not two zeros


def test_long_speech_runs_in_windows_with_the_same_numbers():
    """Windows with the model's whole receptive field as context give what one call over the whole speech gives
    (one call holds T x T attention weights: ~9 GB for 10 minutes)."""
    net = retrieval.lips_model("model")
    speech = np.random.default_rng(0).normal(0, 0.1, 16000 * 24).astype(np.float32)  # 600 frames
    whole = lips_infer.run(net, speech, 600, chunk=10**9)
    windowed = lips_infer.run(net, speech, 600, chunk=100)
    assert windowed.shape == whole.shape == (600, 80)
    np.testing.assert_allclose(windowed, whole, atol=1e-4)
