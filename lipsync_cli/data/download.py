"""Generic download machinery: resumable, verified HTTP downloads and archive extraction that cannot escape.

Corpora are gigabytes over flaky links, so a download resumes a `.part` file with an HTTP Range request,
retries with exponential back-off, and only becomes `dest` (by rename) once its size and checksum check out:
a file at `dest` is therefore always complete. Archives come from third parties, so every member is vetted
before anything is written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from lipsync_cli.errors import LipsyncError

Progress = Callable[[int, int | None], None]  # (bytes of the file so far, its total size or None)

USER_AGENT = "lipsync-cli (+https://github.com/; research corpus fetch)"
CHUNK = 1 << 18
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _Interrupted(Exception):
    """The transfer stopped before its end (dropped connection, odd reply): worth another try."""


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_problem(path: Path, size: int | None = None, md5: str | None = None) -> str | None:
    """Why `path` is not the expected file, or None when it is (unknown size / md5 are not checked)."""
    got = path.stat().st_size
    if size is not None and got != size:
        return f"size {got} bytes, expected {size}"
    if md5 and (digest := file_md5(path)) != md5.lower():
        return f"md5 {digest}, expected {md5.lower()}"
    return None


def head_size(url: str, timeout: float = 5.0) -> int | None:
    """Content-Length from a HEAD request, or None when the server is unreachable or does not say."""
    try:
        with urlopen(Request(url, method="HEAD", headers={"User-Agent": USER_AGENT}), timeout=timeout) as r:
            n = r.headers.get("Content-Length")
            return int(n) if n and n.isdigit() else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def download_file(
    url: str,
    dest: Path,
    expected_size: int | None = None,
    md5: str | None = None,
    *,
    retries: int = 4,
    timeout: float = 30.0,
    backoff: float = 1.0,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> int:
    """Fetch `url` to `dest` (resuming `dest.part`), verify it, and return the bytes transferred by this call.

    An existing, verified `dest` costs no request. A file that fails verification is fetched once more from
    scratch (a resumed tail may have glued onto a bad head); a second failure is a LipsyncError.
    """
    dest = Path(dest)
    if dest.exists():
        if verify_problem(dest, expected_size, md5) is None:
            if progress:
                progress(dest.stat().st_size, dest.stat().st_size)
            return 0
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    moved = 0
    problem = None
    for attempt in range(2):
        before = part.stat().st_size if part.exists() else 0
        total = _fetch(url, part, expected_size, retries, timeout, backoff, progress, cancel, on_retry)
        moved += max(part.stat().st_size - before, 0)
        problem = verify_problem(part, expected_size if expected_size is not None else total, md5)
        if problem is None:
            os.replace(part, dest)
            return moved
        part.unlink()
        if attempt == 0 and on_retry:
            on_retry(f"{dest.name}: {problem}; downloading it again")
    raise LipsyncError(f"{url}: {problem}, twice; the server or mirror holds a bad copy")


def _fetch(
    url: str,
    part: Path,
    expected_size: int | None,
    retries: int,
    timeout: float,
    backoff: float,
    progress: Progress | None,
    cancel: threading.Event | None,
    on_retry: Callable[[str], None] | None,
) -> int | None:
    """Bring `part` to the end of the file, resuming and retrying; return its total size if known."""
    total = expected_size
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have > total:  # not the file we are after: start over
            part.unlink()
            have = 0
        if total is not None and have == total and have > 0:
            return total
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
                return _stream(resp, part, have, total, progress, cancel)
        except HTTPError as e:
            if e.code == 416 and have:  # nothing past our offset: the part is whole (verification decides)
                m = re.search(r"/(\d+)", e.headers.get("Content-Range", "") if e.headers else "")
                return int(m.group(1)) if m else total
            if e.code not in RETRY_STATUS:
                raise LipsyncError(f"{url}: HTTP {e.code} {e.reason}") from None
            why = f"HTTP {e.code}"
        except (_Interrupted, OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            why = str(e.reason if isinstance(e, URLError) else e) or type(e).__name__
        grew = part.exists() and part.stat().st_size > have
        failures = 0 if grew else failures + 1  # a transfer that made headway earns a fresh set of retries
        if failures > retries:
            raise LipsyncError(f"{url}: {why} (gave up after {retries} retries)")
        if on_retry:
            on_retry(f"{part.name[: -len('.part')]}: {why}; retrying")
        if failures:
            time.sleep(min(backoff * 2 ** (failures - 1), 60.0))


def _stream(
    resp: http.client.HTTPResponse,
    part: Path,
    have: int,
    total: int | None,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> int | None:
    """Append the body to `part` (or rewrite it when the server ignored our Range); return the total size."""
    if resp.status == 206 and have:
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
        if not m or int(m.group(1)) != have:  # resumed somewhere else: throw the part away, ask for all of it
            part.unlink()
            raise _Interrupted(f"server resumed at the wrong offset ({resp.headers.get('Content-Range')})")
        total = int(m.group(2)) if m.group(2) != "*" else total
        mode = "ab"
    elif resp.status == 200:  # a fresh start, or a server that ignores Range: the body is the whole file
        have = 0
        n = resp.headers.get("Content-Length")
        total = int(n) if n and n.isdigit() else total
        mode = "wb"
    else:
        raise _Interrupted(f"unexpected HTTP {resp.status}")
    done = have
    if progress:
        progress(done, total)
    with open(part, mode) as f:
        while block := resp.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise LipsyncError("download cancelled (the .part file is kept; rerun to resume)")
            f.write(block)
            done += len(block)
            if progress:
                progress(done, total)
    if total is not None and done < total:
        raise _Interrupted(f"connection closed at {done} of {total} bytes")
    return total if total is not None else done


# ---------------------------------------------------------------------------------------------- extraction


def _unsafe(name: str) -> bool:
    """Absolute, drive-qualified or `..`-climbing member names."""
    name = name.replace("\\", "/")
    return name.startswith("/") or bool(re.match(r"^[A-Za-z]:", name)) or ".." in PurePosixPath(name).parts


def _inside(root: Path, target: Path) -> bool:
    return target.resolve().is_relative_to(root)


def safe_extract(archive: Path, dest: Path, select: Callable[[str], bool] | None = None) -> list[Path]:
    """Extract a zip or tar archive into `dest` and return the regular files written.

    Every member is checked before a byte is written; one that would land outside `dest` (absolute path, `..`,
    a symlink or hardlink pointing out) rejects the whole archive with a LipsyncError. `select(member_name)`
    picks which of the (all vetted) members to extract.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, root, select)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, root, select)
    except (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error) as e:
        raise LipsyncError(f"{archive.name}: damaged archive ({e})") from None
    except OSError as e:  # two members of one name as file and folder (s1/a.mpg, s1/a.mpg/b.mpg), a full disk
        raise LipsyncError(f"{archive.name}: cannot extract {_member_name(e, root)}: {e.strerror or e}") from None
    raise LipsyncError(f"{archive.name}: neither a zip nor a tar archive (damaged, or an error page?)")


