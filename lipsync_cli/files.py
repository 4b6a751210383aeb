"""The file kinds lipsync reads, and the one way it writes: atomically.

A reader never sees half a file: every output (videos, wavs, shards, manifests, checkpoints, markers) is written
to a hidden temp name in the same folder and renamed over its target only once complete; a failure leaves the
target as it was and no temp file behind.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

VIDEO_EXT = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".m4v")  # video files we look for in folders
SPEECH_EXT = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac")  # speech files we look for in folders


class atomic:  # noqa: N801 - used like open()
    """`with atomic(path) as tmp:` write tmp (hidden, same directory); it replaces `path` only on success.
    Long-lived writers call commit() / discard() themselves."""

    def __init__(self, path: Path, suffix: str = ""):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a fresh name rather than mkstemp: the writer creates it, so it gets the umask's mode, not 0600
        self.path, self.tmp = path, path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")

    def __enter__(self) -> Path:
        return self.tmp

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """`obj` as JSON at `path`, atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))
