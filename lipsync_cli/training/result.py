"""What a training run returns: `TrainResult` (also what the CLI prints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    """One run, as it ended. `history` has a row per log window: step, loss, lr, grad_norm, samples_per_s, t
    (seconds since the run started, when the window ended) and the task's own loss terms."""

    name: str  # the run's name (checkpoints/<name>/, runs/<name>/)
    steps: int  # the optimiser step it stopped at
    start_step: int  # where it started (> 0 after --resume)
    samples: int  # training samples seen in all, over every process
    samples_per_s: float | None  # steady speed: log windows after the first (None: no step run)
    loss: float | None  # the last log window's mean training loss
    metric: str  # the task's validation metric
    best: float | None  # its best value, and the step it was reached at
    best_step: int | None
    val: dict[str, float] | None  # the last validation's metrics
    last: Path  # last.safetensors (resumable with last.state.*)
    best_checkpoint: Path | None  # best.safetensors, when a validation ran
    run_dir: Path  # TensorBoard events
    precision: str  # 32 | bf16 | 16
    device: str
    processes: int
    batch: int  # per process and micro-batch
    accumulate: int
    effective_batch: int  # batch x accumulate x processes: samples per optimiser step
    wall_s: float
    cpu_s: float  # this process's user + system time
    rank_max_abs_diff: float | None  # largest weight difference between processes at the end (None: one)
    history: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> str:
        """One line: where it stopped, the best validation, speed, precision and device, where the weights are."""
        best = f"{self.metric} {self.best:.4g} at step {self.best_step}, " if self.best is not None else ""
        speed = f"{self.samples_per_s:.1f} samples/s" if self.samples_per_s else "no steps run"
        return (
            f"{self.name}: step {self.steps}, {best}{speed} ({self.precision}, {self.device} x{self.processes})"
            f" -> {self.last.parent}"
        )
