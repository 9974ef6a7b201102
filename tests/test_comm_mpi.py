"""Multi-rank tests of hpcllm.distributed.comm and hpcllm.distributed.data_parallel.

Every result is checked against plain mpi4py on NumPy buffers, the reference MPI gets
right. CUDA tests run wherever torch sees a GPU and are skipped (with the reason) elsewhere.
"""

import pytest
import torch
import torch.nn as nn

from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy

CFG = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=16)
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (CUDA tests run on a GPU machine)"


class WithUnused(nn.Module):
    """A GPT plus a parameter that never gets a gradient (it must still be reduced, as zeros)."""

    def __init__(self):
        super().__init__()
        self.gpt = GPT(CFG, init_seed=1)
        self.unused = nn.Parameter(torch.ones(7))

    def forward(self, x):
        return self.gpt(x)


def make_model(unused: bool, device="cpu") -> nn.Module:
    return (WithUnused() if unused else GPT(CFG, init_seed=1)).to(device)


def batch(*seed, device="cpu"):
    g = torch.Generator().manual_seed(hash(seed) % 2**31)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.block_size + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).cpu() for p in model.parameters()])


def in_buffer(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `t` is a view into `buffer`'s memory."""
    start = buffer.data_ptr()
    return (
        t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and start <= t.data_ptr()
        and t.data_ptr() + t.numel() * 4 <= start + buffer.numel() * 4
    )


def check_data_parallel(comm, device="cpu", cuda_aware=False):
    from mpi4py import MPI

    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import DataParallel

    largest = max(GPT(CFG).parameters(), key=lambda p: p.numel())
    nbytes = largest.numel() * 4
    # (bucket size in MiB, extra unused parameter): smaller than, equal to and larger than one parameter.
    cases = [
        (nbytes / 2 / 2**20, False),
        (nbytes / 2**20, False),
        (25.0, False),
        (nbytes / 2**20, True),
    ]
    for bucket_mb, unused in cases:
        what = f"bucket_mb={bucket_mb} unused={unused}"
        model, reference = make_model(unused, device), make_model(unused, "cpu")
        ddp = DataParallel(model, TensorComm(comm, cuda_aware), bucket_mb)

        # Layout: every parameter is in exactly one bucket, none over the size unless alone.
        params = list(model.parameters())
        in_buckets = [p for b in ddp.buckets for p in b.params]
        assert sorted(map(id, in_buckets)) == sorted(map(id, params)), what
        for b in ddp.buckets:
            assert b.buffer.numel() == sum(p.numel() for p in b.params)
            assert len(b.params) == 1 or b.buffer.numel() * 4 <= int(bucket_mb * 2**20), what
        if bucket_mb < 1:
            # The largest parameter does not share its bucket.
            assert any(
                len(b.params) == 1 and b.params[0].numel() == largest.numel() for b in ddp.buckets
            ), what
            assert len(ddp.buckets) > 2, what
        else:
            assert len(ddp.buckets) == 1, what

        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            micro = [batch(step, comm.rank, k, device=device) for k in range(2)]
            ddp.zero_grad()
            for k, (x, y) in enumerate(micro):
                ddp.sync = k == len(micro) - 1
                (cross_entropy(model(x), y) / len(micro)).backward()
                if k == 0:
                    # Accumulation steps launch nothing.
                    assert ddp._next_launch == 0, what
            if not unused and len(ddp.buckets) > 1:
                # Overlap: buckets were launched while backward ran, before finish().
                assert ddp._next_launch > 0, what
            ddp.finish()

            # Reference: the same model and data, one flat plain Allreduce, then / size.
            reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
            reference.zero_grad(set_to_none=True)
            for x, y in micro:
                (cross_entropy(reference(x.cpu()), y.cpu()) / len(micro)).backward()
            for p in reference.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            local = flat_grads(reference)
            expected = local.clone()
            comm.Allreduce(MPI.IN_PLACE, expected.numpy(), op=MPI.SUM)
            expected /= comm.size

            got = flat_grads(model)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=what)
            # The check is not vacuous: ranks had different local gradients.
            local_norms = comm.allgather(float(local.norm()))
            assert len(set(local_norms)) == comm.size and float(expected.norm()) > 0, what
            # Every rank ends with the same averaged gradient.
            assert len(set(comm.allgather(got.numpy().tobytes()))) == 1, what
            if unused:
                assert torch.count_nonzero(model.unused.grad) == 0, what

            optimizer.step()
            # Gradients stay views into their buckets across steps.
            for b in ddp.buckets:
                for p in b.params:
                    assert in_buffer(p.grad, b.buffer), (what, step)
        # Reduced parameters stayed identical on every rank.
        assert (
            len(
                set(
                    comm.allgather(
                        torch.cat([p.detach().reshape(-1).cpu() for p in params]).numpy().tobytes()
                    )
                )
            )
            == 1
        ), what


