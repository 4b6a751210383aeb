"""Decode, encode and mux through ffmpeg.

The ffmpeg binary is the one imageio-ffmpeg ships (or `settings.ffmpeg`); command lines are built with
ffmpeg-python and run as argument lists, never through a shell. That binary comes without ffprobe, so `probe`
reads files with PyAV (its own bundled FFmpeg libraries): it demuxes every video packet (no decoding, milliseconds
for a minute of video) because header durations are estimates in some containers (MPEG-PS, Matroska without
durations) and `VideoInfo.n_frames` has to be exact.

Conventions, shared by every function here:
- One timeline: t = 0 is the start of the file (ffmpeg shifts timestamps by the container's start time).
  `iter_frames` yields frame i for time i / fps from t = 0 (ffmpeg repeats the first frame when the video stream
  starts late) and `read_audio` pads a late audio start with silence, so sample j is time j / sr: frames and
  samples line up without any offset bookkeeping.
- Frames are RGB uint8 (H, W, 3), C-contiguous, square pixels (anamorphic video is scaled to its display size).
- Rotation: phone video is often stored landscape with a display-matrix rotation. Frames are decoded in their
  DISPLAYED orientation (ffmpeg's default autorotation) and `VideoWriter` encodes them as they are, with no
  rotation flag, so the output displays like the input in every player, including ones that ignore the flag.
- Colour: the writer converts with the BT.709 matrix (limited range) and tags the stream so, which players and our
  own decoder honour; an untagged stream would be read as BT.601 by some and BT.709 by others.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import ffmpeg as ffmpeg_python
import numpy as np
from rich.markup import escape

from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import atomic, exists_error
from lipsync_cli.progress import log

HDR_TRANSFERS = {16: "smpte2084", 18: "arib-std-b67"}  # ffmpeg's AVColorTransferCharacteristic codes: PQ, HLG
# HDR to SDR: HDR reference white (ITU-R BT.2408: 203 cd/m2) is SDR white (1.0 linear); the Mobius curve keeps
# everything under HDR_KNEE as it is and rolls the rest, up to HDR_PEAK (1000 cd/m2, BT.2100 HLG's nominal peak, a
# phone's brightest), into what is left: reference white reads 238 of 255, mid-tones unchanged. (Hable's curve
# darkened the whole picture by a third; ffmpeg's default Mobius knee, 0.3, greyed the skin.)
HDR_WHITE_NITS = 203
HDR_KNEE = 0.7
HDR_PEAK = 1000 / HDR_WHITE_NITS
PIPE_SIZE = 1 << 20  # Linux default max for F_SETPIPE_SZ; bigger pipes mean fewer context switches per frame
_QUIET = ("-nostdin", "-hide_banner", "-loglevel", "error")


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # displayed width: rotation and sample aspect ratio applied
    height: int  # displayed height
    fps: float  # average source frame rate
    duration: float  # seconds from the file's start to the end of the last video frame
    rotation: int  # clockwise degrees the stored picture is turned for display: 0, 90, 180 or 270
    has_audio: bool
    codec: str
    stream_index: int = 0  # the video stream decoded (cover-art streams are skipped)
    hdr: str = ""  # the HDR transfer ("smpte2084": PQ, "arib-std-b67": HLG, a phone's default), "" for SDR
    interlaced: bool = False  # fields (TV, camcorders: 1080i, 576i): deinterlaced on decode

    def n_frames(self, fps: float = 25.0) -> int:
        """How many frames `iter_frames(path, fps)` yields: ffmpeg's fps filter rounds the end to the nearest frame."""
        return max(1, math.floor(self.duration * fps + 0.5 + 1e-6))


@functools.lru_cache(maxsize=8)
def ffmpeg_exe(path: str | None = None) -> str:
    """The ffmpeg binary: `path` (a file or a name on PATH) if given, else imageio-ffmpeg's bundled one."""
    if path:
        p = Path(path).expanduser()
        found = str(p) if p.is_file() else shutil.which(path)
        if not found or not os.access(found, os.X_OK):
            raise LipsyncError(f"ffmpeg not found or not executable: {path}")
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # imageio-ffmpeg raises RuntimeError when its binary is missing
        raise LipsyncError(f"no ffmpeg binary: {e} (install imageio-ffmpeg or set ffmpeg in the settings)") from e


