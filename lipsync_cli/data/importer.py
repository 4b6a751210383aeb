"""Import: any talking-head videos -> a corpus in GRID's layout, so prep and training have one path for everything.

    lipsync data import ~/recordings --name me   ->   data/raw/me/me/video/<stem>_<sha8>_<k>.mp4 + .json

Each source is cut into utterance-sized segments (~2-8 s) at pauses in its speech, so a long recording becomes many
training clips whose edges never fall inside a word. A segment is kept only when the tracked face is there in >= 95%
of its frames and no second face competes with it; everything else is dropped with a reason. Two streaming passes
per source: face tracking on every frame and voice activity on the audio, then the kept segments are re-encoded
(25 fps H.264 + AAC, media.VideoWriter) with a provenance JSON beside each (source file, sha256, start/end seconds,
face fraction). Inputs are only read; outputs are written atomically, every segment's JSON before any of the
source's videos, so no video is ever there without its provenance (prep and the eval hold-out read it). A source is
imported once each JSON naming its sha256 has its video: it is then skipped, and an interrupted import (JSONs
without videos) is simply done again when rerun.
A source's audio is held in memory while it is cut (48 kHz float32: ~0.7 GB per hour of recording).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from lipsync_cli import audio, face, media
from lipsync_cli.data.prep import sha256
from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import VIDEO_EXT, check_name, write_json

FPS = 25
SR = 48000  # segment audio keeps full bandwidth; voice activity runs on a 16 kHz copy
VAD_RATE = 100  # voice-activity frames per second (10 ms)


@dataclass
class Segment:
    source: Path
    index: int  # k-th candidate segment of its source
    start: float  # seconds, on the 25 fps frame grid
    end: float
    found: float = 0.0  # fraction of frames with the tracked face
    id: str | None = None  # set when kept
    reason: str = ""  # why it was dropped


@dataclass
class ImportSummary:
    kept: list[Segment] = field(default_factory=list)
    dropped: list[Segment] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # sources already imported
    failed: list[tuple[Path, str]] = field(default_factory=list)  # sources that could not be read
    out_dir: Path | None = None

    @property
    def seconds(self) -> float:
        return sum(s.end - s.start for s in self.kept)

    @property
    def all_failed(self) -> bool:
        """No source could be read at all: the run imported nothing (the CLI exits 1 after the table)."""
        return bool(self.failed) and not (self.kept or self.dropped or self.skipped)


def find_videos(path: Path, exclude: Path | None = None) -> list[Path]:
    """`path` itself, or every video file under the folder `path` (recursive, hidden entries and `exclude` skipped)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LipsyncError(f"{path}: no such file or folder")
    ex = exclude.resolve() if exclude is not None else None
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if p.suffix.lower() not in VIDEO_EXT or any(s.startswith(".") for s in rel) or not p.is_file():
            continue
        if ex is not None and p.resolve().is_relative_to(ex):
            continue  # our own output inside the input folder
        out.append(p)
    return out


