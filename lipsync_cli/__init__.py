"""lipsync: re-animate a talking face to new speech, offline, on a CPU.

    import lipsync_cli as lipsync
    result = lipsync.dub("in.mp4", "Hello there.", output="out.mp4", voice="clone", engine="retrieval")

`dub`, `speak` and `Dubber` live in lipsync_cli.api; they are imported on first use, so `lipsync --version` and
`import lipsync_cli` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DubResult", "Dubber", "LipsyncError", "Settings", "SpeechResult", "__version__", "dub", "speak"]

if TYPE_CHECKING:
    from lipsync_cli.api import Dubber, dub, speak
    from lipsync_cli.dubbing import DubResult
    from lipsync_cli.errors import LipsyncError
    from lipsync_cli.settings import Settings
    from lipsync_cli.voice.speech import SpeechResult

_WHERE = {
    "dub": "api", "speak": "api", "Dubber": "api", "DubResult": "dubbing", "SpeechResult": "voice.speech",
    "LipsyncError": "errors", "Settings": "settings",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"lipsync_cli.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lipsync_cli' has no attribute {name!r}")
