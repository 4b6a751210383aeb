"""The file kinds lipsync reads, and the one way it writes: atomically.

A reader never sees half a file: every output (videos, wavs, shards, manifests, checkpoints, markers) is written
to a hidden temp name in the same folder and renamed over its target only once complete; a failure leaves the
target as it was and no temp file behind. Temp names carry the writer's pid, so what a killed run left (no
`finally` runs on SIGKILL) is recognised and swept at the next start (`sweep_stale`).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from lipsync_cli.errors import LipsyncError

VIDEO_EXT = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".m4v")  # video files we look for in folders
SPEECH_EXT = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac")  # speech files we look for in folders


TEMP_TAG = "lipsync"  # every temp name we create carries f"{TEMP_TAG}-{pid}-": how sweep_stale knows its own
# the whole name, as temp_name makes it: a hidden ".NAME.lipsync-PID-HEX.tmp[.ext]" / "....video.mp4" file beside
# an output, or a "lipsync-PID-HEX-xxxxxxxx" temp folder (TemporaryDirectory's prefix); a user's "talk
# lipsync-20241207-20241207.mp4" is none of these
_STALE_FILE = re.compile(rf"\..+\.{TEMP_TAG}-(\d+)-[0-9a-f]{{8}}(?:\.tmp(?:\.\w+)?|\.video\.mp4)")
_STALE_DIR = re.compile(rf"{TEMP_TAG}-(\d+)-[0-9a-f]{{8}}-\w+")


def check_name(label: str, value: str) -> None:
    """A user-given name that becomes a folder (a corpus, a speaker, a training run): letters, digits, '-' and '_'
    only, so that it can never climb out of its parent ('..', '/') or hide ('.x')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
        raise LipsyncError(f"{label} {value!r}: use letters, digits, '-' and '_' (it becomes a folder name)")


def temp_name(stem: str = "", suffix: str = "") -> str:
    """A fresh temp name that says which process made it (see sweep_stale)."""
    return f"{stem}{TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _ours(folder: str | Path) -> list[tuple[os.DirEntry, int, bool]]:
    """The entries of `folder` named as temp_name names them: (entry, the pid in its name, is a folder)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for e in entries:
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            continue
        m = (_STALE_DIR if is_dir else _STALE_FILE).fullmatch(e.name)
        if m is not None:
            found.append((e, int(m.group(1)), is_dir))
    return found


def _remove(e: os.DirEntry, folder: bool) -> int:
    try:
        shutil.rmtree(e.path, ignore_errors=True) if folder else os.unlink(e.path)
        return 1
    except OSError:
        return 0


def sweep_stale(folder: str | Path, min_age_s: float = 60.0) -> int:
    """Delete what a killed run left in `folder`: only names we make (temp_name), only when the process that made
    them is gone and they are older than `min_age_s` (a pid from another host or container sharing the folder could
    look dead: the age keeps a live run's fresh files safe). Returns how many entries were removed."""
    removed, now = 0, time.time()
    for e, pid, is_dir in _ours(folder):
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if now - e.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
        except OSError:
            continue
        removed += _remove(e, is_dir)
    return removed


def exists_error(path: Path) -> LipsyncError:
    """The one message for an output that is there already (the CLI's flag and the Python API's keyword)."""
    return LipsyncError(f"{path} exists; use --force (force=True in Python) to overwrite it")


def remove_temps_of(folder: str | Path, pids: set[int]) -> int:
    """Delete the temp files (temp_name) that the processes `pids` left in `folder`: children this process has just
    killed, so no age or liveness rule is needed. Returns how many were removed."""
    return sum(_remove(e, False) for e, pid, is_dir in _ours(folder) if pid in pids and not is_dir)


class atomic:  # noqa: N801 - used like open()
    """`with atomic(path) as tmp:` write tmp (hidden, same folder); it becomes `path` only on success, and a failure
    leaves no temp file. Long-lived writers call commit() / discard() themselves.

    The temp file is created at once (exclusively), so an unwritable folder is found before any work is done.
    Without `force` the publish is a hard link, which fails if `path` exists by then: of two runs racing for one
    output exactly one wins, and nothing is ever overwritten (no check-then-rename window).
    """

    def __init__(self, path: Path, suffix: str = "", force: bool = True):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.force = path, force
        self.tmp = path.with_name(temp_name(f".{path.name}.", f".tmp{suffix}"))
        try:  # 0o666 & ~umask, as the writer would make it (mkstemp: 0600)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise LipsyncError(f"cannot write to {path.parent}: {e.strerror or e}") from None

    def __enter__(self) -> Path:
        return self.tmp

    def commit(self) -> None:
        if self.force:
            if self.path.is_dir():
                raise LipsyncError(f"{self.path} is a folder; give a file name")
            os.replace(self.tmp, self.path)
            return
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise exists_error(self.path) from None
        except OSError:  # no hard links on this file system: claim the name exclusively, then fill it
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                raise exists_error(self.path) from None
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


def json_safe(v):
    """`v` in plain JSON types: NaN/inf -> null (strict JSON has no NaN: jq and browsers refuse it), numpy arrays
    and scalars -> python, tuples -> lists, keys -> text."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if hasattr(v, "tolist"):  # numpy: an array becomes a list, a scalar a python number
        return json_safe(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """`obj` as JSON at `path`, atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))
