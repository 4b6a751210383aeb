"""Training throughput of one model: samples/s at precision 32 vs bf16 (and fp16 on CUDA), on CPU and CUDA.

    python benchmarks/train_speed.py --model sync [--manifest M] [--steps 30] [--batch-size B] [--out speed.json]
    python benchmarks/train_speed.py --model lips --devices cuda --precisions 32,bf16,16 --out /tmp/lips.json

Each (device, precision) pair is a real `lipsync_cli.training.train()` run of --steps optimiser steps in a temporary
output folder, from the same seed: data loading, forward, backward, AdamW, all of it. samples/s is the steady rate,
the first log window (a fifth of the steps: allocator and autotune warm-up) left out, validation and checkpoints
never counted. The ratio column is each precision's rate over precision 32 on the same device, in the same run.
Without --manifest, <data_dir>/prep/128/manifest.json is used when it exists, else --limit clips of --source are
prepped into a temporary folder first (mediapipe, ~0.4 s CPU per clip). CPU time and the load average are printed
beside wall time: on a shared machine the wall figure measures the share of the cores the run got.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lipsync_cli import progress
from lipsync_cli.training import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, manifest: Path, device: str, precision: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        opts = TrainOptions(
            out_dir=Path(tmp),
            gpus=1 if device == "cuda" else 0,
            precision=precision,
            batch_size=args.batch_size,
            max_steps=args.steps,
            val_every=10**9,
            save_every=10**9,
            log_every=max(1, args.steps // 5),
            val_batches=1,  # the end-of-run validation is not timed; keep it short
            workers=args.workers,
            tensorboard=False,
            seed=0,
        )
        s = train(model, manifest, opts)
    return {
        "device": device,
        "precision": precision,
        "samples_per_s": s.samples_per_s,
        "batch": s.batch,
        "steps": s.steps,
        "wall_s": s.wall_s,
        "cpu_s": s.cpu_s,
        "final_loss": s.loss,
    }


def find_manifest(args, tmp: Path) -> Path:
    if args.manifest is not None:
        return args.manifest
    default = ROOT / "data" / "prep" / "128" / "manifest.json"
    if default.is_file():
        return default
    if not args.source.is_dir():
        raise SystemExit(f"no prepped data at {default} and no clips under {args.source}: pass --manifest")
    from lipsync_cli.data.prep import prep

    print(f"prepping {args.limit} clips of {args.source} into {tmp} ...")
    prep(None, tmp / "128", [args.source], size=128, workers=min(4, os.cpu_count() or 1), limit=args.limit)
    return tmp / "128" / "manifest.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sync", help="sync | lips | seed | render | package.module:factory")
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "corpus" / "grid")
    ap.add_argument("--limit", type=int, default=48, help="clips to prep when there is no manifest")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    ap.add_argument("--precisions", default="32,bf16", help="comma list of 32, bf16, 16 (16: CUDA only)")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when there is none")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    progress.set_quiet(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    precisions = args.precisions.split(",")
    load0, t0 = os.getloadavg()[0], os.times()
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-prep-") as tmp:
        manifest = find_manifest(args, Path(tmp))
        for device in devices:
            for precision in precisions:
                if precision == "16" and device != "cuda":
                    continue
                rows.append(measure(args.model, manifest, device, precision, args))
                print(f"{device} {precision}: {rows[-1]['samples_per_s']:.1f} samples/s")
    for r in rows:
        base = next((x for x in rows if x["device"] == r["device"] and x["precision"] == "32"), None)
        r["vs_32"] = r["samples_per_s"] / base["samples_per_s"] if base and base["samples_per_s"] else None

    env = {
        "model": args.model,
        "manifest": str(manifest),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": [load0, os.getloadavg()[0]],
        "cpu_s_total": sum(os.times()[:4]) - sum(t0[:4]),
    }
    table = Table(title=f"train {args.model}: samples/s over {args.steps} steps", box=None)
    for col in ("device", "precision", "batch", "samples/s", "vs 32", "wall s", "cpu s", "final loss"):
        table.add_column(col, justify="left" if col in ("device", "precision") else "right")
    for r in rows:
        table.add_row(
            r["device"],
            r["precision"],
            str(r["batch"]),
            f"{r['samples_per_s']:.1f}",
            f"{r['vs_32']:.2f}" if r["vs_32"] else "-",
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
            f"{r['final_loss']:.4g}" if r["final_loss"] is not None else "-",
        )
    Console().print(table)
    print(
        f"gpu: {env['gpu'] or 'none'}; {env['cores']} cores, {env['cpu_threads']} torch threads; "
        f"load average {load0:.1f} -> {env['load_average'][1]:.1f}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
