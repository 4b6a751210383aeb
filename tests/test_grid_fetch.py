"""GRID fetch without the internet: a threaded HTTP server on 127.0.0.1 serves tiny archives in GRID's
layouts (Zenodo and Sheffield), with Range support and scripted misbehaviour (drops, 500s, bad bytes, evil
members)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lipsync_cli.data.corpus import corpus_summary
from lipsync_cli.data.download import download_file, safe_extract
from lipsync_cli.data.grid import done_parts, fetch_grid, parse_speakers, read_align, urls_for
from lipsync_cli.errors import LipsyncError

IDS = ["bbaf2n", "bbaf3s", "lgaz8p"]
RECORD = "/records/3625687/files"
API = "/api/records/3625687"


# ---------------------------------------------------------------------------------------------- fake server


class FakeServer:
    """Serves `files` (path -> bytes) with Range; `fail`, `drop`, `ignore_range`, `delay` script trouble."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # path -> how many 500s to answer first
        self.drop: dict[str, int] = {}  # path -> byte offset where the connection dies (once)
        self.ignore_range: set[str] = set()
        self.delay = 0.0
        self.log: list[list] = []  # [method, path, Range, status]
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                srv.serve(self, head=True)

            def do_GET(self) -> None:
                srv.serve(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> list[list]:
        return [e for e in self.log if e[0] == "GET" and e[1] == path]

    def serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path, rng = urlsplit(h.path).path, h.headers.get("Range")
        entry = [h.command, path, rng, 0]  # logged (status filled in) before the client can see an answer
        with self.lock:
            self.log.append(entry)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay and not head:
                time.sleep(self.delay)
            self._respond(h, entry, head)
        finally:
            with self.lock:
                self.active -= 1

    def _respond(self, h: BaseHTTPRequestHandler, entry: list, head: bool) -> None:
        path, rng = entry[1], entry[2]
        if path not in self.files:
            entry[3] = 404
            h.send_error(404)
            return
        if not head and self.fail.get(path, 0) > 0:
            self.fail[path] -= 1
            entry[3] = 500
            h.send_error(500)
            return
        data, start, status = self.files[path], 0, 200
        if rng and path not in self.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                entry[3] = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        entry[3] = status
        h.send_response(status)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if head:
            return
        body = data[start:]
        cut = self.drop.pop(path, None)
        if cut is not None and cut > start:
            body = body[: cut - start]  # HTTP/1.0: the connection closes short of Content-Length
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buf.getvalue()


def align_text(word: str) -> bytes:
    return f"0 23750 sil\r\n23750 29500 {word}\r\n29500 74500 sil\r\n".encode()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def zenodo_layout(srv: FakeServer, speakers=(1, 2, 3, 4), api: bool = True) -> None:
    """GRID as Zenodo serves it: sN.zip (sN/ID.mpg), alignments.zip (alignments/sN/ID.align), audio_25k.zip
    (sN/ID.wav), and the record's JSON with md5s."""
    for s in speakers:
        videos = {f"s{s}/{i}.mpg": f"mpg s{s} {i}".encode() * 50 for i in IDS}
        srv.files[f"{RECORD}/s{s}.zip"] = zip_bytes(videos)
    srv.files[f"{RECORD}/alignments.zip"] = zip_bytes(
        {f"alignments/s{s}/{i}.align": align_text(f"s{s}{i}") for s in speakers for i in IDS}
    )
    srv.files[f"{RECORD}/audio_25k.zip"] = zip_bytes(
        {f"s{s}/{i}.wav": b"RIFF" + bytes(64) for s in speakers for i in IDS}
    )
    if api:
        entries = [
            {"key": p.rsplit("/", 1)[1], "size": len(d), "checksum": f"md5:{md5(d)}"}
            for p, d in srv.files.items()
            if p.startswith(RECORD)
        ]
        srv.files[API] = json.dumps({"id": 3625687, "files": entries}).encode()


def sheffield_layout(srv: FakeServer, s: int = 1) -> None:
    """GRID as Sheffield serves it: sN/video/sN.mpg_vcd.zip (nested), sN/align/sN.tar, sN/audio/sN.tar."""
    srv.files[f"/s{s}/video/s{s}.mpg_vcd.zip"] = zip_bytes({f"s{s}/video/{i}.mpg": b"mpg" * 20 for i in IDS})
    srv.files[f"/s{s}/align/s{s}.tar"] = tar_bytes({f"align/{i}.align": align_text(i) for i in IDS})
    srv.files[f"/s{s}/audio/s{s}.tar"] = tar_bytes({f"s{s}/{i}.wav": b"RIFF" + bytes(32) for i in IDS})


def fetch(srv: FakeServer, root: Path, speakers="1", source="zenodo", **kw):
    base = srv.url + (RECORD if source == "zenodo" else "")
    kw = {"api_url": srv.url + API, "quiet": True, "backoff": 0.01, "timeout": 5.0, "retries": 3, **kw}
    return fetch_grid(speakers, root, source, base_url=base, **kw)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------------------------ plain functions


def test_parse_speakers():
    assert parse_speakers("5") == [1, 2, 3, 4, 5]
    assert parse_speakers("1,3,7") == [1, 3, 7]
    assert parse_speakers("2-4") == [2, 3, 4]
    assert parse_speakers("1-3,7,s9") == [1, 2, 3, 7, 9]
    assert parse_speakers("all") == list(range(1, 35))
    assert parse_speakers([4, 2]) == [2, 4]
    for bad in ("0", "35", "1,40", "x", "4-2", ""):
        with pytest.raises(LipsyncError):
            parse_speakers(bad)


@pytest.mark.parametrize(
    "huge",
    ["10000000000", "1-100000000000", "s3-s99999999999", "9" * 5000, "2,1" + "0" * 40],
    ids=["count", "range", "s-range", "5000-digits", "list"],
)
def test_parse_speakers_checks_bounds_before_building_ranges(huge):
    """A huge count or range is refused at once (it used to build the whole range: MemoryError, or the OOM killer)."""
    with pytest.raises(LipsyncError, match="34"):
        parse_speakers(huge)


def test_read_align_crlf(tmp_path):
    p = tmp_path / "bbaf2n.align"
    p.write_bytes(b"0 23750 sil\r\n23750 29500 bin\r\n29500 74500 sil\r\n\r\n")
    assert read_align(p) == [(0.0, 0.95, "sil"), (0.95, 1.18, "bin"), (1.18, 2.98, "sil")]
    p.write_bytes(b"0 23750\n")
    with pytest.raises(LipsyncError, match="bbaf2n.align:1"):
        read_align(p)


def test_read_align_real_grid(shared):
    path = shared / "corpus/grid/s1/align/bbaf2n.align"
    if not path.exists():
        pytest.skip(f"absent: {path}")
    words = read_align(path)
    assert [w for _, _, w in words] == ["sil", "bin", "blue", "at", "f", "two", "now", "sil"]
    assert words[-1][1] == pytest.approx(2.98)


def test_urls_for_sources():
    z = urls_for([20, 21], "zenodo", "http://m/files/", audio=True)
    assert [d.url for d in z] == [
        "http://m/files/s20.zip",
        "http://m/files/alignments.zip",
        "http://m/files/audio_25k.zip",
    ]
    assert z[1].speakers == (20, 21) and z[1].shared
    s = [d.url for d in urls_for([3], "sheffield", audio=True)]
    assert s == [
        "https://spandh.dcs.shef.ac.uk/gridcorpus/s3/video/s3.mpg_vcd.zip",
        "https://spandh.dcs.shef.ac.uk/gridcorpus/s3/align/s3.tar",
        "https://spandh.dcs.shef.ac.uk/gridcorpus/s3/audio/s3.tar",
    ]
    assert urls_for([1], "zenodo")[0].url == "https://zenodo.org/records/3625687/files/s1.zip"
    with pytest.raises(LipsyncError):
        urls_for([1], "youtube")


# ---------------------------------------------------------------------------------------------- fetch


def test_zenodo_fetch_layout_then_idempotent(server, tmp_path):
    zenodo_layout(server)
    root = tmp_path / "raw" / "grid"
    summary = fetch(server, root, "2", audio=True)
    assert summary.fetched == [1, 2] and summary.bytes > 0
    for s in (1, 2):
        for kind, ext in (("video", "mpg"), ("align", "align"), ("audio", "wav")):
            assert names(root / f"s{s}" / kind) == sorted(f"{i}.{ext}" for i in IDS)
        assert done_parts(root, s) == {"video", "align", "audio"}
        marker = json.loads((root / f"s{s}" / ".done").read_text())
        assert marker["parts"]["video"]["files"] == 3
    assert not (root / "s3").exists()  # alignments.zip holds s3 too; only the asked speakers are unpacked
    assert read_align(root / "s2/align/lgaz8p.align")[1][2] == "s2lgaz8p"
    assert names(root) == [".zenodo-record.json", "s1", "s2"]  # no archives, no temp folders
    assert len(server.gets(f"{RECORD}/alignments.zip")) == 1  # one shared archive for both speakers

    before = len(server.log)
    again = fetch(server, root, "2", audio=True)
    assert len(server.log) == before and again.skipped == [1, 2] and not again.plan

    rows = corpus_summary(tmp_path / "raw")
    assert [(r.corpus, r.speaker, r.clips) for r in rows] == [("grid", "s1", 3), ("grid", "s2", 3)]
    assert rows[0].hours == pytest.approx(3 * 3.0 / 3600) and rows[0].bytes > 0


def test_adding_audio_later_fetches_only_audio(server, tmp_path):
    zenodo_layout(server)
    root = tmp_path / "grid"
    fetch(server, root, "1", keep_archives=True)
    assert (root / ".downloads/s1.zip").is_file() and done_parts(root, 1) == {"video", "align"}
    before = len(server.log)
    fetch(server, root, "1", audio=True)
    assert [e[1] for e in server.log[before:]] == [f"{RECORD}/audio_25k.zip"]
    assert done_parts(root, 1) == {"video", "align", "audio"}


def test_parallel_fetch_of_three_speakers(server, tmp_path):
    zenodo_layout(server)
    server.delay = 0.3  # long enough for the transfers to overlap
    summary = fetch(server, tmp_path / "grid", "3", workers=3)
    assert summary.fetched == [1, 2, 3]
    assert server.max_active >= 2
    for s in (1, 2, 3):
        assert len(list((tmp_path / "grid" / f"s{s}" / "video").glob("*.mpg"))) == 3


def test_resume_after_dropped_connection(server, tmp_path):
    zenodo_layout(server)
    path = f"{RECORD}/s1.zip"
    server.drop[path] = len(server.files[path]) // 2
    fetch(server, tmp_path / "grid", "1")
    gets = server.gets(path)
    assert len(gets) == 2 and gets[0][2] is None
    assert gets[1][2] == f"bytes={len(server.files[path]) // 2}-" and gets[1][3] == 206
    assert done_parts(tmp_path / "grid", 1) == {"video", "align"}


def test_server_errors_are_retried(server, tmp_path):
    zenodo_layout(server)
    server.fail[f"{RECORD}/s1.zip"] = 2
    fetch(server, tmp_path / "grid", "1")
    assert [e[3] for e in server.gets(f"{RECORD}/s1.zip")] == [500, 500, 200]
    assert "video" in done_parts(tmp_path / "grid", 1)


def test_persistent_errors_give_up(server, tmp_path):
    server.files["/f.bin"] = b"x" * 100
    server.fail["/f.bin"] = 10
    with pytest.raises(LipsyncError, match="HTTP 500.*gave up after 2 retries"):
        download_file(server.url + "/f.bin", tmp_path / "f.bin", retries=2, backoff=0.01)
    assert len(server.gets("/f.bin")) == 3
    with pytest.raises(LipsyncError, match="404"):
        download_file(server.url + "/missing.bin", tmp_path / "m.bin", retries=2, backoff=0.01)
    assert len(server.gets("/missing.bin")) == 1  # a 404 is final
    with pytest.raises(LipsyncError, match="gave up"):
        download_file(free_port_url() + "/x", tmp_path / "x", retries=1, backoff=0.01, timeout=2)


def test_server_ignoring_range_restarts(server, tmp_path):
    data = bytes(range(256)) * 40
    server.files["/f.bin"] = data
    server.ignore_range.add("/f.bin")
    (tmp_path / "f.bin.part").write_bytes(b"junk" * 10)
    seen = []
    url = server.url + "/f.bin"
    download_file(url, tmp_path / "f.bin", md5=md5(data), progress=lambda *a: seen.append(a))
    assert (tmp_path / "f.bin").read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert server.gets("/f.bin")[0][2] == "bytes=40-"
    assert seen[0] == (0, len(data)) and seen[-1][0] == len(data)


def test_complete_part_answered_416_is_verified(server, tmp_path):
    data = b"abc" * 1000
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)
    assert download_file(server.url + "/f.bin", tmp_path / "f.bin", md5=md5(data)) == 0
    assert server.gets("/f.bin")[0][3] == 416 and (tmp_path / "f.bin").read_bytes() == data
    # a kept, verified file costs no request at all
    n = len(server.log)
    download_file(server.url + "/f.bin", tmp_path / "f.bin", len(data), md5(data))
    assert len(server.log) == n


