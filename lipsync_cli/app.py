"""`lipsync app`: a local web page over the same `Dubber` the Python API gives (FastAPI + one small HTML page).

Why not Gradio: it would add ~100 MB of dependencies and its own front-end build for one form; FastAPI, uvicorn and
python-multipart are ~5 MB, and the page (app.html) is plain HTML + fetch(). The models load once at start-up and
stay loaded; one job runs at a time per process, the others wait in a queue (the page shows their place). Each job's
files live in a temporary folder removed when the server stops (and when a job falls out of the last KEEP).
"""

from __future__ import annotations

import errno
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from lipsync_cli import __version__, progress
from lipsync_cli.api import Dubber
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings, choices
from lipsync_cli.voice.speech import check_words

KEEP = 20  # finished jobs whose files are kept
MAX_TEXT = 5000  # characters


@dataclass
class Job:
    id: str
    folder: Path
    video: Path
    text: str | None
    audio: Path | None
    settings: dict[str, str]
    state: str = "queued"  # queued | running | done | error
    stage: str = ""
    done: float = 0.0
    total: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)

    def public(self, position: int | None) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "stage": self.stage, "done": self.done, "total": self.total,
            "queue_position": position, "error": self.error, "result": self.result, "input": self.video.name,
        }  # fmt: skip


def _as_uploaded(message: str, folder: Path) -> str:
    """`message` with the job's files named as they were uploaded, not by where the server keeps them."""
    return re.sub(re.escape(str(folder)) + r"/(?:video/|audio/)?", "", message)


def _save(upload: UploadFile, folder: Path, fallback: str) -> Path:
    """An upload copied into `folder` under its own (safe) name."""
    folder.mkdir()
    path = folder / _safe_name(upload.filename, fallback)
    with path.open("wb") as f:
        shutil.copyfileobj(upload.file, f)
    return path


