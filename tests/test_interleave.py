"""The interleaved 1F1B schedule (parallel.virtual_stages) without MPI: every rank of a
pipeline is a thread running the real Schedule and PipelineStages over a fake communicator
whose sends complete only once the peer has posted the matching receive (MPI's rendezvous
protocol for large messages, the strictest case). A deadlock or a message taken by the
wrong chunk then fails the test (a timeout, or gradients unlike the sequential chain's)
instead of hanging; the MPI layout tests check the same schedule end to end."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

from hpcllm.distributed.pipeline import Schedule, chunk_stages, rank_chunks, split_layers

WIDTH, DEADLOCK_S = 4, 20.0


class Exchange:
    """The messages in flight between the threads: sends and posted receives, matched in
    order per (source, dest, tag) as MPI matches them."""

    def __init__(self):
        self.cond = threading.Condition()
        self.sends: dict[tuple, deque] = {}
        self.recvs: dict[tuple, deque] = {}

    def match(self, key: tuple) -> None:
        sends, recvs = self.sends.setdefault(key, deque()), self.recvs.setdefault(key, deque())
        while sends and recvs:
            send, recv = sends.popleft(), recvs.popleft()
            recv.tensor.copy_(send.tensor)
            send.done = recv.done = True
        self.cond.notify_all()

    def wait(self, request, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: request.done, timeout=DEADLOCK_S):
                raise TimeoutError(f"deadlock: {what} never completed")


class Request:
    def __init__(self, exchange: Exchange, tensor: torch.Tensor, key: tuple, what: str):
        self.exchange, self.tensor, self.key, self.what = exchange, tensor, key, what
        self.done = False

    def test(self) -> bool:
        return self.done

    def wait(self) -> None:
        self.exchange.wait(self, self.what)


class Recv(Request):
    def start(self) -> None:
        with self.exchange.cond:
            self.done = False
            self.exchange.recvs.setdefault(self.key, deque()).append(self)
            self.exchange.match(self.key)

    def wait(self) -> torch.Tensor:  # type: ignore[override]
        super().wait()
        return self.tensor


class FakeComm:
    """The part of TensorComm that PipelineStage uses."""

    def __init__(self, exchange: Exchange, rank: int, size: int):
        self.exchange, self.rank, self.size = exchange, rank, size
        self.name, self.wait_seconds = "pp", 0.0

    def isend(self, tensor: torch.Tensor, dest: int, tag: int) -> Request:
        key = (self.rank, dest, tag)
        send = Request(self.exchange, tensor, key, f"send {key}")
        with self.exchange.cond:
            self.exchange.sends.setdefault(key, deque()).append(send)
            self.exchange.match(key)
        return send

    def recv_init(self, tensor: torch.Tensor, source: int, tag: int) -> Recv:
        return Recv(
            self.exchange,
            tensor,
            (source, self.rank, tag),
            f"receive {source}->{self.rank} tag {tag}",
        )

    def wait(self, work: Request) -> None:
        work.wait()


class Chunks(nn.Module):
    """A stand-in for a GPT of several chunks: one linear layer per block, tanh between."""

    def __init__(self, blocks: dict[int, nn.Linear], chunks: list[range]):
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): blocks[i] for c in chunks for i in c})
        self.chunks = chunks

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        for i in self.chunks[chunk]:
            x = torch.tanh(self.blocks[str(i)](x))
        return x


def run_pipeline(pp: int, virtual: int, m: int, kind: str) -> tuple[list, list]:
    """Every pp rank in a thread; returns each block's weight gradient and the loss."""
    n_layer = pp * virtual + 1  # one chunk holds two blocks
    torch.manual_seed(0)
    blocks = {i: nn.Linear(WIDTH, WIDTH) for i in range(n_layer)}
    batches = [(torch.randn(1, WIDTH), None) for _ in range(m)]
    layers = split_layers(n_layer, pp, virtual_stages=virtual)
    exchange, errors, losses = Exchange(), [], [torch.zeros(())] * pp
    comms = [FakeComm(exchange, r, pp) for r in range(pp)]

    def rank_main(rank: int) -> None:
        try:
            module = Chunks(blocks, rank_chunks(layers, pp, rank))
            stages = chunk_stages(
                module,
                comms[rank],
                virtual_stages=virtual,
                act_shape=(1, WIDTH),
                device=torch.device("cpu"),
            )
            schedule = Schedule(stages, kind, loss_fn=lambda out, y: out.pow(2).sum())
            inputs = [(x if rank == 0 else None, None) for x, _ in batches]
            losses[rank] = schedule.run(inputs, nullcontext(), lambda i: None)
        except Exception as e:  # reported by the main thread, which fails the test
            errors.append(f"rank {rank}: {e!r}")
            with exchange.cond:
                exchange.cond.notify_all()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * DEADLOCK_S)
    assert not any(t.is_alive() for t in threads), "a rank is still blocked"
    assert not errors, errors
    return [blocks[i].weight.grad for i in range(n_layer)], losses


@pytest.mark.parametrize(
    "pp, virtual, m, kind",
    [
        (2, 2, 2, "1f1b"),
        (2, 2, 4, "1f1b"),
        (2, 3, 6, "1f1b"),
        (3, 2, 3, "1f1b"),
        (3, 2, 9, "1f1b"),
        (4, 2, 8, "1f1b"),
        (4, 3, 12, "1f1b"),
        (4, 4, 4, "1f1b"),
        (2, 2, 4, "gpipe"),
        (4, 1, 8, "1f1b"),
        (3, 1, 2, "gpipe"),
    ],
)
def test_schedule_matches_the_sequential_chain_without_deadlock(pp, virtual, m, kind):
    """Every (micro-batch, chunk) goes through the virtual stages in order: the gradients
    and loss are the plain sequential chain's, under rendezvous sends, for several pp, V, m."""
    grads, losses = run_pipeline(pp, virtual, m, kind)
    torch.manual_seed(0)
    n_layer = pp * virtual + 1
    blocks = [nn.Linear(WIDTH, WIDTH) for _ in range(n_layer)]
    total = torch.zeros(())
    for _ in range(m):
        x = torch.randn(1, WIDTH)
        for block in blocks:
            x = torch.tanh(block(x))
        loss = x.pow(2).sum()
        (loss / m).backward()
        total += loss.detach()
    torch.testing.assert_close(losses[-1], total)
    assert all(loss == 0 for loss in losses[:-1])
    for i, (got, block) in enumerate(zip(grads, blocks, strict=True)):
        torch.testing.assert_close(got, block.weight.grad, msg=f"block {i}")


def test_schedule_refuses_micro_batches_not_a_multiple_of_pp():
    with pytest.raises(Exception, match=r"train.grad_accum_steps = 3.*multiple of parallel.pp = 2"):
        run_pipeline(2, 2, 3, "1f1b")
