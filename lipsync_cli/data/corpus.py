"""What corpora are on disk (`lipsync data list`): one row per speaker of every corpus under data/raw.

Probing tens of thousands of clips for their duration would take minutes, so this only counts files: hours
come from a sidecar `meta.json` when one exists (`{"seconds": total}` or `{"clip_seconds": s}`, in a speaker's
folder or the corpus's), else from GRID's fixed 3.0 s sentences, else stay unknown (None).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from rich.filesize import decimal
from rich.table import Table

from lipsync_cli.files import VIDEO_EXT

AUDIO_EXT = {".wav", ".flac"}
KIND = {ext: "video" for ext in VIDEO_EXT} | {ext: "audio" for ext in AUDIO_EXT} | {".align": "align"}
CLIP_SECONDS = {"grid": 3.0}
# corpora whose licence lets weights trained on them ship with lipsync (anything else, e.g. the imported `shared`
# clips, may serve evaluation and per-video adaptation only)
REDISTRIBUTABLE = {
    "grid": "CC BY 4.0: GRID audio-visual corpus, Cooke, Barker, Cunningham & Shao, JASA 120(5), 2006 "
    "(Zenodo record 3625687)",
}


def training_data(speakers: list[str]) -> dict:
    """What a checkpoint records of its training data: `corpus/speaker` names -> speakers, corpora, licences."""
    corpora = sorted({s.split("/", 1)[0] for s in speakers})
    licences = {c: REDISTRIBUTABLE.get(c, "not redistributable") for c in corpora}
    return {"speakers": sorted(speakers), "corpora": corpora, "licences": licences}


class CorpusRow(NamedTuple):
    corpus: str
    speaker: str
    clips: int
    hours: float | None
    bytes: int


def corpus_summary(root: Path, notes: list[str] | None = None) -> list[CorpusRow]:
    """Rows (corpus, speaker, clips, hours, bytes) for each `root/<corpus>/<speaker>/` holding files.

    Clips are distinct file stems of the videos (else the audio, else `.align` files) under a speaker's
    folder; hidden entries (`.done`, `.downloads/`, half-unpacked `.unpack-*`) are ignored. What cannot be read (a
    dangling link, a meta.json whose seconds are no number) is left out, with a line in `notes` saying so.
    """
    root = Path(root)
    rows: list[CorpusRow] = []
    notes = [] if notes is None else notes
    if not root.is_dir():
        return rows
    for corpus in _visible_dirs(root):
        corpus_meta = _meta(corpus)
        for speaker in _visible_dirs(corpus):
            clips, size, unreadable = _scan(speaker)
            if unreadable:
                more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
                notes.append(f"{unreadable[0]}: cannot read it (a dangling link?), not counted{more}")
            if not size:
                continue
            meta = _meta(speaker)
            default = _seconds(corpus_meta, "clip_seconds", corpus / "meta.json", notes)
            if default is None:
                default = CLIP_SECONDS.get(corpus.name)
            per_clip = _seconds(meta, "clip_seconds", speaker / "meta.json", notes)
            per_clip = default if per_clip is None else per_clip
            seconds = _seconds(meta, "seconds", speaker / "meta.json", notes)
            if seconds is None and per_clip is not None:
                seconds = per_clip * clips
            hours = None if seconds is None else seconds / 3600
            rows.append(CorpusRow(corpus.name, speaker.name, clips, hours, size))
    return rows


def corpus_table(rows: list[CorpusRow]) -> Table:
    """The rows as a rich table, with a total line per corpus."""
    table = Table("corpus", "speakers", "clips", "hours", "size", box=None)
    for name in dict.fromkeys(r.corpus for r in rows):
        mine = [r for r in rows if r.corpus == name]
        hours = [r.hours for r in mine]
        total = "?" if None in hours else f"{sum(hours):.2f}"
        who = ",".join(r.speaker for r in mine)
        who = who if len(who) <= 40 else f"{mine[0].speaker}..{mine[-1].speaker} ({len(mine)})"
        table.add_row(name, who, str(sum(r.clips for r in mine)), total, decimal(sum(r.bytes for r in mine)))
    return table


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders not starting with '.', in natural order (s2 before s10)."""
    dirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _seconds(meta: dict, key: str, path: Path, notes: list[str]) -> float | None:
    """meta[key] as seconds, or None when absent or not a finite number >= 0 (then a note names the file)."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    notes.append(f"{path}: {key} {value!r} is not a number of seconds: hours unknown")
    return None


def _scan(folder: Path) -> tuple[int, int, list[str]]:
    """(clips, bytes, unreadable paths) of the visible files under `folder`."""
    stems: dict[str, set[str]] = {"video": set(), "audio": set(), "align": set()}
    size = 0
    unreadable = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:  # a dangling link, or a file gone since the listing: no clip
                unreadable.append(os.path.join(dirpath, name))
                continue
            stem, ext = os.path.splitext(name)
            if kind := KIND.get(ext.lower()):
                stems[kind].add(stem)
    clips = len(stems["video"]) or len(stems["audio"]) or len(stems["align"])
    return clips, size, unreadable
