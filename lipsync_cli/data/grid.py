"""The GRID audio-visual corpus (34 speakers x 1000 three-second sentences), fetched into a tidy layout:

    data/raw/grid/sN/{video,align,audio}/ID.{mpg,align,wav}     plus sN/.done (JSON: which parts are complete)

Two sources carry it. Zenodo record 3625687 (default) has one video zip per speaker (`sN.zip`, none for
s21) but the alignments and the 25 kHz audio as single zips for all speakers, so those are fetched once and
distributed; its API publishes an md5 per file. The Sheffield original has a video zip, align tar and audio
tar per speaker, sizes only. Archive nesting differs between them (and over the years), so files are
placed by basename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from urllib.request import Request, urlopen

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from lipsync_cli.data.download import USER_AGENT, download_file, head_size, safe_extract
from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import write_json
from lipsync_cli.progress import console, is_quiet, log

ZENODO_URL = "https://zenodo.org/records/3625687/files"
ZENODO_API_URL = "https://zenodo.org/api/records/3625687"
SHEFFIELD_URL = "https://spandh.dcs.shef.ac.uk/gridcorpus"
N_SPEAKERS = 34
NO_VIDEO = frozenset({21})  # speaker 21's video was never released
SUFFIX = {"video": ".mpg", "align": ".align", "audio": ".wav"}
ALIGN_RATE = 25000  # align times count 25 kHz audio samples
DONE = ".done"
USAGE = "give a count (5), a list (1,3,7) or a range (2-4)"


@dataclass
class Download:
    """One archive to fetch, and which speakers' `kind` files it provides."""

    url: str
    name: str  # local file name, unique within a plan
    kind: str  # "video" | "align" | "audio"
    speakers: tuple[int, ...]
    shared: bool = False  # holds every speaker (sN/ folders inside), not just `speakers`
    size: int | None = None
    md5: str | None = None


@dataclass
class FetchSummary:
    speakers: list[int]
    skipped: list[int] = field(default_factory=list)  # already complete before this run
    fetched: list[int] = field(default_factory=list)  # completed by this run
    plan: list[Download] = field(default_factory=list)
    bytes: int = 0  # transferred by this run
    dry_run: bool = False


def parse_speakers(spec: str | int | Sequence[int]) -> list[int]:
    """Speaker numbers: "5" -> 1..5 (the first five), "1,3,7" -> those, "2-4" -> 2..4, "1-3,7", "all".

    Bounds are checked on the numbers before any range is built: "1-100000000000" must be an error, not a set of
    a hundred billion ints."""
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        out = {int(s) for s in spec}
        bad = sorted(s for s in out if not 1 <= s <= N_SPEAKERS)
        if bad or not out:
            raise LipsyncError(f"GRID speakers are 1..{N_SPEAKERS}; got {bad or 'none'}")
        return sorted(out)
    text = spec.strip().lower().replace(" ", "")
    if text == "all":
        return list(range(1, N_SPEAKERS + 1))
    if re.fullmatch(r"[0-9]+", text):
        n = _speaker_number(text)
        if n == 0:
            raise LipsyncError(f"--speakers 0 selects nobody; {USAGE}")
        if n > N_SPEAKERS:
            raise LipsyncError(f"--speakers {text}: GRID has {N_SPEAKERS} speakers; {USAGE}, or 'all'")
        return list(range(1, n + 1))
    out, bad = set(), []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"s?([0-9]+)(?:-s?([0-9]+))?", item)
        if not m:
            raise LipsyncError(f"--speakers: cannot read {item!r}; {USAGE}")
        lo, hi = _speaker_number(m.group(1)), _speaker_number(m.group(2) or m.group(1))
        if hi < lo:
            raise LipsyncError(f"--speakers: empty range {item!r}")
        if lo < 1 or hi > N_SPEAKERS:
            bad.append(item)
            continue
        out.update(range(lo, hi + 1))
    if bad or not out:
        raise LipsyncError(f"GRID speakers are 1..{N_SPEAKERS}; got {', '.join(bad) or 'none'}")
    return sorted(out)


