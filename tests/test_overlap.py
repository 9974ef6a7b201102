"""Scheduling of the dp gradient reduction (parallel.overlap, parallel.comm_thread): every
mode gives bit-identical steps, auto makes one choice on every rank, and the communication
thread's failures reach the training thread instead of hanging it. And the glibc setting
that keeps Open MPI's per-call temporaries from page-faulting anew on every step."""

import sys
import time
from contextlib import nullcontext

import pytest
import torch

from hpcllm.models.gpt import GPT, ModelConfig

from helpers import run

CFG = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_overlap_modes_are_bit_identical_and_auto_agrees_across_ranks(comm):
    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import AUTO_PLAN, DataParallel
    from hpcllm.distributed.pipeline import PipelineStage, Schedule
    from hpcllm.distributed.steps import train_step
    from hpcllm.models.gpt import cross_entropy

    pp_comm = TensorComm(comm.Split(comm.rank), name="pp")

    def steps(overlap: str, comm_thread: bool) -> tuple[list[float], list[torch.Tensor]]:
        model = GPT(CFG, init_seed=5)
        tc = TensorComm(comm)
        ddp = DataParallel(model, tc, 0.01, overlap=overlap, comm_thread=comm_thread)
        assert (ddp._thread is not None) == comm_thread
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        losses = []
        for step in range(len(AUTO_PLAN) + 2):
            g = torch.Generator().manual_seed(100 * step + comm.rank)
            tokens = torch.randint(0, CFG.vocab_size, (2, CFG.block_size + 1), generator=g)
            micro = [(tokens[k : k + 1, :-1], tokens[k : k + 1, 1:]) for k in range(2)]
            stage = PipelineStage(
                model,
                pp_comm,
                stage=0,
                num_stages=1,
                act_shape=(1, 16, 16),
                device=torch.device("cpu"),
            )
            start = time.perf_counter()
            waited = ddp.wait_seconds + tc.wait_seconds
            losses.append(train_step(Schedule(stage, "1f1b"), ddp, micro, nullcontext()).item())
            # The time blocked in MPI is counted once (by the comm or by DataParallel).
            assert ddp.wait_seconds + tc.wait_seconds - waited <= time.perf_counter() - start
            optimizer.step()
        assert ddp.choice in ("on", "off")
        ddp.close()
        return losses, [p.detach().clone() for p in model.parameters()]

    reference = steps("off", False)
    for overlap, comm_thread in [("on", False), ("on", True), ("auto", True)]:
        losses, params = steps(overlap, comm_thread)
        assert losses == reference[0], (overlap, comm_thread)
        for p, q in zip(params, reference[1], strict=True):
            assert torch.equal(p, q), (overlap, comm_thread)

    # auto: rank 0 finds reducing after backward slower, rank 1 (less so) overlapping, by
    # clocks skewed here (real delays would be waited for by the other rank too); each rank
    # alone would keep a different mode, together they keep the one that is faster on the
    # slowest rank, and say so.
    model, messages = GPT(CFG, init_seed=5), []
    ddp = DataParallel(model, TensorComm(comm), 0.01, overlap="auto", log=messages.append)
    count_trial = ddp._time_trial
    slow_mode, skew = ("off", 1.0) if comm.rank == 0 else ("on", 0.5)
    ddp._time_trial = lambda s: count_trial(s + skew * (ddp._mode == slow_mode))
    x = torch.randint(0, CFG.vocab_size, (1, CFG.block_size + 1))
    for _ in AUTO_PLAN:
        ddp.zero_grad()
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        ddp.finish()
    mine = {m: sorted(t)[len(t) // 2] for m, t in ddp._trial_seconds.items()}
    assert (mine["on"] < mine["off"]) == (comm.rank == 0), mine
    assert comm.allgather(ddp.choice) == ["on", "on"]
    assert len(messages) == 1 and messages[0].startswith("parallel.overlap auto: on"), messages

    # An error on the communication thread is raised by finish() on the training thread.
    def broken(bucket):
        raise OSError("no route to peer")

    model = GPT(CFG, init_seed=5)
    ddp = DataParallel(model, TensorComm(comm), 0.01, comm_thread=True)
    ddp._thread._start = broken
    ddp.zero_grad()
    cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
    with pytest.raises(RuntimeError, match=r"communication thread failed.*no route to peer"):
        ddp.finish()


def test_large_temporaries_are_reused_instead_of_page_faulted_on_every_call():
    # Open MPI's per-call temporaries of one step's three buckets, in flight together (so
    # the heap's top grows past glibc's trim threshold and is given back when they go).
    code = (
        "import resource, numpy as np\n"
        "from hpcllm.runtime.spmd import keep_large_allocations\n"
        "keep_large_allocations()\n"
        "def step():\n"
        "    return [np.ones(n * 2**18, np.float32) for n in (24, 24, 16)]\n"
        "step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(4):\n"
        "    step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {
        setting: int(
            run([sys.executable, "-c", code], timeout=60, env={"HPCLLM_MALLOPT": setting}).stdout
        )
        for setting in ("1", "0")
    }
    # glibc's defaults fault part of the 64 MiB in anew each step (4 KiB pages), not all.
    assert faults["0"] > 1000 and faults["1"] < faults["0"] / 20, faults