def _member_name(e: OSError, root: Path) -> str:
    """The file an extraction error is about, as a member name when it lies under `root`."""
    if e.filename is None:
        return "it"
    try:
        return repr(Path(e.filename).relative_to(root).as_posix())
    except ValueError:
        return repr(str(e.filename))


def _reject(archive: Path, name: str, why: str) -> LipsyncError:
    return LipsyncError(f"{archive.name}: refusing to extract, member {name!r} {why}")


def _extract_zip(archive: Path, root: Path, select: Callable[[str], bool] | None) -> list[Path]:
    written = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            if _unsafe(info.filename) or not _inside(root, root / info.filename):
                raise _reject(archive, info.filename, "points outside the target folder")
            if stat.S_ISLNK(info.external_attr >> 16):  # written as a plain file; pointing out is a bad sign
                link = zf.read(info).decode("utf-8", "replace")
                if link.startswith("/") or not _inside(root, (root / info.filename).parent / link):
                    raise _reject(archive, info.filename, f"links outside the target folder ({link})")
        for info in infos:
            if info.is_dir() or (select and not select(info.filename)):
                continue
            out = root / info.filename
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            written.append(out)
    return written


def _extract_tar(archive: Path, root: Path, select: Callable[[str], bool] | None) -> list[Path]:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            if _unsafe(m.name) or not _inside(root, root / m.name):
                raise _reject(archive, m.name, "points outside the target folder")
            if m.issym() or m.islnk():  # symlinks are relative to the link, hardlinks to the archive root
                base = (root / m.name).parent if m.issym() else root
                if m.linkname.startswith("/") or not _inside(root, base / m.linkname):
                    raise _reject(archive, m.name, f"links outside the target folder ({m.linkname})")
            elif not (m.isfile() or m.isdir()):
                raise _reject(archive, m.name, "is a device or fifo")
        chosen = [m for m in members if not select or select(m.name)]
        try:  # the "data" filter re-checks against the real files, which catches chains of links
            tf.extractall(root, members=chosen, filter="data")
        except tarfile.FilterError as e:
            raise LipsyncError(f"{archive.name}: refusing to extract: {e}") from None
    return [root / m.name for m in chosen if m.isfile() or m.islnk()]