def _speaker_number(digits: str) -> int:
    """int(digits), capped just past any speaker: Python refuses to parse over 4300 digits (ValueError), and a
    number that long is out of bounds anyway."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 6 else 10**6


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# a GRID id spells its sentence, one letter a word (MEDIA.md): command colour preposition letter digit adverb
GRID_WORDS = (
    {"b": "bin", "l": "lay", "p": "place", "s": "set"},
    {"b": "blue", "g": "green", "r": "red", "w": "white"},
    {"a": "at", "b": "by", "i": "in", "w": "with"},
    None,  # the letter itself
    {"z": "zero", **{str(d): w for d, w in enumerate(DIGITS)}},
    {"a": "again", "n": "now", "p": "please", "s": "soon"},
)


def sentence(clip_id: str) -> str | None:
    """The sentence a GRID id spells ("bbaf2n" -> "bin blue at f two now"); None when the id is not one."""
    cid = clip_id.lower()
    if len(cid) != 6:
        return None
    words = []
    for ch, table in zip(cid, GRID_WORDS, strict=True):
        if table is None:
            if not ("a" <= ch <= "z") or ch == "w":  # GRID's letters leave out w
                return None
            words.append(ch)
        elif ch in table:
            words.append(table[ch])
        else:
            return None
    return " ".join(words)


def read_align(path: Path) -> list[tuple[float, float, str]]:
    """(start_s, end_s, word) per line of a GRID `.align` file (times count 25 kHz samples; CRLF is fine)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="ascii", errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            start, end, word = int(parts[0]), int(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise LipsyncError(f"{path}:{i}: expected 'start end word', got {line.strip()!r}") from None
        out.append((start / ALIGN_RATE, end / ALIGN_RATE, word))
    return out


def wanted_parts(speaker: int, audio: bool = False) -> set[str]:
    parts = {"align"} | ({"audio"} if audio else set())
    return parts if speaker in NO_VIDEO else parts | {"video"}


def urls_for(
    speakers: Sequence[int], source: str = "zenodo", base_url: str | None = None, audio: bool = False
) -> list[Download]:
    """Every archive that `speakers` need from `source` (video, alignments, and the 25 kHz audio if asked)."""
    speakers = tuple(sorted(set(speakers)))
    if source == "zenodo":
        base = (base_url or ZENODO_URL).rstrip("/")
        with_video = [s for s in speakers if s not in NO_VIDEO]
        plan = [Download(f"{base}/s{s}.zip", f"s{s}.zip", "video", (s,)) for s in with_video]
        plan.append(Download(f"{base}/alignments.zip", "alignments.zip", "align", speakers, shared=True))
        if audio:
            plan.append(Download(f"{base}/audio_25k.zip", "audio_25k.zip", "audio", speakers, shared=True))
        return plan
    if source == "sheffield":
        base = (base_url or SHEFFIELD_URL).rstrip("/")
        plan = []
        for s in speakers:
            if s not in NO_VIDEO:
                name = f"s{s}.mpg_vcd.zip"  # the normal-quality video
                plan.append(Download(f"{base}/s{s}/video/{name}", name, "video", (s,)))
            plan.append(Download(f"{base}/s{s}/align/s{s}.tar", f"s{s}-align.tar", "align", (s,)))
            if audio:
                plan.append(Download(f"{base}/s{s}/audio/s{s}.tar", f"s{s}-audio.tar", "audio", (s,)))
        return plan
    raise LipsyncError(f"unknown GRID source {source!r} (zenodo or sheffield)")


def zenodo_files(api_url: str, cache: Path | None = None, timeout: float = 10.0) -> dict[str, tuple]:
    """{file name: (size, md5)} from a Zenodo record's API JSON, cached on disk; {} when unreachable or malformed.

    A cache that does not parse as a record is as good as none (the record is fetched again and rewritten); an
    API answer that does not is treated like an unreachable API: sizes only, with a warning."""
    if cache is not None and cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if isinstance(saved, dict) and saved.get("url") == api_url:
                return _zenodo_parse(saved.get("record"))
        except (OSError, ValueError):
            pass
    try:
        with urlopen(Request(api_url, headers={"User-Agent": USER_AGENT}), timeout=timeout) as r:
            record = json.loads(r.read())
        files = _zenodo_parse(record)
    except (OSError, ValueError) as e:
        log(f"[yellow]could not read checksums from {escape(api_url)} ({escape(str(e))}); checking sizes only[/]")
        return {}
    if cache is not None and files:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"url": api_url, "record": record})
    return files


