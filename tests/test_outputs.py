"""Outputs and temp files: atomic no-overwrite publish, early errors, temp-space checks, cleanup on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lipsync_cli import files, media
from lipsync_cli.errors import LipsyncError
from tests.conftest import shared_file

SR = 16000


def ours(folder: Path) -> list[str]:
    """Temp names a dub makes (files.temp_name), anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*") if files.TEMP_TAG + "-" in p.name]


@pytest.fixture
def speech(tmp_path) -> Path:
    """3 s of a shared recording, as a file to dub from (no TTS: quick)."""
    x = media.read_audio(shared_file("speech/musetalk_eng.wav"), SR)[: 3 * SR]
    p = tmp_path / "speech.wav"
    media.write_wav(p, x, SR)
    return p


def start_dub(*args, tmpdir: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    cmd = [sys.executable, "-m", "lipsync_cli.cli", "--quiet", "dub", *map(str, args)]
    # SIGINT as in a terminal (a shell running us in the background would leave it ignored, and children inherit that)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_output_folder_is_an_error_before_any_work(tmp_path, speech):
    video = shared_file("media/pcavs_00086.mp4")
    folder = tmp_path / "out.mp4"
    folder.mkdir()
    t = time.perf_counter()
    p = start_dub(video, "--audio", speech, "-o", folder, "--force")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().startswith("error:") and "is a folder" in err, err
    assert len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t < 20  # no analysis happened (that alone takes longer on this machine)
    assert not list(tmp_path.glob(".*"))


def test_no_input_is_ever_the_output(tmp_path):
    """--force never lets the output replace an input: the video, the --audio file, the --voice-ref recording or a
    --transcript file (only the video was checked: `dub v.mp4 --audio a.mp4 -o a.mp4 --force` replaced a.mp4).
    A --transcript that names a missing text file is an error, not the words "words.txt"."""
    from lipsync_cli.dubbing import dub
    from lipsync_cli.settings import Settings
    from lipsync_cli.voice.speech import speak

    video, audio, ref, words = (tmp_path / n for n in ("v.mp4", "a.mp4", "ref.wav", "words.txt"))
    for f in (video, audio, ref, words):
        f.write_bytes(b"input")
    cases = [
        (dict(text=None, audio=audio, output=audio), Settings()),
        (dict(text="Hi.", audio=None, output=ref), Settings(voice_ref=ref)),
        (dict(text=None, audio=audio, output=tmp_path / "w.mp4", transcript=str(tmp_path / "w.mp4")), Settings()),
    ]
    for kw, settings in cases:
        (tmp_path / "w.mp4").write_bytes(b"input")
        with pytest.raises(LipsyncError, match="over the input"):
            dub(video, settings=settings, force=True, **kw)
    with pytest.raises(LipsyncError, match="over the input"):
        speak(video, "Hi.", ref.with_suffix(".wav"), Settings(voice_ref=ref), force=True)
    with pytest.raises(LipsyncError, match="file not found"):
        dub(video, None, audio, tmp_path / "o.mp4", Settings(), transcript=str(tmp_path / "missing.txt"))
    assert all(f.read_bytes() == b"input" for f in (video, audio, ref, words, tmp_path / "w.mp4"))


def test_publish_without_force_never_overwrites(tmp_path):
    out = tmp_path / "o.wav"
    a, b = files.atomic(out, ".wav", force=False), files.atomic(out, ".wav", force=False)
    a.tmp.write_bytes(b"first")
    b.tmp.write_bytes(b"second")
    a.commit()
    with pytest.raises(LipsyncError, match="exists; use --force"):
        b.commit()
    b.discard()
    assert out.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


def test_unwritable_folder_found_at_once(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system stops it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode == 0
        if not mounted:
            pytest.skip("root writes anywhere, and no read-only tmpfs could be mounted")
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(LipsyncError, match="cannot write"):
            files.atomic(ro / "o.mp4")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])