@pytest.mark.numerics
@pytest.mark.mpi(ranks=[2, 4], timeout=180)
def test_bucketed_overlapped_allreduce_equals_plain_allreduce(comm):
    check_data_parallel(comm)


def check_tensor_collectives(comm, device="cpu", cuda_aware=False):
    from mpi4py import MPI

    from hpcllm.distributed.comm import TensorComm

    tc = TensorComm(comm, cuda_aware)
    rank, size = comm.rank, comm.size
    all_values = [
        torch.randn(1000, generator=torch.Generator().manual_seed(r)) * 100 for r in range(size)
    ]

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        mine = all_values[rank].to(dtype)
        # bf16/fp16 have no MPI type: the sum must be the fp32 sum of the values, rounded once.
        expected = sum(v.to(dtype).float() for v in all_values).to(dtype)
        t = mine.clone().to(device)
        assert tc.allreduce_(t) is t
        assert t.dtype == dtype and t.device.type == device
        torch.testing.assert_close(t.cpu(), expected, rtol=0, atol=0, msg=str(dtype))

        t = mine.clone().to(device)
        work = tc.iallreduce_(t)
        tc.wait(work)
        torch.testing.assert_close(t.cpu(), expected, rtol=0, atol=0, msg=str(dtype))

        # Broadcast from the last rank carries the raw bits of any dtype.
        t = mine.clone().to(device)
        tc.broadcast_(t, root=size - 1)
        assert torch.equal(t.cpu(), all_values[size - 1].to(dtype)), dtype

    maximum = torch.tensor([float(rank), -float(rank)], device=device)
    tc.allreduce_(maximum, op=MPI.MAX)
    assert maximum.tolist() == [size - 1.0, 0.0]
    assert tc.wait_seconds > 0

    with pytest.raises(ValueError, match=r"contiguous"):
        tc.allreduce_(torch.zeros(4, 4, device=device).t())


