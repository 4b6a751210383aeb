"""Import and prep on real GRID clips from ../shared (copied into a tmp corpus with a corrupt clip beside them),
the splits, and the Dataset's windows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from safetensors import safe_open
from typer.testing import CliRunner

from lipsync_cli import media
from lipsync_cli.audio import frames_to_video, speech_loudness_db
from lipsync_cli.data.dataset import WindowDataset
from lipsync_cli.data.grid import read_align, sentence
from lipsync_cli.data.importer import import_videos, speech_segments
from lipsync_cli.data.prep import (
    Clip,
    find_clips,
    grid_words,
    prep,
    sha256,
    shard_info,
    split_clips,
    word_frames,
)

GRID = SHARED / "corpus" / "grid" / "s1"
IDS = ["bbaf2n", "bbaf3s", "bbal7s"]
EXTRA = ["bbal8p", "bbas3a"]  # spoken in the synthesized recordings
SIZE = 96
pytestmark = pytest.mark.skipif(not (GRID / "video" / f"{IDS[0]}.mpg").is_file(), reason=f"no GRID clips in {GRID}")


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """<tmp>/grid/s1/{video,align}: three real clips and `zzbad.mpg`, which no decoder can read."""
    root = tmp_path_factory.mktemp("src") / "grid"
    for part in ("video", "align"):
        (root / "s1" / part).mkdir(parents=True)
    for i in IDS:
        shutil.copy(GRID / "video" / f"{i}.mpg", root / "s1" / "video")
        shutil.copy(GRID / "align" / f"{i}.align", root / "s1" / "align")
    (root / "s1" / "video" / "zzbad.mpg").write_bytes(np.random.default_rng(0).bytes(50_000))
    return root


@pytest.fixture(scope="module")
def prepped(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / str(SIZE)
    return out, prep(None, out, [corpus], size=SIZE, workers=2)


def test_prep_writes_consistent_shards(prepped):
    out, s = prepped
    assert (s.clips, s.prepped, s.skipped) == (4, 3, 0)
    assert [k for k, _ in s.failures] == ["grid/s1/zzbad"]
    assert "cannot read" in s.failures[0][1] and "zzbad.mpg" in s.failures[0][1]
    assert s.frames == 3 * 75 and s.seconds == s.new_seconds == pytest.approx(9.0)
    for i in IDS:
        with safe_open(str(out / "grid" / "s1" / f"{i}.safetensors"), framework="numpy") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
            meta = f.metadata()
        T = 75
        assert t["crops"].shape == (T, SIZE, SIZE, 3) and t["crops"].dtype == np.uint8
        assert t["landmarks"].shape == (T, 478, 2) and t["lips"].shape == (T, 40, 2)
        assert t["affine"].shape == (T, 2, 3) and t["mouth"].shape == (T,)
        assert t["found"].mean() >= 0.95
        assert np.isfinite(t["lips"][t["found"]]).all() and (t["lips"][t["found"]] >= 0).all()
        assert t["mel"].shape == (4 * T + 1, 80) and t["mel"].dtype == np.float16  # ~300 rows at 100 Hz
        assert t["mfcc"].shape == (4 * T + 1, 13)
        assert t["audio"].shape == (T * 640,) and t["audio"].dtype == np.int16
        np.testing.assert_array_equal(t["mel_index"], np.arange(T) * 4)
        loud = speech_loudness_db(t["audio"].astype(np.float32) / 32767, 16000)
        assert loud == pytest.approx(-23.0, abs=1.0)
        words = json.loads(meta["words"])
        assert words == [[round(a, 4), round(b, 4), w] for a, b, w in read_align(GRID / "align" / f"{i}.align")]
        spoken = [w for _, _, w in words if w not in ("sil", "sp")]
        assert len(spoken) == 6  # GRID: command colour preposition letter digit adverb
        assert t["silence"][0] and t["silence"][-1] and not t["silence"].all()
        assert {words[k][2] for k in t["word_index"][t["word_index"] >= 0]} == set(spoken)
        assert (t["word_index"] >= 0).sum() == (~t["silence"]).sum()
        prov = json.loads(meta["provenance"])
        assert prov["sha256"] == sha256(GRID / "video" / f"{i}.mpg")
        assert json.loads(meta["info"])["frames"] == T


def test_rerun_skips_done_clips(prepped, corpus):
    out, _ = prepped
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = prep(None, out, [corpus], size=SIZE, workers=1)
    assert (again.prepped, again.skipped, len(again.failures)) == (0, 3, 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    assert not [p for p in out.rglob(".*")]  # no temp files left behind


def test_manifest_and_splits(prepped):
    out, _ = prepped
    m = json.loads((out / "manifest.json").read_text())
    keys = [f"{c['corpus']}/{c['speaker']}/{c['id']}" for c in m["clips"]]
    assert keys == [f"grid/s1/{i}" for i in IDS]
    assert all(c["frames"] == 75 and c["found"] >= 0.95 and (out / c["path"]).is_file() for c in m["clips"])
    utt = m["splits"]["utterance"]
    assert sorted(sum(utt.values(), [])) == sorted(keys)
    assert m["splits"]["speaker"] is None and "1 speaker" in m["splits"]["speaker_note"]
    assert {"bin", "blue", "now"} <= set(m["vocab"])

    entries = [{"corpus": "grid", "speaker": f"s{s}", "id": f"u{u}"} for s in range(1, 8) for u in range(40)]
    entries += [{"corpus": "grid", "speaker": "s9", "id": f"u{u}"} for u in range(40, 100)]  # the big speaker
    a, b = split_clips(entries), split_clips(list(reversed(entries)))
    assert {k: sorted(v) for k, v in a["utterance"].items()} == {k: sorted(v) for k, v in b["utterance"].items()}
    for scheme in ("utterance", "speaker"):
        parts = [set(a[scheme][p]) for p in ("train", "val", "test")]
        assert sum(map(len, parts)) == len(entries) and not (
            parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]
        )
    owner = {}
    for p, ks in a["speaker"].items():
        for k in ks:
            assert owner.setdefault(k.rsplit("/", 1)[0], p) == p  # a speaker lives in one part only
    assert sorted(owner.values()) == ["test"] * 2 + ["train"] * 4 + ["val"] * 2  # 8 speakers: two held out each
    assert owner["grid/s9"] == "train"  # the speaker with the most clips always trains
    assert len(a["speaker"]["test"]) == len(a["speaker"]["val"]) == 80
    few = split_clips([e for e in entries if e["speaker"] in ("s1", "s2", "s3")])["speaker"]
    assert len(few["test"]) == len(few["val"]) == 40  # under 5 speakers: one held out each
    utt_part = {k: p for p, ks in a["utterance"].items() for k in ks}
    assert all(utt_part[f"grid/s1/u{u}"] == utt_part[f"grid/s7/u{u}"] for u in range(40))  # the sentence decides


def test_dataset_windows_line_up(prepped):
    out, _ = prepped
    m = json.loads((out / "manifest.json").read_text())
    split = next(p for p, ks in m["splits"]["utterance"].items() if ks)
    ds = WindowDataset(out / "manifest.json", split=split, window=5, stride=1)
    assert len(ds) >= 70 * len(m["splits"]["utterance"][split])
    item = ds[len(ds) // 2]
    clip, s = ds.clips[int(item["clip"])], int(item["start"])
    assert item["crops"].shape == (5, SIZE, SIZE, 3) and item["mel"].shape == (20, 80)
    with safe_open(str(out / clip["path"]), framework="numpy") as f:
        mel, crops = f.get_tensor("mel").astype(np.float32), f.get_tensor("crops")
        silence = f.get_tensor("silence")
    np.testing.assert_array_equal(item["crops"].numpy(), crops[s : s + 5])
    per_frame = frames_to_video(mel, clip["frames"])
    np.testing.assert_array_equal(item["mel"].numpy()[::4], per_frame[s : s + 5])
    # the timelines agree: frames the transcript calls silent have quiet mel rows
    energy = per_frame.max(axis=1)
    assert energy[~silence].mean() > energy[silence].mean() + 1.0


def test_word_frames_reads_crlf_align(tmp_path):
    p = tmp_path / "x.align"
    p.write_bytes(b"0 12500 sil\r\n12500 25000 bin\r\n25000 37500 sp\r\n37500 50000 blue\r\n")
    index, silence = word_frames(read_align(p), 50)
    assert list(index[[0, 12, 13, 37, 38, 49]]) == [-1, -1, 1, -1, 3, 3]
    assert silence[:13].all() and not silence[13:25].any() and silence[25:38].all()


def test_speech_segments_cut_at_pauses():
    rate = 100
    active = np.zeros(3000, bool)
    for a, b in [(100, 250), (300, 400), (600, 800), (1000, 2400), (2600, 2700)]:  # 1 s 2nd pause; 14 s run
        active[a:b] = True
    level = np.where(active, -20.0, -60.0)
    level[1700] = -50  # the quietest point of the long run
    segs = speech_segments(active, level, rate, min_s=2.0, max_s=8.0)
    assert all(0 < e - s <= 8.0 for s, e in segs)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(segs, segs[1:], strict=False))
    assert any(abs(e - 17.0) < 0.01 for _, e in segs)  # cut at the quiet point
    assert segs[-1][1] >= 27.0  # the 1 s tail joined its neighbour rather than being lost


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """Two GRID sentences, 1.5 s of silence, two more: one 13.5 s 'recording'."""
    path = tmp_path_factory.mktemp("rec") / "talk.mp4"
    clips = [GRID / "video" / f"{i}.mpg" for i in [IDS[0], IDS[1], IDS[2], EXTRA[0]]]
    inputs = sum((["-i", str(c)] for c in clips), [])
    gap = "[0:v]trim=duration=1.5,setpts=PTS-STARTPTS[gv];[0:a]atrim=duration=1.5,asetpts=PTS-STARTPTS,volume=0[ga];"
    chain = "[0:v][0:a][1:v][1:a][gv][ga][2:v][2:a][3:v][3:a]concat=n=5:v=1:a=1[v][a]"
    ffmpeg(*inputs, "-filter_complex", gap + chain, "-map", "[v]", "-map", "[a]", "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))  # fmt: skip
    return path


def test_import_splits_at_pauses_with_provenance(recording, tmp_path):
    before = (sha256(recording), recording.stat().st_mtime_ns)
    s = import_videos(recording, tmp_path / "raw", "me")
    assert len(s.kept) >= 2, s.dropped
    assert (sha256(recording), recording.stat().st_mtime_ns) == before  # inputs are never touched
    video_dir = tmp_path / "raw" / "me" / "me" / "video"
    for seg in s.kept:
        meta = json.loads((video_dir / f"{seg.id}.json").read_text())
        assert meta["source"] == str(recording.resolve()) and meta["sha256"] == before[0]
        assert 2.0 <= meta["end"] - meta["start"] <= 8.0 and meta["found"] >= 0.95
        info = media.probe(video_dir / f"{seg.id}.mp4")
        assert info.has_audio and info.n_frames(25) == meta["frames"]
    assert s.kept[0].end <= 7.5 + 1.0 and s.kept[-1].start >= 6.0  # the 1.5 s silence separates them
    assert [c.id for c in find_clips(tmp_path / "raw")] == sorted(seg.id for seg in s.kept)
    again = import_videos(recording, tmp_path / "raw", "me")
    assert not again.kept and again.skipped == [(recording, "already imported")]


def test_interrupted_import_leaves_no_video_without_provenance(recording, tmp_path, monkeypatch):
    """Ctrl-C after the first segment's video: every video on disk has its JSON (prep took an orphan without
    provenance, so the eval hold-out missed it), and a rerun imports the source whole."""
    from lipsync_cli.data import importer

    real = importer._write_segments

    def first_then_interrupt(video, info, x, keep, out_dir, *args):
        real(video, info, x, keep[:1], out_dir, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "_write_segments", first_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        import_videos(recording, tmp_path / "raw", "me")
    video_dir = tmp_path / "raw" / "me" / "me" / "video"
    videos = sorted(video_dir.glob("*.mp4"))
    assert len(videos) == 1 and all(v.with_suffix(".json").is_file() for v in videos)
    assert all(c.provenance is not None for c in find_clips(tmp_path / "raw"))

    monkeypatch.setattr(importer, "_write_segments", real)
    again = import_videos(recording, tmp_path / "raw", "me")
    assert len(again.kept) >= 2 and not again.skipped  # not taken for done
    assert sorted(p.stem for p in video_dir.glob("*.mp4")) == sorted(p.stem for p in video_dir.glob("*.json"))
    assert import_videos(recording, tmp_path / "raw", "me").skipped == [(recording, "already imported")]


def test_import_drops_faceless_segments(tmp_path):
    path = tmp_path / "noface.mp4"
    audio = [GRID / "video" / f"{i}.mpg" for i in EXTRA]
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=320x240:r=25:d=6", "-i", str(audio[0]), "-i", str(audio[1]),
           "-filter_complex", "[1:a][2:a]concat=n=2:v=0:a=1[a]", "-map", "0:v", "-map", "[a]", "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))  # fmt: skip
    s = import_videos(path, tmp_path / "raw", "noface")
    assert not s.kept and s.dropped
    assert all("face in 0%" in seg.reason or "too short" in seg.reason for seg in s.dropped)
    assert any("face" in seg.reason for seg in s.dropped)
    assert not list((tmp_path / "raw").rglob("*.mp4"))


def test_cli_import_of_nothing_readable_fails(tmp_path, monkeypatch):
    """Sources that all fail (no video, no audio, a text file) are a user error after the table (it exited 0)."""
    from lipsync_cli.cli import app
    from lipsync_cli.errors import LipsyncError

    monkeypatch.setenv("LIPSYNC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64:r=25:d=1", "-c:v", "libx264", str(bad / "noaudio.mp4"))
    (tmp_path / "notes.txt").write_text("hello")
    for path, words in ((bad, "none of the 2 sources"), (tmp_path / "notes.txt", "the source could not")):
        r = CliRunner().invoke(app, ["-q", "data", "import", str(path), "--name", "me"])
        assert isinstance(r.exception, LipsyncError) and words in str(r.exception), r.output
        assert "failed" in r.stdout  # the per-source table still comes first
    assert "no audio stream" in CliRunner().invoke(app, ["-q", "data", "import", str(bad), "--name", "me"]).stdout


@pytest.mark.parametrize("blocker", ["data", "data/raw/me/me/video"])
def test_cli_import_into_an_unwritable_place_fails_first(tmp_path, monkeypatch, blocker):
    """A data dir that is a file (or <speaker>/video a file) is one clear error before any tracking, not a
    '[Errno 20]' failure per source after tracking each one, and exit 0."""
    from lipsync_cli.cli import app
    from lipsync_cli.errors import LipsyncError

    monkeypatch.setenv("LIPSYNC_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / blocker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocker).write_text("x")
    r = CliRunner().invoke(app, ["data", "import", str(GRID / "video" / f"{IDS[0]}.mpg"), "--name", "me"])
    assert isinstance(r.exception, LipsyncError), r.output
    assert f"{tmp_path / blocker} is not a folder" in str(r.exception) and "tracking" not in r.output


def test_cli_prep_and_import(corpus, tmp_path, monkeypatch):
    from lipsync_cli.cli import app

    monkeypatch.setenv("LIPSYNC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        app, ["-q", "prep", "--source", str(corpus), "--limit", "1", "--workers", "1", "--size", "96"]
    )
    assert r.exit_code == 0, r.output
    assert "1 prepped" in r.output
    assert (tmp_path / "data" / "prep" / "96" / "grid" / "s1" / f"{IDS[0]}.safetensors").is_file()
    r = CliRunner().invoke(app, ["-q", "data", "import", str(tmp_path / "nothing"), "--name", "x"])
    assert r.exit_code != 0


@pytest.mark.parametrize("size", [33, 64, 97, 512])
def test_prep_size_is_one_the_models_use(size, tmp_path, monkeypatch):
    """96, 128 or 256 only (33 and 97 used to be taken): a usage error on the line, a clear error from the settings
    or the API."""
    from lipsync_cli.cli import app
    from lipsync_cli.errors import LipsyncError

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["prep", "--size", str(size)])
    assert r.exit_code == 2 and "96" in r.output
    monkeypatch.setenv("LIPSYNC_PREP_SIZE", str(size))
    r = CliRunner().invoke(app, ["prep"])
    assert isinstance(r.exception, LipsyncError) and "prep_size" in str(r.exception)
    with pytest.raises(LipsyncError, match="96, 128, 256"):
        prep(None, tmp_path / "out", [], size=size)
    assert not (tmp_path / "out").exists()


def _live_in_group(pgid: int) -> list[str]:
    """Command lines of the processes of process group `pgid` that are not zombies (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:200])
        except OSError:
            continue
    return live


