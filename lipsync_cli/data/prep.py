"""Prep: every clip on disk -> one training-ready safetensors shard, plus a manifest with the splits.

    data/raw/<corpus>/<speaker>/video/<id>.*  (+ align/<id>.align, video/<id>.json)  and any --source roots
        -> data/prep/<size>/<corpus>/<speaker>/<id>.safetensors      data/prep/<size>/manifest.json

A shard holds everything training reads for a clip, at two rates. Per video frame (25 fps, T frames): `crops`
uint8 (T, S, S, 3) aligned lower-face crops, `landmarks` float32 (T, 478, 2) smoothed full-frame pixels, `affine`
float32 (T, 2, 3) frame -> crop, `lips` float32 (T, 40, 2) in crop pixels, `mouth` float32 (T,) opening, `found`
bool (T,), `word_index` int16 (T,) into the `words` metadata (-1 = none), `silence` bool (T,), `mel_index` int32
(T,) the feature row of each frame. At 100 Hz (Tm = 4T + 1 rows, row r centred at r / 100 s): `mel` float16
(Tm, 80) log10 power, `mfcc` float32 (Tm, 13). And `audio` int16 (T * 640,), 16 kHz mono, its active speech
normalised to -23 dB, padded or cut to exactly the video's length so that frame i, row 4i and sample 640i are
the same instant. Where no face was found, landmarks/lips/mouth are NaN and the crop holds the nearest found
frame's alignment. Metadata (strings): format, fps, sr, feat_rate, size, corpus, speaker, id, and JSON `info`
(frames, seconds, found, loudness), `words` ([start_s, end_s, word], silences included) and `provenance`.

The manifest is rebuilt after every run from the shard headers under data/prep/<size>/, so it always describes
what is on disk. Splits: utterance-disjoint by a hash of the clip id (GRID ids name the sentence, so a test
sentence is unseen by every speaker) and speaker-disjoint (whole speakers held out) when there are >= 3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import queue
import re
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from rich.markup import escape
from rich.table import Table
from safetensors import safe_open
from safetensors.numpy import save_file

from lipsync_cli import face, media, progress
from lipsync_cli.audio import match_loudness, mel_spectrogram, mfcc, speech_loudness_db, voice_activity
from lipsync_cli.data.grid import read_align, sentence
from lipsync_cli.data.shard import FEAT_RATE, FORMAT, FPS, HOP, SR, TARGET_DB
from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import VIDEO_EXT, atomic, remove_temps_of, write_json
from lipsync_cli.settings import PREP_SIZES

SILENCE_WORDS = frozenset({"sil", "sp"})
FRAME_BUDGET = 512 << 20  # decoded frames kept for the crop pass up to this many bytes; longer clips decode twice
STAGES = ("decode", "mesh", "crops", "audio", "wait_audio", "write")


@dataclass(frozen=True)
class Clip:
    corpus: str
    speaker: str
    id: str
    video: Path
    align: Path | None = None  # GRID word timings
    provenance: Path | None = None  # the importer's JSON beside the video

    @property
    def key(self) -> str:
        return f"{self.corpus}/{self.speaker}/{self.id}"


@dataclass
class PrepSummary:
    clips: int = 0  # selected this run
    prepped: int = 0
    skipped: int = 0  # already done
    frames: int = 0  # of the selected clips that have a shard
    seconds: float = 0.0
    new_seconds: float = 0.0  # of video prepped by this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (clip key, reason)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over workers
    wall: float = 0.0
    manifest: Path | None = None


# ---------------------------------------------------------------------------------------------- discovery


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _dirs(path: Path) -> list[Path]:
    return sorted(
        (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural(p.name)
    )


def corpus_clips(corpus_dir: Path, corpus: str | None = None) -> list[Clip]:
    """Clips of one corpus laid out as `<corpus_dir>/<speaker>/video/<id>.<ext>` (align/ and JSON optional)."""
    corpus = corpus or corpus_dir.name
    clips = []
    for speaker in _dirs(corpus_dir):
        vdir = speaker / "video"
        if not vdir.is_dir():
            continue
        videos = [p for p in vdir.iterdir() if p.suffix.lower() in VIDEO_EXT and not p.name.startswith(".")]
        for v in sorted(videos, key=lambda p: _natural(p.name)):
            align, prov = speaker / "align" / f"{v.stem}.align", v.with_suffix(".json")
            align, prov = (p if p.is_file() else None for p in (align, prov))
            clips.append(Clip(corpus, speaker.name, v.stem, v, align, prov))
    return clips


def find_clips(raw_root: Path | None, sources: Sequence[Path] = ()) -> list[Clip]:
    """Every clip under `raw_root` (data/raw: one folder per corpus) and each extra corpus root in `sources`.

    A clip found twice (the same corpus/speaker/id under two roots) is taken from the first root.
    """
    roots = [] if raw_root is None or not Path(raw_root).is_dir() else [(c, c.name) for c in _dirs(Path(raw_root))]
    for s in sources:
        s = Path(s).expanduser()
        if not s.is_dir():
            raise LipsyncError(f"--source {s}: not a folder (expected <root>/<speaker>/video/)")
        roots.append((s, s.resolve().name))
    seen: dict[str, Clip] = {}
    for root, name in roots:
        for c in corpus_clips(root, name):
            seen.setdefault(c.key, c)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- one clip


def word_frames(
    words: list[tuple[float, float, str]], n_frames: int, fps: float = FPS
) -> tuple[np.ndarray, np.ndarray]:
    """(word_index int16, silence bool) per frame: the entry whose [start, end) holds time i / fps (-1: none)."""
    t = np.arange(n_frames) / fps
    index = np.full(n_frames, -1, np.int16)
    silence = np.ones(n_frames, bool)
    for k, (start, end, word) in enumerate(words):
        inside = (t >= start) & (t < end)
        if word.lower() not in SILENCE_WORDS:
            index[inside] = k
            silence[inside] = False
    return index, silence


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def clip_audio(clip: Clip, n_frames: int, target_db: float = TARGET_DB, ffmpeg: str | None = None) -> dict:
    """The clip's audio tensors (exactly n_frames long), word timings and loudness, plus the seconds it took."""
    t0 = time.perf_counter()
    x = media.read_audio(clip.video, SR, ffmpeg=ffmpeg)
    loudness = speech_loudness_db(x, SR)
    x = match_loudness(x, SR, target_db)
    n = n_frames * SR // FPS
    x = np.pad(x, (0, max(0, n - len(x))))[:n]
    mel = mel_spectrogram(x, SR, n_mels=80, hop_s=HOP / SR)
    words = read_align(clip.align) if clip.align else grid_words(clip, x)
    if words:
        word_index, silence = word_frames(words, n_frames)
    else:  # no transcript: pauses from the audio itself
        word_index, silence = np.full(n_frames, -1, np.int16), ~voice_activity(x, SR, fps=FPS, n_frames=n_frames)
    tensors = {
        "word_index": word_index,
        "silence": silence,
        "mel_index": np.clip(np.round(np.arange(n_frames) * FEAT_RATE / FPS), 0, len(mel) - 1).astype(np.int32),
        "mel": mel.astype(np.float16),
        "mfcc": mfcc(x, SR, n_mfcc=13, n_mels=80, hop_s=HOP / SR),
        "audio": np.round(np.clip(x, -1, 1) * 32767).astype(np.int16),
    }
    return {"tensors": tensors, "words": words, "loudness": loudness, "seconds": time.perf_counter() - t0}


