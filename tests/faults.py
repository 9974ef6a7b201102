"""`python tests/faults.py <hpcllm.train options>`: `python -m hpcllm.train` with faults injected
into the training steps, for tests of what the job does when a rank fails (helpers.train's
`faults`). The product's loop knows nothing of them: this wraps `Trainer.train_step`, so a
fault strikes inside the step's watchdog region, after its data is loaded.

    HPCLLM_FAIL_AT_STEP=s  rank HPCLLM_FAIL_RANK (default 0) raises at step s
    HPCLLM_HANG_AT_STEP=s  rank HPCLLM_HANG_RANK (default 0) blocks forever at step s
    HPCLLM_NAN_AT_STEP=s   rank 0 fills its first parameter with NaN at step s (a divergence)

torch loads before the watchdog is armed here, unlike in `python -m hpcllm.train`.
"""

import os
import runpy
import time

import torch

from hpcllm.training.trainer import Trainer


def inject(step: int, rank: int, model: torch.nn.Module) -> None:
    env = os.environ
    if env.get("HPCLLM_NAN_AT_STEP") == str(step) and rank == 0:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    if env.get("HPCLLM_FAIL_AT_STEP") == str(step) and env.get("HPCLLM_FAIL_RANK", "0") == str(
        rank
    ):
        raise RuntimeError(f"injected failure at step {step} (HPCLLM_FAIL_AT_STEP)")
    if env.get("HPCLLM_HANG_AT_STEP") == str(step) and env.get("HPCLLM_HANG_RANK", "0") == str(
        rank
    ):
        while True:
            time.sleep(3600)


train_step = Trainer.train_step


def train_step_with_faults(self: Trainer, micro_batches: list):
    inject(self.step, self.grid.world.Get_rank(), self.model)
    return train_step(self, micro_batches)


if __name__ == "__main__":
    Trainer.train_step = train_step_with_faults  # type: ignore[method-assign]
    runpy.run_module("hpcllm.train", run_name="__main__", alter_sys=True)