def test_json_output_is_strict_json():
    """A figure with nothing to measure (no pause in the words: silence is NaN) is null in --json output: strict JSON
    has no NaN, and jq or a browser refuse a file that holds one."""
    import json

    from lipsync_cli.dubbing import DubResult

    fields = {f: 0 for f in DubResult.__dataclass_fields__}
    r = DubResult(
        **fields | {"output": Path("o.mp4"), "articulation": {"silence": np.float64("nan"), "n": np.int64(3)}}
    )
    text = json.dumps(r.to_json(), allow_nan=False)  # raises on NaN
    assert json.loads(text)["articulation"] == {"silence": None, "n": 3}
    assert files.json_safe({1: (np.arange(2), float("inf"))}) == {"1": [[0, 1], None]}


def test_sweep_removes_only_our_stale_names(tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f"lipsync-{dead}-0123abcd-x"
    stale.mkdir()
    (stale / "speech.wav").write_bytes(b"x")
    stale_file = tmp_path / f".o.mp4.lipsync-{dead}-89abcdef.tmp.mp4"
    stale_file.write_bytes(b"x")
    fresh = tmp_path / f"lipsync-{dead}-fedcba98-y"  # a dead pid, but too new to be sure (another container?)
    fresh.mkdir()
    alive = tmp_path / f"lipsync-{os.getppid()}-00000000-z"  # a live process's
    alive.mkdir()
    other = tmp_path / f"notours-{dead}-0123abcd"
    other.mkdir()
    users = [tmp_path / n for n in ("holiday lipsync-20241207-20241207.mp4", f"lipsync-{dead}-0123abcd.mp4")]
    users += [tmp_path / f".o.mp4.lipsync-{dead}-89abcdef.tmp.mp4.bak", tmp_path / f"lipsync-{dead}-0123abcd-x.mp4"]
    for u in users:  # a user's files whose names only contain something like ours
        u.write_bytes(b"mine")
    old = time.time() - 3600
    for p in (stale, stale_file, alive, other, *users):
        os.utime(p, (old, old))
    assert files.sweep_stale(tmp_path) == 2
    kept = [fresh.name, alive.name, other.name, *(u.name for u in users)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.mark.slow
def test_concurrent_dubs_exactly_one_wins(tmp_path, speech):
    video = shared_file("media/pcavs_00086.mp4")
    out = tmp_path / "out.mp4"
    procs = [start_dub(video, "--audio", speech, "-o", out) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "exists; use --force" in loser and len(loser.strip().splitlines()) == 1, loser
    assert media.probe(out).has_audio
    assert not ours(tmp_path), ours(tmp_path)


def tmpfs(path: Path, size: str) -> bool:
    """Mount a small tmpfs at `path` (root only); False when that is not possible here."""
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_temp_folder_too_small_is_one_clear_error(tmp_path, speech, monkeypatch):
    video = shared_file("media/pcavs_00086.mp4")
    small = tmp_path / "small"
    out = tmp_path / "out.mp4"
    if tmpfs(small, "256k"):  # a real small temp folder
        try:
            p = start_dub(video, "--audio", speech, "-o", out, tmpdir=small)
            _, err = p.communicate(timeout=300)
            assert p.returncode == 1, err
            left = list(small.iterdir())
        finally:
            subprocess.run(["umount", str(small)])
    else:  # in-process, with disk_usage saying the folder is nearly full
        import shutil

        from lipsync_cli import dubbing
        from lipsync_cli.settings import Settings

        real = shutil.disk_usage
        monkeypatch.setenv("TMPDIR", str(small))
        monkeypatch.setattr("tempfile.tempdir", None)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=256 << 10))
        with pytest.raises(LipsyncError) as e:
            dubbing.dub(video, None, speech, out, Settings(quiet=True))
        err, left = f"error: {e.value}", list(small.iterdir())
    line = err.strip()
    assert line.startswith("error:") and len(line.splitlines()) == 1 and "TMPDIR" in line, err
    assert str(small) in line
    assert not left, left
    assert not out.exists() and not ours(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_render_leaves_no_temp_file(tmp_path, sig):
    video = shared_file("media/pcavs_00086.mp4")
    long = tmp_path / "long.wav"  # 40 s: bounces the 5 s clip, so the render runs long enough to be caught
    media.write_wav(long, media.read_audio(shared_file("speech/musetalk_eng.wav"), SR)[: 40 * SR], SR)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out.mp4"
    p = start_dub(video, "--audio", long, "-o", out, "--sync-mode", "bounce", tmpdir=tmp)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # the reserved output grows once frames are encoded
        if any(Path(f).stat().st_size > 100_000 for f in ours(tmp_path) if Path(f).is_file() and "out.mp4" in f):
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc in (130, 128 + sig), (rc, err)
    assert err.strip() == ("interrupted" if sig == signal.SIGINT else "terminated"), err
    assert not out.exists()
    assert not ours(tmp_path), ours(tmp_path)
    assert not list(tmp.iterdir())
    # and no ffmpeg of ours is left running
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps and str(tmp) not in ps


def test_sample_frames_bounds_the_pool():
    from lipsync_cli.dubbing import POOL_BLOCK, POOL_FRAMES, POOL_MIN_FRAMES, sample_frames

    ranges, pool = sample_frames(15000, 15000)  # a 10-minute bounce: all analysed, a bounded pool
    assert ranges == [(0, 15000)] and pool.sum() == POOL_FRAMES
    ranges, pool = sample_frames(15000, 50)  # 2 s of a 10-minute clip: the frames shown plus stretches across it
    assert ranges[0] == (0, 50) and ranges[-1][1] > 14000
    assert sum(b - a for a, b in ranges) == pytest.approx(POOL_MIN_FRAMES, abs=POOL_BLOCK)
    assert pool.sum() == sum(b - a for a, b in ranges)
    ranges, pool = sample_frames(130, 40)  # a short clip: all of it
    assert ranges == [(0, 130)] and pool.all()
    assert np.all(np.diff([a for a, _ in ranges]) > 0) if len(ranges) > 1 else True


def peak_rss_mb(*args) -> float:
    """Run a dub; the peak resident memory of its Python process (ffmpeg children are separate and fixed-size)."""
    p = start_dub(*args)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_bounce_memory_flat_in_video_length(tmp_path):
    """The same 130 s of speech bounced over a 20 s and a 2-minute input: the long input costs no more memory beyond
    its per-frame landmarks (~0.03 MB a frame; storing frames cost 0.22 MB a frame and more)."""
    src = shared_file("media/pcavs_00086.mp4")  # 224 px: small frames keep this quick
    exe = media.ffmpeg_exe()
    clips = {}
    for seconds in (20, 120):
        clips[seconds] = tmp_path / f"in{seconds}.mp4"
        loops = str(int(np.ceil(seconds / media.probe(src).duration)) - 1)
        cmd = [exe, "-loglevel", "error", "-stream_loop", loops, "-i", str(src), "-t", str(seconds), "-c", "copy"]
        subprocess.run([*cmd, str(clips[seconds])], check=True)
    x = media.read_audio(shared_file("speech/musetalk_eng.wav"), SR)
    speech = tmp_path / "speech.wav"
    media.write_wav(speech, np.concatenate([x, x, x[: 10 * SR]]), SR)
    short = peak_rss_mb(clips[20], "--audio", speech, "-o", tmp_path / "a.mp4", "--sync-mode", "bounce")
    long = peak_rss_mb(clips[120], "--audio", speech, "-o", tmp_path / "b.mp4", "--sync-mode", "bounce")
    extra_frames = (120 - 20) * 25
    print(f"peak RSS of the dub: 20 s input {short:.0f} MB, 2-minute input {long:.0f} MB")
    assert long - short < 0.06 * extra_frames, (short, long)
    assert media.probe(tmp_path / "b.mp4").duration == pytest.approx(130, abs=0.1)