def test_ctrl_c_stops_parallel_prep_at_once(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) on `prep --workers 2`: exit 130 within seconds, workers gone, no
    temp file, every shard on disk whole, and a rerun resumes (it went on until every clip was done: 27 s for 100)."""
    data = tmp_path / "data"
    out = data / "prep" / str(SIZE)
    env = {**os.environ, "LIPSYNC_DATA_DIR": str(data), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "lipsync_cli.cli", "-q", "prep", "--workers", "2", "--size", str(SIZE)]
    proc = subprocess.Popen(
        [*cmd, "--source", str(GRID.parent), "--limit", "60"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even under `&`
    )  # fmt: skip
    for _ in range(600):  # interrupt once the workers are under way
        if list(out.glob("*/*/*.safetensors")) or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 130 and err.endswith("interrupted\n") and "Traceback" not in err, err
    assert took < 5.0, f"{took:.1f} s from Ctrl-C to exit"
    for _ in range(50):  # the multiprocessing resource tracker and a killed worker's ffmpeg take a moment to go
        if not _live_in_group(proc.pid):
            break
        time.sleep(0.1)
    assert not _live_in_group(proc.pid), "a worker (or its ffmpeg) outlived the run"
    shards = sorted(out.glob("*/*/*.safetensors"))
    assert 1 <= len(shards) < 60 and all(shard_info(p) is not None for p in shards)
    assert not [p for p in out.rglob(".*")], "temp file left behind"
    again = prep(None, out, [GRID.parent], size=SIZE, workers=1, limit=len(shards) + 1)
    assert (again.skipped, again.prepped, again.failures) == (len(shards), 1, [])


def test_remove_temps_of_only_the_given_pids(tmp_path):
    from lipsync_cli.files import remove_temps_of

    mine = tmp_path / f".a.safetensors.lipsync-{os.getpid()}-0123abcd.tmp"
    other = tmp_path / ".b.safetensors.lipsync-1-0123abcd.tmp"
    keep = tmp_path / "c.safetensors"
    for p in (mine, other, keep):
        p.write_bytes(b"x")
    assert remove_temps_of(tmp_path, {os.getpid()}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, keep.name])


def test_grid_sentence_from_its_id():
    assert sentence("bbaf2n") == "bin blue at f two now"
    assert sentence("pbbm3n") == "place blue by m three now" and sentence("lgaz8p") == "lay green at z eight please"
    assert sentence("bbaw2n") is None and sentence("xbaf2n") is None and sentence("bbaf2") is None  # no w; not ids


def test_forced_alignment_of_a_grid_clip_matches_its_align_file():
    """A GRID clip without .align gets word timings from its id's sentence: on s1, where GRID's own timings exist,
    the forced alignment names the same words within 60 ms at each boundary."""
    video, align = SHARED / "corpus/grid/s1/video/bbaf2n.mpg", SHARED / "corpus/grid/s1/align/bbaf2n.align"
    if not video.is_file() or not align.is_file():
        pytest.skip("shared GRID s1 absent")
    x = media.read_audio(video, 16000)
    ours = [w for w in grid_words(Clip("grid", "s1", "bbaf2n", video), x) if w[2] != "sil"]
    theirs = [w for w in read_align(align) if w[2] not in ("sil", "sp")]
    assert [w for _, _, w in ours] == [w for _, _, w in theirs] == ["bin", "blue", "at", "f", "two", "now"]
    assert max(abs(a - b) for o, t in zip(ours, theirs, strict=True) for a, b in zip(o[:2], t[:2], strict=True)) < 0.06
    assert grid_words(Clip("shared", "x", "bbaf2n", video), x) == []  # other corpora: no sentence from the id
