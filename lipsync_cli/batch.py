"""`lipsync dub --batch jobs.jsonl`: many dubs with the models loaded once, one result line per job, a failing
job reported and skipped.

A job is a JSON object per line (or a CSV row under a header) with `video`, `text` or `audio`, optionally `output`
and any setting by name (`engine`, `voice`, `crf`, ...). Relative paths are relative to the jobs file. Empty CSV
cells and JSON nulls mean "not given".
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from lipsync_cli import progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings, check_names

FIELDS = ("video", "text", "audio", "output")


@dataclass
class Job:
    line: int  # line (JSONL) or row (CSV, 1 = first after the header) in the jobs file
    video: Path | None
    text: str | None = None
    audio: Path | None = None
    output: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why the job cannot run (reported as its result; the others still run)


def _job(line: int, raw: Any, root: Path) -> Job:
    if not isinstance(raw, dict):
        return Job(line, None, problem="a job must be an object with at least a video")
    raw = {k: v for k, v in raw.items() if v is not None and v != ""}
    paths = {k: root / str(raw[k]) for k in ("video", "audio", "output") if k in raw}
    job = Job(line, paths.get("video"), None if "text" not in raw else str(raw["text"]), paths.get("audio"))
    job.output = paths.get("output")
    job.settings = {k: v for k, v in raw.items() if k not in FIELDS}
    try:
        check_names(list(job.settings), f"job {line}")
    except LipsyncError as e:
        job.problem = str(e)
    if job.video is None:
        job.problem = job.problem or "no video"
    return job


def _read_text(path: Path) -> str:
    """The jobs file's text; a video or other binary file given by mistake is an error naming it, not a bug."""
    wrong = LipsyncError(f"--batch {path}: not a text file (a .jsonl or .csv of jobs, in UTF-8)")
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
            if b"\0" in head:  # text never holds NUL bytes, a video does: stop before reading all of it
                raise wrong
            data = head + f.read()
    except OSError as e:
        raise LipsyncError(f"--batch {path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise wrong from None


def read_jobs(path: Path) -> list[Job]:
    """The jobs in a .jsonl/.json-lines or .csv file; a line that does not parse becomes a job with a problem."""
    path = Path(path)
    if not path.is_file():
        raise LipsyncError(f"--batch {path}: {'not a file' if path.exists() else 'file not found'}")
    root = path.parent
    text = _read_text(path)
    jobs: list[Job] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "video" not in reader.fieldnames:
            raise LipsyncError(f"--batch {path}: the CSV needs a header row with a 'video' column")
        for i, row in enumerate(reader, start=1):
            jobs.append(_job(i, {k: v for k, v in row.items() if k}, root))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                jobs.append(_job(i, json.loads(line), root))
            except json.JSONDecodeError as e:
                jobs.append(Job(i, None, problem=f"not JSON ({e.msg})"))
    if not jobs:
        raise LipsyncError(f"--batch {path}: no jobs in it")
    return jobs


def run_batch(path: Path, settings: Settings, force: bool = False, as_json: bool = False) -> int:
    """Run every job with one Dubber; print one line per job (JSON with --json). Returns the exit code:
    0 all done, 1 some job had a user error, 3 some job hit a bug."""
    from lipsync_cli.api import Dubber

    jobs = read_jobs(path)
    code = 0
    with Dubber.from_settings(settings) as dubber:
        for n, job in enumerate(jobs, start=1):
            progress.log(f"[bold]job {n}/{len(jobs)}[/] {escape(str(job.video))}")
            record: dict[str, Any] = {"job": job.line, "video": None if job.video is None else str(job.video)}
            try:
                if job.problem:
                    raise LipsyncError(job.problem)
                r = dubber.dub(job.video, job.text, audio=job.audio, output=job.output, force=force, **job.settings)
                record |= {"ok": True, **r.to_json()}
            except LipsyncError as e:
                record |= {"ok": False, "error": str(e)}
                code = max(code, 1)
            except Exception as e:  # a bug in one job must not lose the others' results
                record |= {"ok": False, "error": f"unexpected {type(e).__name__}: {e} (a bug: please report it)"}
                code = 3
            if as_json:
                print(json.dumps(record), flush=True)
            elif record["ok"]:
                print(f"ok    job {job.line}: {record['output']} ({record['duration']:.2f} s)", flush=True)
            else:
                print(f"error job {job.line} ({record['video']}): {record['error']}", flush=True)
    return code
