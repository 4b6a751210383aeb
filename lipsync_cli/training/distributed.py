"""Processes and devices: torchrun launch, the process group, and the few collectives the loop needs.

Under torchrun each process trains on its share of every step (gloo on CPU, NCCL on CUDA); rank 0 validates, logs
and saves while the others wait at the next collective.

    launch(nproc) / launched()     re-run this command under torchrun / are we a process it started
    exit_worker()                  end a torchrun process that has finished, skipping the interpreter's teardown
    init(opts) -> Dist             this process's rank, world size and device (and the process group)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import temp_name
from lipsync_cli.training.options import TrainOptions

# torchrun's own process, run quietly: a worker that fails has printed its one `error:` line, so torchrun's summary
# (a ChildFailedError traceback, "Sending process closing signal" warnings) is noise unless LIPSYNC_DEBUG asks for
# it; its exit code is the first failed worker's (128 + N for a worker killed by signal N), or 128 + N when torchrun
# itself was stopped by signal N.
_TORCHRUN = """
import logging, os, sys
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
debug = bool(os.environ.get("LIPSYNC_DEBUG"))
if not debug:
    logging.disable(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    if debug:
        print(e, file=sys.stderr)
    code = e.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code)
except SignalException as e:
    sys.exit(128 + int(e.sigval))
"""
STOP_GRACE_S = 15.0  # how long torchrun may take to stop its workers after Ctrl-C / SIGTERM before they are killed


def launch(nproc: int, argv: list[str] | None = None) -> int:
    """Re-run this command as `nproc` processes under torchrun (one machine); the exit code of the group.

    Each process runs `python -m lipsync_cli.cli <argv>` (default: this process's own arguments) and finds its rank
    in torchrun's environment. For several machines, start torchrun yourself (--nnodes, --rdzv-endpoint, ...).
    torchrun runs in its own session, so that only we signal it: on Ctrl-C or SIGTERM here it is told to stop and
    given STOP_GRACE_S, then it and every process under it is killed (none is left training behind us). Its log
    folder is a temporary one of ours, removed whatever the outcome.
    """
    argv = sys.argv[1:] if argv is None else argv
    # torchrun sets 1 for its workers anyway and prints a banner saying so when it is unset
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix=temp_name() + "-", ignore_cleanup_errors=True) as logs:
        cmd = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}"]
        proc = subprocess.Popen([*cmd, "-m", "lipsync_cli.cli", *argv], env=env, start_new_session=True)
        try:
            return proc.wait()
        except BaseException as e:  # Ctrl-C (KeyboardInterrupt), SIGTERM (SystemExit from the CLI's handler), ...
            _stop(proc, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
            raise


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Stop torchrun and its workers. torchrun passes `sig` on to them and waits; its workers sit in sessions of
    their own, out of reach of a group signal, so they are noted first and killed if still there at the end."""
    workers = _descendants(proc.pid)
    try:
        proc.send_signal(sig)
        proc.wait(STOP_GRACE_S)
    except BaseException:  # it did not stop in time, or a second Ctrl-C: no more waiting
        proc.kill()
        proc.wait()
    for pid, started in workers:
        if _started(pid) == started:  # still that process, not a new one that reuses its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _started(pid: int) -> str | None:
    """When process `pid` started (field 22 of /proc/PID/stat, in clock ticks since boot); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process under `pid`, from /proc (empty where there is none, e.g. not Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if (started := _started(child)) is not None:
            found.append((child, started))
        todo.extend(children.get(child, []))
    return found


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
