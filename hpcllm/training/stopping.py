"""Ending training before train.max_steps, decided alike on every rank: a stop request (a
signal or run.time_limit_s; every rank saves and exits 0), or a step whose loss or gradient
norm is not finite (Diverged, exit 3, before the step's update is applied)."""

from __future__ import annotations

import math

from hpcllm import checkpoint
from hpcllm.runtime.rundir import RunDir
from hpcllm.runtime.spmd import Diverged, print0
from hpcllm.runtime.stop import StopRequest


class Stopping:
    def __init__(self, stop: StopRequest, world, run: RunDir | None, lr: float):
        self.stop = stop
        self.world = world
        self.run = run
        self.lr = lr  # optim.lr, for the divergence message

    def requested(self) -> str | None:
        """Collective: the reason to stop after this step if any rank has one, else None."""
        return self.stop.agreed(self.world)

    def announce(self, step: int, reason: str) -> None:
        print0(
            f"stopping at step {step}: {reason}; all ranks saved and exit 0. "
            "Run the same command again to resume."
        )

    def check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise Diverged if the step's loss or gradient norm is not finite. Both are known to
        every rank (all-reduced), so this is the same decision everywhere."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.diverged(step, loss, grad_norm)

    def diverged(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop a run whose step produced a non-finite loss or gradient norm, without applying
        or saving that step.

        The state the failing step started from gave the non-finite values, so a checkpoint of
        exactly that state (saved at the previous step) is no resume point: it is set aside as
        `diverged-step_NNNNNN` (kept for inspection), and the newest checkpoint before it is
        where the rerun with a lower learning rate starts.
        """
        message = (
            f"step {step} diverged: loss {loss}, gradient norm {grad_norm}; the step was not "
            "applied and not saved."
        )
        run = self.run
        if run:
            poisoned = run.path / "checkpoints" / f"step_{step - 1:06d}"
            if poisoned.is_dir():
                aside = checkpoint.set_aside(poisoned, "diverged")
                message += (
                    f" The checkpoint of step {step - 1} is the state that diverged: set aside "
                    f"as {aside}."
                )
            latest, _ = checkpoint.find_latest(str(run.path))
            message += (
                f" Rerun with a lower optim.lr (now {self.lr:g}) to resume from "
                f"{latest or 'scratch (no earlier checkpoint)'}, or check the data."
            )
            run.write_status({"state": "diverged", "step": step, "reason": "non-finite loss"})
        raise Diverged(message)