# ---------------------------------------------------------------------------------------------------- probing


def probe(path: str | Path) -> VideoInfo:
    """Size, rate, duration, rotation and audio presence of a video file (cached on path, mtime and size)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise LipsyncError(f"cannot read {p}: {e.strerror or e}") from e
    if not p.is_file():
        raise LipsyncError(f"cannot read {p}: not a file")
    return _probe_cached(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _probe_cached(path: str, mtime_ns: int, size: int) -> VideoInfo:
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise LipsyncError(f"cannot read {path}: {_av_reason(e)}") from e
    with container:
        videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            raise LipsyncError(f"{path} has no video stream")
        stream = videos[0]
        try:
            return _scan(Path(path), container, stream)
        except av.FFmpegError as e:
            raise LipsyncError(f"cannot read {path}: {_av_reason(e)}") from e


def _scan(path: Path, container, stream) -> VideoInfo:
    """Demux every video packet for the exact first and last timestamps; decode only the first frame."""
    tb = stream.time_base or Fraction(1, 90000)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    default_dur = int(1 / (rate * tb)) if rate else 0
    start, end, count, first = None, None, 0, None
    for packet in container.demux(stream):
        if first is None:
            first = next(iter(_decode(stream, packet)), None)
        if packet.size == 0:  # the flush packet PyAV yields at the end
            continue
        count += 1
        if packet.pts is None:
            continue
        stop = packet.pts + (packet.duration or default_dur)
        start = packet.pts if start is None else min(start, packet.pts)
        end = stop if end is None else max(end, stop)
    if first is None:
        first = next(iter(_decode(stream, None)), None)  # a decoder that holds frames back until flushed
    if first is None:
        raise LipsyncError(f"cannot read {path}: no decodable video frame")

    zero = Fraction(container.start_time or 0, 1_000_000)  # ffmpeg's t = 0: the container's start
    if end is not None:
        duration = float(end * tb - min(zero, start * tb))
    elif stream.duration:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / 1_000_000
    else:
        duration = count / float(rate or 25)
    fps = float(rate) if rate else (count / duration if duration > 0 else 25.0)

    rotation = (-round(float(first.rotation or 0) / 90) * 90) % 360
    width, height = first.width, first.height
    sar = stream.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:
        width = max(2, round(width * sar))
    if rotation in (90, 270):
        width, height = height, width
    trc = getattr(first, "color_trc", None) or getattr(stream.codec_context, "color_trc", None)
    return VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=fps,
        duration=duration,
        rotation=rotation,
        has_audio=bool(container.streams.audio),
        codec=stream.codec_context.name,
        stream_index=stream.index,
        hdr=HDR_TRANSFERS.get(int(trc or 0), ""),
        interlaced=bool(getattr(first, "interlaced_frame", False)),
    )


def _decode(stream, packet) -> list:
    try:
        return stream.decode(packet)
    except av.FFmpegError:
        return []  # a broken packet before the first keyframe; the next one may decode


def _av_reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


def has_audio(path: Path) -> bool | None:
    """True/False when PyAV can open the file, None when it cannot (then ffmpeg gets to say why)."""
    try:
        with av.open(str(path)) as c:
            return bool(c.streams.audio)
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------- decoding


def iter_frames(
    path: str | Path, fps: float = 25.0, ffmpeg: str | None = None, start: int = 0, count: int | None = None
) -> Iterator[np.ndarray]:
    """Stream RGB frames at a constant `fps`, displayed orientation, exactly `probe(path).n_frames(fps)` of them
    (or frames `start` .. `start + count` of that sequence, found by seeking: random access without storing frames).

    Frames come through an ffmpeg rawvideo pipe one at a time, so memory stays flat however long the video is.
    The file is probed now (errors surface at the call); ffmpeg starts at the first `next()` and is killed if the
    consumer stops early. Should ffmpeg deliver a frame more or less than predicted (odd timestamps), the stream
    is cut or its last frame repeated so the count always matches.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    info = probe(path)
    total = info.n_frames(fps)
    start = min(max(int(start), 0), total - 1)
    count = total - start if count is None else max(0, min(int(count), total - start))
    exe = ffmpeg_exe(ffmpeg)
    args: dict = {}
    if start > 0:
        # seek a second early (to a keyframe before that, decoding from there), keep the file's own timestamps
        # (t = 0 at its start, as without seeking) so the fps filter's grid is the same as a full decode's, and cut
        # on that grid: frame `start` is bit-identical to the one a decode from the beginning yields
        args = dict(ss=f"{max(0.0, start / fps - 1.0):.6f}", copyts=None, start_at_zero=None)
    video = ffmpeg_python.input(str(Path(path).absolute()), **args)[str(info.stream_index)]
    if info.interlaced:  # woven fields comb every moving edge (the face mesh reads them, the output would keep them)
        video = video.filter("bwdif", mode="send_frame", deint="interlaced")  # a frame a frame: the rate is kept
    video = video.filter("fps", fps=_rate(fps))
    if start > 0:
        video = video.filter("trim", start_pts=start)
    if info.hdr:
        video = _to_sdr(video)
    video = video.filter("scale", info.width, info.height)
    out = ffmpeg_python.output(video, "pipe:", format="rawvideo", pix_fmt="rgb24", vframes=count)
    cmd = out.compile(cmd=[exe, *_QUIET])
    return _frames(cmd, info, count)


