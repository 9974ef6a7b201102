"""One rank of a (pp, dp, tp, zero) layout built by hpcllm.train's own `build_rank`, for the
subjects that compare layouts (`tp`, `memory`) and for the planner's tests: the grid, the
three communicators (of a chosen TensorComm class, e.g. one that counts bytes), random
batches and one optimizer step."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from mpi4py import MPI

from hpcllm.config import Config, OptimConfig, ParallelConfig, TrainConfig
from hpcllm.distributed.build import Rank, build_rank
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.steps import clip_grad_norm, stage_inputs, train_step
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import ModelConfig

CPU = torch.device("cpu")


def add_model_arguments(
    parser, *, seq_len: int, n_layer: int, n_head: int, d_model: int, vocab: int
):
    """The model's shape as command-line options, with this subject's defaults."""
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--n-head", type=int, default=n_head)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--vocab", type=int, default=vocab)


def model_config(args) -> ModelConfig:
    """A gpt2 of the shape in `args` (add_model_arguments)."""
    return ModelConfig(
        vocab_size=args.vocab,
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
    )


def bench_config(args, *, micro_batch: int, accum: int = 1, pp=1, tp=1, zero=0) -> Config:
    """A gpt2 of the shape in `args` (add_model_arguments) trained by AdamW in this layout."""
    model = model_config(args)
    train = TrainConfig(seq_len=args.seq_len, micro_batch_size=micro_batch, grad_accum_steps=accum)
    return Config(
        model=model,
        train=train,
        parallel=ParallelConfig(pp=pp, tp=tp, zero=zero),
        optim=OptimConfig(name="adamw"),
    )


class CountingComm(TensorComm):
    """A TensorComm that adds up the bytes of every tensor it hands to MPI (`payload`)."""

    def __init__(self, comm: MPI.Comm, cuda_aware: bool = False, name: str = "world"):
        super().__init__(comm, cuda_aware, name)
        self.payload = 0

    def _count(self, tensor: torch.Tensor) -> None:
        self.payload += tensor.numel() * tensor.element_size()

    def allreduce_(self, tensor, op=MPI.SUM):
        self._count(tensor)
        return super().allreduce_(tensor, op)

    def iallreduce_(self, tensor, op=MPI.SUM):
        self._count(tensor)
        return super().iallreduce_(tensor, op)

    def ireduce_scatter(self, tensor, out=None, op=MPI.SUM):
        self._count(tensor)
        return super().ireduce_scatter(tensor, out, op)

    def iallgather_(self, tensor):
        self._count(tensor)
        return super().iallgather_(tensor)

    def allgather(self, tensor, out=None):
        self.payload += self.size * tensor.numel() * tensor.element_size()  # the gathered whole
        return super().allgather(tensor, out)

    def isend(self, tensor, dest, tag=0):
        self._count(tensor)
        return super().isend(tensor, dest, tag)


def build(cfg: Config, world: MPI.Comm, comm_class=TensorComm) -> Rank:
    """This rank of `cfg`'s layout on `world`, on the CPU, fp32: `build_rank` with
    communicators of `comm_class`. Free it with `rank.grid.free()`."""
    p = cfg.parallel
    grid = Grid.build(world, dp=p.dp, pp=p.pp, tp=p.tp)
    comms = {a: comm_class(grid.comm(a), name=a) for a in ("dp", "pp", "tp")}
    return build_rank(cfg, grid, CPU, comms)


def random_batches(rank: Rank, step: int) -> list:
    """This dp rank's micro-batches of `step`: random tokens, the same on every tp and pp
    rank of a dp coordinate (inputs on the first stage, targets on the last)."""
    t, vocab = rank.cfg.train, rank.cfg.model.vocab_size
    g = torch.Generator().manual_seed(1000 * step + rank.grid.rank("dp"))
    shape = (t.grad_accum_steps, t.micro_batch_size, t.seq_len + 1)
    tokens = torch.randint(vocab, shape, generator=g)
    return stage_inputs([(x[:, :-1], x[:, 1:]) for x in tokens], rank.grid, CPU)


def take_step(rank: Rank, batches: list) -> None:
    """One optimizer step as the training loop takes it (the loss reduction aside)."""
    train_step(rank.schedule, rank.ddp, batches, nullcontext())
    clip_grad_norm(rank.model, 1.0, [rank.comms["pp"]], rank.comms["tp"], rank.ddp)
    rank.optimizer.step()


def held_bytes(rank: Rank) -> dict[str, int]:
    """What the rank's tensors occupy, by distinct storage: parameters, gradients (buckets and
    ZeRO-1's reduced shard) and optimizer state."""
    from hpcllm.optim.zero import optimizer_state_bytes

    def unique(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    shards = [b.grad_shard for b in rank.ddp.buckets if b.grad_shard is not None]
    return {
        "params": unique(rank.model.parameters()),
        "grads": unique([q.grad for q in rank.model.parameters()] + shards),
        "optimizer": optimizer_state_bytes(rank.optimizer),
    }
