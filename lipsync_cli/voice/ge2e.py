"""The GE2E speaker encoder (resemblyzer's: weights in its wheel, nothing downloads) in numpy, forward and backward.

resemblyzer ships the encoder as a torch module; importing torch and resemblyzer and loading it cost the dub's
voice process 1.6 s of CPU and 215 MB of memory, for a network this small: a 3-layer LSTM (40 mel bands -> 256)
whose last hidden state goes through a linear layer, a ReLU and an L2 norm. Here it is in numpy: `forward` embeds a
batch of 160-frame partial utterances, `backward` takes a gradient on the embeddings back to the mel frames (the
voice conversion's shaping gain is fitted by gradient ascent through it). tests/test_voice_convert.py holds both to
torch's to 1e-5. numpy's LSTM is ~2x slower than torch's fused one (60 vs 30 ms for 5 partials), which costs a dub
~0.5 s of the 1.6 s.

The weights are read from resemblyzer's `pretrained.pt` (torch's legacy pickle format) by an unpickler that builds
only dicts and float tensors: any other object in the file is refused, so nothing in it can run code.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lipsync_cli.audio import SR

HIDDEN, LAYERS = 256, 3  # resemblyzer's hparams: model_hidden_size, model_num_layers
PARTIAL_FRAMES = 160  # a partial utterance: 1.6 s of 10 ms mel frames
FRAME_SAMPLES = SR // 100  # one 10 ms mel frame
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first value of a torch file in the legacy (non-zip) format


@dataclass
class Encoder:
    """The encoder's weights: per LSTM layer the input and recurrent matrices (4H, in) / (4H, H), gates in torch's
    order (input, forget, cell, output), and the two biases summed; then the linear layer."""

    w_ih: list[np.ndarray]
    w_hh: list[np.ndarray]
    bias: list[np.ndarray]
    linear_w: np.ndarray
    linear_b: np.ndarray


class _Tensor:
    """A tensor named in the pickle, built once its storage has been read (storages follow the pickle)."""

    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple, *_):
        self.key, self.offset, self.size = storage[0], int(offset), tuple(int(k) for k in size)
        if tuple(stride) != tuple(int(np.prod(self.size[i + 1 :])) for i in range(len(self.size))):
            raise pickle.UnpicklingError("a tensor that is not contiguous in a weights file")

    def build(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        s = storages[self.key]
        n = int(np.prod(self.size))
        if self.offset < 0 or self.offset + n > len(s):
            raise pickle.UnpicklingError("a tensor reaches past its storage in a weights file")
        return s[self.offset : self.offset + n].reshape(self.size).astype(np.float32)  # a copy, native order


class _Unpickler(pickle.Unpickler):
    """Legacy torch checkpoints, data only: OrderedDicts and float tensors; any other class is an error."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
        ("torch", "FloatStorage"): "float32",
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file") from None

    def persistent_load(self, pid):
        kind, dtype, key = pid[:3]
        if kind != "storage" or dtype != "float32":
            raise pickle.UnpicklingError(f"unexpected storage {pid[:2]} in a weights file")
        return (key,)


def read_checkpoint(path: Path) -> dict:
    """The object saved in a legacy-format torch file (magic, version, system info, the pickle, its storage keys,
    then each storage as an int64 count and its little-endian float32 values), tensors as numpy arrays."""
    with open(path, "rb") as f:
        if _Unpickler(f).load() != LEGACY_MAGIC:
            raise pickle.UnpicklingError(f"{path} is not a torch file in the legacy format")
        for _ in range(2):  # protocol version, system info: plain values
            _Unpickler(f).load()
        obj = _Unpickler(f).load()
        storages = {}
        for key in _Unpickler(f).load():
            head = f.read(8)
            n = int.from_bytes(head, "little", signed=True) if len(head) == 8 else -1
            data = f.read(4 * n) if n >= 0 else b""
            if n < 0 or len(data) != 4 * n:
                raise pickle.UnpicklingError(f"{path} is truncated")
            storages[key] = np.frombuffer(data, "<f4")

    def build(o):
        if isinstance(o, _Tensor):
            return o.build(storages)
        if isinstance(o, dict):
            return {k: build(v) for k, v in o.items()}
        return o

    return build(obj)