def _to_sdr(video):
    """HDR (PQ or HLG, BT.2020) to SDR BT.709, tone-mapped. Decoded as if it were SDR, a talking head made HDR and
    back came out dim and grey: mean luma 90-91 instead of 102, saturation 54 (HLG) and 34 (PQ) instead of 66."""
    return (
        video.filter("zscale", t="linear", npl=HDR_WHITE_NITS)
        .filter("format", "gbrpf32le")
        .filter("zscale", p="bt709")
        .filter("tonemap", tonemap="mobius", param=HDR_KNEE, peak=HDR_PEAK, desat=0)
        .filter("zscale", t="bt709", m="bt709", r="tv")
        .filter("format", "yuv420p")
    )


def _frames(cmd: list[str], info: VideoInfo, total: int) -> Iterator[np.ndarray]:
    shape = (info.height, info.width, 3)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        _grow_pipe(proc.stdout)
        try:
            n, frame, partial = 0, None, False
            while n < total:
                buf = np.empty(shape, np.uint8)
                got = _read_into(proc.stdout, memoryview(buf).cast("B"))
                if got < buf.nbytes:
                    partial = got > 0
                    break
                frame = buf
                n += 1
                yield frame
            if n < total:  # ffmpeg ended early: a failure, or a frame fewer than the timestamps promised
                rc = proc.wait()
                if rc != 0 or frame is None or partial:
                    why = _ffmpeg_error(err, rc) if rc != 0 else "no complete frame from ffmpeg"
                    raise LipsyncError(f"cannot decode {info.path}: {why}")
                if total - n > 1:
                    log(escape(f"{info.path}: decoded {n} of {total} frames, repeating the last one"))
                for _ in range(total - n):
                    yield frame.copy()
        finally:
            _stop(proc)


def _read_into(stream: IO[bytes], view: memoryview) -> int:
    """Fill `view` from a raw pipe, whose reads may come short; the bytes read (fewer only at end of stream)."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _stop(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Kill ffmpeg (after `grace` seconds to exit by itself) and reap it, so nothing is left running."""
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):  # flushing into a pipe ffmpeg already closed
                f.close()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------- audio