def grid_words(clip: Clip, x: np.ndarray) -> list[tuple[float, float, str]]:
    """Word timings of a GRID clip without `.align`: its id spells the sentence, forced alignment times it.

    [] for other corpora, ids that spell no GRID sentence, or audio the aligner cannot fit (VAD pauses then)."""
    text = sentence(clip.id) if clip.corpus == "grid" else None
    if text is None:
        return []
    from lipsync_cli import phones  # pocketsphinx loads only when needed

    words = [(w.start, w.end, w.word.lower()) for w in phones.align_words(x, text)]
    spoken = [w for w in words if w[2] not in ("", phones.SIL.lower())]
    if len(spoken) != len(text.split()):  # a stretch fell back to phone recognition: the timings are not words
        return []
    return [(s, e, "sil" if w == phones.SIL.lower() else w) for s, e, w in words]


def _read_ahead(frames: Iterator[np.ndarray], q: queue.SimpleQueue) -> None:
    """Move every frame into `q` as fast as ffmpeg delivers, then None (or the exception that stopped it)."""
    try:
        for frame in frames:
            q.put(frame)
        q.put(None)
    except BaseException as e:
        q.put(e)


def _drain(q: queue.SimpleQueue) -> Iterator[np.ndarray]:
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _timed(frames: Iterator[np.ndarray], tm: dict[str, float]) -> Iterator[np.ndarray]:
    """The frames, adding the time spent waiting for each to tm["decode"]."""
    while True:
        t0 = time.perf_counter()
        frame = next(frames, None)
        tm["decode"] += time.perf_counter() - t0
        if frame is None:
            return
        yield frame


