"""`python -m hpcllm.train`: the SPMD training entry point (every rank runs this file).

    mpirun -np 4 python -m hpcllm.train                      # default corpus and model
    mpirun -np 8 python -m hpcllm.train --config my.toml --train.max_steps 1000
    python -m hpcllm.train --dry-run --world-size 1024 --parallel.pp 4

Parse the config, plan (--dry-run) or build this rank's Trainer (hpcllm/training/trainer.py:
grid, data, model, optimizer, resume) and train it.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    if {"-h", "--help"} & set(sys.argv[1:]):  # usage and every key, without torch or MPI
        from hpcllm.docs import train_help

        print(train_help())
        sys.exit(0)
    # Before torch and MPI load: a rank stuck in an import on a slow shared file system, or
    # a peer that never reaches MPI_Init, must end the job as well (hpcllm/runtime/watchdog.py).
    from hpcllm.runtime.watchdog import WATCHDOG

    WATCHDOG.start_at_launch(sys.argv[1:])


import sys
from pathlib import Path

from hpcllm import planner
from hpcllm.config import parse_args
from hpcllm.distributed.parallelize import build_stage
from hpcllm.runtime.rundir import RunDir
from hpcllm.runtime.spmd import StartupError, agree, print0, spmd_main
from hpcllm.runtime.stop import StopRequest
from hpcllm.runtime.watchdog import WATCHDOG
from hpcllm.training.checkpointer import check_same_model
from hpcllm.training.trainer import DEFAULT_DATA, setup

# build_stage and check_same_model: imported from here by tests and scripts.
__all__ = ["build_stage", "check_same_model", "main"]


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    cfg, options = agree(world, lambda: parse_args(sys.argv[1:] if argv is None else argv))
    if options["dry_run"]:
        size = options["world_size"] or world.Get_size()
        print0(agree(world, lambda: planner.dry_run(cfg, size, DEFAULT_DATA)))
        return 0
    stop = StopRequest(cfg.run.time_limit_s)
    run = agree(world, lambda: RunDir(cfg.run.dir) if world.Get_rank() == 0 else None)
    WATCHDOG.start(
        cfg.run.watchdog_s, cfg.run.watchdog_first_step_s, Path(cfg.run.dir) / "heartbeat"
    )
    try:
        trainer = setup(cfg, world)
    except StartupError:
        WATCHDOG.stop()
        if run:
            run.discard()  # a run refused before training leaves nothing behind
        raise
    trainer.train(run, stop)
    WATCHDOG.stop()
    return 0


if __name__ == "__main__":
    spmd_main(main)
