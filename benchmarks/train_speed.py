"""Training throughput: samples/s per model, precision (32, bf16, fp16 on CUDA), batch size and variant, CPU and CUDA.

    python benchmarks/train_speed.py --model sync [--manifest M] [--steps 30] [--batch-size B] [--out speed.json]
    python benchmarks/train_speed.py --model sync,lips,render,seed --devices cuda --precisions 32,bf16,16 \\
        --seconds 8 --out /tmp/speed.json                     # the README's GPU table
    python benchmarks/train_speed.py --model render --devices cuda --precisions bf16 --batch-size 4,32 \\
        --variants base,channels_last,compile --seconds 8

Each row is a real `lipsync_cli.training.train()` run in a temporary output folder, from the same seed: data loading
(DataLoader workers, pinned memory on CUDA), forward, backward, AdamW, all of it. samples/s is the steady rate: the
first log window (allocator, cuDNN autotune, compilation) left out, validation and checkpoints never counted. Runs
last --steps optimiser steps, or --seconds of wall time each from the second step on (setup, CUDA start-up and
compilation left out). On CUDA a thread samples the GPU's
utilisation (NVML, the fraction of time a kernel was running) every 50 ms; `gpu %` is its mean over the steady
windows, `GB` the peak memory torch allocated. Variants: base, channels_last (NHWC convolutions), compile
(torch.compile of the model's forward). The ratio column is each row's rate over precision 32 of the same model,
device, batch and variant. Without --manifest, <data_dir>/prep/128/manifest.json is used when it exists, else
--limit clips of --source are prepped first (mediapipe, ~0.4 s CPU per clip). CPU time and the load average are
printed beside wall time: on a shared machine the wall figure measures the share of the cores the run got.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lipsync_cli import progress
from lipsync_cli.training import TrainOptions, resolve, train

ROOT = Path(__file__).resolve().parents[1]


class GpuSampler:
    """(time, utilisation %) every `period` s from NVML while running; None where NVML is missing."""

    def __init__(self, period: float = 0.05):
        self.period, self.samples, self._stop = period, [], threading.Event()
        try:
            torch.cuda.utilization()
            self.ok = True
        except Exception:  # no pynvml / NVML
            self.ok = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), torch.cuda.utilization()))
            time.sleep(self.period)

    def __enter__(self):
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    def mean(self, t0: float, t1: float) -> float | None:
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        return sum(xs) / len(xs) if xs else None


def measure(model: str, manifest: Path, device: str, precision: str, batch: int | None, variant: str, args) -> dict:
    steps = args.steps if args.seconds is None else 10**6
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        opts = TrainOptions(
            out_dir=Path(tmp),
            gpus=1 if device == "cuda" else 0,
            precision=precision,
            batch_size=batch,
            max_steps=steps,
            max_minutes=None if args.seconds is None else 1e6,  # set once the task is built
            schedule_steps=1000,
            val_every=10**9,
            save_every=10**9,
            log_every=args.log_every or max(1, steps // 5),
            val_batches=1,  # the end-of-run validation is not timed; keep it short
            workers=args.workers,
            channels_last=variant == "channels_last",
            compile=variant == "compile",
            tensorboard=False,
            seed=0,
        )
        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_call = time.perf_counter()
        factory = resolve(model)

        def timed_factory(manifest, overrides):
            """The task, its loss wrapped so that --seconds count from the second step: setup, CUDA's start, cuDNN
            autotune and torch.compile's compilation (first forward and backward) stay out of the time."""
            task = factory(manifest, overrides)
            loss, calls = task.loss, [0]

            def counted(m, b, step):
                calls[0] += 1
                if calls[0] == 2 and args.seconds is not None:
                    opts.max_minutes = (time.perf_counter() - t_call + args.seconds) / 60
                return loss(m, b, step)

            task.loss = counted
            return task

        with GpuSampler() if cuda else _nothing() as sampler:
            s = train(timed_factory, manifest, opts)
    hist = s.history
    util = None
    if cuda and sampler.ok and len(hist) >= 2:  # the steady windows: from the end of the first to the last
        util = sampler.mean(t_call + hist[0]["t"], t_call + hist[-1]["t"])
    return {
        "model": model,
        "device": device,
        "precision": precision,
        "variant": variant,
        "samples_per_s": s.samples_per_s,
        "batch": s.batch,
        "steps": s.steps,
        "wall_s": s.wall_s,
        "cpu_s": s.cpu_s,
        "gpu_util": util,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "final_loss": s.loss,
    }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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