def test_corrupt_archive_redownloads_once_then_fails(server, tmp_path):
    zenodo_layout(server)
    path = f"{RECORD}/s1.zip"
    good = server.files[path]
    server.files[path] = good[:-1] + bytes([good[-1] ^ 0xFF])  # same size, wrong md5
    root = tmp_path / "grid"
    with pytest.raises(LipsyncError, match=r"s1\.zip.*md5"):
        fetch(server, root, "1")
    assert len(server.gets(path)) == 2
    assert "video" not in done_parts(root, 1) and not (root / "s1" / "video").exists()
    assert not list(root.rglob("*.mpg")) and not list(root.glob(".unpack-*"))
    # once the mirror is fixed, a rerun completes only what is missing
    server.files[path] = good
    before = len(server.log)
    fetch(server, root, "1")
    assert [e[1] for e in server.log[before:]] == [path] and done_parts(root, 1) == {"video", "align"}


def test_unsafe_archive_is_rejected(server, tmp_path):
    zenodo_layout(server, api=False)
    server.files[f"{RECORD}/s1.zip"] = zip_bytes(
        {"s1/bbaf2n.mpg": b"ok", "../evil.mpg": b"evil", "/tmp/lipsync-evil-abs.mpg": b"evil"}
    )
    root = tmp_path / "a" / "grid"
    with pytest.raises(LipsyncError, match="refusing to extract"):
        fetch(server, root, "1", api_url=None)
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name]
    assert not Path("/tmp/lipsync-evil-abs.mpg").exists()
    assert "video" not in done_parts(root, 1) and not list(root.glob(".unpack-*"))


