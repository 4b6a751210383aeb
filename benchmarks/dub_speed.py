"""Frames per second of each dub stage and end to end, on the shared clips.

    python benchmarks/dub_speed.py [--media ../shared/media] [--speech FILE] [--max-side 1280] [--clips a.mp4 ...]

Stages are timed in isolation on the same frames (decode, face tracking, engine, blend, encode), then `dub()` end to
end (driven by an audio file, so TTS time is not counted). The baseline in the same run is a plain decode + encode
of the same clip through the same ffmpeg (what any pipeline that rewrites the video pays at least): the last column
is end-to-end fps / transcode fps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lipsync_cli import audio, compositing, dub, face, media, progress
from lipsync_cli.engine import get_engine
from lipsync_cli.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def fps(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_clip(video: Path, speech_path: Path, settings: Settings) -> dict[str, float]:
    info = media.probe(video)
    row: dict[str, float] = {"frames": info.n_frames(25)}
    t = time.perf_counter()
    frames = list(media.iter_frames(video))
    row["decode"] = fps(len(frames), time.perf_counter() - t)

    t = time.perf_counter()
    with face.FaceTracker() as tr:
        for f in frames:
            tr.update(f)
    row["face"] = fps(len(frames), time.perf_counter() - t)

    speech = media.read_audio(speech_path, audio.SR)[: int(len(frames) / 25 * audio.SR)]
    with tempfile.TemporaryDirectory() as tmp:
        source, _ = dub.analyse_video(video, info, settings, Path(tmp), keep_frames=False)
        plan = np.arange(source.n_frames)
        t = time.perf_counter()
        close = dub.mouth_must_close(speech, len(plan), 25.0, None)
        track = get_engine("retrieval")(source, speech, plan, close=close)
        row["engine"] = fps(len(plan), time.perf_counter() - t)

        aligned = source.aligned_landmarks()
        out_frames = []
        t = time.perf_counter()
        for i, b in enumerate(plan):
            f = frames[min(b, len(frames) - 1)].copy()
            if track.source_index[i] >= 0:
                compositing.composite(f, source.matrices[b], track.crop(i, source), track.points[i], aligned[b])
            out_frames.append(f)
        row["blend"] = fps(len(plan), time.perf_counter() - t)

        h, w = frames[0].shape[:2]
        t = time.perf_counter()
        with media.VideoWriter(Path(tmp) / "enc.mp4", w, h) as wr:
            for f in out_frames:
                wr.write(f)
        row["encode"] = fps(len(out_frames), time.perf_counter() - t)

        t = time.perf_counter()
        with media.VideoWriter(Path(tmp) / "transcode.mp4", w, h) as wr:
            for f in media.iter_frames(video):
                wr.write(f)
        row["transcode"] = fps(len(frames), time.perf_counter() - t)

        clip_wav = Path(tmp) / "speech.wav"
        media.write_wav(clip_wav, speech, audio.SR)
        t = time.perf_counter()
        res = dub.dub(video, None, clip_wav, Path(tmp) / "out.mp4", settings, force=True)
        row["end_to_end"] = fps(res.frames, time.perf_counter() - t)
    row["vs_transcode"] = row["end_to_end"] / row["transcode"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    ap.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech" / "musetalk_eng.wav")
    ap.add_argument("--max-side", type=int, default=1280, help="skip clips larger than this (720p = 1280)")
    ap.add_argument("--clips", nargs="*", type=Path)
    args = ap.parse_args()
    clips = args.clips or sorted(args.media.glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no clips found under {args.media}")
    progress.set_quiet(True)
    settings = Settings(quiet=True)
    cols = ["frames", "decode", "face", "engine", "blend", "encode", "end_to_end", "transcode", "vs_transcode"]
    table = Table(title="dub speed, frames per second (2-core CPU)")
    table.add_column("clip")
    table.add_column("size")
    for c in cols:
        table.add_column(c, justify="right")
    rows = []
    for clip in clips:
        info = media.probe(clip)
        if max(info.width, info.height) > args.max_side:
            continue
        row = bench_clip(clip, args.speech, settings)
        rows.append(row)
        table.add_row(
            clip.stem,
            f"{info.width}x{info.height}",
            *(f"{row[c]:.0f}" if c != "vs_transcode" else f"{row[c]:.2f}" for c in cols),
        )
    if rows:
        mean = {c: float(np.mean([r[c] for r in rows])) for c in cols}
        table.add_row("[bold]mean", "", *(f"{mean[c]:.0f}" if c != "vs_transcode" else f"{mean[c]:.2f}" for c in cols))
    Console().print(table)


if __name__ == "__main__":
    main()
