"""Processes and devices: torchrun launch, the process group, and the few collectives the loop needs.

Under torchrun each process trains on its share of every step (gloo on CPU, NCCL on CUDA); rank 0 validates, logs
and saves while the others wait at the next collective.

    launch(nproc) / launched()     re-run this command under torchrun / are we a process it started
    exit_worker()                  end a torchrun process that has finished, skipping the interpreter's teardown
    init(opts) -> Dist             this process's rank, world size and device (and the process group)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from lipsync_cli.errors import LipsyncError
from lipsync_cli.training.options import TrainOptions


def launch(nproc: int, argv: list[str] | None = None) -> int:
    """Re-run this command as `nproc` processes under torchrun (one machine); the exit code of the group.

    Each process runs `python -m lipsync_cli.cli <argv>` (default: this process's own arguments) and finds its rank
    in torchrun's environment. For several machines, start torchrun yourself (--nnodes, --rdzv-endpoint, ...).
    """
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*cmd, "-m", "lipsync_cli.cli", *argv])


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def exit_worker(code: int = 0) -> NoReturn:
    """End a torchrun process whose work is saved and whose process group is left, without the interpreter's teardown.

    There gloo's leftover C++ threads can abort a process that finished (SIGABRT, "terminate called without an active
    exception"), failing the whole run: seen in CI on a loaded 2-core machine even after barrier + destroy.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Dist:
    """This process: its rank among `world` processes, its GPU index on this machine, its device."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for the device's queued work (before reading a clock)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def init(opts: TrainOptions) -> Dist:
    """This process's place (torchrun's environment, else one process) and device; joins the process group."""
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if world == 1 and max(opts.gpus or 0, 1) > 1:
        raise LipsyncError(f"--gpus {opts.gpus} needs one process per GPU: use `lipsync train` or torchrun")
    cuda = opts.gpus != 0 and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=opts.dist_timeout_min))
    return Dist(rank, local, world, device)


def close(d: Dist, finished: bool = True) -> None:
    """Leave the process group. After a finished run every process first waits for the others: a rank that tears
    gloo down while rank 0 is still saving can die with SIGABRT at exit (seen in CI on a loaded 2-core machine)."""
    if d.world == 1 or not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    gc.collect()  # DDP's reducer, kept alive by reference cycles, holds the group: free it while gloo still runs
    dist.destroy_process_group()


def wrap(net: nn.Module, d: Dist, find_unused_parameters: bool) -> nn.Module:
    """`net` in DistributedDataParallel when there are several processes; itself alone."""
    if d.world == 1:
        return net
    ids = [d.local_rank] if d.cuda else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused_parameters)


def mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of `x` over the processes (x itself alone)."""
    if d.world > 1:
        dist.all_reduce(x)
        x /= d.world
    return x


def rank0_says(flag: bool, d: Dist) -> bool:
    """Rank 0's `flag`, on every process (wall time differs per process: one decides for all)."""
    t = torch.tensor([float(flag)], device=d.device)
    if d.world > 1:
        dist.broadcast(t, 0)
    return bool(t.item())


def gather_json(obj, d: Dist) -> list:
    """Every process's `obj` (JSON-able), on every process: bytes over the process group, nothing unpickled."""
    if d.world == 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(d.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=d.device) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=d.device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=d.device)
    padded[: data.numel()] = data
    out = [torch.empty(longest, dtype=torch.uint8, device=d.device) for _ in range(d.world)]
    dist.all_gather(out, padded)
    return [json.loads(o[: int(s)].cpu().numpy().tobytes()) for o, s in zip(out, sizes, strict=True)]


def rank_disagreement(net: nn.Module, d: Dist) -> float | None:
    """Largest parameter difference between any process and rank 0 (DDP keeps them bitwise equal): None alone."""
    if d.world == 1:
        return None
    flat = torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