@pytest.mark.parametrize(
    "archive",
    [
        ("zip", {"ok.txt": b"1", "a/../../evil": b"x"}, None),
        ("zip", {"ok.txt": b"1", "/evil": b"x"}, None),
        ("zip", {"ok.txt": b"1", "C:/evil": b"x"}, None),
        ("tar", {"ok.txt": b"1", "../evil": b"x"}, None),
        ("tar", {"ok.txt": b"1", "/evil": b"x"}, None),
        ("tar", {"ok.txt": b"1"}, {"link": (tarfile.SYMTYPE, "../evil")}),
        ("tar", {"ok.txt": b"1"}, {"d/link": (tarfile.SYMTYPE, "/etc/passwd")}),
        ("tar", {"ok.txt": b"1"}, {"hard": (tarfile.LNKTYPE, "../evil")}),
    ],
)
def test_safe_extract_rejects_escapes(tmp_path, archive):
    kind, members, links = archive
    src = tmp_path / f"bad.{kind}"
    src.write_bytes(zip_bytes(members) if kind == "zip" else tar_bytes(members, links))
    dest = tmp_path / "out" / "x"
    with pytest.raises(LipsyncError, match="refusing to extract"):
        safe_extract(src, dest)
    assert not list(dest.iterdir())  # vetted before a byte is written
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name, "out"]


