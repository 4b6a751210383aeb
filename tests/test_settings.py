"""Settings precedence: defaults < lipsync.toml < LIPSYNC_* env < flags; and the CLI shows them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings


def test_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    assert Settings().crf == 18 and Settings().sync_mode == "bounce"
    (tmp_path / "lipsync.toml").write_text('crf = 22\nsync_mode = "loop"\n')
    assert Settings().crf == 22 and Settings().sync_mode == "loop"
    monkeypatch.setenv("LIPSYNC_CRF", "25")
    s = Settings()
    assert s.crf == 25 and s.sync_mode == "loop"
    s2 = s.with_overrides(crf=30, sync_mode=None)
    assert s2.crf == 30 and s2.sync_mode == "loop"
    with pytest.raises(LipsyncError, match="sync_mode"):
        s.with_overrides(sync_mode="sideways")


def test_config_show_lists_settings(tmp_path):
    (tmp_path / "my.toml").write_text("crf = 27\n")
    r = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", "--config", str(tmp_path / "my.toml"), "config", "show"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "crf" in r.stdout and "27" in r.stdout and "LIPSYNC_SYNC_MODE" in r.stdout


def test_load_settings_reads_the_named_file_without_touching_the_environment(tmp_path, monkeypatch):
    import os

    from lipsync_cli.settings import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    (tmp_path / "lipsync.toml").write_text("crf = 22\n")
    (tmp_path / "other.toml").write_text('crf = 27\nlips = "map"\n')
    before = dict(os.environ)
    s = load_settings(tmp_path / "other.toml")
    assert type(s) is Settings and s.crf == 27 and s.lips == "map"
    assert dict(os.environ) == before
    assert load_settings().crf == 22  # the default file is untouched by the call above
    monkeypatch.setenv("LIPSYNC_CRF", "30")
    assert load_settings(tmp_path / "other.toml").crf == 30  # the environment still beats the file


def test_nothing_below_the_cli_reads_settings_or_writes_the_environment():
    """Settings flow in as arguments: only cli.py builds them from file + environment, and nobody sets os.environ."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "lipsync_cli"
    bad = []
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if rel not in ("cli.py", "settings.py") and (
                    name == "load_settings" or (name == "Settings" and not node.args and not node.keywords)
                ):
                    bad.append(f"{rel}:{node.lineno} reads settings")
                if name in ("putenv", "setdefault", "update") and "environ" in ast.unparse(f):
                    bad.append(f"{rel}:{node.lineno} writes os.environ")
            targets = node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Subscript) and "environ" in ast.unparse(t.value) for t in targets):
                bad.append(f"{rel}:{node.lineno} writes os.environ")
    assert not bad, bad


@pytest.mark.slow
def test_settings_passed_to_dub_win_over_file_and_environment(tmp_path, monkeypatch):
    """dub(..., Settings(lips="map")) from Python uses the map although lipsync.toml and LIPSYNC_LIPS say model."""
    from lipsync_cli import media, progress
    from lipsync_cli.dubbing import dub
    from lipsync_cli.engine import retrieval
    from tests.conftest import shared_file

    video = shared_file("media/pcavs_00086.mp4")
    speech = media.read_audio(shared_file("speech/musetalk_eng.wav"), 16000)[:16000]
    wav = tmp_path / "speech.wav"
    media.write_wav(wav, speech, 16000)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lipsync.toml").write_text('lips = "model"\n')
    monkeypatch.setenv("LIPSYNC_LIPS", "model")
    chosen = []
    real = retrieval.lips_model
    monkeypatch.setattr(retrieval, "lips_model", lambda choice="model": chosen.append(choice) or real(choice))
    progress.set_quiet(True)
    result = dub(video, None, wav, tmp_path / "out.mp4", Settings(lips="map"), force=True)
    assert chosen == ["map"]
    assert result.output.is_file() and result.frames == 25


@pytest.mark.parametrize(
    ("name", "value"),
    [("fps", "-5"), ("fps", "0"), ("fps", "nan"), ("fps", "inf"), ("fps", "1e9"), ("smooth", "inf"),
     ("download_timeout", "inf"), ("train_grad_clip", "nan"), ("face_index", "-1"), ("seed", "-1")],
)  # fmt: skip
def test_numeric_settings_out_of_range_are_user_errors(name, value, tmp_path, monkeypatch):
    """A nonsensical number names the setting (exit 1) instead of crashing the dub that uses it (exit 3)."""
    from lipsync_cli.settings import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    monkeypatch.setenv(f"LIPSYNC_{name.upper()}", value)
    with pytest.raises(LipsyncError, match=f"invalid setting {name} "):
        load_settings()
    with pytest.raises(LipsyncError, match=f"invalid setting {name}:"):
        Settings.load(**{name: float(value)})


def test_fps_within_bounds_is_kept():
    assert [Settings.load(fps=f).fps for f in (1, 29.97, 120)] == [1.0, 29.97, 120.0]


def test_config_named_by_flag_or_environment_must_be_a_readable_file(tmp_path, monkeypatch):
    """--config and LIPSYNC_CONFIG fail alike on a missing path, a folder, a FIFO or non-UTF-8 bytes (they were
    silently skipped or a UnicodeDecodeError); an absent ./lipsync.toml is fine, it is optional."""
    import os

    from lipsync_cli.settings import load_settings, read_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    assert load_settings().crf == 18
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe\x00")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        tmp_path / "bad.toml": r"cannot read config file .*bad\.toml: not UTF-8 text",
        tmp_path / "none.toml": r"config file not found: .*none\.toml",
        tmp_path: r"config file is a folder: ",
        tmp_path / "fifo": r"config file is not a regular file: .*fifo",
    }
    for path, message in cases.items():
        with pytest.raises(LipsyncError, match=message):
            load_settings(path)
        monkeypatch.setenv("LIPSYNC_CONFIG", str(path))
        with pytest.raises(LipsyncError, match=message):
            load_settings()
        monkeypatch.delenv("LIPSYNC_CONFIG")
        if path.name != "fifo":  # the API's config= (not the FIFO: were its check lost, the read would hang)
            with pytest.raises(LipsyncError, match=message):
                read_config(path)
