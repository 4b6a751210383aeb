"""`lipsync app` in a real headless browser: Debian's Chromium driven by Playwright (which downloads nothing: it is
pointed at /usr/bin/chromium). Uploads a shared clip and words, waits for the dub, checks that the page's <video>
plays it; a bad input shows the CLI's error. LIPSYNC_APP_SCREENSHOT=path saves the page (README's docs/app.png)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import shared_file

CHROMIUM = Path(os.environ.get("LIPSYNC_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def server(tmp_path):
    """`lipsync app` on a free local port, in its own process, stopped (Ctrl-C) after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "lipsync_cli.cli", "-q", "app", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/api/options", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"lipsync app exited: {proc.stdout.read()}")
            time.sleep(0.2)
    yield url
    proc.send_signal(2)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert not list(tmp_path.glob("lipsync-app-*")), "the app left its job folder behind"


def test_app_dubs_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} absent: apt-get install chromium")
    clip = shared_file("media/pcavs_00086.mp4")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1100, "height": 860},
        )
        page = browser.new_page()
        page.goto(server)
        page.wait_for_selector("#engine option", state="attached")

        page.click("#go")  # nothing chosen: the CLI's words, on the page
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status") == "error: no video: choose the video of the person talking"
        page.set_input_files("#video", str(clip))
        page.click("#go")  # no words and no speech
        page.wait_for_function("document.querySelector('#status').textContent.includes('no text')")
        assert page.inner_text("#status").startswith("error: no text to speak")

        page.fill("#text", "Bob bought a big map.")
        page.select_option("#voice", "tts")  # the plain voice: cloning is tested elsewhere, and costs CPU here
        page.select_option("#engine", "retrieval")
        page.click("#go")
        page.wait_for_function("!document.querySelector('#result').hidden", timeout=300_000)
        page.wait_for_function("document.querySelector('#dubbed').readyState >= 2", timeout=30_000)
        video = page.evaluate(
            "(() => { const v = document.querySelector('#dubbed');"
            " return {w: v.videoWidth, h: v.videoHeight, d: v.duration, err: v.error && v.error.code}; })()"
        )
        assert video["err"] is None and video["w"] > 0 and video["h"] > 0 and 1.0 < video["d"] < 4.0, video
        page.evaluate("document.querySelector('#dubbed').play()")  # it decodes: time moves on
        page.wait_for_function("document.querySelector('#dubbed').currentTime > 0.3", timeout=20_000)
        page.evaluate("document.querySelector('#dubbed').pause(); document.querySelector('#dubbed').currentTime = 0.6")
        page.wait_for_function("document.querySelector('#original').readyState >= 2")
        assert page.inner_text("#status").startswith("done:")
        href = page.get_attribute("#download", "href")
        with urllib.request.urlopen(server + href) as r:
            body = r.read()
            assert r.headers["content-type"] == "video/mp4" and "attachment" in r.headers["content-disposition"]
        assert body[4:8] == b"ftyp" and len(body) > 10_000
        if shot := os.environ.get("LIPSYNC_APP_SCREENSHOT"):
            page.evaluate("document.querySelector('#original').currentTime = 0.6")
            page.wait_for_timeout(500)
            page.screenshot(path=shot, full_page=True)
        browser.close()


def test_two_uploads_never_share_a_file(tmp_path):
    """A video uploaded as "speech-x.wav" beside speech "x.wav" landed in one file (the speech took the name
    "speech-" + its own); each now has its own folder, and messages name them as uploaded."""
    import io

    from fastapi import UploadFile

    from lipsync_cli.app import _as_uploaded, _save

    video = _save(UploadFile(io.BytesIO(b"video"), filename="speech-x.wav"), tmp_path / "video", "video.mp4")
    audio = _save(UploadFile(io.BytesIO(b"audio"), filename="x.wav"), tmp_path / "audio", "speech.wav")
    assert video != audio and video.read_bytes() == b"video" and audio.read_bytes() == b"audio"
    assert _as_uploaded(f"{video} has no video stream", tmp_path) == "speech-x.wav has no video stream"


def test_bad_port_or_host_is_said_before_any_model_loads(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", "app", "--port", "70000"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "65535" in r.stderr, r.stderr  # a usage error, not an OverflowError (exit 3)
    r = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", "app", "--host", "256.1.1.1"], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.startswith("error: cannot listen") and "check --host" in r.stderr, r.stderr