def test_member_both_file_and_folder_is_a_clear_error(server, tmp_path):
    """s1/a.mpg and s1/a.mpg/b.mpg cannot both be extracted: a LipsyncError, and no archive, temp or empty
    .downloads folder is left (it was a FileExistsError, exit 3)."""
    zenodo_layout(server, api=False)
    server.files[f"{RECORD}/s1.zip"] = zip_bytes({"s1/a.mpg": b"x", "s1/a.mpg/b.mpg": b"y"})
    root = tmp_path / "grid"
    with pytest.raises(LipsyncError, match=r"s1\.zip: cannot extract 's1/a\.mpg"):
        fetch(server, root, "1", api_url=None)
    assert names(root) == ["s1"] and names(root / "s1") == [".done", "align"]  # alignments.zip went in fine
    src = tmp_path / "t.tar"
    src.write_bytes(tar_bytes({"d/a": b"x", "d/a/b": b"y"}))
    with pytest.raises(LipsyncError, match="t.tar: cannot extract"):
        safe_extract(src, tmp_path / "out")


@pytest.mark.parametrize("in_the_way", ["data", "data/grid/s1/video", "data/grid/.downloads", "data/grid/s1"])
def test_a_file_where_a_folder_goes_is_named_before_downloading(server, tmp_path, in_the_way):
    zenodo_layout(server)
    root = tmp_path / "data" / "grid"
    blocker = tmp_path / in_the_way
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("x")
    with pytest.raises(LipsyncError, match=f"{re.escape(str(blocker))} is in the way"):
        fetch(server, root, "1")
    assert not server.log  # found before any request
    assert blocker.read_text() == "x"