def read_audio(path: str | Path, sr: int = 16000, ffmpeg: str | None = None) -> np.ndarray:
    """Float32 mono in [-1, 1] at `sr` from anything ffmpeg reads; sample 0 is the file's t = 0."""
    p = Path(path)
    if not p.is_file():
        raise LipsyncError(f"cannot read audio from {p}: {'not a file' if p.exists() else 'file not found'}")
    if has_audio(p) is False:
        raise LipsyncError(f"{p} has no audio stream")
    src = ffmpeg_python.input(str(p.absolute()))["a:0"]
    audio = src.filter("aresample", sr, first_pts=0)  # pad a late start with silence (see the module docstring)
    out = ffmpeg_python.output(audio, "pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sr)
    cmd = out.compile(cmd=[ffmpeg_exe(ffmpeg), *_QUIET])
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise LipsyncError(f"cannot read audio from {p}: {_last_line(proc.stderr, proc.returncode)}")
    return np.clip(np.frombuffer(proc.stdout, "<f4"), -1.0, 1.0)


def write_wav(path: str | Path, audio: np.ndarray, sr: int) -> None:
    """16-bit PCM WAV of float audio in [-1, 1], (n,) or (n, channels); written atomically, 2^20 samples at a time
    (10 minutes at 48 kHz converted at once took ~0.45 GB of temporaries)."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"audio must be (n,) or (n, channels), got shape {a.shape}")
    try:
        with atomic(Path(path), ".wav") as tmp, wave.open(str(tmp), "wb") as w:
            w.setnchannels(a.shape[1])
            w.setsampwidth(2)
            w.setframerate(int(sr))
            for s in range(0, len(a), 1 << 20):
                w.writeframes(
                    np.round(np.clip(np.nan_to_num(a[s : s + (1 << 20)]), -1.0, 1.0) * 32767).astype("<i2").tobytes()
                )
    except OSError as e:  # a full disk, a quota: the temp file is gone already (atomic)
        raise LipsyncError(f"cannot write {path}: {e.strerror or e}") from None


CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # output suffix -> ffmpeg muxer
VIDEO_OUT = tuple(CONTAINERS)
AAC = {"acodec": "aac", "audio_bitrate": "160k"}  # the output's sound, encoded by the writer or muxed in later


def _muxer(fmt: str) -> dict:
    """ffmpeg output options of a container: MP4/MOV put their index first, so players start before the file is in."""
    return {"format": fmt, **({"movflags": "+faststart"} if fmt in ("mp4", "mov") else {})}


def check_output(
    output: Path, video: Path, force: bool, suffixes: tuple[str, ...] = VIDEO_OUT, inputs: tuple = ()
) -> None:
    """Refuse before any work is done: overwriting without --force, writing over the input (`video` or any of the
    other `inputs`: --audio, --voice-ref, a --transcript file; None skipped), unwritable folder."""
    for p in (video, *inputs):
        if p is not None and output.resolve() == Path(p).resolve():
            raise LipsyncError(f"refusing to write the output over the input {p}")
    if output.suffix.lower() not in suffixes:
        kind = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else suffixes[0]
        raise LipsyncError(f"output must be a {kind} file, got {output.name}")
    if output.is_dir():
        raise LipsyncError(f"{output} is a folder; give the output a file name")
    if output.exists() and not force:  # early, to save the work; the publish itself is what makes it safe
        raise exists_error(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise LipsyncError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise LipsyncError(f"output folder {folder} is not writable")


# ---------------------------------------------------------------------------------------------------- encoding

# x264 beyond crf/preset: live-action tuning and lighter deblocking. A dub's mouth changes more between frames than
# the rest of the picture, and x264's defaults smoothed it most: re-encoding three lossless dubs at crf 18 kept
# 0.82-0.87 of the source mouth's Laplacian variance (lossless 0.95-0.97), these options 0.895-0.904; size +1%, same
# speed, mouth PSNR -0.1 dB (a psychovisual trade: texture kept rather than smoothed; docs/articulation_engine.md)
X264_OPTIONS = {"tune": "film", "deblock": "-2:-2"}


class VideoWriter:
    """H.264/yuv420p (+ AAC) mp4 from RGB frames, as `with VideoWriter(path, w, h, audio=wav) as vw: vw.write(f)`.

    The output lasts exactly as long as the frames written: the audio is padded with silence or cut to match
    (cut at an AAC packet, up to 23 ms short, unless `frames` tells in advance how many will be written).
    Odd sizes are padded by one pixel (edge replicated) because yuv420p needs even ones. ffmpeg writes a hidden
    temp file beside `path` which replaces it only when the block exits cleanly; on any error nothing is left.
    `preset` is x264's speed/size trade: veryfast encodes ~3x faster than medium at a similar size for this
    kind of footage, which matters on a CPU that is also running the lip-sync.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: float = 25.0,
        audio: str | Path | None = None,
        crf: int = 18,
        ffmpeg: str | None = None,
        preset: str = "veryfast",
        publish: atomic | None = None,
        frames: int | None = None,
    ):
        if width <= 0 or height <= 0 or fps <= 0:
            raise ValueError(f"bad video size/rate: {width}x{height} at {fps} fps")
        self.path, self.width, self.height, self.fps = Path(path), int(width), int(height), float(fps)
        self.frames = 0
        exe = ffmpeg_exe(ffmpeg)
        if audio is not None:
            audio = Path(audio)
            if not audio.is_file():
                raise LipsyncError(f"cannot read audio from {audio}: file not found")
            if has_audio(audio) is False:
                raise LipsyncError(f"{audio} has no audio stream")

        suffix = self.path.suffix.lower() or ".mp4"
        fmt = CONTAINERS.get(suffix)
        if fmt is None:
            raise LipsyncError(f"cannot write {self.path}: use {', '.join(VIDEO_OUT)} for H.264 video")
        self._file = publish if publish is not None else atomic(self.path, suffix)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the writer, closed in close/abort
        try:
            cmd = self._command(exe, fmt, audio, crf, preset, None if frames is None else frames / self.fps)
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err)
        except BaseException as e:
            self._err.close()
            self._file.discard()
            if isinstance(e, OSError):
                raise LipsyncError(f"cannot run ffmpeg ({exe}): {e}") from e
            raise
        _grow_pipe(self._proc.stdin)
        self._open = True
        # frames go to ffmpeg from a thread through a short queue: the caller composites the next frame while a
        # pipe write waits for x264 (pipe writes release the GIL)
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, name="encoder-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        # the get wakes up to look at _stop: Ctrl-C/SIGTERM raise in the main thread wherever it is, and one raised
        # inside the queue's notify loses that wake-up (a dub hung for good in abort's join: 1 of 5 signals under load)
        while not self._stop.is_set():
            try:
                frame = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if frame is None:
                return
            if self._failed is not None:
                continue  # drain, so a blocked put never waits forever
            try:
                self._proc.stdin.write(memoryview(frame).cast("B"))
            except BaseException as e:  # BrokenPipeError: ffmpeg died (bad audio, disk full, ...)
                self._failed = e

    def _drain(self, stop: bool = False) -> None:
        """Stop the feeding thread after what is queued, or at once (`stop`); reap it before touching the pipe."""
        if self._feeder.is_alive():
            if stop:
                self._stop.set()
            else:
                self._queue.put(None)
            self._feeder.join()

    def _raise_failed(self) -> None:
        _stop(self._proc, grace=5.0)
        msg = _ffmpeg_error(self._err, self._proc.returncode)
        e = self._failed
        self.abort()
        raise LipsyncError(f"ffmpeg failed writing {self.path}: {msg}") from e

    def _command(
        self, exe: str, fmt: str, audio: Path | None, crf: int, preset: str, seconds: float | None
    ) -> list[str]:
        src = ffmpeg_python.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{self.width}x{self.height}", framerate=_rate(self.fps)
        )
        video = src.video
        pad_w, pad_h = self.width % 2, self.height % 2
        if pad_w or pad_h:  # yuv420p needs even sizes: add a row/column that repeats the edge
            video = video.filter("pad", self.width + pad_w, self.height + pad_h)
            video = video.filter("fillborders", right=pad_w, bottom=pad_h, mode="smear")
        video = (
            video.filter("scale", out_color_matrix="bt709", out_range="tv")
            .filter("format", "yuv420p")
            .filter("setparams", range="tv", color_primaries="bt709", color_trc="bt709", colorspace="bt709")
            .filter("setsar", 1)
        )
        streams = [video]
        kw: dict = dict(_muxer(fmt), vcodec="libx264", crf=crf, preset=preset, pix_fmt="yuv420p", **X264_OPTIONS)
        if audio is not None:
            streams.append(_sound(audio, seconds))
            kw.update(AAC, **({"shortest": None} if seconds is None else {}))
        out = ffmpeg_python.output(*streams, str(self._file.tmp.absolute()), **kw)
        return out.compile(cmd=[exe, *_QUIET, "-y"])

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame of shape (height, width, 3)."""
        if not self._open:
            raise ValueError("write to a closed VideoWriter")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {tuple(frame.shape)}"
            )
        if self._failed is not None:
            self._drain()
            self._raise_failed()
        self._queue.put(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> None:
        """Finish encoding and move the file into place; raises LipsyncError (leaving nothing) if ffmpeg failed."""
        if not self._open:
            return
        try:
            self._drain()
            if self._failed is not None:
                self._raise_failed()
            with contextlib.suppress(OSError):  # ffmpeg already gone; its exit code tells
                self._proc.stdin.close()
            rc = self._proc.wait()
            if rc != 0:
                raise LipsyncError(f"ffmpeg failed writing {self.path}: {_ffmpeg_error(self._err, rc)}")
            if self.frames == 0:
                raise LipsyncError(f"no frames were written to {self.path}")
            self._file.commit()
        except BaseException:  # a failure, or Ctrl-C/SIGTERM while ffmpeg finishes: nothing left behind
            self.abort()
            raise
        self._open = False
        self._file.discard()  # the temp name of a hard-linked commit
        self._err.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never closed (no `with`): do not leave ffmpeg or a temp file
            self.abort()

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial output (for error paths)."""
        if not self._open:
            return
        self._open = False
        self._failed = self._failed or LipsyncError("aborted")
        with contextlib.suppress(OSError):
            self._proc.kill()  # first: a feeder blocked in a pipe write gets EPIPE
        self._drain(stop=True)
        _stop(self._proc)
        self._file.discard()
        self._err.close()


