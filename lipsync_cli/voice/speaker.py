"""Who is speaking: speech-only extraction (VAD) and GE2E speaker embeddings (resemblyzer's encoder, run in
numpy by voice/ge2e.py).

A video's soundtrack is not all speaker: silence, room noise and music would pull both the embedding and the voice
profile away from the person on screen, so everything here looks only at the frames a VAD calls speech.

The encoder's input (40-band mel power spectrogram, 25 ms Hann windows every 10 ms) is computed here in numpy,
to the same numbers as resemblyzer's librosa call: librosa's first use costs 1-6 s of CPU (numba start-up) in every
process, more than all of a dub's embeddings together.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
from scipy.ndimage import binary_closing, binary_opening
from threadpoolctl import threadpool_limits

from lipsync_cli.audio import SR
from lipsync_cli.errors import LipsyncError
from lipsync_cli.voice import ge2e

VAD_FRAME = 480  # 30 ms at 16 kHz, one of the three sizes webrtcvad accepts
MIN_SPEECH_S = 1.0  # below this, GE2E embeddings and F0 statistics are noise
MEL_WINDOW, MEL_HOP, MEL_BANDS = 400, ge2e.FRAME_SAMPLES, 40  # resemblyzer's params.py: 25 ms, 10 ms, 40 mel channels
LEVEL_DBFS = -30  # resemblyzer's audio_norm_target_dBFS: each utterance is scaled to this RMS before embedding


def _webrtc_flags(pcm: np.ndarray, aggressiveness: int) -> np.ndarray:
    with warnings.catch_warnings():  # webrtcvad imports pkg_resources and warns about it
        warnings.simplefilter("ignore")
        import webrtcvad
    vad = webrtcvad.Vad(aggressiveness)
    n = len(pcm) // VAD_FRAME
    return np.array([vad.is_speech(pcm[i * VAD_FRAME : (i + 1) * VAD_FRAME].tobytes(), SR) for i in range(n)], bool)


def speech_mask(audio16k: np.ndarray, aggressiveness: int = 3, floor_db: float = 35.0) -> np.ndarray:
    """Per-sample bool mask of speech: webrtcvad AND an energy gate, smoothed.

    webrtcvad alone happily calls steady room noise "speech", so a frame must also be within `floor_db` of the
    recording's loud frames and clearly above its noise floor. Blips shorter than 90 ms are dropped, gaps shorter
    than 150 ms inside speech are filled (plosive closures and short pauses are still the speaker).
    """
    x = np.asarray(audio16k, np.float32).ravel()
    n = len(x) // VAD_FRAME
    mask = np.zeros(len(x), bool)
    if n == 0:
        return mask
    frames = x[: n * VAD_FRAME].reshape(n, VAD_FRAME)
    db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    peak = np.percentile(db, 95)
    if peak < -70:  # digital silence
        return mask
    floor = np.percentile(db, 10)
    loud = (db > peak - floor_db) & (db > floor + 6.0)
    pcm = (np.clip(frames.ravel(), -1, 1) * 32767).astype(np.int16)
    flags = _webrtc_flags(pcm, aggressiveness) & loud
    flags = binary_closing(np.pad(flags, 5), np.ones(5, bool))[5:-5]  # fill gaps < 150 ms
    flags = binary_opening(flags, np.ones(3, bool))  # drop blips < 90 ms
    mask[: n * VAD_FRAME] = np.repeat(flags, VAD_FRAME)
    return mask


def speech_only(audio16k: np.ndarray, min_seconds: float = MIN_SPEECH_S) -> np.ndarray:
    """The speech segments of a recording, concatenated; LipsyncError when under `min_seconds` of it."""
    x = np.asarray(audio16k, np.float32).ravel()
    speech = x[speech_mask(x)]
    if len(speech) < min_seconds * SR:
        raise LipsyncError(
            f"no usable speech in the reference audio ({len(speech) / SR:.1f} s found, need {min_seconds:.0f} s): "
            "use a video where the person talks, or pass a reference recording of their voice"
        )
    return speech


_F_SP, _MIN_LOG_HZ, _LOGSTEP = 200.0 / 3, 1000.0, np.log(6.4) / 27.0  # Slaney's mel scale, as librosa's default


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (librosa.hz_to_mel's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    log_part = _MIN_LOG_HZ / _F_SP + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f < _MIN_LOG_HZ, f / _F_SP, log_part)


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """(40, 201) mel filterbank as librosa.filters.mel(sr=16000, n_fft=400, n_mels=40) makes it: Slaney's mel scale
    and area-normalised triangles."""
    min_log_mel = _MIN_LOG_HZ / _F_SP
    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), MEL_BANDS + 2)
    hz = np.where(mels >= min_log_mel, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - min_log_mel)), _F_SP * mels)
    ramps = hz[:, None] - np.fft.rfftfreq(MEL_WINDOW, 1 / SR)[None, :]
    fdiff = np.diff(hz)
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return (weights * (2.0 / (hz[2:] - hz[:-2]))[:, None]).astype(np.float32)


def power_frames(x: np.ndarray) -> np.ndarray:
    """(frames, 201) power STFT of resemblyzer's front end (librosa.stft with a periodic Hann window, centred
    frames, zero padding), without importing librosa."""
    x = np.pad(np.asarray(x, np.float32), MEL_WINDOW // 2)
    n = 1 + (len(x) - MEL_WINDOW) // MEL_HOP
    frames = np.lib.stride_tricks.as_strided(x, (n, MEL_WINDOW), (x.strides[0] * MEL_HOP, x.strides[0]))
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(MEL_WINDOW) / MEL_WINDOW)).astype(np.float32)
    return (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).astype(np.float32)


def mel_frames(x: np.ndarray) -> np.ndarray:
    """(frames, 40) mel power spectrogram: resemblyzer's wav_to_mel_spectrogram."""
    return (power_frames(x) @ mel_filters().T).astype(np.float32)


def speaker_embedding(audio16k: np.ndarray, vad: bool = True) -> np.ndarray:
    """L2-normalised 256-d GE2E embedding of the voice in `audio16k` (its speech frames only when `vad`).

    As resemblyzer's embed_utterance: 1.6 s partial windows at 1.3 per second, embedded and averaged."""
    x = speech_only(audio16k) if vad else np.asarray(audio16k, np.float32).ravel()
    if len(x) < MIN_SPEECH_S * SR:
        raise LipsyncError("no usable speech in the reference audio (under 1 s)")
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    x = np.clip(x * (10 ** (LEVEL_DBFS / 20) / max(rms, 1e-6)), -1, 1)  # resemblyzer's loudness normalisation
    parts = ge2e.partial_slices(len(x))
    mel = mel_frames(np.pad(x, (0, max(0, parts[-1].stop * MEL_HOP - len(x)))))
    with one_thread():
        emb = ge2e.forward(ge2e.load(), np.stack([mel[s] for s in parts])).mean(0)
    return (emb / (np.linalg.norm(emb) + 1e-12)).astype(np.float32)


@contextmanager
def one_thread():
    """BLAS on one thread while the encoder runs: it multiplies small matrices, 480 in a row, too little work to
    share, and on a busy machine threads that wait for each other cost many times the CPU time (with torch's
    encoder: shaping 0.7 s vs 16 s of CPU)."""
    with threadpool_limits(1, user_api="blas"):
        yield


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (GE2E: same speaker ~0.8+, different ~0.5-0.7)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