def test_safe_extract_allows_links_inside(tmp_path):
    src = tmp_path / "ok.tar"
    src.write_bytes(tar_bytes({"d/a.txt": b"hi"}, {"d/link": (tarfile.SYMTYPE, "a.txt")}))
    safe_extract(src, tmp_path / "out")
    assert (tmp_path / "out/d/link").read_bytes() == b"hi"


def test_dry_run_writes_nothing(server, tmp_path, capsys):
    zenodo_layout(server)
    root = tmp_path / "grid"
    summary = fetch(server, root, "2", dry_run=True)
    assert not root.exists() and summary.dry_run
    assert [d.size for d in summary.plan] == [
        len(server.files[f"{RECORD}/{n}"]) for n in ("s1.zip", "s2.zip", "alignments.zip")
    ]
    assert {e[1] for e in server.log} == {API}  # sizes and md5s come from the record
    assert f"{RECORD}/s1.zip" in capsys.readouterr().out

    sheffield_layout(server, 1)
    summary = fetch(server, root, "1", "sheffield", dry_run=True, audio=True)
    assert [d.size for d in summary.plan] == [len(server.files[urlsplit(d.url).path]) for d in summary.plan]
    assert {e[0] for e in server.log if e[1] != API} == {"HEAD"} and not root.exists()

    summary = fetch_grid("1", root, "sheffield", base_url=free_port_url(), dry_run=True, timeout=2.0)
    assert [d.size for d in summary.plan] == [None, None] and "?" in capsys.readouterr().out


def test_sheffield_layout(server, tmp_path):
    sheffield_layout(server, 1)
    root = tmp_path / "grid"
    fetch(server, root, "1", "sheffield", audio=True, api_url=free_port_url() + API)  # api is Zenodo-only
    for kind, ext in (("video", "mpg"), ("align", "align"), ("audio", "wav")):
        assert names(root / "s1" / kind) == sorted(f"{i}.{ext}" for i in IDS)
    assert json.loads((root / "s1/.done").read_text())["parts"]["align"]["source"] == "sheffield"
    assert read_align(root / "s1/align/bbaf2n.align")[1] == (0.95, 1.18, "bbaf2n")


def test_damaged_archive_is_dropped_for_the_next_run(server, tmp_path):
    sheffield_layout(server, 1)
    path = "/s1/align/s1.tar"
    good = server.files[path]
    server.files[path] = b"<html>not a tar</html>" + bytes(600)
    root = tmp_path / "grid"
    with pytest.raises(LipsyncError, match="s1-align.tar"):
        fetch(server, root, "1", "sheffield")
    assert done_parts(root, 1) == {"video"} and not (root / ".downloads").exists()
    server.files[path] = good
    fetch(server, root, "1", "sheffield")
    assert done_parts(root, 1) == {"video", "align"}


def test_unreachable_checksums_fall_back_to_sizes(server, tmp_path):
    zenodo_layout(server, api=False)
    summary = fetch(server, tmp_path / "grid", "1", api_url=free_port_url() + API)
    assert summary.fetched == [1] and all(d.md5 is None for d in summary.plan)


