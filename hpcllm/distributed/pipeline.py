"""Pipeline parallelism: this rank's stage of the model, its neighbours, and the schedules.

A stage is a contiguous range of blocks (plus the embeddings on the first stage, the
final norm, LM head and loss on the last). Stages pass activations forward and their
gradients backward over the pp communicator, point to point, through the zero-copy
TensorComm. Every message between two stages has a shape known in advance,
(micro_batch, seq_len, d_model), so buffers are allocated, never described.

Schedules are written as named phases over four verbs (recv_forward, send_forward,
recv_backward, send_backward):

  gpipe:  all forwards, then all backwards; holds every micro-batch's activations.
  1f1b:   warmup forwards (pp - stage - 1 of them), then one forward and one backward
          in turn (steady), then the remaining backwards (cooldown); a stage holds at
          most pp - stage micro-batches of activations.
  interleaved 1f1b (parallel.virtual_stages V > 1): each rank holds V chunks, the model
          passing through every rank's chunk 0, then every rank's chunk 1, ...; the same
          three phases over (micro-batch, chunk) pairs, with a bubble V times smaller.

With one stage both verbs pairs do nothing and 1f1b is plain gradient accumulation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from hpcllm.distributed.comm import PersistentRecv, TensorComm, Work
from hpcllm.models.gpt import cross_entropy

FORWARD_TAG, BACKWARD_TAG = 0, 1
SCHEDULES = ("1f1b", "gpipe")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""loss_fn(output of the last stage, targets) -> scalar mean loss of the micro-batch."""