def _sound(audio: Path, seconds: float | None):
    """`audio`'s first stream with endless silence after it: cut to `seconds` exactly when given (else the
    muxer's -shortest cuts it where the video ends, at an AAC packet: up to 23 ms of the speech lost)."""
    snd = ffmpeg_python.input(str(Path(audio).absolute()))["a:0"]
    if seconds is None:
        return snd.filter("apad")
    return snd.filter("apad", whole_dur=f"{seconds:.6f}").filter("atrim", end=f"{seconds:.6f}")


def mux(video: Path, audio: Path, publish: atomic, seconds: float, ffmpeg: str | None = None) -> None:
    """`video`'s picture (stream copy, `seconds` long) with `audio` as AAC, padded or cut to as long, into
    `publish`'s temp file, then published."""
    src = ffmpeg_python.input(str(Path(video).absolute()))["v:0"]
    fmt = CONTAINERS.get(publish.path.suffix.lower(), "mp4")
    out = ffmpeg_python.output(
        src, _sound(audio, seconds), str(publish.tmp.absolute()), **_muxer(fmt), vcodec="copy", **AAC
    )
    proc = subprocess.run(
        out.compile(cmd=[ffmpeg_exe(ffmpeg), *_QUIET, "-y"]), stdin=subprocess.DEVNULL, capture_output=True
    )
    if proc.returncode != 0:
        raise LipsyncError(f"ffmpeg failed writing {publish.path}: {_last_line(proc.stderr, proc.returncode)}")
    publish.commit()