@pytest.mark.parametrize("cached", [[], "x", None, {"record": {"files": [1]}}, {"record": {"files": {"entries": [1]}}}])
def test_malformed_cached_record_is_fetched_again(server, tmp_path, cached):
    zenodo_layout(server)
    root = tmp_path / "grid"
    root.mkdir()
    if isinstance(cached, dict):
        cached = {"url": server.url + API, **cached}
    (root / ".zenodo-record.json").write_text(json.dumps(cached))
    summary = fetch(server, root, "1")
    assert summary.fetched == [1] and all(d.md5 for d in summary.plan)  # md5s from the API, fetched again
    assert len(server.gets(API)) == 1
    assert json.loads((root / ".zenodo-record.json").read_text())["record"]["files"]  # rewritten whole


def test_foreign_done_marker_means_nothing_done(tmp_path):
    (tmp_path / "s1" / "video").mkdir(parents=True)
    for parts in (5, [[1]], "video", None):
        (tmp_path / "s1" / ".done").write_text(json.dumps({"parts": parts}))
        assert done_parts(tmp_path, 1) == set()


@pytest.mark.parametrize(
    "answer", [{"files": {"entries": [1]}}, {"files": [1]}, {"files": [{"key": "s1.zip"}]}, [], "x", {"files": 3}]
)
def test_malformed_api_answer_checks_sizes_only(server, tmp_path, answer):
    zenodo_layout(server)
    server.files[API] = json.dumps(answer).encode()
    summary = fetch(server, tmp_path / "grid", "1")
    assert summary.fetched == [1] and all(d.md5 is None for d in summary.plan)
    assert not (tmp_path / "grid" / ".zenodo-record.json").exists()


def test_corpus_summary_meta_and_hidden(tmp_path):
    raw = tmp_path / "raw"
    for s, n in (("s1", 2), ("s10", 1), ("s2", 4)):
        (raw / "grid" / s / "video").mkdir(parents=True)
        for i in range(n):
            (raw / "grid" / s / "video" / f"c{i}.mpg").write_bytes(b"x" * 10)
    (raw / "grid" / "s2" / "meta.json").write_text(json.dumps({"seconds": 36.0}))
    (raw / "grid" / ".downloads").mkdir()
    (raw / "grid" / ".downloads" / "s3.zip.part").write_bytes(b"x" * 99)
    rows = corpus_summary(raw)
    assert [(r.speaker, r.clips) for r in rows] == [("s1", 2), ("s2", 4), ("s10", 1)]
    assert rows[1].hours == pytest.approx(0.01) and rows[0].bytes == 20
    assert corpus_summary(tmp_path / "nowhere") == []


def test_corpus_summary_skips_what_it_cannot_read(tmp_path):
    """A dangling link is not a clip and a meta.json's "abc" seconds are unknown hours: notes, not a crash
    (FileNotFoundError, ValueError: exit 3 from `data list`)."""
    raw = tmp_path / "raw"
    (raw / "grid" / "s1" / "video").mkdir(parents=True)
    (raw / "grid" / "s1" / "video" / "a.mpg").write_bytes(b"x" * 10)
    (raw / "grid" / "s1" / "video" / "broken.mpg").symlink_to(tmp_path / "gone.mpg")
    (raw / "me" / "me" / "video").mkdir(parents=True)
    (raw / "me" / "me" / "video" / "c.mp4").write_bytes(b"x" * 5)
    for bad in ({"seconds": "abc"}, {"seconds": [1]}, {"clip_seconds": "2"}, {"seconds": -1}):
        (raw / "me" / "me" / "meta.json").write_text(json.dumps(bad))
        notes: list[str] = []
        rows = corpus_summary(raw, notes)
        assert [(r.corpus, r.clips) for r in rows] == [("grid", 1), ("me", 1)] and rows[0].bytes == 10
        assert rows[0].hours == pytest.approx(3.0 / 3600) and rows[1].hours is None
        assert any("broken.mpg" in n for n in notes) and any("meta.json" in n for n in notes)


def test_data_list_cli_notes_bad_entries(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lipsync_cli.cli import app

    video = tmp_path / "data" / "raw" / "grid" / "s1" / "video"
    video.mkdir(parents=True)
    (video / "broken.mpg").symlink_to(tmp_path / "gone.mpg")
    (video / "a.mpg").write_bytes(b"x")
    (video.parent / "meta.json").write_text('{"seconds": "abc"}')
    monkeypatch.setenv("LIPSYNC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["data", "list"])
    assert r.exit_code == 0, r.output
    assert "broken.mpg" in r.stderr and "abc" in r.stderr and "grid" in r.stdout
