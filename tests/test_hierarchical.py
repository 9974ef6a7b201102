"""Hierarchical all-reduce (hpcllm.distributed.hierarchical) on 4 ranks split into 2 emulated
nodes by colour: the same sums as a flat all-reduce, through DataParallel too; `auto` agrees
on every rank; layouts that do not fit two levels fall back to flat and say why.

Two levels add in another order than Open MPI's flat all-reduce, so fp32 sums agree to
rounding (a few ulp of the largest partial sum); integer-valued fp32 sums are exact, so
there they must be equal bit for bit.
"""

import pytest
import torch
import torch.nn as nn

from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy


class OddSized(nn.Module):
    """A tiny GPT plus a parameter of odd length: buckets must be padded to 2 ranks per node."""

    def __init__(self):
        super().__init__()
        self.gpt = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=16))
        self.odd = nn.Parameter(torch.linspace(-1, 1, 7))

    def forward(self, x):
        return self.gpt(x) + self.odd.sum()


@pytest.mark.numerics
@pytest.mark.mpi(ranks=4, timeout=180)
def test_hierarchical_equals_flat_and_auto_agrees(comm):
    from mpi4py import MPI

    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import DataParallel
    from hpcllm.distributed.hierarchical import agree_on_faster, select_allreduce
    from hpcllm.distributed.topology import Grid

    grid = Grid.build(comm)  # dp 4
    dp = TensorComm(grid.comm("dp"), name="dp")
    two_nodes = comm.rank // 2  # nodes {0, 1} and {2, 3}
    reducer, how = select_allreduce("hierarchical", grid, dp, 0, colour=two_nodes)
    assert reducer is not None and how == "hierarchical (2 nodes x 2 dp ranks)", how

    # The Work alone: integer sums exact, random sums to fp32 rounding, advanced by test().
    g = torch.Generator().manual_seed(comm.rank)
    for values, exact in (
        (torch.randint(-1000, 1000, (2 * 5001,), generator=g).float(), True),
        (torch.randn(2 * 5001, generator=g) * 10 ** (comm.rank - 1), False),
    ):
        expected = values.clone()
        comm.Allreduce(MPI.IN_PLACE, expected.numpy())
        work = reducer.start(values)
        while not work.test():
            pass
        work.wait()
        if exact:
            assert torch.equal(values, expected)
        else:
            torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-5)
        assert len(set(comm.allgather(values.numpy().tobytes()))) == 1  # one result everywhere
    with pytest.raises(ValueError, match="multiple of the 2 ranks per node"):
        reducer.start(torch.zeros(7))

    # Through DataParallel, overlapped with backward: flat's gradients, padded buckets.
    models = [OddSized(), OddSized()]
    models[1].load_state_dict(models[0].state_dict())
    ddps = [
        DataParallel(models[0], dp, bucket_mb=0.002),
        DataParallel(models[1], dp, bucket_mb=0.002, hierarchical=reducer),
    ]
    assert len(ddps[1].buckets) > 2
    assert any(b.buffer.numel() % 2 for b in ddps[0].buckets)  # the odd one needed padding
    assert all(b.buffer.numel() % 2 == 0 for b in ddps[1].buckets)
    x = torch.randint(0, 50, (2, 17), generator=g)
    for model, ddp in zip(models, ddps, strict=True):
        ddp.zero_grad()
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        assert ddp._next_launch > 0  # buckets went out while backward ran
        ddp.finish()
    for flat, hier in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(hier.grad, flat.grad, rtol=1e-5, atol=1e-7)
    assert len(set(comm.allgather(float(models[0].odd.grad.norm())))) == 1

    # auto: one choice on every rank, even when ranks' own timings disagree.
    flat_s = [1.0] * 3 if comm.rank == 0 else [3.0] * 3  # rank 0 alone finds flat faster
    assert set(comm.allgather(agree_on_faster(comm, flat_s, [2.0] * 3))) == {"hierarchical"}
    chosen, how = select_allreduce("auto", grid, dp, 4096, colour=two_nodes)
    picks = comm.allgather("flat" if chosen is None else "hierarchical")
    assert len(set(picks)) == 1 and how.startswith(picks[0] + ", the faster"), (picks, how)

    # Layouts that two levels do not fit: flat, with the reason.
    for colour, reason in (
        (int(comm.rank > 0), "flat: uneven nodes"),  # 1 + 3 ranks
        (comm.rank, "flat: one rank of the group per node"),
        (0, "flat: all 4 ranks of the group are on one node"),
    ):
        chosen, how = select_allreduce("auto", grid, dp, 4096, colour=colour)
        assert chosen is None and how.startswith(reason), how
    chosen, how = select_allreduce("auto", grid, dp, 4096, compression="powersgd", colour=0)
    assert chosen is None and how == "flat: PowerSGD all-reduces its own low-rank factors", how


