"""`lipsync eval`: protocols on real shared clips (skipped when ../shared is absent), the report, --metric parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lipsync_cli import progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.eval import protocols, report
from lipsync_cli.settings import Settings
from tests.conftest import shared_file

CLIP = "media/pcavs_00086.mp4"  # 5 s at 224x224: the fastest real clip
SPEECH = "speech/sadtalker_RD_Radio31_000.wav"


@pytest.fixture(scope="module")
def settings() -> Settings:
    progress.set_quiet(True)
    return Settings(quiet=True)


@pytest.fixture(scope="module")
def reconstructed(settings, tmp_path_factory) -> tuple[protocols.ClipResult, report.SideBySide]:
    case = protocols.media_case(shared_file(CLIP), settings)
    hook = report.SideBySide(tmp_path_factory.mktemp("videos"))
    return protocols.evaluate_case(case, list(protocols.METRICS), "retrieval", settings, on_clip=hook), hook


@pytest.fixture(scope="module")
def crossed(settings) -> protocols.ClipResult:
    from lipsync_cli.voice.speech import load_speech

    speech = load_speech(None, shared_file(SPEECH), settings)[0][: 3 * protocols.SR]
    case = protocols.cross_case(shared_file(CLIP), speech, "radio31", None, settings)
    return protocols.evaluate_case(case, list(protocols.METRICS), "retrieval", settings)


def test_media_case_holds_out_the_end(settings):
    case = protocols.media_case(shared_file(CLIP), settings)
    n = case.source.n_frames
    cut = n - len(case.background)
    assert abs(cut - round(0.6 * n)) <= 1
    assert case.source.usable[:cut].all() and not case.source.usable[cut:].any()  # engine never sees the truth
    assert np.array_equal(case.background, np.arange(cut, n))
    assert len(case.speech) == round(len(case.background) / settings.fps * protocols.SR)
    assert case.frames.shape[0] == len(case.background)


def test_reconstruct_scores_are_finite_and_ordered(reconstructed):
    result, _ = reconstructed
    assert set(result.scores) == {"retrieval", "real", "frozen", "floor"}
    keys = ("lve", "lve_max", "sync_r", "sync_conf", "closure_gap", "psnr_mouth", "ssim_face", "sharpness", "jitter")
    for system, scores in result.scores.items():
        for key in keys:
            assert np.isfinite(scores[key]), (system, key, scores[key])
    real, frozen = result.scores["real"], result.scores["frozen"]
    assert real["lve"] < 1e-6 and real["psnr_face"] == 100.0 and real["ssim_mouth"] == pytest.approx(1.0)
    assert frozen["lve"] > real["lve"] + 0.005
    assert result.scores["floor"]["lve"] > real["lve"] + 0.005
    assert 0 <= result.scores["retrieval"]["closure"] <= 1


def test_cross_runs_reference_free(crossed):
    assert crossed.group == "cross"
    for scores in crossed.scores.values():
        assert "lve" not in scores and "psnr_mouth" not in scores  # no ground truth in cross
        assert np.isfinite(scores["sync_conf"]) and np.isfinite(scores["sharpness"])
    assert crossed.scores["floor"]["sharpness"] == pytest.approx(1.0)  # the unchanged input vs itself
    assert crossed.scores["floor"]["flicker"] == pytest.approx(0.0)


def test_report_writes_json_html_png_and_videos(reconstructed, crossed, tmp_path):
    result, hook = reconstructed
    run = protocols.EvalRun(
        "retrieval", list(protocols.METRICS), [result, crossed], skipped=[("cross", "x", "no face")]
    )
    index = report.write_report(run, tmp_path, hook)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(data["groups"]) == {"reconstruct/media", "cross"}
    assert data["groups"]["reconstruct/media"]["mean"]["real"]["lve"] == pytest.approx(0.0, abs=1e-9)
    assert len(list(tmp_path.glob("*.png"))) >= 3
    page = index.read_text()
    assert "data:image/png;base64," in page and "reconstruct/media" in page and "no face" in page
    assert list((tmp_path / "videos").glob("*.mp4"))
    report.print_report(run)  # the terminal tables render without error


def test_grid_reference_is_other_clips_and_background_is_unusable(settings):
    root = shared_file("corpus/grid/s1")
    test, refs = protocols.grid_split(root, settings.data_dir, limit=1)
    assert test and refs and not set(test) & set(refs)
    assert protocols.grid_split(root, settings.data_dir, limit=1) == (test, refs)  # deterministic
    ref_src = protocols.grid_reference(root, refs[:2], settings)
    case = protocols.grid_case(root, test[0], ref_src, settings)
    n_ref = sum(s.n_frames for s in ref_src)
    assert case.source.usable[:n_ref].all() and not case.source.usable[n_ref:].any()
    assert case.background[0] == n_ref and len(case.frames) == len(case.background)
    assert case.text and case.pauses is not None and case.pauses[:5].all()  # GRID clips start in silence
    result = protocols.evaluate_case(case, ["lve"], "retrieval", settings)
    assert result.scores["real"]["lve"] < 1e-6 < result.scores["frozen"]["lve"]


def test_parse_metrics():
    assert protocols.parse_metrics("all") == list(protocols.METRICS)
    assert protocols.parse_metrics("lve, sync,lve") == ["lve", "sync"]
    with pytest.raises(LipsyncError, match="unknown metric 'bogus'"):
        protocols.parse_metrics("lve,bogus")
    with pytest.raises(LipsyncError, match="voice"):
        protocols.parse_metrics("voice")
    with pytest.raises(LipsyncError, match="no metric"):
        protocols.parse_metrics(" , ")
    with pytest.raises(LipsyncError, match="unknown protocol"):
        protocols.parse_protocols("both")


def test_cli_rejects_unknown_metric():
    r = subprocess.run(
        [sys.executable, "-m", "lipsync_cli.cli", "--quiet", "eval", "--metric", "lve,blur"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "unknown metric 'blur'" in r.stderr and "lve, sync" in r.stderr


def test_cli_with_nothing_to_evaluate_is_an_error(tmp_path):
    """No clip measured is a failure (exit 1, one error line naming why), not an empty table and exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    cmd = [sys.executable, "-m", "lipsync_cli.cli", "--quiet", "eval", "--protocol", "reconstruct", "--metric", "lve"]
    r = subprocess.run(  # run where no ../shared exists: no GRID found, and the video folder is missing
        [*cmd, "--videos", tmp_path / "none"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no clip could be evaluated (") and "no such folder" in last
    assert "Traceback" not in r.stderr
