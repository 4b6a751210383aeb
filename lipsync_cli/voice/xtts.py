"""Optional TTS backend: Coqui XTTS v2, which speaks in a voice cloned zero-shot from a few seconds of speech.

Nothing here is installed or downloaded by lipsync: the package comes with `pip install "lipsync-cli[xtts]"`
(coqui-tts) and the weights (about 1.8 GB, under the Coqui Public Model License) are files the user already has,
e.g. a copy of https://huggingface.co/coqui/XTTS-v2, passed as `--tts xtts --tts-model-dir DIR`. Both are checked
before any work, with a one-line error saying what is missing.

XTTS clones the voice itself, so no WORLD conversion follows it. It reports no phone timings: the dub finds the
p/b/m closures by forced alignment of its speech instead.
"""

from __future__ import annotations

import importlib.util
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lipsync_cli import media
from lipsync_cli.audio import resample
from lipsync_cli.errors import LipsyncError

REQUIRED = ("config.json", "model.pth", "vocab.json")  # what Xtts.load_checkpoint(checkpoint_dir=...) reads
SPEAKERS_FILE = "speakers_xtts.pth"  # XTTS's built-in voices: needed only without a reference (--voice tts)
DEFAULT_SPEAKER = "Ana Florence"
OUTPUT_SR = 24000
MAX_REF_S = 30  # XTTS conditions on at most this much reference speech
INSTALL = 'pip install "lipsync-cli[xtts]"'


def check(model_dir: Path | None, need_speakers: bool = False) -> Path:
    """The model folder, after making sure it holds the XTTS v2 files and coqui-tts is installed."""
    expected = ", ".join((*REQUIRED, SPEAKERS_FILE) if need_speakers else REQUIRED)
    if model_dir is None:
        raise LipsyncError(
            f"--tts xtts needs --tts-model-dir DIR: a folder with the XTTS v2 files ({expected}); "
            "they are never downloaded automatically"
        )
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise LipsyncError(f"XTTS model folder {model_dir} does not exist (expected it to hold {expected})")
    missing = [f for f in (*REQUIRED, *([SPEAKERS_FILE] if need_speakers else [])) if not (model_dir / f).is_file()]
    if missing:
        raise LipsyncError(f"XTTS model folder {model_dir} is incomplete: missing {', '.join(missing)}")
    if importlib.util.find_spec("TTS") is None:
        raise LipsyncError(f"--tts xtts needs the coqui-tts package, which is not installed: {INSTALL}")
    return model_dir


@lru_cache(maxsize=1)
def _model(model_dir: str) -> Any:
    """XTTS loaded once, as coqui-tts documents it: XttsConfig.load_json, Xtts.init_from_config, load_checkpoint."""
    import torch
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    config = XttsConfig()
    config.load_json(str(Path(model_dir) / "config.json"))
    model = Xtts.init_from_config(config)
    try:
        model.load_checkpoint(config, checkpoint_dir=model_dir, eval=True, use_deepspeed=False)
    except Exception as e:  # a truncated or mismatched checkpoint: the user's files, not a bug here
        raise LipsyncError(f"could not load XTTS from {model_dir}: {type(e).__name__}: {e}") from e
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _latents(model: Any, reference16k: np.ndarray | None) -> tuple[Any, Any]:
    """(GPT conditioning latent, speaker embedding): from the person's speech, else XTTS's default voice."""
    if reference16k is None:
        speakers = getattr(model, "speaker_manager", None)
        if speakers is None or DEFAULT_SPEAKER not in speakers.speakers:
            raise LipsyncError(f"XTTS without a voice to clone needs {SPEAKERS_FILE} in the model folder")
        return tuple(speakers.speakers[DEFAULT_SPEAKER].values())
    with tempfile.TemporaryDirectory(prefix="lipsync-xtts-") as tmp:
        wav = Path(tmp) / "reference.wav"
        media.write_wav(wav, np.asarray(reference16k, np.float32)[: MAX_REF_S * 16000], 16000)
        return model.get_conditioning_latents(audio_path=[str(wav)], max_ref_length=MAX_REF_S)


def synthesize(
    text: str, model_dir: Path | None, reference16k: np.ndarray | None = None, sr: int = 16000, language: str = "en"
) -> np.ndarray:
    """`text` spoken by XTTS v2 in the voice of `reference16k` (16 kHz speech; None: XTTS's default speaker)."""
    if not text or not text.strip():
        raise LipsyncError("no text to speak")
    folder = check(model_dir, need_speakers=reference16k is None)
    model = _model(str(folder))
    gpt_cond_latent, speaker_embedding = _latents(model, reference16k)
    out = model.inference(text, language, gpt_cond_latent, speaker_embedding, enable_text_splitting=True)
    wav = np.asarray(out["wav"], np.float32).ravel()
    peak = float(np.abs(wav).max()) if len(wav) else 0.0
    if peak < 1e-6:
        raise LipsyncError("XTTS produced silence")
    return resample(wav * (0.9 / peak), OUTPUT_SR, sr).astype(np.float32)