def check_allgather_reduce_scatter(comm, device="cpu", cuda_aware=False):
    """Against raw MPI Allgather / Reduce_scatter_block on NumPy buffers of the same values."""
    import numpy as np
    from mpi4py import MPI

    from hpcllm.distributed.comm import TensorComm

    tc = TensorComm(comm, cuda_aware)
    rank, size = comm.rank, comm.size
    chunk = (6, 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(rank)
        mine = (torch.randn(size * chunk[0], chunk[1], generator=g) * 100).to(dtype)

        # Reduce-scatter: bf16/fp16 summed in fp32 (their values are exact in fp32), rounded once.
        raw = np.empty(chunk, dtype=np.float32)
        comm.Reduce_scatter_block(mine.float().numpy(), raw, op=MPI.SUM)
        expected = torch.from_numpy(raw).to(dtype)
        got = tc.reduce_scatter(mine.clone().to(device))
        assert got.dtype == dtype and got.device.type == device and got.shape == chunk
        assert torch.equal(got.cpu(), expected), dtype
        out = torch.full(chunk, float("nan"), dtype=dtype, device=device)
        assert tc.reduce_scatter(mine.clone().to(device), out=out) is out
        assert torch.equal(out.cpu(), expected), dtype
        # Non-blocking (ZeRO-1's gradient buckets): the same result once waited for.
        out = torch.full(chunk, float("nan"), dtype=dtype, device=device)
        work = tc.ireduce_scatter(mine.clone().to(device), out)
        tc.wait(work)
        assert work.result is out and torch.equal(out.cpu(), expected), dtype
        # All-gather: raw bits, rank order, along dim 0.
        part = mine[:2].contiguous()
        raw_bits = np.empty(
            (size, *part.shape), dtype=np.int16 if dtype != torch.float32 else np.float32
        )
        send = part.view(torch.int16) if dtype != torch.float32 else part
        comm.Allgather(send.numpy(), raw_bits)
        expected = torch.from_numpy(raw_bits).reshape(size * 2, chunk[1])
        if dtype != torch.float32:
            expected = expected.view(dtype)
        got = tc.allgather(part.to(device))
        assert got.shape == (size * 2, chunk[1]) and got.dtype == dtype
        assert torch.equal(got.cpu(), expected), dtype
        out = torch.empty(size * 2, chunk[1], dtype=dtype, device=device)
        assert tc.allgather(part.to(device), out=out) is out and torch.equal(out.cpu(), expected)
        # In place (ZeRO-1's parameter buffers): each rank fills only its own chunk.
        inplace = torch.zeros(size * 2, chunk[1], dtype=dtype, device=device)
        inplace[2 * rank : 2 * rank + 2] = part.to(device)
        tc.wait(tc.iallgather_(inplace))
        assert torch.equal(inplace.cpu(), expected), dtype

    # An uneven flat buffer (a gradient bucket of 13 elements) padded to a multiple of the
    # ranks: reduce-scatter then all-gather of the shards is the all-reduce of the buffer.
    bucket = torch.randn(13, generator=torch.Generator().manual_seed(100 + rank)).to(device)
    with pytest.raises(ValueError, match=r"must be a multiple of the \d+ ranks; pad it"):
        tc.reduce_scatter(bucket)
    with pytest.raises(ValueError, match=r"must be a multiple of the \d+ ranks; pad it"):
        tc.ireduce_scatter(bucket)
    if size > 1:
        with pytest.raises(ValueError, match=r"must be a multiple of the \d+ ranks; pad it"):
            tc.iallgather_(bucket)
    padded = torch.zeros(-(-13 // size) * size, device=device)
    padded[:13] = bucket
    shard = tc.reduce_scatter(padded)
    assert shard.numel() == padded.numel() // size
    whole = tc.allgather(shard)[:13]
    torch.testing.assert_close(whole, tc.allreduce_(bucket.clone()), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"must hold \d+ ranks' chunks"):
        tc.allgather(shard, out=torch.empty(3, device=device))


def check_point_to_point(comm, device="cpu", cuda_aware=False):
    from hpcllm.distributed.comm import TensorComm

    tc = TensorComm(comm, cuda_aware)
    rank = comm.rank
    peer = rank ^ 1  # pairs (0, 1), (2, 3), ...
    if peer >= comm.size:
        return
    originals = {
        dtype: (
            torch.randn(3, 257, generator=torch.Generator().manual_seed(min(rank, peer))) * 7
        ).to(dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    for tag, (dtype, original) in enumerate(originals.items()):
        if rank % 2 == 0:
            # Send, then receive the peer's doubled copy (doubling is exact in every dtype).
            send = tc.isend(original.clone().to(device), dest=peer, tag=tag)
            back = torch.empty_like(original, device=device)
            recv = tc.irecv(back, source=peer, tag=100 + tag)
            tc.wait(send)
            tc.wait(recv)
            assert back.dtype == dtype and torch.equal(back.cpu(), original * 2), dtype
        else:
            got = torch.full_like(original, float("nan"), device=device)
            tc.wait(tc.irecv(got, source=peer, tag=tag))
            assert torch.equal(got.cpu(), original), dtype
            send = tc.isend(got * 2, dest=peer, tag=100 + tag)
            tc.wait(send)
    # Persistent receives (MPI Recv_init, as the pipeline's) give what plain irecv gives: one
    # buffer per dtype, started for each of several messages, each overwriting the last.
    for tag, (dtype, original) in enumerate(originals.items()):
        messages = [original * (k + 1) for k in range(3)]
        if rank % 2 == 0:
            for k, message in enumerate(messages):
                tc.wait(tc.isend(message.to(device), dest=peer, tag=200 + tag))
                plain = torch.empty_like(original, device=device)
                tc.wait(tc.irecv(plain, source=peer, tag=300 + tag))
                assert torch.equal(plain.cpu(), message), (dtype, k)
        else:
            persistent = tc.recv_init(
                torch.full_like(original, float("nan"), device=device), source=peer, tag=200 + tag
            )
            for k, message in enumerate(messages):
                persistent.start()
                got = persistent.wait()
                assert got is persistent.tensor and torch.equal(got.cpu(), message), (dtype, k)
                tc.wait(tc.isend(got.clone(), dest=peer, tag=300 + tag))  # echoed to irecv
            persistent.free()


@pytest.mark.mpi(ranks=2, timeout=120)
def test_tensor_collectives_and_point_to_point(comm):
    check_tensor_collectives(comm)
    check_point_to_point(comm)


@pytest.mark.mpi(ranks=[2, 4], timeout=120)
def test_allgather_and_reduce_scatter_equal_raw_mpi(comm):
    check_allgather_reduce_scatter(comm)


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_autograd_collectives_give_the_unsharded_gradients(comm):
    """A Megatron MLP split over 2 ranks (fc by output columns, proj by input rows) between
    copy_to_parallel and reduce_from_parallel, and a scatter/gather round trip: the outputs
    and gradients are those of the unsharded computation on one rank."""
    import torch.nn.functional as F

    from hpcllm.distributed.comm import (
        TensorComm,
        copy_to_parallel,
        gather_from_parallel,
        reduce_from_parallel,
        scatter_to_parallel,
    )

    tc = TensorComm(comm, name="tp")
    rank, size = comm.rank, comm.size
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    d, hidden = 8, 32
    x = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    w1, b1 = torch.randn(hidden, d, generator=g), torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(d, hidden, generator=g), torch.randn(d, generator=g)
    w1, b1, w2, b2 = (t.double().requires_grad_() for t in (w1, b1, w2, b2))
    upstream = torch.randn(3, 5, d, generator=g, dtype=torch.float64)

    x_full = x.clone().requires_grad_()
    y_full = F.linear(F.gelu(F.linear(x_full, w1, b1)), w2, b2)
    (y_full * upstream).sum().backward()

    cols = slice(rank * hidden // size, (rank + 1) * hidden // size)
    w1_r, b1_r = (
        w1[cols].detach().clone().requires_grad_(),
        b1[cols].detach().clone().requires_grad_(),
    )
    w2_r = w2[:, cols].detach().clone().requires_grad_()
    x_tp = x.clone().requires_grad_()
    partial = F.linear(F.gelu(F.linear(copy_to_parallel(x_tp, tc), w1_r, b1_r)), w2_r)
    y_tp = reduce_from_parallel(partial, tc) + b2.detach()
    (y_tp * upstream).sum().backward()

    torch.testing.assert_close(y_tp, y_full.detach())
    torch.testing.assert_close(x_tp.grad, x_full.grad)  # needs copy_to_parallel's all-reduce
    torch.testing.assert_close(w1_r.grad, w1.grad[cols])
    torch.testing.assert_close(b1_r.grad, b1.grad[cols])
    torch.testing.assert_close(w2_r.grad, w2.grad[:, cols])

    # Scatter to shards, scale each rank's shard differently, gather: rank r's columns are
    # multiplied by r + 1, in the forward and in the gradient.
    x_sg = x.clone().requires_grad_()
    z = gather_from_parallel(scatter_to_parallel(x_sg, tc) * (rank + 1), tc)
    scale = torch.cat([torch.full((d // size,), r + 1.0, dtype=torch.float64) for r in range(size)])
    torch.testing.assert_close(z, x * scale)
    (z * upstream).sum().backward()
    torch.testing.assert_close(x_sg.grad, upstream * scale)


# ----------------------------------------------------------------------------- CUDA


cuda_mpi = pytest.mark.mpi(ranks=2, timeout=300) if HAS_CUDA else pytest.mark.skip(reason=NO_CUDA)


def cuda_setup(comm, path, monkeypatch):
    from hpcllm.distributed.comm import detect_cuda_aware

    if path == "cuda-aware":
        monkeypatch.delenv("HPCLLM_CUDA_AWARE", raising=False)
        if not detect_cuda_aware("auto"):
            pytest.skip("this MPI is not CUDA-aware (MPIX_Query_cuda_support() is 0)")
        pytest.importorskip("cupy", reason="the CUDA-aware path hands CuPy arrays to MPI")
        monkeypatch.setenv("HPCLLM_CUDA_AWARE", "yes")
    else:
        monkeypatch.setenv("HPCLLM_CUDA_AWARE", "no")
    cuda_aware = detect_cuda_aware("auto")
    assert cuda_aware == (path == "cuda-aware")
    device = torch.device("cuda", comm.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return cuda_aware


@cuda_mpi
@pytest.mark.parametrize("path", ["cuda-aware", "staged"])
def test_cuda_collectives_and_point_to_point(comm, path, monkeypatch):
    cuda_aware = cuda_setup(comm, path, monkeypatch)
    check_tensor_collectives(comm, device="cuda", cuda_aware=cuda_aware)
    check_allgather_reduce_scatter(comm, device="cuda", cuda_aware=cuda_aware)
    check_point_to_point(comm, device="cuda", cuda_aware=cuda_aware)


@cuda_mpi
@pytest.mark.parametrize("path", ["cuda-aware", "staged"])
def test_cuda_data_parallel_equals_plain_allreduce(comm, path, monkeypatch):
    cuda_aware = cuda_setup(comm, path, monkeypatch)
    check_data_parallel(comm, device="cuda", cuda_aware=cuda_aware)


def test_one_rank_collectives_touch_no_mpi_buffers(monkeypatch):
    """Over one rank a reduction is the identity: no buffer is made, so a CUDA tensor is
    not staged through host memory (a round trip of every gradient, found on a GPU)."""
    from mpi4py import MPI

    from hpcllm.distributed.comm import TensorComm

    tc = TensorComm(MPI.COMM_SELF, name="one")
    monkeypatch.setattr(tc, "_buffer", lambda *a, **k: pytest.fail("made an MPI buffer"))
    x = torch.arange(6.0)
    assert tc.allreduce_(x) is x and torch.equal(x, torch.arange(6.0))
    tc.iallreduce_(x).wait()
    tc.iallgather_(x).wait()
    out = tc.reduce_scatter(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, torch.arange(6.0))