def split_layers(n_layer: int, pp: int, explicit: str = "", virtual_stages: int = 1) -> list[range]:
    """Block ranges of each stage: balanced (earlier stages take the remainder), or
    `explicit` as comma-separated block counts, e.g. "3,2,2,1".

    With `virtual_stages` V > 1 there are pp * V ranges, one per virtual stage in pipeline
    order: virtual stage v * pp + r is chunk v of pp rank r (`rank_chunks`)."""
    stages = pp * virtual_stages
    per = f"one per virtual stage, parallel.pp x parallel.virtual_stages = {pp} x {virtual_stages}"
    if explicit:
        try:
            counts = [int(c) for c in explicit.split(",")]
        except ValueError:
            raise ValueError(
                f"parallel.stage_layers '{explicit}' must be comma-separated block counts"
            ) from None
        if len(counts) != stages or sum(counts) != n_layer or min(counts) < 1:
            raise ValueError(
                f"parallel.stage_layers '{explicit}' must give {stages} positive block counts "
                f"({per if virtual_stages > 1 else f'one per stage, parallel.pp = {pp}'}) "
                f"adding up to model.n_layer = {n_layer}"
            )
    else:
        if stages > n_layer:
            what, unit = (
                (f"parallel.pp = {pp} stages", "stage")
                if virtual_stages == 1
                else (f"{stages} pipeline chunks ({per})", "chunk")
            )
            raise ValueError(
                f"{what} but the model has only model.n_layer = {n_layer} blocks; every {unit} "
                "needs at least one block"
            )
        base, extra = divmod(n_layer, stages)
        counts = [base + (1 if s < extra else 0) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


def rank_chunks(layers: list[range], pp: int, rank: int) -> list[range]:
    """The chunks of pp rank `rank`, given every virtual stage's blocks (`split_layers`):
    virtual stages rank, pp + rank, 2 pp + rank, ..."""
    return layers[rank::pp]


class ActivationMeter:
    """Bytes a stage holds for its micro-batches: the activations autograd keeps for backward
    (measured with saved-tensor hooks), and the pipeline's message buffers (reported by
    PipelineStage: its persistent receive buffers and the sends still in flight).

    Every tensor saved for backward is wrapped; the wrapper's count goes down when autograd
    frees it, so `current` is what is alive now and `peak` the most ever. `buffers` and
    `buffers_peak` are the same for message buffers, and `total_peak` is the most of both at
    one instant (an upper bound: a received activation is both a buffer and saved by autograd).
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.buffers = 0
        self.buffers_peak = 0
        self.total_peak = 0

    def reset_peaks(self) -> None:
        self.peak, self.buffers_peak = self.current, self.buffers
        self.total_peak = self.current + self.buffers

    def add_buffer(self, nbytes: int) -> None:
        """Count `nbytes` of message buffer (negative when one is released)."""
        self.buffers += nbytes
        self.buffers_peak = max(self.buffers_peak, self.buffers)
        self.total_peak = max(self.total_peak, self.current + self.buffers)

    def _pack(self, tensor: torch.Tensor):
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Saved:
    __slots__ = ("meter", "nbytes", "tensor")

    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor):
        self.meter, self.tensor = meter, tensor
        # Parameters are saved too but are not activations; linear layers save a view
        # of theirs (weight.t()), which is a plain tensor whose base is the parameter.
        is_param = isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
        self.nbytes = 0 if is_param else tensor.numel() * tensor.element_size()
        meter.current += self.nbytes
        meter.peak = max(meter.peak, meter.current)
        meter.total_peak = max(meter.total_peak, meter.current + meter.buffers)

    def __del__(self):
        self.meter.current -= self.nbytes


class PipelineStage:
    """One rank's stage: its module, its pp neighbours, and the four verbs.

    Under interleaving (parallel.virtual_stages V > 1) a rank has V of them, one per chunk
    of its module: `stage` is then the virtual stage (chunk * pp + pp rank) out of
    `num_stages` = pp * V, `chunk` which of the module's chunks it runs, and the neighbours
    are the pp ranks of the virtual stages before and after it (wrapping from the last pp
    rank to the first). Each message's tag names the virtual stage that sent it and its
    direction, so a rank's chunks never take each other's messages.

    Receives are persistent (MPI Recv_init) on buffers allocated once: a pool per direction,
    a buffer going back to it when its micro-batch is done (`free_input`, `free_grad`). Each
    receive is posted one micro-batch ahead, so the data can arrive while this stage is still
    computing. Sends are non-blocking on the tensor itself (no copy); a send's tensor is
    dropped as soon as the send completes: tested before each new send, waited for when
    MAX_SENDS_IN_FLIGHT are pending in one direction, all waited for at the end of the step.
    So what a stage holds for its messages does not grow with the number of micro-batches.
    """

    # Pending sends per direction before the oldest is waited for. In 1F1B and GPipe the
    # neighbour has posted the receive of the oldest by then (it posts one ahead and only
    # waits on messages sent earlier), so the wait cannot deadlock. Interleaved, a stage
    # object is one chunk and the limit holds per chunk and direction; see Schedule.
    MAX_SENDS_IN_FLIGHT = 2

    def __init__(
        self,
        module: nn.Module,
        comm: TensorComm,
        *,
        stage: int,
        num_stages: int,
        act_shape: tuple[int, ...],
        device: torch.device,
        chunk: int | None = None,
    ):
        self.module = module
        self.comm = comm
        self.stage, self.num_stages = stage, num_stages
        self.chunk = chunk
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.prev_rank, self.next_rank = (stage - 1) % comm.size, (stage + 1) % comm.size
        self.act_shape = act_shape
        self.device = device
        self.meter = ActivationMeter()  # the Schedule shares its own
        self._sends: dict[int, deque[tuple[Work, int]]] = {
            FORWARD_TAG: deque(),
            BACKWARD_TAG: deque(),
        }
        # Receives per direction: started and not yet returned, returned and still in use
        # (oldest first), and idle.
        self._posted: dict[int, deque[PersistentRecv]] = {
            FORWARD_TAG: deque(),
            BACKWARD_TAG: deque(),
        }
        self._in_use: dict[int, deque[PersistentRecv]] = {
            FORWARD_TAG: deque(),
            BACKWARD_TAG: deque(),
        }
        self._idle: dict[int, list[PersistentRecv]] = {FORWARD_TAG: [], BACKWARD_TAG: []}

    # -- the verbs -----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This stage's part of the module (its chunk, when interleaved) on x."""
        return self.module(x) if self.chunk is None else self.module(x, chunk=self.chunk)

    @staticmethod
    def _tag(sender: int, direction: int) -> int:
        """The tag of a message from virtual stage `sender` in `direction`: distinct for
        every pair of chunks that talk to each other."""
        return 2 * sender + direction

    def _post_recv(self, direction: int) -> None:
        idle = self._idle[direction]
        if idle:
            recv = idle.pop()
        else:
            sender = self.stage - 1 if direction == FORWARD_TAG else self.stage + 1
            source = self.prev_rank if direction == FORWARD_TAG else self.next_rank
            buf = torch.empty(self.act_shape, dtype=torch.float32, device=self.device)
            recv = self.comm.recv_init(buf, source, self._tag(sender, direction))
            self.meter.add_buffer(buf.numel() * buf.element_size())
        recv.start()
        self._posted[direction].append(recv)

    def _recv(self, direction: int, more_coming: bool) -> torch.Tensor:
        if not self._posted[direction]:
            self._post_recv(direction)
        recv = self._posted[direction].popleft()
        if more_coming:
            self._post_recv(direction)  # the next micro-batch's message lands while we compute
        self._in_use[direction].append(recv)
        return recv.wait()

    def _free(self, direction: int) -> None:
        if self._in_use[direction]:
            self._idle[direction].append(self._in_use[direction].popleft())

    def _send(self, tensor: torch.Tensor, dest: int, direction: int) -> None:
        pending = self._sends[direction]
        while pending and pending[0][0].test():
            self.meter.add_buffer(-pending.popleft()[1])  # the tensor is dropped here
        if len(pending) >= self.MAX_SENDS_IN_FLIGHT:
            work, nbytes = pending.popleft()
            self.comm.wait(work)
            self.meter.add_buffer(-nbytes)
        nbytes = tensor.numel() * tensor.element_size()
        pending.append((self.comm.isend(tensor, dest, self._tag(self.stage, direction)), nbytes))
        self.meter.add_buffer(nbytes)

    def recv_forward(self, more_coming: bool = False) -> torch.Tensor | None:
        """The previous stage's output activation (None on the first stage). The tensor is a
        reused buffer: valid until `free_input()` for its micro-batch."""
        return None if self.is_first else self._recv(FORWARD_TAG, more_coming)

    def free_input(self) -> None:
        """The oldest received activation is no longer needed (its backward is done)."""
        self._free(FORWARD_TAG)

    def send_forward(self, activation: torch.Tensor) -> None:
        if not self.is_last:
            self._send(activation.detach().float().contiguous(), self.next_rank, FORWARD_TAG)

    def recv_backward(self, more_coming: bool = False) -> torch.Tensor | None:
        """The gradient of this stage's output, from the next stage (None on the last). A
        reused buffer: valid until `free_grad()`."""
        return None if self.is_last else self._recv(BACKWARD_TAG, more_coming)

    def free_grad(self) -> None:
        """The oldest received gradient is no longer needed."""
        self._free(BACKWARD_TAG)

    def send_backward(self, grad: torch.Tensor | None) -> None:
        if not self.is_first:
            assert grad is not None, "a stage after the first receives its input's gradient"
            self._send(grad.contiguous(), self.prev_rank, BACKWARD_TAG)

    def finish_sends(self) -> None:
        for pending in self._sends.values():
            while pending:
                work, nbytes = pending.popleft()
                self.comm.wait(work)
                self.meter.add_buffer(-nbytes)
        assert not any(self._posted.values()), "a posted receive was never consumed"
        assert not any(self._in_use.values()), "a received buffer was never freed"


class Schedule:
    """Runs the forward and backward passes of one step's micro-batches through a stage.

    `micro_batches` holds (x, y) per micro-batch: x only on the first stage and y only
    on the last (None elsewhere). `before_backward(i)` is called before each backward of
    micro-batch i (once per chunk when interleaved; data parallelism uses it to reduce only
    during the last one, which for each chunk's parameters is micro-batch m - 1's).
    Each micro-batch's loss is divided by their number and by `loss_divisor` before its
    backward, so the accumulated gradient is their mean (over the dp ranks too, once summed).
    The last stage turns its module's output and y into a loss with `loss_fn` (Megatron's
    loss_func: the model returns logits, and a vocab-parallel loss can take their shards).
    Returns the summed loss of the micro-batches on the last stage, 0 elsewhere.

    `stages` is one PipelineStage, or a rank's chunks under interleaving (`chunk_stages`),
    in chunk order. The interleaved 1F1B (Narayanan et al. 2021, Megatron-LM's
    forward_backward_pipelining_with_interleaving) runs m * V forwards and as many
    backwards of (micro-batch, chunk) pairs: forwards take pp micro-batches through chunk 0,
    the same through chunk 1, ..., then the next pp micro-batches; backwards the same with
    the chunks from last to first. That needs m to be a multiple of pp. Warmup is
    (pp - rank - 1) * 2 + (V - 1) * pp forwards, so the last chunk of the last rank starts
    its backwards as soon as possible, and the bubble shrinks V-fold to (pp - 1) / (V m).
    Sends are bounded as in 1F1B: each chunk posts its receives one ahead, and a send is
    waited for only behind MAX_SENDS_IN_FLIGHT newer ones of the same chunk and direction;
    tests/test_interleave.py runs this schedule with sends that complete only once received
    (pp up to 4, V up to 4) and finds no deadlock. Megatron's factor 2 in the warmup is kept
    though these non-blocking sends would not need it (the test passes without it).
    """

    def __init__(
        self,
        stages: PipelineStage | list[PipelineStage],
        kind: str = "1f1b",
        meter: ActivationMeter | None = None,
        loss_fn: LossFn = cross_entropy,
    ):
        if kind not in SCHEDULES:
            raise ValueError(
                f"parallel.schedule must be one of {', '.join(SCHEDULES)}, got '{kind}'"
            )
        self.stages = stages if isinstance(stages, list) else [stages]
        self.stage, self.kind = self.stages[0], kind
        self.meter = meter or ActivationMeter()
        for stage in self.stages:
            stage.meter = self.meter  # one count of what the rank holds, buffers included
        self.loss_fn = loss_fn

    @property
    def is_last(self) -> bool:
        """Whether this rank computes the loss (it holds the last stage, or its last chunk)."""
        return self.stages[-1].is_last

    def run(
        self,
        micro_batches: list,
        autocast,
        before_backward: Callable[[int], None],
        loss_divisor: int = 1,
    ) -> torch.Tensor:
        m, V = len(micro_batches), len(self.stages)
        if V > 1 and m % self.stage.comm.size:
            raise ValueError(
                f"the interleaved schedule needs the micro-batches per step "
                f"(train.grad_accum_steps = {m}) to be a multiple of parallel.pp = "
                f"{self.stage.comm.size}"
            )
        # Keyed by (micro-batch, chunk).
        inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        # The loss on the last stage; elsewhere the output's place in the autograd graph, not
        # the output itself, so its memory goes as soon as its send completes (Megatron's
        # deallocate_output_tensor).
        outputs: dict[tuple[int, int], torch.Tensor | GradientEdge] = {}
        loss_sum = torch.zeros((), device=self.stage.device)

        pp, rank = self.stage.comm.size, self.stage.stage % self.stage.comm.size

        def forward(k: int) -> None:
            nonlocal loss_sum
            i, v = micro_batch_chunk(k, pp, V, backward=False)
            s = self.stages[v]
            x, y = micro_batches[i]
            received = s.recv_forward(more_coming=i + 1 < m)
            if received is not None:
                # A fresh alias of the reused buffer, so its .grad is this micro-batch's own.
                x = received = received.detach().requires_grad_()
            with self.meter.hooks(), autocast:
                out = s.forward(x)
                if s.is_last:
                    out = self.loss_fn(out, y)
            if s.is_last:
                loss_sum = loss_sum + out.detach()
                outputs[i, v] = out / (m * loss_divisor)
            else:
                outputs[i, v] = get_gradient_edge(out)
                s.send_forward(out)
            inputs[i, v] = received

        def backward(k: int) -> None:
            i, v = micro_batch_chunk(k, pp, V, backward=True)
            s = self.stages[v]
            before_backward(i)
            grad = s.recv_backward(more_coming=i + 1 < m)
            x, out = inputs.pop((i, v)), outputs.pop((i, v))
            torch.autograd.backward(out, grad_tensors=grad)
            s.free_input()
            s.free_grad()
            s.send_backward(None if x is None else x.grad)

        for is_forward, k in passes(self.kind, m, pp, rank, V):
            (forward if is_forward else backward)(k)
        for s in self.stages:
            s.finish_sends()
        return loss_sum

    @torch.no_grad()
    def forward_only(self, micro_batches: list, autocast) -> torch.Tensor:
        """Evaluation: forward every micro-batch through the pipeline; summed loss on the last
        stage. Interleaved, each micro-batch goes through every chunk before the next one
        starts (its chunks wait on the other ranks, so evaluation has the full bubble)."""
        m = len(micro_batches)
        loss_sum = torch.zeros((), device=self.stage.device)
        for i, (x, y) in enumerate(micro_batches):
            for s in self.stages:
                received = s.recv_forward(more_coming=i + 1 < m)
                with autocast:
                    out = s.forward(x if received is None else received)
                    if s.is_last:
                        out = self.loss_fn(out, y)
                s.free_input()
                if s.is_last:
                    loss_sum += out.float()
                else:
                    s.send_forward(out)
        for s in self.stages:
            s.finish_sends()
        return loss_sum


def micro_batch_chunk(k: int, pp: int, V: int, backward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of a rank's k-th forward (or backward) in a step: pp micro-batches
    through chunk 0, the same through chunk 1, ..., then the next pp; backwards go through
    the chunks from last to first. With one chunk, micro-batch k."""
    if V == 1:
        return k, 0
    group, within = divmod(k, pp * V)
    chunk = within // pp
    return group * pp + within % pp, V - 1 - chunk if backward else chunk


def passes(kind: str, m: int, pp: int, rank: int, V: int = 1) -> Iterator[tuple[bool, int]]:
    """The step's passes on pp rank `rank`, in order: (True, k) for its k-th forward, (False,
    k) for its k-th backward, k counting (micro-batch, chunk) pairs (`micro_batch_chunk`)."""
    total = m * V
    if kind == "gpipe":
        warmup = total  # fill: every forward; drain: every backward
    elif V == 1:
        warmup = min(pp - rank - 1, m)
    else:
        warmup = min((pp - rank - 1) * 2 + (V - 1) * pp, total)
    # Warmup: forwards only, until the last stage has work.
    for k in range(warmup):
        yield True, k
    # Steady state: one forward, then the backward of the oldest micro-batch in flight.
    for k in range(total - warmup):
        yield True, warmup + k
        yield False, k
    # Cooldown: the backwards of the micro-batches still in flight.
    for k in range(total - warmup, total):
        yield False, k


def chunk_stages(
    module: nn.Module,
    comm: TensorComm,
    *,
    virtual_stages: int,
    act_shape: tuple[int, ...],
    device: torch.device,
) -> list[PipelineStage]:
    """This pp rank's stages: one (today's pipeline) or, interleaved, one per chunk of
    `module` (a GPT built with the rank's chunks, `rank_chunks`)."""
    pp, rank = comm.size, comm.rank
    if virtual_stages == 1:
        return [
            PipelineStage(
                module, comm, stage=rank, num_stages=pp, act_shape=act_shape, device=device
            )
        ]
    return [
        PipelineStage(
            module,
            comm,
            stage=v * pp + rank,
            num_stages=pp * virtual_stages,
            act_shape=act_shape,
            device=device,
            chunk=v,
        )
        for v in range(virtual_stages)
    ]