def _zenodo_parse(record: object) -> dict[str, tuple[int, str | None]]:
    """{key: (size, md5 or None)} of a record's files; ValueError for anything not shaped like Zenodo's JSON (a
    proxy, a truncated cache or a future API can hand back any JSON at all)."""
    try:
        files = record["files"]
        if isinstance(files, dict):  # the newer /files endpoint nests them under "entries" (a dict by key)
            files = files.get("entries", {})
            files = list(files.values()) if isinstance(files, dict) else files
        if not isinstance(files, list):
            raise TypeError(f"'files' is a {type(files).__name__}")
        out = {}
        for f in files:
            algo, _, digest = str(f.get("checksum", "")).partition(":")
            size = int(f["size"])
            if size < 0:
                raise ValueError(f"negative size {size}")
            out[str(f["key"])] = (size, digest.lower() if algo == "md5" else None)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a Zenodo record ({type(e).__name__}: {e})") from None
    return out


# ---------------------------------------------------------------------------------------------- markers


def done_parts(root: Path, speaker: int) -> set[str]:
    """Parts of a speaker whose extraction finished (per its `.done` marker, with the folder still there)."""
    try:
        parts = json.loads((root / f"s{speaker}" / DONE).read_text())["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(parts, dict):  # a marker we did not write: nothing is known to be done
        return set()
    return {p for p in parts if (root / f"s{speaker}" / p).is_dir()}


def _mark_done(root: Path, speaker: int, kind: str, files: int, source: str) -> None:
    path = root / f"s{speaker}" / DONE
    try:
        marker = json.loads(path.read_text())
        marker["parts"].keys()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        marker = {"corpus": "grid", "speaker": f"s{speaker}", "parts": {}}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    marker["parts"][kind] = {"files": files, "source": source, "completed": stamp}
    write_json(path, marker)


# ---------------------------------------------------------------------------------------------- fetch


def fetch_grid(
    speakers: str | int | Sequence[int],
    root: Path,
    source: str = "zenodo",
    *,
    base_url: str | None = None,
    api_url: str | None = ZENODO_API_URL,
    audio: bool = False,
    workers: int = 3,
    retries: int = 4,
    timeout: float = 30.0,
    backoff: float = 1.0,
    keep_archives: bool = False,
    dry_run: bool = False,
    quiet: bool | None = None,
) -> FetchSummary:
    """Download, verify and unpack GRID `speakers` into `root` (data/raw/grid); done speakers cost nothing.

    Archives download `workers` at a time under one progress display and are unpacked as each one lands. Any
    failure is reported after the others finished, as one LipsyncError; finished parts stay done, partial
    downloads stay as `.part` files for the next run to resume. `api_url` (Zenodo only) supplies md5s.
    """
    quiet = is_quiet() if quiet is None else quiet
    say = (lambda msg: None) if quiet else log
    root = Path(root)
    speakers = parse_speakers(speakers)
    missing = {s: wanted_parts(s, audio) - done_parts(root, s) for s in speakers}
    summary = FetchSummary(speakers, skipped=[s for s in speakers if not missing[s]], dry_run=dry_run)
    for d in urls_for(speakers, source, base_url, audio):
        need = tuple(s for s in d.speakers if d.kind in missing[s])
        if need:
            summary.plan.append(replace(d, speakers=need))
    dl_dir = root / ".downloads"
    if summary.plan and not dry_run:  # before any download: a file in the way would stop the run at its end
        _check_folders(root, summary.plan)
        try:
            dl_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LipsyncError(f"cannot create {dl_dir}: {e.strerror or e}") from None
    if summary.plan and source == "zenodo" and api_url:
        cache = None if dry_run else root / ".zenodo-record.json"
        meta = zenodo_files(api_url, cache, timeout=min(timeout, 10.0))
        for d in summary.plan:
            d.size, d.md5 = meta.get(PurePosixPath(d.url).name, (None, None))
    if dry_run:
        _show_plan(summary.plan, min(timeout, 5.0))
        return summary
    if not summary.plan:
        say(f"GRID {_names(speakers)}: already complete in {root}")
        return summary

    cancel = threading.Event()
    bars = _Bars(summary.plan, dl_dir, quiet)
    errors: list[str] = []

    def get(d: Download) -> int:
        try:
            return download_file(
                d.url,
                dl_dir / d.name,
                d.size,
                d.md5,
                retries=retries,
                timeout=timeout,
                backoff=backoff,
                progress=bars.hook(d.name),
                cancel=cancel,
                on_retry=say,
            )
        finally:
            bars.finish(d.name)

    with bars.progress, ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="grid") as pool:
        jobs = {pool.submit(get, d): d for d in summary.plan}
        try:
            for job in as_completed(jobs):
                d = jobs[job]
                try:
                    summary.bytes += job.result()
                except LipsyncError as e:
                    errors.append(str(e))
                    continue
                try:
                    counts = _install(dl_dir / d.name, d, root, source)
                    say(f"{d.name}: " + ", ".join(f"s{s} {n} {d.kind}" for s, n in counts.items()))
                except LipsyncError as e:
                    errors.append(str(e))
                finally:  # a bad archive goes too, so that a rerun fetches it afresh
                    if not keep_archives:
                        (dl_dir / d.name).unlink(missing_ok=True)
        except KeyboardInterrupt:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if not any(dl_dir.iterdir()):
        dl_dir.rmdir()
    summary.fetched = [s for s in speakers if missing[s] and not wanted_parts(s, audio) - done_parts(root, s)]
    if errors:
        more = f" (and {len(errors) - 1} more: {' | '.join(errors[1:])})" if len(errors) > 1 else ""
        raise LipsyncError(errors[0] + more)
    say(f"GRID {_names(speakers)} ready in {root} ({decimal(summary.bytes)} downloaded)")
    return summary


