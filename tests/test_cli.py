"""CLI conventions (--version, exit codes, -q anywhere, --json, config typos, Ctrl-C) and the Python API / batch
on a real clip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lipsync_cli.errors import LipsyncError
from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd: Path | None = None, env: dict | None = None, quiet: bool = True):
    """`lipsync ARGS` as a user runs it (no --quiet added unless asked), from `cwd`."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    full_env.pop("LIPSYNC_CONFIG", None)
    cmd = [sys.executable, "-m", "lipsync_cli.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


def test_version_and_usage_exit_codes(tmp_path):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == "lipsync 0.1.0"
    r = cli("dub", "x.mp4", "hi", "--engine", "bogus")
    assert r.returncode == 2 and "retrieval" in r.stderr  # usage error: the choices are named
    r = cli("dub", "--help")
    assert r.returncode == 0 and "retrieval|neural|seed" in r.stdout and "[default: retrieval]" in r.stdout


def test_paths_print_as_they_are(tmp_path):
    """Paths and words are printed verbatim, never read as rich markup: a job named "v[/x].mp4" stopped a whole
    batch with MarkupError (exit 3) and "[final] talk.mp4" printed as " talk.mp4"."""
    names = ["v[/x].mp4", "[final] talk.mp4", "[red]z.mp4"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"video": n, "text": "Hi."}) + "\n" for n in names))
    r = cli("dub", "--batch", jobs, cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # every job a user error (no such file), none a bug
    for n, name in enumerate(names, start=1):
        assert f"job {n}/3 {tmp_path / name}" in r.stderr, r.stderr


def test_user_error_bug_and_quiet_anywhere(tmp_path):
    r = cli("dub", tmp_path / "missing.mp4", "hi", "-q", cwd=tmp_path)  # -q after the subcommand
    assert r.returncode == 1 and r.stderr == f"error: no such file: {tmp_path / 'missing.mp4'}\n"
    bug = (
        "from lipsync_cli import cli, dubbing\n"
        "def boom(*a, **k): raise ZeroDivisionError('division by zero')\n"
        "dubbing.dub = boom\n"
        "cli.main(['dub', 'a.mp4', 'hi'])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", bug], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "unexpected ZeroDivisionError" in r.stderr and "please report" in r.stderr and "LIPSYNC_DEBUG=1" in r.stderr


def test_config_typos_and_field_errors(tmp_path):
    (tmp_path / "lipsync.toml").write_text("crff = 20\n")
    r = cli("config", "show", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == "error: unknown setting 'crff' in lipsync.toml; did you mean 'crf'?\n"
    (tmp_path / "lipsync.toml").write_text('crf = 70\nengine = "neural"\n')
    r = cli("config", "show", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: invalid setting crf (from lipsync.toml")
    assert "less than or equal to 51" in r.stderr
    r = cli("config", "show", cwd=tmp_path, env={"LIPSYNC_SYNC_MODE": "sideways"})
    assert r.returncode == 1 and "sync_mode" in r.stderr
    (tmp_path / "lipsync.toml").write_text('crf = 20\nengine = "neural"\n')
    r = cli("config", "show", "--json", cwd=tmp_path)
    shown = json.loads(r.stdout)
    assert shown["crf"] == 20 and shown["engine"] == "neural" and shown["data_dir"] == "data"
    r = cli("config", "show", cwd=tmp_path)
    assert "PosixPath" not in r.stdout and "unset" in r.stdout
    from lipsync_cli.settings import Settings

    assert all(f.description for f in Settings.model_fields.values())
    r = cli("data", "list", cwd=tmp_path)
    assert r.returncode == 0 and "lipsync data fetch" in r.stderr


def main_here(capsys, *args) -> tuple[int, str]:
    """`cli.main(ARGS)` in this process (no interpreter start-up: fast): its exit code and stderr."""
    from lipsync_cli import cli as cli_module

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            cli_module.main([*map(str, args)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main installs its own handler
    return done.value.code, capsys.readouterr().err


def one_error(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_files_and_values_exit_1(tmp_path, monkeypatch, capsys):
    """A config file that cannot be read, a config path that is not a file, from the flag or LIPSYNC_CONFIG, and
    an out-of-range fps: one error line and exit 1 (they were exit 3, or silently the defaults)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe\x00")
    for path in (tmp_path / "bad.toml", tmp_path, tmp_path / "none.toml"):
        code, err = main_here(capsys, "--config", path, "config", "show")
        assert code == 1 and one_error(err) and str(path) in err, err
        monkeypatch.setenv("LIPSYNC_CONFIG", str(path))
        code, err = main_here(capsys, "config", "show")
        assert code == 1 and one_error(err) and str(path) in err, err
        monkeypatch.delenv("LIPSYNC_CONFIG")
    for fps in ("-5", "0", "nan", "inf", "1e9"):
        monkeypatch.setenv("LIPSYNC_FPS", fps)
        code, err = main_here(capsys, "config", "show", "--json")
        assert code == 1 and one_error(err) and "invalid setting fps" in err, err
    monkeypatch.delenv("LIPSYNC_FPS")
    assert main_here(capsys, "config", "show", "--json")[0] == 0  # no ./lipsync.toml: fine, it is optional


def test_batch_file_that_is_not_text_exits_1(tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00")  # a video, given by mistake
    (tmp_path / "jobs.jsonl").write_bytes(b'{"video": "\xff.mp4", "text": "hi"}\n')  # not UTF-8
    for path in (tmp_path / "clip.mp4", tmp_path / "jobs.jsonl"):
        code, err = main_here(capsys, "-q", "dub", "--batch", path)
        assert code == 1 and one_error(err) and f"--batch {path}: not a text file" in err, err


def test_debug_keeps_exit_3_and_the_error_line(monkeypatch, capsys):
    """LIPSYNC_DEBUG=1 adds the traceback; the exit code and the `error: unexpected` line stay."""
    from lipsync_cli import dubbing

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(dubbing, "dub", boom)
    monkeypatch.setenv("LIPSYNC_DEBUG", "1")
    code, err = main_here(capsys, "dub", "a.mp4", "hi")
    assert code == 3 and "Traceback" in err and "ZeroDivisionError" in err
    assert "\nerror: unexpected ZeroDivisionError: division by zero\n" in err and "please report" in err


def test_eval_arguments_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """A bad --rows key or value, a --report that is a file and a negative --limit fail at once (they were exit 3
    after the first clip's work, or a silently shorter run)."""
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    for rows, said in (("retrieval:crf=abc", "takes no key 'crf'; valid: lips"), ("retrieval:nokey=1", "'nokey'"),
                       ("neural:adapt_steps=abc", "adapt_steps='abc'")):  # fmt: skip
        code, err = main_here(capsys, "-q", "eval", "--metric", "articulation", "--rows", rows)
        assert code == 1 and one_error(err) and said in err, err
    (tmp_path / "afile").write_text("")
    for report in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        code, err = main_here(capsys, "-q", "eval", "--metric", "voice", "--report", report)
        assert code == 1 and one_error(err) and "afile is a file, not a folder" in err, err
    assert main_here(capsys, "-q", "eval", "--limit", "-1")[0] == 2


def test_api_settings_are_explicit(tmp_path, monkeypatch):
    import lipsync_cli as lipsync

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lipsync.toml").write_text("crff = 20\n")  # not read unless asked
    monkeypatch.setenv("LIPSYNC_CRF", "30")
    d = lipsync.Dubber(engine="neural", crf=21)
    assert (d.settings.engine, d.settings.crf, d.settings.quiet) == ("neural", 21, True)
    with pytest.raises(LipsyncError, match="unknown setting 'egine' in the arguments; did you mean 'engine'"):
        lipsync.Dubber(egine="neural")
    with pytest.raises(LipsyncError, match="did you mean 'crf'"):
        lipsync.Dubber(config=tmp_path / "lipsync.toml")
    assert lipsync.Dubber(env=True).settings.crf == 30
    with pytest.raises(LipsyncError, match="measuring articulation needs the words"):  # said before any work
        lipsync.dub(tmp_path / "nowhere.mp4", audio=tmp_path / "speech.wav", measure=True)


def test_dubber_and_batch_on_a_real_clip(tmp_path):
    """Three dubs through one Dubber (one face tracker, nothing process-wide changed; the first again, after other
    speech, is the same file), then `dub --batch --json` with a failing job in the middle: the others still run and
    each job gets one line."""
    import lipsync_cli as lipsync

    clip = shared_file("media/pcavs_00086.mp4")
    fd2, threads = os.readlink("/proc/self/fd/2"), threading.active_count()
    with lipsync.Dubber(voice="tts") as dubber:
        first = dubber.dub(clip, "Bob bought a big map.", output=tmp_path / "a.mp4", measure=True)
        tracker = dubber._tracker
        seen = []
        second = dubber.dub(
            clip, "Hello.", output=tmp_path / "b.mp4", sync_mode="cut", on_progress=lambda *a: seen.append(a)
        )
        assert dubber._tracker is tracker
        again = dubber.dub(clip, "Bob bought a big map.", output=tmp_path / "c.mp4")  # after other speech
    assert again.output.read_bytes() == first.output.read_bytes()  # the same file, bit for bit
    assert os.readlink("/proc/self/fd/2") == fd2 and threading.active_count() == threads
    assert first.output.is_file() and second.output.is_file() and first.faces_found > 0.9
    assert first.engine == "retrieval" and first.voice == "tts" and 1.0 < first.duration < 3.0
    assert first.articulation["n_bilabial"] >= 4 and first.articulation["bilabial"] >= 0.75, first.articulation
    assert second.articulation is None  # measured only when asked
    assert {"speech", "analyse", "engine", "render", "total"} <= set(first.timings)
    assert any(stage == "rendering" and done == total for stage, done, total in seen)

    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"video": str(clip), "text": "Map.", "output": "one.mp4", "voice": "tts"},
        {"video": "missing.mp4", "text": "Nothing."},
        {"video": str(clip), "text": "Two.", "output": "two.mp4", "voice": "tts", "crff": 20},
    ]
    jobs.write_text("\n".join(json.dumps(j) for j in lines) + "\n")
    r = cli("-q", "dub", "--batch", jobs, "--json", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["ok"] for o in out] == [True, False, False]
    assert out[1]["error"] == f"no such file: {tmp_path / 'missing.mp4'}"
    assert "did you mean 'crf'" in out[2]["error"]
    assert Path(out[0]["output"]) == tmp_path / "one.mp4" and (tmp_path / "one.mp4").is_file()


def _interrupt_a_dub(clip: Path, work: Path, tmp: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "lipsync_cli.cli", "dub", clip, "A long sentence to say. " * 8, "-o", "out.mp4"]
    # a shell without job control starts background commands with SIGINT ignored, and the dub would inherit that
    # (pytest run as `... &` saw it finish with exit 0): the dub starts with Ctrl-C's default, as from a terminal
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    for _ in range(600):  # interrupt mid-dub: once its work folder exists (speech made, video being analysed)
        if list(tmp.glob("lipsync-*")) or proc.poll() is not None:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_exits_130_and_cleans_up(tmp_path):
    clip = shared_file("media/pcavs_00086.mp4")
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), tmp.mkdir()
    code, err = _interrupt_a_dub(clip, work, tmp)
    if code == -signal.SIGINT:  # KNOWN FLAKE (seen once in a full run under load): the process died of the signal
        code, err = _interrupt_a_dub(clip, work, tmp)  # itself; the leftover checks below still apply to both runs
    assert code == 130, err
    assert err.endswith("\ninterrupted\n") and "Traceback" not in err
    assert list(work.iterdir()) == [], "output (or its hidden temp file) left behind"
    assert not list(tmp.glob("lipsync-*")), "work folder left behind"  # (onnxruntime and torch leave their own)


def test_measure_line_says_what_the_words_lack():
    """`dub --measure` on words with no p/b/m or no pause says so, where it printed "nan%"."""
    from lipsync_cli.cli import _articulation_line

    full = {"bilabial": 0.9, "n_bilabial": 10, "contrast": 4.2, "silence": 1.0}
    assert (
        _articulation_line(full) == "p/b/m closed 90% of 10, open-vowel/closure contrast 4.20, at rest in pauses 100%"
    )
    bare = _articulation_line(
        {"bilabial": float("nan"), "n_bilabial": 0, "contrast": float("nan"), "silence": float("nan")}
    )
    assert "nan" not in bare and "no p/b/m" in bare and "no pause" in bare


def test_api_says_what_is_wrong_with_its_arguments(tmp_path):
    """The Python API with words that are not text: one LipsyncError saying so (was AttributeError: 'int' object
    has no attribute 'strip'); an existing output names the keyword as well as the flag."""
    import lipsync_cli as lipsync

    video, out = tmp_path / "v.mp4", tmp_path / "o.mp4"
    video.write_bytes(b"x")
    out.write_bytes(b"x")
    for words in (123, b"Hello", ["Hello"]):
        with pytest.raises(lipsync.LipsyncError, match=r"must be text \(str\)"):
            lipsync.dub(video, words, output=tmp_path / "new.mp4")
    with pytest.raises(lipsync.LipsyncError, match=r"force=True"):
        lipsync.dub(video, "Hello.", output=out)
