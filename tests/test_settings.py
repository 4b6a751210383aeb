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
