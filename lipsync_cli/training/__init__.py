"""`lipsync train`: one training loop for every model (see models/): AMP, accumulation, DDP, checkpoints, resume.

    train(model, manifest, TrainOptions(...)) -> TrainResult   model: sync | lips | seed | render | pkg.mod:factory
    start(model, manifest, opts, procs)                        what the CLI runs: train here, or under torchrun
    read_config(path) -> (model overrides, trainer options)    a --config TOML/JSON file
    launch(nproc) / launched()                                 re-run the command under torchrun / are we under it
    exit_worker()                                              end a finished torchrun process without teardown

The modules, in the order they build on each other:
    options.py      TrainOptions, the --config file, the factory by name, checks before any work
    schedule.py     the step's learning rate (warmup + cosine) and samples (StepBatches): pure functions of the step
    distributed.py  torchrun launch, the process group, devices, the collectives the loop needs
    state.py        RNG states, optimiser + GradScaler to last.state.{safetensors,json} for an exact --resume
    result.py       TrainResult: what a run returns
    loop.py         the loop: set up, step, log, validate, save
"""

from lipsync_cli.training.distributed import exit_worker, launch, launched
from lipsync_cli.training.loop import start, train
from lipsync_cli.training.options import TRAINER_KEYS, TrainOptions, check, merge, read_config, resolve
from lipsync_cli.training.result import TrainResult
from lipsync_cli.training.schedule import StepBatches, lr_at

__all__ = [
    "TRAINER_KEYS",
    "StepBatches",
    "TrainOptions",
    "TrainResult",
    "check",
    "exit_worker",
    "launch",
    "launched",
    "lr_at",
    "merge",
    "read_config",
    "resolve",
    "start",
    "train",
]