def prep_clip(
    clip: Clip,
    out: Path,
    size: int,
    tracker: face.FaceTracker,
    *,
    smooth: float = 1.5,
    target_db: float = TARGET_DB,
    ffmpeg: str | None = None,
) -> dict[str, float]:
    """Write `out` (the clip's shard, atomically); returns seconds spent per stage. Raises LipsyncError."""
    tm = dict.fromkeys(STAGES, 0.0)
    t0 = time.perf_counter()
    info = media.probe(clip.video)
    if not info.has_audio:
        raise LipsyncError("no audio stream")
    n_frames = info.n_frames(FPS)
    keep = n_frames * info.width * info.height * 3 <= FRAME_BUDGET
    frames: list[np.ndarray] = []
    with ThreadPoolExecutor(2) as bg:  # audio and decoding overlap the mesh, which leaves the CPU idle between frames
        sound = bg.submit(clip_audio, clip, n_frames, target_db, ffmpeg)
        it = media.iter_frames(clip.video, FPS, ffmpeg=ffmpeg)
        if keep:  # the frames are all kept anyway: let ffmpeg run ahead instead of 3 frames (the pipe) at most
            q: queue.SimpleQueue = queue.SimpleQueue()
            bg.submit(_read_ahead, it, q)
            it = _drain(q)
        tm["decode"] += time.perf_counter() - t0
        t0, decode0 = time.perf_counter(), tm["decode"]
        # one worker's tracker serves clip after clip (track_faces resets it)
        track = face.track_faces(
            _timed(it, tm), smooth_sigma=smooth, progress=False, tracker=tracker,
            on_frame=(lambda _t, frame, _lm: frames.append(frame)) if keep else None,
        )  # fmt: skip
        tm["mesh"] += time.perf_counter() - t0 - (tm["decode"] - decode0)
        t0 = time.perf_counter()
        audio = sound.result()
        tm["audio"] = audio["seconds"]
        tm["wait_audio"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    T, found = len(track), track.found
    if not found.any():
        raise LipsyncError(f"no face found in {T} frames")
    lm, M = track.landmarks, track.align(size)  # frames without a face borrow the nearest one's matrix
    lips = np.full((T, len(face.LIPS), 2), np.nan, np.float32)
    for i in np.flatnonzero(found):
        lips[i] = face.lip_shape(lm[i], M[i])
    crops = np.empty((T, size, size, 3), np.uint8)
    for i, frame in enumerate(frames if keep else media.iter_frames(clip.video, FPS, ffmpeg=ffmpeg)):
        crops[i] = face.warp_to_aligned(frame, M[i], size)
    frames.clear()  # free them before the write
    tm["crops"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    words, loudness = audio["words"], audio["loudness"]
    provenance = {"video": str(clip.video.resolve()), "sha256": sha256(clip.video)}
    if clip.align:
        provenance["align"] = str(clip.align.resolve())
    if clip.provenance:
        with contextlib.suppress(OSError, ValueError):  # an unreadable sidecar only costs the provenance
            provenance["import"] = json.loads(clip.provenance.read_text())
    tensors = {
        "crops": crops,
        "landmarks": lm,
        "affine": M.astype(np.float32),
        "lips": lips,
        "mouth": np.asarray(face.mouth_opening(lm), np.float32).reshape(T),
        "found": found,
        **audio["tensors"],
    }
    meta = {
        "format": FORMAT, "fps": str(FPS), "sr": str(SR), "feat_rate": str(FEAT_RATE), "size": str(size),
        "corpus": clip.corpus, "speaker": clip.speaker, "id": clip.id,
        "info": json.dumps({
            "frames": T, "seconds": T / FPS, "found": round(float(found.mean()), 4),
            "words": [w for _, _, w in words if w.lower() not in SILENCE_WORDS],
            "loudness_db": round(loudness, 2),
            "silence_from": "vad" if not words else "align" if clip.align else "forced",
        }),
        "words": json.dumps([[round(s, 4), round(e, 4), w] for s, e, w in words]),
        "provenance": json.dumps(provenance),
    }  # fmt: skip
    with atomic(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    tm["write"] += time.perf_counter() - t0
    return tm


def shard_info(path: Path) -> dict | None:
    """The manifest entry of a finished shard, from its header alone; None when missing or unreadable."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            if meta.get("format") != FORMAT or "crops" not in names:
                return None
            info = json.loads(meta["info"])
            return {
                "corpus": meta["corpus"], "speaker": meta["speaker"], "id": meta["id"], "frames": info["frames"],
                "seconds": info["seconds"], "found": info["found"], "words": info["words"],
            }  # fmt: skip
    except Exception:  # missing, truncated, foreign: not done
        return None


# ---------------------------------------------------------------------------------------------- splits, manifest


def _bucket(text: str) -> int:
    """A stable 0..99 from a string (not Python's salted hash())."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100


def split_clips(clips: list[dict]) -> dict:
    """Utterance-disjoint (id hash -> train 80 / val 10 / test 10) and speaker-disjoint splits of manifest entries.

    Speakers are `corpus/speaker`; with >= 3 of them ~10% each go to val and test (one each under 5 speakers, at
    least two from 5 on), picked by hash, so adding a corpus moves few clips between splits. The speaker with the
    most clips is never held out: it carries the training (GRID s1: 400 of 481 sentences).
    """
    key = lambda c: f"{c['corpus']}/{c['speaker']}/{c['id']}"  # noqa: E731
    utt: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in clips:
        b = _bucket(c["id"])
        utt["train" if b < 80 else "val" if b < 90 else "test"].append(key(c))
    speakers = sorted({f"{c['corpus']}/{c['speaker']}" for c in clips})
    splits: dict = {"utterance": utt}
    if len(speakers) < 3:
        splits["speaker"] = None
        splits["speaker_note"] = f"only {len(speakers)} speaker(s): no speaker-disjoint split (needs >= 3)"
        return splits
    count: dict[str, int] = {}
    for c in clips:
        count[f"{c['corpus']}/{c['speaker']}"] = count.get(f"{c['corpus']}/{c['speaker']}", 0) + 1
    biggest = max(speakers, key=lambda s: (count[s], s))
    order = sorted((s for s in speakers if s != biggest), key=lambda s: (hashlib.sha1(s.encode()).hexdigest(), s))
    n = max(1 if len(speakers) < 5 else 2, round(0.1 * len(speakers)))
    held = {"test": order[:n], "val": order[n : 2 * n]}
    part = {s: p for p, ss in held.items() for s in ss}
    spk: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in clips:
        spk[part.get(f"{c['corpus']}/{c['speaker']}", "train")].append(key(c))
    splits["speaker"] = spk
    splits["speaker_held_out"] = held
    return splits


def write_manifest(out_root: Path, size: int) -> dict:
    """Rebuild `out_root/manifest.json` from every shard under `out_root` (headers only), atomically."""
    clips = []
    for path in sorted(out_root.glob("*/*/*.safetensors"), key=lambda p: [_natural(x) for x in p.parts[-3:]]):
        if not path.name.startswith(".") and (entry := shard_info(path)) is not None:
            clips.append({**entry, "path": path.relative_to(out_root).as_posix()})
    vocab = sorted({w for c in clips for w in c.pop("words")})
    manifest = {
        "format": int(FORMAT), "size": size, "fps": FPS, "sr": SR, "feat_rate": FEAT_RATE, "n_mels": 80,
        "n_mfcc": 13, "target_db": TARGET_DB, "clips": clips, "frames": sum(c["frames"] for c in clips),
        "hours": round(sum(c["seconds"] for c in clips) / 3600, 4), "vocab": vocab, "splits": split_clips(clips),
    }  # fmt: skip
    write_json(out_root / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- the run

_tracker: face.FaceTracker | None = None


def _init_worker() -> None:
    """Each worker process builds its own tracker once (mediapipe graphs are not shareable across processes)."""
    global _tracker
    # Ctrl-C reaches the whole process group: the parent alone acts on it (_stop_workers), so that a worker does not
    # die mid-queue with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    progress.set_quiet(True)  # a worker's log lines would tear the parent's progress bar
    cv2.setNumThreads(1)  # parallelism comes from the processes
    _tracker = face.FaceTracker(detect_every=1 << 30)  # detection only on loss: prep needs no face counts


def _work(clip: Clip, out: Path, size: int, kw: dict) -> dict[str, float]:
    return prep_clip(clip, out, size, _tracker, **kw)


def _stop_workers(pool: ProcessPoolExecutor, folders: set[Path]) -> None:
    """Stop `pool` now: queued clips cancelled, the running ones' workers killed, and the temp shards they were
    writing (in `folders`) removed. shutdown(cancel_futures=True) alone lets every running clip finish, and the
    `with` block's exit used to wait for the whole queue."""
    procs = list((pool._processes or {}).values())  # the workers: no public handle on them before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()  # SIGTERM: a worker dies at once (no handler), its ffmpegs on their broken pipes
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    pids = {p.pid for p in procs}
    for folder in folders:
        remove_temps_of(folder, pids)  # a killed worker runs no `finally`: its half-written shard is ours to remove


def prep(
    raw_root: Path | None,
    out_root: Path,
    sources: Sequence[Path] = (),
    *,
    size: int = 128,
    workers: int = 2,
    limit: int | None = None,
    smooth: float = 1.5,
    ffmpeg: str | None = None,
) -> PrepSummary:
    """Prep every clip under `raw_root` and `sources` into `out_root` (data/prep/<size>), then rebuild its manifest.

    Done clips (shard exists and parses) are skipped; a clip that fails is recorded with its reason and the rest
    go on. `workers` processes share the clips (1: in this process).
    """
    if size not in PREP_SIZES:
        raise LipsyncError(f"prep size {size}: use one of {', '.join(map(str, PREP_SIZES))}")
    t_start = time.perf_counter()
    clips = find_clips(raw_root, sources)
    if not clips:
        raise LipsyncError(
            f"no clips under {raw_root}/<corpus>/<speaker>/video/ (fetch or import some, or use --source)"
        )
    if limit is not None:
        clips = clips[: max(0, limit)]
    out_root = Path(out_root)
    summary = PrepSummary(clips=len(clips), timings=dict.fromkeys(STAGES, 0.0))
    path = {c.key: out_root / c.corpus / c.speaker / f"{c.id}.safetensors" for c in clips}
    todo = []
    for c in clips:
        if (info := shard_info(path[c.key])) is not None:
            summary.skipped += 1
            summary.frames += info["frames"]
            summary.seconds += info["seconds"]
        else:
            todo.append(c)
    kw = {"smooth": smooth, "ffmpeg": ffmpeg}

    def done(c: Clip, timings: dict | None, error: BaseException | None) -> None:
        if error is not None:
            reason = str(error) if isinstance(error, LipsyncError) else f"{type(error).__name__}: {error}"
            summary.failures.append((c.key, reason))
            return
        for k, v in timings.items():
            summary.timings[k] += v
        info = shard_info(path[c.key])
        summary.prepped += 1
        summary.frames += info["frames"]
        summary.seconds += info["seconds"]
        summary.new_seconds += info["seconds"]

    with progress.task(f"prep {size}px", len(todo)) as advance:
        if todo and workers <= 1:
            tracker = face.FaceTracker(detect_every=1 << 30)
            try:
                for c in todo:
                    try:
                        done(c, prep_clip(c, path[c.key], size, tracker, **kw), None)
                    except Exception as e:
                        done(c, None, e)
                    advance(1)
            finally:
                tracker.close()
        elif todo:
            ctx = multiprocessing.get_context("spawn")  # no fork: mediapipe and ffmpeg pipes do not survive it
            pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker)
            try:  # no `with`: its exit waits for the running clips
                jobs = {pool.submit(_work, c, path[c.key], size, kw): c for c in todo}
                for job in as_completed(jobs):
                    e = job.exception()
                    done(jobs[job], None if e else job.result(), e)
                    advance(1)
            except BaseException:  # Ctrl-C, SIGTERM's SystemExit, a bug: stop at once, not after the queue
                _stop_workers(pool, {path[c.key].parent for c in todo})
                raise
            pool.shutdown()
    summary.manifest = out_root / "manifest.json"
    write_manifest(out_root, size)
    summary.wall = time.perf_counter() - t_start
    return summary


def summary_table(s: PrepSummary) -> Table:
    """What a run did: clips, frames, hours, and every failure with its reason."""
    t = Table(box=None, show_header=False)
    t.add_row("clips", f"{s.clips} ({s.prepped} prepped, {s.skipped} already done, {len(s.failures)} failed)")
    t.add_row("frames", f"{s.frames} ({s.seconds / 3600:.2f} h of video)")
    t.add_row("time", f"{s.wall:.1f} s ({s.new_seconds / max(s.wall, 1e-9):.1f}x real time)")
    t.add_row("manifest", escape(str(s.manifest)))
    for key, why in s.failures:
        t.add_row("[red]failed[/]", escape(f"{key}: {why}"))
    return t