def weights_path() -> Path:
    """resemblyzer's pretrained.pt, found without importing resemblyzer (which imports torch)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise ImportError("resemblyzer is not installed (its wheel holds the speaker encoder's weights)")
    return Path(spec.origin).parent / "pretrained.pt"


@lru_cache(maxsize=1)
def load() -> Encoder:
    """The encoder, read once per process (~20 ms)."""
    state = read_checkpoint(weights_path())["model_state"]
    return Encoder(
        w_ih=[state[f"lstm.weight_ih_l{k}"] for k in range(LAYERS)],
        w_hh=[state[f"lstm.weight_hh_l{k}"] for k in range(LAYERS)],
        bias=[state[f"lstm.bias_ih_l{k}"] + state[f"lstm.bias_hh_l{k}"] for k in range(LAYERS)],
        linear_w=state["linear.weight"],
        linear_b=state["linear.bias"],
    )


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[slice]:
    """Mel-frame slices of the 1.6 s partial utterances an utterance of `n_samples` is embedded from, `rate` per
    second, as resemblyzer's embed_utterance cuts them: the last is kept when at least `min_coverage` of it lies
    in the audio (the mel frames are zero-padded up to it), and there is always at least one."""
    n_frames = int(np.ceil((n_samples + 1) / FRAME_SAMPLES))
    step = int(np.round(SR / rate / FRAME_SAMPLES))
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * FRAME_SAMPLES) / (PARTIAL_FRAMES * FRAME_SAMPLES)
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()
    return [slice(a, a + PARTIAL_FRAMES) for a in starts]


# torch's gate order is input, forget, cell, output; sigmoid(z) = (1 + tanh(z / 2)) / 2, so with the sigmoid gates'
# weights halved one tanh over all four gates serves them all
_HALF = np.repeat(np.array([0.5, 0.5, 1.0, 0.5], np.float32), HIDDEN)[:, None]
_SHIFT = np.repeat(np.array([0.5, 0.5, 0.0, 0.5], np.float32), HIDDEN)[:, None]
# Partials run through the LSTM in pairs, as columns: OpenBLAS multiplies a (1024, 256) matrix by a (256, 2) one in
# 18 us and by a (256, 5) one in 90 us (this machine), and the recurrence is 480 such products in a row
PAIR = 2
# the same, one column per partial of a pair: broadcasting a column inside the step loop made numpy iterate 2
# elements at a time (36 us of elementwise work a step instead of 16)
_HALF_PAIR, _SHIFT_PAIR = (np.ascontiguousarray(np.repeat(a, PAIR, 1)) for a in (_HALF, _SHIFT))


def forward(enc: Encoder, mels: np.ndarray, keep: bool = False):
    """(B, 256) L2-normalised embeddings of `mels` (B, T, 40), and with `keep` what `backward` needs."""
    mels = np.asarray(mels, np.float32)
    B, T, n = mels.shape
    pairs = np.concatenate([mels, np.zeros(((-B) % PAIR, T, n), np.float32)]).reshape(-1, PAIR, T, n)
    x = np.ascontiguousarray(pairs.transpose(2, 0, 3, 1))  # (T, pairs, 40, 2)
    saved = []
    for w_ih, w_hh, bias in zip(enc.w_ih, enc.w_hh, enc.bias, strict=True):
        x, cs, gates = _layer(x, w_ih, w_hh, bias, keep)
        saved.append((cs, gates))
    last = x[-1].transpose(0, 2, 1).reshape(-1, HIDDEN)[:B]  # each partial's final hidden state, (B, 256)
    raw = last @ enc.linear_w.T + enc.linear_b
    relu = np.maximum(raw, 0)
    norm = np.linalg.norm(relu, axis=1, keepdims=True)
    emb = relu / norm
    return (emb, (saved, raw, norm, emb)) if keep else emb


def _layer(x: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray, bias: np.ndarray, keep: bool):
    """One LSTM layer over inputs x (T, pairs, in, 2): its hidden states, cell states (T, pairs, 256, 2) and, with
    `keep`, its gates (T, pairs, 1024, 2; else one step's)."""
    T, P, _, k = x.shape
    zx = np.matmul(w_ih * _HALF, x) + bias[:, None] * _HALF  # the input's part of every gate, all steps at once
    w = np.ascontiguousarray(w_hh * _HALF)
    gates = np.empty((T if keep else 1, P, 4 * HIDDEN, k), np.float32)
    hs, cs = np.empty((T, P, HIDDEN, k), np.float32), np.empty((T, P, HIDDEN, k), np.float32)
    h, c = np.zeros((P, HIDDEN, k), np.float32), np.zeros((P, HIDDEN, k), np.float32)
    z = np.empty((P, 4 * HIDDEN, k), np.float32)
    for t in range(T):
        np.matmul(w, h, out=z)
        z += zx[t]
        np.tanh(z, out=z)
        a = gates[t if keep else 0]
        np.multiply(z, _HALF_PAIR, out=a)
        a += _SHIFT_PAIR
        c = a[:, HIDDEN : 2 * HIDDEN] * c + a[:, :HIDDEN] * a[:, 2 * HIDDEN : 3 * HIDDEN]
        cs[t] = c
        h = hs[t]
        np.tanh(c, out=h)
        h *= a[:, 3 * HIDDEN :]
    return hs, cs, gates


def backward(enc: Encoder, kept, d_emb: np.ndarray) -> np.ndarray:
    """Gradient on the mel frames (B, T, 40) of a loss whose gradient on `forward`'s embeddings is `d_emb` (B, 256)."""
    saved, raw, norm, emb = kept
    B, H = len(emb), HIDDEN
    d_relu = (d_emb - emb * np.sum(d_emb * emb, axis=1, keepdims=True)) / norm
    d_last = (d_relu * (raw > 0)) @ enc.linear_w  # on each partial's final hidden state
    T, P, _, k = saved[0][0].shape
    d_out = np.zeros((T, P, H, k), np.float32)
    d_out[-1] = np.concatenate([d_last, np.zeros((P * k - B, H), np.float32)]).reshape(P, k, H).transpose(0, 2, 1)
    for layer in reversed(range(LAYERS)):
        cs, gates = saved[layer]
        tc = np.tanh(cs)
        slope = gates * (1 - gates)  # the sigmoid gates' derivative; the cell gate's (tanh) is 1 - g^2
        slope[:, :, 2 * H : 3 * H] = 1 - gates[:, :, 2 * H : 3 * H] ** 2
        through = gates[:, :, 3 * H :] * (1 - tc * tc)  # dc/dh within a step
        c_prev = np.concatenate([np.zeros_like(cs[:1]), cs[:-1]])
        d_z = np.empty_like(gates)
        w_hh_t = np.ascontiguousarray(enc.w_hh[layer].T)
        dh_next, dc_next = np.zeros_like(cs[0]), np.zeros_like(cs[0])
        for t in reversed(range(T)):
            a, dz = gates[t], d_z[t]
            dh = d_out[t] + dh_next
            dc = dc_next + dh * through[t]
            np.multiply(dc, a[:, 2 * H : 3 * H], out=dz[:, :H])
            np.multiply(dc, c_prev[t], out=dz[:, H : 2 * H])
            np.multiply(dc, a[:, :H], out=dz[:, 2 * H : 3 * H])
            np.multiply(dh, tc[t], out=dz[:, 3 * H :])
            dz *= slope[t]
            dh_next, dc_next = np.matmul(w_hh_t, dz), dc * a[:, H : 2 * H]
        d_out = np.matmul(enc.w_ih[layer].T, d_z)  # onto the layer's input: the layer below's outputs, or the mels
    return d_out.transpose(1, 3, 0, 2).reshape(-1, T, d_out.shape[2])[:B]
