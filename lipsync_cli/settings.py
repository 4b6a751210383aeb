"""The one settings object every subcommand receives.

Precedence, lowest first: defaults < config file (`lipsync.toml`, or the file in `LIPSYNC_CONFIG`) <
`LIPSYNC_*` environment variables < command-line flags (applied by the CLI with `Settings.with_overrides`).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lipsync_cli.errors import LipsyncError

Engine = Literal["retrieval", "neural", "seed"]
SyncMode = Literal["bounce", "loop", "cut"]
Tts = Literal["piper", "espeak", "xtts"]
Voice = Literal["clone", "tts"]
Hear = Literal["words", "phones"]
Precision = Literal["auto", "32", "bf16", "16"]
# prep's crop sides: 96 is the least at which every model's mouth box (sync 72x48 of 0.75x0.5 of the crop, render
# 64 px of 0.75) is cut without upsampling, 256 the crop the engines paint on; other sizes only cost disk or blur
PrepSize = Literal[96, 128, 256]
PREP_SIZES: tuple[int, ...] = get_args(PrepSize)


def config_path() -> Path:
    """The config file in force: `$LIPSYNC_CONFIG`, else `./lipsync.toml`."""
    return Path(os.environ.get("LIPSYNC_CONFIG") or "lipsync.toml")  # set but empty: unset, as shells mean it


def check_config_file(path: Path, required: bool, origin: str = "") -> None:
    """A config file named by --config or LIPSYNC_CONFIG must exist and be a regular file (pydantic-settings would
    silently skip a folder, and reading a FIFO would hang); the implicit ./lipsync.toml may be absent."""
    where = f" (from {origin})" if origin else ""
    if path.is_file() or (not required and not path.exists()):
        return
    if not path.exists():
        raise LipsyncError(f"config file not found: {path}{where}")
    kind = "a folder" if path.is_dir() else "not a regular file"
    raise LipsyncError(f"config file is {kind}: {path}{where}")


def unreadable(path: Path, e: Exception) -> LipsyncError:
    """An I/O or encoding failure reading a config file, as one line naming it."""
    why = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e)
    return LipsyncError(f"cannot read config file {path}: {why}")


def check_names(names: list[str], where: str) -> None:
    """Unknown setting names are errors naming the nearest valid one (a typo must not be silently ignored)."""
    valid = list(Settings.model_fields)
    for name in names:
        if name not in Settings.model_fields:
            near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else "; see `lipsync config show`"
            raise LipsyncError(f"unknown setting {name!r} in {where}{hint}")


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, checked for unknown names and TOML syntax."""
    path = Path(path)
    check_config_file(path, required=True)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LipsyncError(f"cannot read config file {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, e) from None
    check_names(list(data), str(path))
    return data


def validation_message(e: ValidationError, where: str = "") -> str:
    """pydantic's report as one line naming the field: `invalid setting crf (from lipsync.toml): ...`."""
    err = e.errors()[0]
    name = ".".join(str(p) for p in err["loc"]) or "settings"
    given = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"invalid setting {name}{f' (from {where})' if where else ''}: {err['msg']}{given}{more}"


def plain(value: Any) -> str:
    """A setting's value as a user writes it (no Python reprs): paths as text, None as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of a setting with fixed choices."""
    ann = Settings.model_fields[name].annotation
    return tuple(a for a in get_args(ann) if isinstance(a, str))


def default(name: str) -> Any:
    return Settings.model_fields[name].default


_implicit: ContextVar[bool] = ContextVar("lipsync_settings_implicit", default=True)


class _CheckedToml(TomlConfigSettingsSource):
    """The config file, with unknown names refused instead of ignored."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path):
        super().__init__(settings_cls, toml_file=toml_file)
        self.path = Path(toml_file)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        check_names(list(data), str(self.path))
        return data


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
    seed: int = Field(0, ge=0, description="Random seed for training, evaluation and the neural engine's adaptation.")

    # dub
    # fps: every frame count, window and sample step is derived from it; past ~120 the speech features (100 per
    # second) have nothing new to give and the frames of a clip stop fitting in memory
    fps: float = Field(
        25.0,
        ge=1,
        le=120,
        allow_inf_nan=False,
        description="Frame rate the face models work at (the output keeps the input's own).",
    )
    face_index: int = Field(0, ge=0, description="Which face to track: 0 = largest, 1 = second largest, ...")
    sync_mode: SyncMode = Field(
        "bounce", description="Speech longer than the video: bounce (play it back and forth), loop, or cut the speech."
    )
    engine: Engine = Field(
        "retrieval", description="Mouth engine: retrieval (the person's own mouths), neural (renderer) or seed."
    )
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
    hear: Hear = Field(
        "words",
        description="--audio without --transcript: recognise English words and align them (natural English "
        "speech), or bare phones (another language, word lists): what times the p/b/m and vowels.",
    )
    tts: Tts = Field(
        "piper", description="Text-to-speech: piper (bundled), espeak, or xtts (Coqui XTTS v2 from tts_model_dir)."
    )
    voice: Voice = Field(
        "clone", description="clone: speak in the on-screen person's voice (from the video's speech); tts: plain TTS."
    )
    voice_ref: Path | None = Field(None, description="Clone the voice from this recording instead of the video's.")
    voice_fallback: bool = Field(
        False, description="No usable speech to clone from: use the plain TTS voice (with a warning), don't stop."
    )
    tts_model_dir: Path | None = Field(None, description="XTTS v2 model folder (config.json, model.pth, vocab.json).")
    crf: int = Field(18, ge=0, le=51, description="x264 quality of the output (lower is better).")
    # sigma in frames: a second's worth (25) already flattens speech; beyond it the kernel only costs memory
    smooth: float = Field(
        1.5,
        ge=0,
        le=25,
        allow_inf_nan=False,
        description="Temporal smoothing of landmarks, in frames (Gaussian sigma).",
    )

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
    download_timeout: float = Field(30.0, gt=0, allow_inf_nan=False, description="Seconds without data before a retry.")
    prep_size: int = Field(128, description="Side of the aligned lower-face crops prep stores: 96, 128 or 256.")
    prep_workers: int = Field(2, ge=1, le=64, description="Processes prep runs in parallel (one per core).")

    # train
    train_precision: Precision = Field(
        "auto", description="32 | bf16 (autocast) | 16 (CUDA, loss scaling) | auto: bf16 on a CUDA GPU, else 32."
    )
    train_max_steps: int = Field(20000, ge=1, description="Optimiser steps when neither --max-steps nor --max-minutes.")
    train_val_every: int = Field(500, ge=1, description="Validate (and keep best.safetensors) every this many steps.")
    train_save_every: int = Field(500, ge=1, description="Write last.* (resumable) every this many steps.")
    train_log_every: int = Field(20, ge=1, description="Log loss, LR, grad norm and samples/s every this many steps.")
    train_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader workers per process (unset: 4 on a GPU, 0 on CPU)."
    )
    train_grad_clip: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Clip the global gradient norm to this (0: off)."
    )

    @field_validator("prep_size")
    @classmethod
    def _prep_size(cls, v: int) -> int:
        # an int checked here, not a Literal: the environment and TOML give "128" as text, which Literal refuses
        if v not in PREP_SIZES:
            raise ValueError(f"Input should be {', '.join(map(str, PREP_SIZES[:-1]))} or {PREP_SIZES[-1]}")
        return v

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
        if not _implicit.get():  # Settings.load / with_overrides: only what was passed
            return (init_settings,)
        path = settings_cls.model_config.get("toml_file") or config_path()  # load_settings(config) names one
        toml = _CheckedToml(settings_cls, toml_file=path)
        return (init_settings, env_settings, toml)

    def with_overrides(self, **flags: Any) -> Settings:
        """A copy with the command-line flags that were actually given (None means 'not given')."""
        given = {k: v for k, v in flags.items() if v is not None}
        if not given:
            return self
        check_names(list(given), "the arguments")
        return _explicit({**self.model_dump(), **given}, "")

    @classmethod
    def load(cls, config: str | Path | None = None, env: bool = False, **values: Any) -> Settings:
        """Settings from the defaults, the TOML file `config` (only when given), the LIPSYNC_* environment (only
        when `env`) and `values`, in that order of precedence. The Python API's way: nothing implicit."""
        data = read_config(Path(config)) if config is not None else {}
        if env:
            data |= EnvSettingsSource(cls, env_prefix="LIPSYNC_")()
        check_names(list(values), "the arguments")
        return _explicit(data, str(config or "")).with_overrides(**values)


def _explicit(values: dict[str, Any], where: str) -> Settings:
    """Settings from these values and the defaults only (no config file, no environment)."""
    token = _implicit.set(False)
    try:
        return Settings(**values)
    except ValidationError as e:
        raise LipsyncError(validation_message(e, where)) from None
    finally:
        _implicit.reset(token)


def load_settings(config: Path | None = None) -> Settings:
    """Defaults < `config` (None: `config_path()`) < LIPSYNC_* variables: what the CLI starts from, once. Everything
    below the CLI is handed a Settings (or the values it needs) and never reads them again. Unknown names and bad
    values are a LipsyncError naming them."""
    where = Path(config) if config is not None else config_path()
    from_env = config is None and bool(os.environ.get("LIPSYNC_CONFIG"))
    check_config_file(where, required=config is not None or from_env, origin="LIPSYNC_CONFIG" if from_env else "")
    try:
        if config is None:
            return Settings()

        class FromFile(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": Path(config)})

        return _explicit(FromFile().model_dump(), str(where))
    except tomllib.TOMLDecodeError as e:
        raise LipsyncError(f"cannot read config file {where}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(where, e) from None
    except ValidationError as e:
        raise LipsyncError(validation_message(e, f"{where} or the LIPSYNC_* environment")) from None
