"""The per-rank training loader: deterministic, resumable, and independent of the rank layout.

All ranks share one endless stream of sample positions 0, 1, 2, ...; position p lies in
epoch e = p // N (N samples in the split) and names sample perm_e[p % N], where perm_e is a
permutation seeded by (seed, e). Global step s covers the G = micro_batch * accum * dp_size
positions starting at consumed_samples, cut as

    micro-step k, dp rank r  ->  positions P + k * (dp_size * mb) + r * mb + [0, mb)

so each step trains on the same G samples whatever the split between data-parallel ranks and
gradient accumulation, and resuming needs only `consumed_samples` (and the seed).

With `prefetch`, a background thread reads the next step's samples while this one trains
(h5py reads there; torch's compute releases the GIL). Only that thread ever reads, and what
it read is used only if it is for the position asked for, so the batches, the stream and a
resume are exactly those without prefetching.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hpcllm.data.shards import ShardSet


def step_positions(
    consumed_samples: int,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    dp_rank: int,
    dp_size: int,
) -> list[np.ndarray]:
    """Stream positions of one rank's micro-batches for the global step starting at `consumed_samples`."""
    first = consumed_samples + dp_rank * micro_batch_size
    stride = dp_size * micro_batch_size
    return [
        first + k * stride + np.arange(micro_batch_size, dtype=np.int64)
        for k in range(grad_accum_steps)
    ]


# Inputs and targets of one micro-batch; (None, None) on a pipeline stage that needs neither.
MicroBatch = tuple[torch.Tensor | None, torch.Tensor | None]


def _to_xy(samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # samples: (B, T + 1) -> inputs and next-token targets, each (B, T)
    t = torch.from_numpy(samples)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Loader:
    """Yields this rank's micro-batches of each global step from a `ShardSet`."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        prefetch: bool = False,
    ):
        for key, value in (
            ("seq_len", seq_len),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum_steps", grad_accum_steps),
            ("dp_size", dp_size),
        ):
            if value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must lie in [0, {dp_size}), got {dp_rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.shards = shards
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.global_batch_size = micro_batch_size * grad_accum_steps * dp_size
        self.num_samples = shards.num_samples(seq_len)
        self.consumed_samples = 0
        self._epoch = -1
        self._perm: np.ndarray | None = None
        self._reader = ThreadPoolExecutor(1, "hpcllm-loader") if prefetch else None
        self._ahead: tuple[int, int, Future] | None = None  # (position, seed, reading)
        self.wait_seconds = 0.0
        """Time next_step() spent waiting for samples: the loader's share of a step."""

    def sample_index(self, position: int) -> int:
        """The sample (index into the shard set) at stream position `position`."""
        epoch, offset = divmod(int(position), self.num_samples)
        if epoch != self._epoch:
            # Only the current epoch's order is kept: positions only move forward in training.
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
            self._epoch = epoch
        assert self._perm is not None
        return int(self._perm[offset])

    def next_step(self, read: bool = True) -> list[MicroBatch]:
        """This rank's `grad_accum_steps` micro-batches (x, y), each (micro_batch, seq_len) int64.

        With `read=False` (a middle pipeline stage, which needs neither inputs nor targets)
        nothing is read and every micro-batch is (None, None); the stream still advances.
        """
        start = time.perf_counter()
        position = self.consumed_samples
        if not read:
            batches: list[MicroBatch] = [(None, None)] * self.grad_accum_steps
        elif self._reader is None:
            batches = self._read_step(position)
        else:
            ahead = self._ahead
            if ahead is None or ahead[:2] != (position, self.seed):
                ahead = (position, self.seed, self._reader.submit(self._read_step, position))
            batches = ahead[2].result()
            following = position + self.global_batch_size
            self._ahead = (following, self.seed, self._reader.submit(self._read_step, following))
        self.consumed_samples += self.global_batch_size
        self.wait_seconds += time.perf_counter() - start
        return batches

    def _read_step(self, position: int) -> list[MicroBatch]:
        positions = step_positions(
            position,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        return [
            _to_xy(
                np.stack(
                    [self.shards.read_sample(self.sample_index(p), self.seq_len) for p in micro]
                )
            )
            for micro in positions
        ]

    def close(self) -> None:
        """Stop the background reader (after the read in progress)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._ahead = None, None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved stream; the global batch (not the rank layout) must match to resume exactly.

        The saved seed wins over the constructor's: the epoch in progress must keep its order,
        or samples would repeat or be skipped.
        """
        self.consumed_samples = int(state["consumed_samples"])
        if int(state["seed"]) != self.seed:
            if self._ahead is not None:
                self._ahead[2].result()  # the reader thread owns the permutation until it is done
            self.seed = int(state["seed"])
            self._epoch, self._perm = -1, None


def val_batches(
    shards: ShardSet, *, seq_len: int, batch_size: int, num_batches: int, dp_rank: int, dp_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the first num_batches * batch_size * dp_size samples, in order.

    Batch b spans samples [b * batch_size * dp_size, (b + 1) * batch_size * dp_size); rank
    `dp_rank` takes its contiguous `batch_size` of them. Wraps around if the split is smaller.
    """
    num_samples = shards.num_samples(seq_len)
    batches = []
    for b in range(num_batches):
        first = (b * dp_size + dp_rank) * batch_size
        indices = (first + np.arange(batch_size)) % num_samples
        batches.append(_to_xy(np.stack([shards.read_sample(int(i), seq_len) for i in indices])))
    return batches
