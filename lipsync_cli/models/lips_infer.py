"""The lips model (models/lips.py) at dub time: its input features, its forward pass in numpy, and its adaptation
to one video's mouth.

Why numpy: the model is tiny (0.4 M weights, ~50 ms for 20 s of speech) while importing torch costs ~1.3 s of a
~16 s dub (docs/speed.md, "Session 18"); with this file a retrieval dub loads no torch in its main process.
Training runs the torch module (models/lips.py, which takes its features from here); `forward` is the same
computation on its state dict, step for step (tests/test_lips_model.py holds the two to 1e-4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import erf

from lipsync_cli import audio
from lipsync_cli.models import lipmap

N_MELS = 80
ROWS = 4  # feature rows per video frame (100 Hz / 25 fps)
REST_LEAD, REST_LAG = 2, 2  # frames: the silence gate opens this early and closes this late
RUN_CHUNK = 1000  # frames per forward pass (40 s): the banded attention's mask and weights are T x T in memory
LN_EPS = 1e-5  # torch's LayerNorm default


# ----------------------------------------------------------------------------- features


def level_channel(logmel: np.ndarray) -> np.ndarray:
    """Row energy mapped to 0 (30 dB under the utterance's loud parts, or quieter) .. 1: voice-independent."""
    e = logmel.mean(1)
    peak = float(np.percentile(e, 95)) if len(e) else 0.0
    return np.clip((e - (peak - 3.0)) / 3.0, 0.0, 1.0).astype(np.float32)


def features(logmel: np.ndarray) -> np.ndarray:
    """(R, 80) log10 mel -> (R, 81): per-utterance normalised mel + the loudness channel."""
    return np.concatenate([audio.normalise_utterance(logmel), level_channel(logmel)[:, None]], axis=1)


def speech_features(speech: np.ndarray, n_frames: int, sr: int = audio.SR) -> np.ndarray:
    """(4 * n_frames, 81) features for `n_frames` video frames of speech (row 4i is frame i's instant)."""
    if sr != audio.SR:
        speech = audio.resample(speech, sr, audio.SR)
    logmel = audio.mel_spectrogram(np.asarray(speech, np.float32), audio.SR, n_mels=N_MELS)
    feat = features(logmel)
    rows = ROWS * n_frames
    return np.pad(feat[:rows], ((0, max(0, rows - len(feat))), (0, 0)), mode="edge")


# ----------------------------------------------------------------------------- the network


@dataclass
class LipsNet:
    """A lips checkpoint as arrays: `config` (models/lips.Config as a dict) and the torch module's state dict."""

    config: dict
    weights: dict[str, np.ndarray]


def load(path: str | Path) -> LipsNet:
    """`<stem>.safetensors` + `<stem>.json` (as models.save writes them), read without torch."""
    from safetensors.numpy import load_file

    path = Path(path).with_suffix(".safetensors")
    return LipsNet(json.loads(path.with_suffix(".json").read_text()), load_file(str(path)))


def from_module(model) -> LipsNet:
    """The numpy twin of a models/lips.LipsModel (tests, benchmarks)."""
    from dataclasses import asdict

    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    return LipsNet(asdict(model.cfg), state)


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _layer_norm(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _attention(x: np.ndarray, w: dict, name: str, heads: int, band: int) -> np.ndarray:
    """Multi-head self-attention where frame i sees frames i-band .. i+band (torch's MultiheadAttention)."""
    T, d = x.shape
    q, k, v = np.split(x @ w[f"{name}.in_proj_weight"].T + w[f"{name}.in_proj_bias"], 3, axis=1)
    q, k, v = (a.reshape(T, heads, d // heads).transpose(1, 0, 2) for a in (q, k, v))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
    i = np.arange(T)
    scores[:, np.abs(i[None, :] - i[:, None]) > band] = -np.inf
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v
    return _linear(out.transpose(1, 0, 2).reshape(T, d), w, f"{name}.out_proj")


def forward(net: LipsNet, feat: np.ndarray) -> np.ndarray:
    """(4T, 81) feature rows -> (T, 80) speaker-normalised lip points: LipsModel.forward for one sequence."""
    w, cfg = net.weights, net.config
    x = _linear(np.asarray(feat, np.float32), w, "inp")  # (4T, d)
    x = np.concatenate([np.repeat(x[:1], ROWS, 0), x])  # replicate-pad ROWS rows on the left
    T = (len(x) - 2 * ROWS) // ROWS + 1
    # strided conv, kernel 2*ROWS: frame i sees rows 4i-4 .. 4i+3
    win = np.lib.stride_tricks.sliding_window_view(x, 2 * ROWS, axis=0)[::ROWS][:T]  # (T, d, 2*ROWS)
    kernel = w["down.weight"]  # (d_out, d_in, 2*ROWS)
    x = win.reshape(T, -1) @ kernel.reshape(len(kernel), -1).T + w["down.bias"]
    # depthwise position conv (kernel 9, zero padding 4) and exact GELU
    k = w["pos.weight"][:, 0, :]  # (d, 9)
    p = np.pad(x, ((4, 4), (0, 0)))
    pos = sum(p[j : j + T] * k[:, j] for j in range(k.shape[1])) + w["pos.bias"]
    x = x + 0.5 * pos * (1.0 + erf(pos / np.sqrt(2.0)))
    for n in range(cfg["n_layers"]):  # pre-norm transformer layers, ReLU feed-forward
        name = f"encoder.layers.{n}"
        x = x + _attention(_layer_norm(x, w, f"{name}.norm1"), w, f"{name}.self_attn", cfg["n_heads"], cfg["band"])
        h = np.maximum(_linear(_layer_norm(x, w, f"{name}.norm2"), w, f"{name}.linear1"), 0.0)
        x = x + _linear(h, w, f"{name}.linear2")
    return _linear(_layer_norm(x, w, "norm"), w, "head")


def run(net: LipsNet, speech: np.ndarray, n_frames: int, sr: int = audio.SR, chunk: int = RUN_CHUNK) -> np.ndarray:
    """(n_frames, 80) speaker-normalised lip points for the speech (any length: attention is banded).

    Long speech goes through the model in windows of `chunk` frames, each with as much context on both sides as a
    frame can see (band per layer, plus the position conv): the same numbers (measured: 1.7e-6 on 3 min), while
    one pass over 10 minutes of speech would hold ~9 GB of attention weights (15000 x 15000 per head)."""
    feat = speech_features(speech, n_frames, sr)
    margin = net.config["n_layers"] * net.config["band"] + 8
    out = []
    for a in range(0, n_frames, chunk):
        b = min(n_frames, a + chunk)
        lo, hi = max(0, a - margin), min(n_frames, b + margin)
        out.append(forward(net, feat[ROWS * lo : ROWS * hi])[a - lo : b - lo])
    return np.concatenate(out).astype(np.float64)


# ----------------------------------------------------------------------------- speaker normalisation


def speaker_stats(shapes: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Mean lip shape (D,) and motion scale (RMS distance from it per coordinate) of one speaker's frames."""
    x = shapes if valid is None else shapes[valid]
    x = x[np.isfinite(x).all(1)]
    mean = x.mean(0)
    return mean, float(np.sqrt(((x - mean) ** 2).mean())) + 1e-6


def normalise(shapes: np.ndarray, mean: np.ndarray, scale: float) -> np.ndarray:
    return (shapes - mean) / scale


def denormalise(y: np.ndarray, mean: np.ndarray, scale: float) -> np.ndarray:
    return mean + scale * y


# ----------------------------------------------------------------------------- one video's mouth


def predict(
    net: LipsNet,
    lm: lipmap.LipMap,  # fitted on the source: its PCA basis is the target space retrieval selects in
    shapes: np.ndarray,
    valid: np.ndarray,
    source_audio: np.ndarray | None,
    speech: np.ndarray,
    n_frames: int,
    fps: float,
    sr: int = audio.SR,
    adapt: bool = True,
) -> np.ndarray:
    """(n_frames, k) target coefficients in the map's basis: the generalist's motion de-normalised with the video's
    own mean shape and scale; with `adapt`, calibrated per coefficient on the video's own audio and lips; then
    eased towards the source's closed mouth where the speech is quiet (`rest_in_silence`).

    Why the easing: the model is trained with L1, so where it is unsure (a voice it never heard, a pause) it
    predicts a mouth near the speaker's mean. It shapes the motion between the viseme anchors (visemes.py); the
    anchors themselves (p/b/m shut, open vowels open) are enforced by the engine, never by this target."""
    mean, scale = speaker_stats(shapes, valid)
    to_coef = lambda y: lipmap.coefficients(lm, denormalise(y, mean, scale))  # noqa: E731
    coef = to_coef(run(net, speech, n_frames, sr))
    if adapt and source_audio is not None and len(source_audio) > sr:
        T = len(shapes)
        usable = valid & (np.arange(T) < int(len(source_audio) / sr * fps))
        if usable.sum() >= 50:
            own = to_coef(run(net, source_audio, T, sr))[usable]
            real = lipmap.coefficients(lm, shapes[usable])
            coef = _calibrate(own, real, coef)
    drive = lipmap.loudness_drive(speech, n_frames, fps, sr)
    return rest_in_silence(coef, lm.closed, _spread(drive, REST_LEAD, REST_LAG))


def rest_in_silence(coef: np.ndarray, closed: np.ndarray, drive: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """Fade towards the closed mouth as the loudness drive (0 silence .. 1 loud vowels) vanishes: the model's
    pauses sit near the speaker's mean shape, and no sound means no articulation whoever speaks."""
    return closed + np.clip(gain * drive, 0.0, 1.0)[:, None] * (coef - closed)


def _spread(x: np.ndarray, lead: int, lag: int) -> np.ndarray:
    """Running max over frames i - lag .. i + lead: the lips part before a sound starts and close after it ends."""
    if lead + lag <= 0 or not len(x):
        return x
    p = np.pad(x, (lag, lead), mode="edge")
    return np.max([p[i : i + len(x)] for i in range(lead + lag + 1)], axis=0)


def _calibrate(pred: np.ndarray, real: np.ndarray, target: np.ndarray, prior: float = 200.0) -> np.ndarray:
    """Per coefficient real ~ a * pred + b on the source, then applied to the target prediction. The gain is shrunk
    towards 1 as if `prior` more frames agreed with the model: a few seconds of video can say how far this mouth
    moves, not teach it to speak (weaker priors, or a ridge on the hidden features, did worse on unseen voices)."""
    out = np.empty_like(target)
    for k in range(pred.shape[1]):
        p, r = pred[:, k], real[:, k]
        X = np.stack([p, np.ones_like(p)], 1)
        reg = prior * np.diag([float(p.var()) + 1e-12, 1e-6])
        a, b = np.linalg.solve(X.T @ X + reg, X.T @ r + reg @ np.array([1.0, 0.0]))
        out[:, k] = a * target[:, k] + b
    return out