def _check_folders(root: Path, plan: list[Download]) -> None:
    """Every folder the fetch writes into is a folder, or can become one: a file (or a dangling link) on the way,
    such as `sN/video` or the data folder itself, is a LipsyncError naming it."""
    wanted = {root / ".downloads"} | {root / f"s{s}" / d.kind for d in plan for s in d.speakers}
    for folder in sorted(wanted):
        for p in (folder, *folder.parents):
            if p.is_dir():
                break
            if p.exists() or p.is_symlink():
                raise LipsyncError(f"{p} is in the way: a folder is needed there (GRID goes into {root})")


def _install(archive: Path, d: Download, root: Path, source: str) -> dict[int, int]:
    """Unpack `archive` beside the target and rename each speaker's files into `sN/<kind>/` by basename.

    Nothing is visible under `sN/` until a speaker's folder is complete; the `.done` marker comes last.
    """
    suffix = SUFFIX[d.kind]

    def pick(name: str) -> bool:
        p = PurePosixPath(name.replace("\\", "/"))
        if not p.name.endswith(suffix) or p.name.startswith("._") or "__MACOSX" in p.parts:
            return False
        return not d.shared or _speaker_of(p) in d.speakers

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".unpack-{d.name}-", dir=root))
    try:
        by_speaker: dict[int, dict[str, Path]] = {s: {} for s in d.speakers}
        unpacked = tmp / "x"
        for f in safe_extract(archive, unpacked, select=pick):
            rel = PurePosixPath(f.relative_to(unpacked.resolve()).as_posix())
            s = _speaker_of(rel) if d.shared else d.speakers[0]
            if f.is_file() and s in by_speaker:
                by_speaker[s][f.name] = f
        for s, files in by_speaker.items():
            if not files:
                continue
            stage = tmp / f"s{s}"
            stage.mkdir()
            for name, f in files.items():
                os.replace(f, stage / name)
            target = root / f"s{s}" / d.kind
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # leftovers of an earlier, unfinished run (it never got its marker)
                shutil.rmtree(target)
            os.replace(stage, target)
            _mark_done(root, s, d.kind, len(files), source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    empty = [s for s, files in by_speaker.items() if not files]
    if empty:
        raise LipsyncError(f"{d.name} ({d.url}) holds no {suffix} files for {_names(empty)}")
    return {s: len(files) for s, files in by_speaker.items()}


def _speaker_of(p: PurePosixPath) -> int | None:
    """The speaker of an archive member, from the innermost `sN` folder on its path."""
    for part in reversed(p.parent.parts):
        if m := re.fullmatch(r"s(\d+)", part):
            return int(m.group(1))
    return None


def _names(speakers: Sequence[int]) -> str:
    return ",".join(f"s{s}" for s in speakers)


class _Bars:
    """One live display for all parallel downloads: a bar per active file plus a total, with rate and ETA."""

    def __init__(self, plan: list[Download], dl_dir: Path, quiet: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self.lock = threading.Lock()
        self.sizes = {d.name: d.size for d in plan}
        self.done = {d.name: _size(dl_dir / d.name) or _size(dl_dir / (d.name + ".part")) for d in plan}
        self.tasks: dict[str, int] = {}
        self.total = self.progress.add_task("total", total=self._total(), completed=sum(self.done.values()))

    def _total(self) -> int | None:
        return sum(n for n in self.sizes.values() if n) or None

    def hook(self, name: str):
        return lambda done, total: self.update(name, done, total)

    def update(self, name: str, done: int, total: int | None) -> None:
        with self.lock:
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=total, completed=done)
            else:
                self.progress.update(self.tasks[name], completed=done, total=total)
            if total and self.sizes[name] != total:
                self.sizes[name] = total
                self.progress.update(self.total, total=self._total())
            self.progress.advance(self.total, done - self.done[name])
            self.done[name] = done

    def finish(self, name: str) -> None:
        with self.lock:
            if (tid := self.tasks.pop(name, None)) is not None:
                self.progress.remove_task(tid)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _show_plan(plan: list[Download], timeout: float) -> None:
    """The --dry-run table: what would be fetched, with sizes (Zenodo's record, else HEAD, else '?')."""
    unknown = [d for d in plan if d.size is None]
    if unknown:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for d, n in zip(unknown, pool.map(lambda d: head_size(d.url, timeout), unknown), strict=True):
                d.size = n
    out = Console()
    if not out.is_terminal:  # piped: never cut a URL short
        out = Console(width=400)
    if not plan:
        out.print("nothing to fetch: every requested speaker is complete")
        return
    table = Table("part", "speakers", "size", "md5", box=None)
    table.add_column("url", overflow="fold")
    for d in plan:
        who = _names(d.speakers) if len(d.speakers) <= 6 else f"{len(d.speakers)} speakers"
        table.add_row(d.kind, who, "?" if d.size is None else decimal(d.size), "yes" if d.md5 else "-", d.url)
    known = sum(d.size or 0 for d in plan)
    partial = "+" if any(d.size is None for d in plan) else ""
    table.add_row("total", "", decimal(known) + partial if known else "?", "", "")
    out.print(table)
