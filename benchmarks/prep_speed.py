"""Prep throughput on the shared GRID speaker: clips/s, real-time factor, and where the time goes.

    python benchmarks/prep_speed.py [--source ../shared/corpus/grid] [--limit 60] [--workers 2] [--size 128]

Runs `prep()` into a fresh temporary folder (nothing is skipped), so the figure includes worker start-up
(spawn + one FaceTracker each) and the manifest. Real-time factor = seconds of video prepped / wall seconds;
the target is >= 10x (1200 s of GRID in <= 120 s). Stage times are each worker's wall time per stage, summed over
workers: mesh = face.track_faces (tracking + smoothing), decode = waiting for the next frame from ffmpeg, crops = warps,
write = the shard; audio (read + loudness + mel/MFCC) runs in a thread beside the mesh, so it overlaps the others.
CPU time (workers and their ffmpeg children) is printed too: on a machine shared with other jobs the wall figure
measures the share of the CPUs prep got, while CPU per clip says what an idle machine could do at best.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lipsync_cli import progress
from lipsync_cli.data.prep import prep

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "corpus" / "grid")
    ap.add_argument("--limit", type=int, default=None, help="first K clips (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"no GRID clips under {args.source}")
    progress.set_quiet(True)
    t0 = os.times()
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        s = prep(None, Path(tmp), [args.source], size=args.size, workers=args.workers, limit=args.limit)
    t1 = os.times()
    cpu = sum(t1[:4]) - sum(t0[:4])  # user + system of this process and its reaped workers (and their ffmpegs)
    if s.failures:
        for key, why in s.failures:
            print(f"failed: {key}: {why}")
    worker_s = sum(v for k, v in s.timings.items() if k != "audio")  # audio runs beside the mesh, in a thread
    table = Table(title=f"prep {args.size}px, {args.workers} workers: seconds per stage, summed over workers", box=None)
    for col in ("stage", "seconds", "share", "ms/clip"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, t in sorted(s.timings.items(), key=lambda kv: -kv[1]):
        share = "(overlaps)" if stage == "audio" else f"{t / max(worker_s, 1e-9):.0%}"
        table.add_row(stage, f"{t:.1f}", share, f"{1000 * t / max(s.prepped, 1):.0f}")
    Console().print(table)
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    print(
        f"CPU {cpu:.1f} s = {1000 * cpu / max(s.prepped, 1):.0f} ms/clip (workers + their ffmpegs): {cores} idle cores "
        f"would allow at most {cores * s.new_seconds / cpu:.1f}x real time; load average {load:.1f} during the run"
    )
    rtf = s.new_seconds / s.wall
    print(
        f"{s.prepped} clips ({s.frames} frames, {s.new_seconds:.0f} s of video) in {s.wall:.1f} s: "
        f"{s.prepped / s.wall:.2f} clips/s, {s.frames / s.wall:.0f} frames/s, {rtf:.1f}x real time "
        f"(target 10x: {'met' if rtf >= 10 else 'missed'}); limited by {max(s.timings, key=s.timings.get)}"
    )


if __name__ == "__main__":
    main()