def audio_info(path: str | Path) -> tuple[int | None, float | None]:
    """(sample rate, seconds) of a file's first audio stream, from its header; None for what PyAV cannot tell."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                return None, None
            st = c.streams.audio[0]
            if st.duration is not None and st.time_base is not None:
                seconds = float(st.duration * st.time_base)
            else:
                seconds = c.duration / av.time_base if c.duration else None
            return int(st.sample_rate), seconds
    except (av.FFmpegError, OSError, UnicodeDecodeError, IndexError, TypeError):
        return None, None


# ---------------------------------------------------------------------------------------------------- helpers


def _rate(fps: float) -> str:
    """A frame rate as ffmpeg's exact rational: 25 -> '25', 29.97002997 -> '30000/1001'."""
    f = Fraction(fps).limit_denominator(1001)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _grow_pipe(f: IO[bytes] | None) -> None:
    """Raise a pipe's kernel buffer to PIPE_SIZE (Linux); a plain pipe holds only 64 KiB, a tenth of a 720p frame."""
    try:
        import fcntl

        fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError, ValueError):
        pass


_GENERIC = ("Conversion failed", "Error opening output file", "Error opening input file", "Exiting with exit code")


def _last_line(stderr: bytes, rc: int | None) -> str:
    """ffmpeg's last meaningful stderr line (its final lines are often generic 'Conversion failed!')."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_GENERIC) and "Error opening output files" not in ln]
    line = (useful or lines or [f"ffmpeg exited with code {rc}"])[-1]
    if line.startswith("[") and "] " in line:  # drop the "[mp4 @ 0x55d...] " context prefix
        line = line.split("] ", 1)[1]
    return line


def _ffmpeg_error(err: IO[bytes], rc: int | None) -> str:
    err.seek(0)
    return _last_line(err.read(), rc)