@pytest.mark.mpi(ranks=4, timeout=180)
def test_hierarchical_reduce_scatter_and_compression_compose(comm):
    """ZeRO-1 and bf16/fp16 through the two levels (one policy: the reduce-scatter form drops
    the in-node all-gather, compression takes the cross-node phase), on nodes of consecutive
    dp ranks and on round-robin ones (the blocks are reordered for the reduce-scatter).

    The reduce-scatter form leaves each rank the flat reduce-scatter's shard (integer sums
    exactly, gradients to fp32 rounding); compressed, each rank keeps the very values the
    compressed all-reduce form gives at its shard (two addends per level: their sum is the
    same in either order, and each block is rounded from the same values), within 16-bit
    rounding of the fp32 result."""
    from mpi4py import MPI

    from hpcllm.distributed import compression
    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import DataParallel
    from hpcllm.distributed.hierarchical import select_allreduce
    from hpcllm.distributed.topology import Grid

    grid = Grid.build(comm)  # dp 4
    dp = TensorComm(grid.comm("dp"), name="dp")
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randint(0, 50, (2, 17), generator=g)
    for colour in (comm.rank // 2, comm.rank % 2):
        reducer, how = select_allreduce("hierarchical", grid, dp, 0, colour=colour)
        assert reducer is not None, how
        values = torch.randint(-1000, 1000, (4 * 1001,), generator=g).float()
        expected = torch.empty(1001)
        comm.Reduce_scatter_block(values.numpy(), expected.numpy())
        shard = torch.empty(1001)
        reducer.start(values, shard).wait()
        assert torch.equal(shard, expected)

        def reduced(hierarchical, shard: bool, mode: str = "none") -> DataParallel:
            model = OddSized()  # the same initial weights everywhere (seeded)
            ddp = DataParallel(model, dp, bucket_mb=0.002, shard=shard, hierarchical=hierarchical)
            ddp.compressor = compression.build(
                mode, dp, ddp.buckets, model, hierarchical=hierarchical
            )
            ddp.zero_grad()
            cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
            ddp.finish()
            return ddp

        flat = reduced(None, True)
        assert len(flat.buckets) > 2
        for b0, b1 in zip(flat.buckets, reduced(reducer, True).buckets, strict=True):
            torch.testing.assert_close(b1.grad_shard, b0.grad_shard, rtol=1e-5, atol=1e-7)
        for mode in ("bf16", "fp16"):
            whole, sharded = reduced(reducer, False, mode), reduced(reducer, True, mode)
            for b0, b1, ref in zip(whole.buckets, sharded.buckets, flat.buckets, strict=True):
                lo, hi = b1.shard_range(comm.rank, comm.size)
                # fp16 scales each 1/dp block: alike where both forms pad the bucket alike.
                if mode == "bf16" or b0.buffer.numel() == b1.buffer.numel():
                    n = max(0, min(hi, b0.buffer.numel()) - lo)  # the rest is padding
                    assert torch.equal(b1.grad_shard[:n], b0.buffer[lo : lo + n]), (colour, mode)
                # 2^-8 per 16-bit rounding: of each node's sum, and of the total; fp16 puts a
                # block's peak at 2^14, where its subnormals resolve 2^-38 of the peak.
                bound = ref.buffer.abs()  # this rank's own addends (reduce-scatter kept them)
                comm.Allreduce(MPI.IN_PLACE, bound.numpy())
                bound = (2**-7 * bound + 2**-36 * bound.max()) / comm.size
                err = (b1.grad_shard - ref.grad_shard).abs()
                assert (err <= bound[lo:hi]).all(), (colour, mode)
        reducer.local.comm.Free()
        reducer.cross.comm.Free()