def speech_segments(
    active: np.ndarray,
    level_db: np.ndarray,
    rate: float = VAD_RATE,
    min_s: float = 2.0,
    max_s: float = 8.0,
    pause_s: float = 0.3,
    pad_s: float = 0.4,
) -> list[tuple[float, float]]:
    """(start, end) seconds of utterances from a voice-activity mask: runs of speech grouped until a pause of
    >= pause_s ends one that is already >= min_s long, never beyond max_s (a run longer than that is cut at its
    quietest point), each padded with up to pad_s of its surrounding pauses (half of a pause at most, so segments
    never overlap); one still shorter than min_s joins a neighbour if the two fit in max_s, else it stays short (an
    isolated short utterance) and the caller drops it."""
    f = np.concatenate([[False], np.asarray(active, bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    pad, lo, hi, gap = (round(x * rate) for x in (pad_s, min_s, max_s, pause_s))
    pieces: list[tuple[int, int]] = []  # runs longer than max_s cut at their quietest points
    for a, b in runs:
        while b - a + 2 * pad > hi:
            first, last = a + max(lo - 2 * pad, 1), a + max(hi - 2 * pad, 2)
            cut = first + int(np.argmin(level_db[first:last])) if last > first else last
            pieces.append((a, cut))
            a = cut
        pieces.append((a, b))
    groups: list[list[int]] = []
    for a, b in pieces:
        if groups:
            s, e = groups[-1]
            long_enough, pause = e - s + 2 * pad >= lo, a - e
            if not (long_enough and pause >= gap) and b - s + 2 * pad <= hi:
                groups[-1][1] = b
                continue
        groups.append([a, b])
    n = len(active)
    segs = []
    for k, (s, e) in enumerate(groups):
        before = s - groups[k - 1][1] if k else 2 * s
        after = groups[k + 1][0] - e if k + 1 < len(groups) else 2 * (n - e)
        segs.append([s - min(pad, before // 2), e + min(pad, after // 2)])
    k = 0
    while k < len(segs):  # one too short to keep joins a neighbour (the earlier first) when the two fit in max_s
        s, e = segs[k]
        prev = k > 0 and e - segs[k - 1][0] <= hi
        nxt = k + 1 < len(segs) and segs[k + 1][1] - s <= hi
        if e - s < lo and (prev or nxt):
            j = k - 1 if prev else k
            segs[j : j + 2] = [[segs[j][0], segs[j + 1][1]]]
            k = j
            continue
        k += 1
    return [(s / rate, e / rate) for s, e in segs]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:40] or "clip"


def _segment_jsons(video_dir: Path) -> dict[str, list[Path]]:
    """The segment JSONs in `video_dir`, by their source's sha256."""
    by_source: dict[str, list[Path]] = {}
    for p in video_dir.glob("*.json") if video_dir.is_dir() else []:
        try:
            by_source.setdefault(json.loads(p.read_text())["sha256"], []).append(p)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return by_source


def _complete(jsons: list[Path]) -> bool:
    """Whether a source's import finished: the videos come after all of its JSONs, so each JSON has its video."""
    return all(p.with_suffix(".mp4").is_file() for p in jsons)


def import_source(
    video: Path,
    out_dir: Path,
    tracker: face.FaceTracker,
    *,
    corpus: str,
    speaker: str,
    digest: str | None = None,
    min_s: float = 2.0,
    max_s: float = 8.0,
    min_face: float = 0.95,
    crf: int = 18,
    ffmpeg: str | None = None,
) -> list[Segment]:
    """Segment one source and write its kept segments into `out_dir` (…/<speaker>/video); returns every candidate."""
    info = media.probe(video)
    if not info.has_audio:
        raise LipsyncError("no audio stream")
    digest = digest or sha256(video)
    x = media.read_audio(video, SR, ffmpeg=ffmpeg)
    n_frames = info.n_frames(FPS)
    x = x[: n_frames * SR // FPS]
    x16 = audio.resample(x, SR, audio.SR)
    active = audio.voice_activity(x16, audio.SR, fps=VAD_RATE)
    level = audio.rms_envelope(x16, audio.SR, fps=VAD_RATE, n_frames=len(active))
    spans = speech_segments(active, level, min_s=min_s, max_s=max_s)
    if not spans:
        return [Segment(video, 0, 0.0, n_frames / FPS, reason="no speech")]

    track = face.track_faces(
        media.iter_frames(video, FPS, ffmpeg=ffmpeg), smooth_sigma=0, total=n_frames, n_frames=n_frames,
        tracker=tracker, label=f"tracking {video.name}",
    )  # fmt: skip
    found = track.found
    crowded = track.n_faces > 1  # the latest detection saw more than one face

    segments = []
    for k, (s, e) in enumerate(spans):
        i0, i1 = round(s * FPS), min(round(e * FPS), n_frames)
        seg = Segment(video, k, i0 / FPS, i1 / FPS, found=float(found[i0:i1].mean()) if i1 > i0 else 0.0)
        if seg.end - seg.start < min_s - 1e-6:
            seg.reason = f"too short ({seg.end - seg.start:.1f} s)"
        elif seg.found < min_face:
            seg.reason = f"face in {seg.found:.0%} of frames (< {min_face:.0%})"
        elif crowded[i0:i1].mean() > 0.05:
            seg.reason = f"several faces in view ({crowded[i0:i1].mean():.0%} of frames)"
        else:
            seg.id = f"{_slug(video.stem)}_{digest[:8]}_{k:03d}"
        segments.append(seg)
    keep = [s for s in segments if s.id]
    if keep:
        for seg in keep:  # all JSONs before any video: a video is never without its provenance (see _complete)
            i0, i1 = round(seg.start * FPS), round(seg.end * FPS)
            write_json(out_dir / f"{seg.id}.json", {
                "source": str(video.resolve()), "sha256": digest, "start": seg.start, "end": seg.end,
                "frames": i1 - i0, "fps": FPS, "found": round(seg.found, 4), "segment": seg.index,
                "corpus": corpus, "speaker": speaker, "source_fps": info.fps,
                "source_size": [info.width, info.height], "imported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })  # fmt: skip
        _write_segments(video, info, x, keep, out_dir, crf, ffmpeg)
        for seg in keep:  # the frames ran out before a segment's end (a probe's count is an estimate): drop it
            if not (out_dir / f"{seg.id}.mp4").is_file():
                (out_dir / f"{seg.id}.json").unlink(missing_ok=True)
                seg.id, seg.reason = None, "the video ended before the segment"
    return segments


def _write_segments(
    video: Path, info: media.VideoInfo, x: np.ndarray, keep: list[Segment], out_dir: Path, crf: int, ffmpeg: str | None
) -> None:
    """Second pass: route each decoded frame to the writer of the kept segment it falls in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = [(round(s.start * FPS), round(s.end * FPS), s) for s in keep]
    with tempfile.TemporaryDirectory(prefix="lipsync-import-") as tmp:
        k, writer = 0, None
        try:
            for i, frame in enumerate(media.iter_frames(video, FPS, ffmpeg=ffmpeg)):
                if k == len(bounds):
                    break
                i0, i1, seg = bounds[k]
                if i < i0:
                    continue
                if writer is None:
                    wav = Path(tmp) / f"{seg.id}.wav"
                    media.write_wav(wav, x[i0 * SR // FPS : i1 * SR // FPS], SR)
                    writer = media.VideoWriter(
                        out_dir / f"{seg.id}.mp4", info.width, info.height, FPS, wav, crf, ffmpeg
                    )
                writer.write(frame)
                if i + 1 == i1:
                    writer.close()
                    writer, k = None, k + 1
        finally:
            if writer is not None:
                writer.abort()


def import_videos(
    path: Path,
    raw_root: Path,
    name: str,
    speaker: str | None = None,
    *,
    min_s: float = 2.0,
    max_s: float = 8.0,
    min_face: float = 0.95,
    crf: int = 18,
    ffmpeg: str | None = None,
) -> ImportSummary:
    """Import a video file, or every video under a folder, as corpus `name` (one speaker: `speaker` or `name`)."""
    for label, value in (("--name", name), ("--speaker", speaker or name)):
        check_name(label, value)
    if min_s <= 0 or max_s < min_s:
        raise LipsyncError(f"segment lengths must satisfy 0 < min <= max, got {min_s}, {max_s}")
    speaker = speaker or name
    out_dir = Path(raw_root) / name / speaker / "video"
    sources = find_videos(path, exclude=Path(raw_root) / name)
    if not sources:
        raise LipsyncError(f"no video files under {path}")
    _check_writable(out_dir)
    summary = ImportSummary(out_dir=out_dir)
    earlier = _segment_jsons(out_dir)
    done = {digest for digest, jsons in earlier.items() if _complete(jsons)}
    tracker = None
    try:
        for video in sources:
            try:
                digest = sha256(video)
                if digest in done:
                    summary.skipped.append((video, "already imported"))
                    continue
                for p in earlier.get(digest, []):  # an interrupted import's JSONs without videos: this run redoes it
                    if not p.with_suffix(".mp4").is_file():
                        p.unlink()
                tracker = tracker or face.FaceTracker()
                segments = import_source(
                    video, out_dir, tracker, corpus=name, speaker=speaker, digest=digest, min_s=min_s,
                    max_s=max_s, min_face=min_face, crf=crf, ffmpeg=ffmpeg,
                )  # fmt: skip
            except (LipsyncError, OSError) as e:
                summary.failed.append((video, _reason(e)))
                continue
            done.add(digest)
            summary.kept += [s for s in segments if s.id]
            summary.dropped += [s for s in segments if not s.id]
    finally:
        if tracker is not None:
            tracker.close()
    if summary.kept:
        _write_meta(out_dir.parent)
    return summary


def _check_writable(folder: Path) -> None:
    """`folder` exists or can be made, and can be written: found before any face tracking, not as the same
    failure after every source's (a data dir that is a file, `<speaker>/video` a file, a read-only disk)."""
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise LipsyncError(f"cannot write to {folder}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise LipsyncError(f"cannot write to {folder}: {p} is not writable")


def _reason(e: Exception) -> str:
    """A failure's words for the table: an OSError's message and file, without its [Errno N]."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def _write_meta(speaker_dir: Path) -> None:
    """`meta.json` with the speaker's total seconds, which `lipsync data list` shows as hours."""
    total = 0.0
    for p in (speaker_dir / "video").glob("*.json"):
        if not p.with_suffix(".mp4").is_file():  # its video not written yet
            continue
        try:
            seg = json.loads(p.read_text())
            total += float(seg["end"]) - float(seg["start"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    write_json(speaker_dir / "meta.json", {"seconds": round(total, 2)})


def summary_table(s: ImportSummary) -> Table:
    """Segments kept and dropped (each with its reason), and sources skipped or unreadable."""
    t = Table(box=None, show_header=False)
    t.add_row("kept", f"{len(s.kept)} segments, {s.seconds:.1f} s, in {escape(str(s.out_dir))}")
    t.add_row("dropped", f"{len(s.dropped)} segments")
    for seg in s.dropped:
        t.add_row("", escape(f"{seg.source.name} {seg.start:.2f}-{seg.end:.2f} s: {seg.reason}"))
    for video, why in s.skipped:
        t.add_row("skipped", escape(f"{video}: {why}"))
    for video, why in s.failed:
        t.add_row("[red]failed[/]", escape(f"{video}: {why}"))
    return t