def _ints(text: str | None) -> list[int | None]:
    return [None] if not text else [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sync", help="comma list of sync | lips | seed | render | pkg.module:factory")
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "corpus" / "grid")
    ap.add_argument("--limit", type=int, default=48, help="clips to prep when there is no manifest")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=None, help="run each row this long instead of --steps")
    ap.add_argument("--log-every", type=int, default=None, help="steps per timing window (default: steps / 5)")
    ap.add_argument("--batch-size", default=None, help="comma list (default: the model's)")
    ap.add_argument("--precisions", default="32,bf16", help="comma list of 32, bf16, 16 (16: CUDA only)")
    ap.add_argument("--variants", default="base", help="comma list of base, channels_last, compile")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when there is none")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every row)")
    args = ap.parse_args()
    if args.seconds is not None and args.log_every is None:
        args.log_every = 10
    progress.set_quiet(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    if "cuda" in devices:  # start CUDA, cuBLAS and cuDNN before the first row, which would otherwise pay for them
        x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
        torch.nn.functional.conv2d(x, torch.randn(8, 3, 3, 3, device="cuda")).square().mean().backward()
        (x.flatten(1) @ x.flatten(1).T).sum().item()
    precisions = args.precisions.split(",")
    load0, t0 = os.getloadavg()[0], os.times()
    env = {
        "models": args.model,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    rows = []

    def write() -> None:
        if args.out is not None:
            env.update(load_average=[load0, os.getloadavg()[0]], cpu_s_total=sum(os.times()[:4]) - sum(t0[:4]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"env": env, "results": rows}, indent=1))

    with tempfile.TemporaryDirectory(prefix="train-bench-prep-") as tmp:
        manifest = find_manifest(args, Path(tmp))
        env["manifest"] = str(manifest)
        for model in args.model.split(","):
            for device in devices:
                for variant in args.variants.split(","):
                    for batch in _ints(args.batch_size):
                        for precision in precisions:
                            if precision == "16" and device != "cuda":
                                continue
                            try:
                                r = measure(model, manifest, device, precision, batch, variant, args)
                            except Exception as e:  # one failing row (a compile error, say) must not lose the rest
                                why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                r = {"model": model, "device": device, "precision": precision, "variant": variant,
                                     "batch": batch, "error": why}  # fmt: skip
                            rows.append(r)
                            shown = r.get("error") or f"{r['samples_per_s']} samples/s, gpu {r['gpu_util']}"
                            print(f"{model} {device} {precision} {variant} batch {r['batch']}: {shown}", flush=True)
                            write()
    for r in rows:
        base = next(
            (
                x
                for x in rows
                if "error" not in x
                and (x["model"], x["device"], x["variant"], x["batch"])
                == (r["model"], r["device"], r["variant"], r["batch"])
                and x["precision"] == "32"
            ),
            None,
        )
        ok = "error" not in r and base and base["samples_per_s"]
        r["vs_32"] = r["samples_per_s"] / base["samples_per_s"] if ok else None
    write()
    table = Table(title="train: steady samples/s", box=None)
    cols = ("model", "device", "precision", "variant", "batch", "samples/s", "vs 32", "gpu %", "GB", "wall s", "cpu s")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "device", "precision", "variant") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["device"], r["precision"], r["variant"], str(r["batch"]), r["error"][:60])
            continue
        table.add_row(
            r["model"],
            r["device"],
            r["precision"],
            r["variant"],
            str(r["batch"]),
            f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-",
            f"{r['vs_32']:.2f}" if r["vs_32"] else "-",
            f"{r['gpu_util']:.0f}" if r["gpu_util"] is not None else "-",
            f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-",
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
        )
    Console(width=160).print(table)
    print(
        f"gpu: {env['gpu'] or 'none'}; {env['cores']} cores, {env['cpu_threads']} torch threads; "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    if args.out is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
