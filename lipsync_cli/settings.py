"""The one settings object every subcommand receives.

Precedence, lowest first: defaults < config file (`lipsync.toml`, or the file in `LIPSYNC_CONFIG`) <
`LIPSYNC_*` environment variables < command-line flags (applied by the CLI with `Settings.with_overrides`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lipsync_cli.errors import LipsyncError


def config_path() -> Path:
    """The config file in force: `$LIPSYNC_CONFIG`, else `./lipsync.toml`."""
    return Path(os.environ.get("LIPSYNC_CONFIG", "lipsync.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPSYNC_", extra="ignore", validate_assignment=True)

    # shared
    data_dir: Path = Field(Path("data"), description="Root of raw corpora and prepped shards.")
    output_dir: Path = Field(Path("outputs"), description="Checkpoints, logs and reports.")
    shared_dir: Path = Field(
        Path("../shared"), description="Shared test media (media/, speech/, corpus/grid/): `lipsync eval` defaults."
    )
    ffmpeg: str | None = Field(None, description="Path to an ffmpeg binary; default: the one imageio-ffmpeg ships.")
    quiet: bool = Field(False, description="No progress bars or chatter.")
    seed: int = 0

    # dub
    fps: float = Field(25.0, description="Working and output frame rate.")
    face_index: int = Field(0, description="Which face to track: 0 = largest, 1 = second largest, ...")
    sync_mode: Literal["bounce", "loop", "cut"] = "bounce"
    engine: Literal["retrieval", "neural", "seed"] = "retrieval"
    adapt_minutes: float = Field(
        2.0, ge=0, le=120, description="engine neural: minutes of fine-tuning the renderer on the input video's face."
    )
    adapt_steps: int | None = Field(
        None, ge=0, description="engine neural: adapt for exactly this many steps instead (reproducible: eval)."
    )
    lips: Literal["model", "map"] = Field(
        "model",
        description="Speech -> lip shape inside the engine: the learned model (weights/lips.safetensors, adapted to "
        "the video's mouth) or the map fitted on the video alone (also used when the weights are absent).",
    )
    tts: Literal["piper", "espeak", "xtts"] = Field(
        "piper", description="Text-to-speech: piper (bundled), espeak, or xtts (Coqui XTTS v2 from tts_model_dir)."
    )
    voice: Literal["clone", "tts"] = Field(
        "clone", description="clone: speak in the on-screen person's voice (from the video's speech); tts: plain TTS."
    )
    voice_ref: Path | None = Field(None, description="Clone the voice from this recording instead of the video's.")
    voice_fallback: bool = Field(
        False, description="No usable speech to clone from: use the plain TTS voice (with a warning), don't stop."
    )
    tts_model_dir: Path | None = Field(None, description="XTTS v2 model folder (config.json, model.pth, vocab.json).")
    crf: int = Field(18, ge=0, le=51, description="x264 quality of the output (lower is better).")
    smooth: float = Field(1.5, ge=0, description="Temporal smoothing of landmarks, in frames (Gaussian sigma).")

    # data
    grid_source: Literal["zenodo", "sheffield"] = Field("zenodo", description="Where GRID is fetched from.")
    grid_zenodo_url: str = Field(
        "https://zenodo.org/records/3625687/files", description="Where GRID's Zenodo files are (or a mirror)."
    )
    grid_zenodo_api_url: str = Field(
        "https://zenodo.org/api/records/3625687", description="Zenodo record JSON (md5s); empty: sizes only."
    )
    grid_sheffield_url: str = Field(
        "https://spandh.dcs.shef.ac.uk/gridcorpus", description="Sheffield GRID site (or a mirror)."
    )
    download_workers: int = Field(3, ge=1, le=16, description="Parallel downloads.")
    download_retries: int = Field(5, ge=0, description="Retries per download on connection errors and 5xx.")
    download_timeout: float = Field(30.0, gt=0, description="Seconds without data before a retry.")
    prep_size: int = Field(128, ge=32, le=512, description="Side of the aligned lower-face crops prep stores.")
    prep_workers: int = Field(2, ge=1, le=64, description="Processes prep runs in parallel (one per core).")

    # train
    train_precision: Literal["auto", "32", "bf16", "16"] = Field(
        "auto", description="32 | bf16 (autocast) | 16 (CUDA, loss scaling) | auto: bf16 on a CUDA GPU, else 32."
    )
    train_max_steps: int = Field(20000, ge=1, description="Optimiser steps when neither --max-steps nor --max-minutes.")
    train_val_every: int = Field(500, ge=1, description="Validate (and keep best.safetensors) every this many steps.")
    train_save_every: int = Field(500, ge=1, description="Write last.* (resumable) every this many steps.")
    train_log_every: int = Field(20, ge=1, description="Log loss, LR, grad norm and samples/s every this many steps.")
    train_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader workers per process (unset: 4 on a GPU, 0 on CPU)."
    )
    train_grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # later sources lose: init (flags) > env > toml file > defaults
        path = settings_cls.model_config.get("toml_file") or config_path()  # load_settings(config) names one
        toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
        return (init_settings, env_settings, toml)

    def with_overrides(self, **flags: Any) -> Settings:
        """A copy with the command-line flags that were actually given (None means 'not given')."""
        given = {k: v for k, v in flags.items() if v is not None}
        if not given:
            return self
        try:
            return self.model_validate({**self.model_dump(), **given})
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            raise LipsyncError(f"invalid value for {name}: {err['msg']}") from None


def load_settings(config: Path | None = None) -> Settings:
    """Defaults < `config` (None: `config_path()`) < LIPSYNC_* variables: what the CLI starts from, once. Everything
    below the CLI is handed a Settings (or the values it needs) and never reads them again."""
    if config is None:
        return Settings()

    class FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": Path(config)})

    return Settings.model_validate(FromFile().model_dump())