def _safe_name(name: str | None, fallback: str) -> str:
    """An uploaded file's own name (so errors read as the CLI's would), stripped to safe characters."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name).strip("._")
    return base[:100] or fallback


class Jobs:
    """The queue and its one worker thread."""

    def __init__(self, settings: Settings, root: Path):
        self.dubber = Dubber.from_settings(settings)
        self.root = root
        self.jobs: dict[str, Job] = {}
        self.order: list[str] = []
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="lipsync-app-worker", daemon=True)
        self.worker.start()

    def _work(self) -> None:
        try:
            self.dubber.load()
        except Exception as e:  # shown on the page: the server still answers
            self.load_error = f"the models could not be loaded: {e}"
        self.ready.set()
        while (job := self.queue.get()) is not None:
            self._run(job)

    def _run(self, job: Job) -> None:
        job.state = "running"

        def listen(stage: str, done: float, total: float | None) -> None:
            job.stage, job.done, job.total = stage, done, total

        try:
            if self.load_error:
                raise LipsyncError(self.load_error)
            out = job.folder / f"{job.video.stem}.dubbed.mp4"
            r = self.dubber.dub(job.video, job.text, audio=job.audio, output=out, on_progress=listen, **job.settings)
            job.result = {k: v for k, v in r.to_json().items() if k not in ("output", "video")}
            job.state = "done"
        except LipsyncError as e:
            job.error, job.state = f"error: {_as_uploaded(str(e), job.folder)}", "error"
        except Exception as e:  # a bug: the same words as the CLI's exit 3
            job.error = f"error: unexpected {type(e).__name__}: {e} (a bug in lipsync {__version__}: please report it)"
            job.state = "error"
        job.stage = ""

    def submit(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.id] = job
            self.order.append(job.id)
            finished = [i for i in self.order if self.jobs[i].state in ("done", "error")]
            for old in finished[:-KEEP]:
                shutil.rmtree(self.jobs.pop(old).folder, ignore_errors=True)
                self.order.remove(old)
        self.queue.put(job)

    def position(self, job: Job) -> int | None:
        """1 = next to run."""
        if job.state != "queued":
            return None
        waiting = [i for i in self.order if self.jobs[i].state == "queued"]
        return waiting.index(job.id) + 1

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=5)
        self.dubber.close()


def make_app(settings: Settings) -> FastAPI:
    """The web app; its job folders go in a temporary folder that `app.state.close()` removes."""
    root = Path(tempfile.mkdtemp(prefix="lipsync-app-"))
    jobs = Jobs(settings, root)
    app = FastAPI(title="lipsync", version=__version__, docs_url=None, redoc_url=None)
    page = resources.files("lipsync_cli").joinpath("app.html").read_text(encoding="utf-8")

    def close() -> None:
        jobs.close()
        shutil.rmtree(root, ignore_errors=True)

    app.state.close = close

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        names = ("voice", "engine", "sync_mode")
        return {
            "choices": {n: list(choices(n)) for n in names},
            "defaults": {n: getattr(settings, n) for n in names},
            "ready": jobs.ready.is_set(),
            "load_error": jobs.load_error,
            "version": __version__,
        }

    @app.post("/api/jobs")
    def submit(  # a plain def: FastAPI runs it in a worker thread, so copying an upload never blocks the server
        video: UploadFile | None = File(None),
        text: str = Form(""),
        audio: UploadFile | None = File(None),
        voice: str = Form(settings.voice),
        engine: str = Form(settings.engine),
        sync_mode: str = Form(settings.sync_mode),
    ) -> JSONResponse:
        def bad(msg: str) -> JSONResponse:
            return JSONResponse({"error": f"error: {msg}"}, status_code=400)

        if video is None or not video.filename:
            return bad("no video: choose the video of the person talking")
        audio = audio if audio is not None and audio.filename else None
        words = text.strip() or None
        try:
            check_words(words, Path(audio.filename) if audio else None)
            if words and len(words) > MAX_TEXT:
                raise LipsyncError(f"the text is {len(words)} characters long; the web page takes up to {MAX_TEXT}")
            chosen = {"voice": voice, "engine": engine, "sync_mode": sync_mode}
            settings.with_overrides(**chosen)  # a bad choice is refused now, not after the upload waits in line
        except LipsyncError as e:
            return bad(str(e))
        job_id = uuid.uuid4().hex[:12]
        folder = root / job_id
        folder.mkdir()
        video_path = _save(video, folder / "video", "video.mp4")  # each in its own folder: any two names may
        audio_path = None if audio is None else _save(audio, folder / "audio", "speech.wav")  # be the same
        job = Job(job_id, folder, video_path, words, audio_path, chosen)
        jobs.submit(job)
        return JSONResponse(job.public(jobs.position(job)))

    def find(job_id: str) -> Job:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job (finished jobs are kept until the server stops, up to 20)")
        return job

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        return job.public(jobs.position(job))

    @app.get("/api/jobs/{job_id}/input")
    def input_video(job_id: str) -> FileResponse:
        job = find(job_id)
        return FileResponse(job.video, filename=job.video.name, content_disposition_type="inline")

    @app.get("/api/jobs/{job_id}/output")
    def output_video(job_id: str, download: bool = False) -> FileResponse:
        job = find(job_id)
        out = job.folder / f"{job.video.stem}.dubbed.mp4"
        if job.state != "done" or not out.is_file():
            raise HTTPException(409, "the video is not ready")
        return FileResponse(
            out,
            media_type="video/mp4",
            filename=out.name,
            content_disposition_type="attachment" if download else "inline",
        )

    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the web app until Ctrl-C (uvicorn; access log off, errors on)."""
    import socket

    import uvicorn

    with socket.socket() as probe:  # a clear error before any model loads
        try:
            probe.bind((host, port))
        except OSError as e:  # taken or privileged: another port; anything else: the host is not one of ours
            fix = "pass another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host"
            raise LipsyncError(f"cannot listen on {host}:{port} ({e.strerror or e}): {fix}") from None
    app = make_app(settings)
    url = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
    progress.console.print(f"lipsync app: open [bold]{url}[/] (Ctrl-C to stop); loading the models", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        app.state.close()
