"""Validation: the loss on the fixed validation batches every train.eval_every steps and at
the end, in nats per token and in bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import math

import torch

from hpcllm.config import Config
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.pipeline import Schedule
from hpcllm.distributed.steps import evaluate, mean_over_grid
from hpcllm.generate import load_run_tokenizer
from hpcllm.runtime.watchdog import WATCHDOG


class Validator:
    def __init__(
        self,
        every: int,
        schedule: Schedule,
        batches: list,
        comms: list[TensorComm],
        autocast: object,
        bytes_per_token: float,
    ):
        self.every = every
        self.schedule = schedule
        self.batches = batches
        self.comms = comms
        self.autocast = autocast
        self.bytes_per_token = bytes_per_token

    def should_validate(self, step: int, last: bool) -> bool:
        return bool(self.every and step % self.every == 0) or last

    def evaluate(self) -> tuple[float, float]:
        """(loss in nats per token, bits per byte), the same on every rank."""
        with WATCHDOG.watch("validation", peers=False):
            loss = evaluate(self.schedule, self.batches, self.comms, self.autocast)
        # nats per token -> bits per byte: comparable across tokenizers
        return loss, loss / math.log(2) / self.bytes_per_token


def val_bytes_per_token(cfg: Config, val: list, comms: list[TensorComm]) -> float:
    """Bytes of text that the validation targets stand for, per target, over every rank's
    batches (only the last stage holds targets)."""
    lengths = torch.from_numpy(load_run_tokenizer(cfg.data.path).token_bytes())
    targets = [y for _, y in val if y is not None]
    num_bytes = sum((lengths[y.cpu()].sum() for y in targets), torch.tensor(0))
    return mean_over_grid(num_bytes.double(), sum(y.numel() for y in targets), comms)
