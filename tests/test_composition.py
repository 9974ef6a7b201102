"""The composition matrix: parallel layouts x features, each against its reference.

Layouts within 4 ranks: dp 2, pp 2, tp 2, interleaved pp 2 x V 2, and the mixed dp 2 x pp 2,
dp 2 x tp 2, dp 2 x pp 2 x V 2. Features: none, ZeRO-1, bf16 compression, local SGD, Muon,
llama, tied embeddings. A run is compared with the single-rank run of the same feature
where the feature keeps the maths of the layout (ZeRO-1, Muon, llama, tied embeddings, and
any feature at dp 1), and with the same feature on the plain dp 2 layout where it changes
them with dp (bf16 rounds each dp rank's gradient; local SGD averages models, and its dp 2
reference is computed by hand from two single-rank replicas). A few pairs of features are
checked the same way, and the pairs still refused are asserted refused with their reason.

Everything runs in process under one 4-rank launch: each run builds its ranks from a Config
the way hpcllm.train does (build_stage, DataParallel with its compressor and tied-gradient
group, chunk_stages, build_optimizer, LocalSGD) on a tiny GPT and random tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import nullcontext

import pytest
import torch
from mpi4py import MPI
from test_pipeline import E2E_PARAM_TOL, LOSS_TOL, SETTINGS, step_batches
from test_tensor_parallel import TP_ADAM_EPS, assemble

from hpcllm.checkpoint.index import placement_of
from hpcllm.config import Config, ConfigError, ParallelConfig, TrainConfig, validate
from hpcllm.distributed.build import build_rank
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.steps import clip_grad_norm, mean_over_grid, stage_inputs, train_step
from hpcllm.distributed.topology import AXES, Grid
from hpcllm.models.gpt import GPT, ModelConfig

from helpers import REPO, merged_params, resume_elsewhere

CPU = torch.device("cpu")
SEQ_LEN, STEPS, MICRO = 16, 4, 2  # micro-batches per step: a multiple of pp (interleaving)
GLOBAL_BATCH = 4  # sequences per step: 2 x 2 on one dp rank, 2 x 1 on each of two
# An odd vocabulary: tp 2 pads it (the tied weight's shards hold padding rows too).
MODEL = ModelConfig(vocab_size=67, block_size=SEQ_LEN, n_layer=4, n_head=2, d_model=32)
# fp32 throughout: a layout changes the order of a few sums (over stages, tp shards, dp
# ranks, samples), so results differ from the reference by rounding: a few float32 ulps
# (~1.2e-7 relative) of the gradients per step, which AdamW's normalised update turns into
# at most ~lr x 1e-6 of a parameter per step; 4 steps stay well inside these bounds.
TOL = {"atol": 1e-6, "rtol": 1e-5}
# bf16 on the wire: a gradient element that rounding puts on the other side of a bf16
# rounding boundary moves by one bf16 ulp (2^-8 relative), so its update moves by up to
# lr x 2^-8 a step (AdamW), lr x 2^-8 x 4 over the 4 steps: 5e-5 with lr 3e-3.
BF16_TOL = {"atol": 5e-5, "rtol": 1e-5}
EXACT = {"atol": 0.0, "rtol": 0.0}

LAYOUTS: dict[str, dict] = {
    "dp2": {"dp": 2},
    "pp2": {"pp": 2},
    "tp2": {"tp": 2},
    "pp2xV2": {"pp": 2, "virtual_stages": 2},
    "dp2xpp2": {"dp": 2, "pp": 2},
    "dp2xtp2": {"dp": 2, "tp": 2},
    "dp2xpp2xV2": {"dp": 2, "pp": 2, "virtual_stages": 2},
    "pp2xtp2": {"pp": 2, "tp": 2},  # tied embeddings under pp and tp (PAIRS)
}
FEATURES: dict[str, dict] = {
    "none": {},
    "zero1": {"parallel.zero": 1},
    "bf16": {"parallel.grad_compression": "bf16"},
    "local_sgd": {"parallel.sync_every": 2},
    "muon": {"optim.name": "muon"},
    "llama": {"model.arch": "llama", "model.qk_norm": True},
    "tied": {"model.tie_embeddings": True},
}
# Features whose maths change with the number of dp ranks: compared with the same feature
# on the plain dp 2 layout when the layout has dp 2.
PER_DP = ("bf16", "local_sgd", "fp16", "powersgd")
# Pairs of features beyond the matrix (this slice of issue 17), on the layout that shows them.
PAIRS: list[tuple[str, str, dict]] = [
    ("dp2xpp2", "tied+zero1", {"model.tie_embeddings": True, "parallel.zero": 1}),
    ("dp2xpp2", "tied+local_sgd", {"model.tie_embeddings": True, "parallel.sync_every": 2}),
    ("dp2xpp2", "tied+muon", {"model.tie_embeddings": True, "optim.name": "muon"}),
    ("pp2xtp2", "tied", FEATURES["tied"]),
    ("dp2xpp2xV2", "fp16", {"parallel.grad_compression": "fp16"}),
    ("dp2xpp2xV2", "powersgd", {"parallel.grad_compression": "powersgd"}),
    ("pp2xV2", "powersgd", {"parallel.grad_compression": "powersgd"}),
    ("dp2", "muon+local_sgd", {"optim.name": "muon", "parallel.sync_every": 2}),
    ("dp2xpp2", "muon+local_sgd", {"optim.name": "muon", "parallel.sync_every": 2}),
    ("dp2xtp2", "muon+local_sgd", {"optim.name": "muon", "parallel.sync_every": 2}),
    ("dp2", "muon+zero1", {"optim.name": "muon", "parallel.zero": 1}),
    ("dp2xtp2", "muon+zero1", {"optim.name": "muon", "parallel.zero": 1}),
    ("dp2xpp2xV2", "muon+zero1", {"optim.name": "muon", "parallel.zero": 1}),
    ("dp2xpp2", "bf16+zero1", {"parallel.grad_compression": "bf16", "parallel.zero": 1}),
    ("dp2xtp2", "bf16+zero1", {"parallel.grad_compression": "bf16", "parallel.zero": 1}),
    ("dp2", "powersgd+zero1", {"parallel.grad_compression": "powersgd", "parallel.zero": 1}),
]
# Every feature issue 17 names, as settings of the tiny dp 2 config: each pair of them (two
# that set different keys) is accepted by config.validate or is one of REFUSED's.
SWITCHES: dict[str, dict] = {
    "zero1": FEATURES["zero1"],
    "bf16": FEATURES["bf16"],
    "fp16": {"parallel.grad_compression": "fp16"},
    "powersgd": {"parallel.grad_compression": "powersgd"},
    "local_sgd": FEATURES["local_sgd"],
    "muon": FEATURES["muon"],
    "interleaved": {"parallel.pp": 2, "parallel.virtual_stages": 2},
    "tied": FEATURES["tied"],
    "hierarchical": {"parallel.allreduce": "hierarchical"},
    "tp": {"parallel.tp": 2},
    "pp": {"parallel.pp": 2},
}
# The pairs of features config.validate still refuses (issue 17 allows three): the pairs of
# SWITCHES each covers and the words of its reason, which docs/parallelism.md ("What
# composes") gives too. A pair that starts to work moves from here into PAIRS.
REFUSED: dict[str, tuple[list[tuple[str, str]], str]] = {
    "local SGD x ZeRO-1": (
        [("zero1", "local_sgd")],
        "ZeRO-1 shards the update over dp, which needs the averaged gradient every step",
    ),
    "local SGD x gradient compression": (
        [(mode, "local_sgd") for mode in ("bf16", "fp16", "powersgd")],
        "there is no gradient all-reduce to compress",
    ),
    "PowerSGD x hierarchical all-reduce": (
        [("powersgd", "hierarchical")],
        "its all-reduces carry low-rank factors",
    ),
}


def config(layout: dict, settings: dict) -> Config:
    """The run's Config: the tiny model, AdamW at a fixed rate, `layout` and `settings`
    ({"section.key": value}), checked by config.validate as a job's would be."""
    dp = layout.get("dp", 1)
    cfg = Config(
        model=dataclasses.replace(MODEL),
        parallel=ParallelConfig(
            dp=dp,
            pp=layout.get("pp", 1),
            tp=layout.get("tp", 1),
            virtual_stages=layout.get("virtual_stages", 1),
            bucket_mb=0.02,  # several buckets, so ZeRO-1 shards cut through parameters
            powersgd_warmup=1,
            powersgd_rank=2,
        ),
        train=TrainConfig(
            micro_batch_size=GLOBAL_BATCH // (MICRO * dp),
            grad_accum_steps=MICRO,
            seq_len=SEQ_LEN,
            seed=7,
        ),
    )
    cfg.optim.name, cfg.optim.lr, cfg.optim.grad_clip = "adamw", 3e-3, 0.5
    cfg.optim.eps = TP_ADAM_EPS  # AdamW and rounding noise: see test_tensor_parallel
    for key, value in settings.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg


class Rank:
    """One rank of a run, built from `cfg` as hpcllm.train builds it."""

    def __init__(self, comm, cfg: Config):
        p = cfg.parallel
        self.cfg = cfg
        self.grid = grid = Grid.build(comm, dp=p.dp, pp=p.pp, tp=p.tp)
        comms = {a: TensorComm(grid.comm(a), name=a) for a in AXES}
        self.dp, self.pp, self.tp = comms["dp"], comms["pp"], comms["tp"]
        rank = build_rank(cfg, grid, CPU, comms)
        self.model, self.ddp, self.schedule = rank.model, rank.ddp, rank.schedule
        self.optimizer, self.local_sgd = rank.optimizer, rank.local_sgd

    def step(self, step: int, data_rank: int | None = None, data_size: int | None = None):
        """Optimizer step `step` (from 0) on this dp rank's samples (or those of dp rank
        `data_rank` of `data_size`); returns (mean loss, gradient norm) over the grid."""
        grid, t = self.grid, self.cfg.train
        batches = [(None, None)] * t.grad_accum_steps
        if grid.is_first_stage or grid.is_last_stage:
            batches = step_batches(
                step,
                num_micro=t.grad_accum_steps,
                micro_batch=t.micro_batch_size,
                dp_rank=grid.rank("dp") if data_rank is None else data_rank,
                dp_size=grid.size("dp") if data_size is None else data_size,
                vocab=self.cfg.model.vocab_size,
            )
        loss_sum = train_step(
            self.schedule,
            self.ddp,
            stage_inputs(batches, grid, CPU),
            nullcontext(),
            average_grads=self.local_sgd is None,
        )
        norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip, [self.pp], self.tp, self.ddp)
        if self.local_sgd is not None:
            norm = self.local_sgd.agreed_norm(norm)
        self.optimizer.step()
        if self.local_sgd is not None:
            self.local_sgd.after_step(step + 1, STEPS)
        count = t.grad_accum_steps if grid.is_last_stage else 0
        return mean_over_grid(loss_sum, count, [self.pp, self.dp]), norm

    def free(self) -> None:
        """Release this run's MPI objects: its communicators and persistent receives."""
        for stage in self.schedule.stages:
            for recvs in stage._idle.values():
                for recv in recvs:
                    recv.free()
        if self.ddp.compressor is not None:
            for c in self.ddp.compressor.bucket_comms.values():
                c.comm.Free()
        if self.ddp.tied is not None:
            self.ddp.tied.comm.comm.Free()
        self.grid.free()

    def gather(self, comm) -> dict | None:
        """On rank 0 of `comm`: every parameter under its global name, assembled from its tp
        shards, and the copies (dp replicas, tp replicas, a tied weight's two stages) that
        differ bitwise; None elsewhere."""
        local = {n: (p.detach().clone(), placement_of(p)) for n, p in self.model.named_parameters()}
        gathered = comm.gather((self.grid.coords, local), root=0)
        self.free()
        if comm.rank != 0:
            return None
        params, differ = {}, []
        for name in sorted({n for _, part in gathered for n in part}):
            shards: dict[int, tuple] = {}
            for coords, part in gathered:
                if name not in part:
                    continue
                tensor, placement = part[name]
                key = coords["tp"] if placement is not None else 0
                if key in shards and not torch.equal(shards[key][0], tensor):
                    differ.append(f"{name} at {coords}")
                shards.setdefault(key, (tensor, placement))
            params[name] = assemble([shards[k] for k in sorted(shards)])
        return {"params": params, "differ": differ}


def train(comm, cfg: Config) -> dict | None:
    """STEPS steps of `cfg` on `comm`: on its rank 0 the losses, gradient norms, parameters
    and differing copies; None on the other ranks."""
    rank = Rank(comm, cfg)
    losses, norms = zip(*(rank.step(s) for s in range(STEPS)), strict=True)
    result = rank.gather(comm)
    return None if result is None else {**result, "losses": losses, "norms": norms}


def local_by_hand(settings: dict) -> dict:
    """Local SGD (`settings` has parallel.sync_every) on dp 2, computed on one rank: two
    single-rank replicas, each on its dp rank's samples, and their mean every sync_every
    steps and at the end."""
    every = settings["parallel.sync_every"]
    one = config({}, {k: v for k, v in settings.items() if k != "parallel.sync_every"})
    one.train.micro_batch_size = GLOBAL_BATCH // (MICRO * 2)
    replicas = [Rank(MPI.COMM_SELF, one) for _ in range(2)]
    params = [list(r.model.parameters()) for r in replicas]
    losses, norms = [], []
    for s in range(STEPS):
        steps = [r.step(s, data_rank=i, data_size=2) for i, r in enumerate(replicas)]
        losses.append(sum(loss for loss, _ in steps) / 2)
        norms.append((sum(n**2 for _, n in steps) / 2) ** 0.5)
        if (s + 1) % every == 0 or s + 1 == STEPS:
            with torch.no_grad():
                for a, b in zip(*params, strict=True):
                    mean = (a + b) / 2
                    a.copy_(mean)
                    b.copy_(mean)
    result = replicas[0].gather(MPI.COMM_SELF)
    replicas[1].free()
    assert result is not None
    return {**result, "losses": losses, "norms": norms}


def compare(label: str, got: dict, ref: dict, tol: dict) -> list[str]:
    """What differs between a run and its reference, as readable lines."""
    problems = [f"{label}: copies differ: {', '.join(got['differ'][:3])}"] if got["differ"] else []
    if set(got["params"]) != set(ref["params"]):
        return [*problems, f"{label}: parameters {sorted(set(got['params']) ^ set(ref['params']))}"]
    pairs = [
        (k, torch.tensor(got[k]).double(), torch.tensor(ref[k]).double())
        for k in ("losses", "norms")
    ]
    pairs += [(n, got["params"][n], ref["params"][n]) for n in sorted(ref["params"])]
    for name, a, b in pairs:
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as e:
            problems.append(f"{label}: {name}: {str(e).splitlines()[-2:]}")
    return problems


def ranks(layout: str) -> int:
    dims = LAYOUTS[layout]
    return dims.get("dp", 1) * dims.get("pp", 1) * dims.get("tp", 1)


def reference_of(layout: str, feature: str) -> tuple[str, str]:
    """The run a (layout, feature) run is compared with: the single-rank run of the feature,
    or where it changes the maths with dp and the layout has dp 2, the feature on dp 2 (local
    SGD's computed by hand); on dp 2 itself, with ZeRO-1, the feature without it (ZeRO-1
    keeps the maths)."""
    features = feature.split("+")
    if LAYOUTS[layout].get("dp", 1) > 1 and any(f in PER_DP for f in features):
        if layout == "dp2" and "zero1" in features:
            return "dp2", "+".join(f for f in features if f != "zero1")
        return "dp2", feature
    return "single", feature


@pytest.mark.mpi(ranks=4, timeout=300)
def test_layouts_times_features_match_their_references(comm):
    """Every run equals its reference (TOL: float order only; bf16/fp16 within a rounding
    flip) and keeps its copies (dp and tp replicas, a tied weight's two stages) bitwise equal."""
    rank, size = comm.rank, comm.size
    assert size == 4
    settings = {**FEATURES, **{f: s for _, f, s in PAIRS}}
    runs = [(lay, f) for lay in LAYOUTS if lay != "pp2xtp2" for f in FEATURES]
    runs += [(lay, f) for lay, f, _ in PAIRS]
    refs_needed = {reference_of(lay, f) for lay, f in runs}
    # Compressed dp 2 references are runs of the dp 2 layout itself.
    # (Sorted: every rank must walk the same list; a set's order varies with the hash seed.)
    runs += sorted(("dp2", f) for kind, f in refs_needed if kind == "dp2" and "local_sgd" not in f)
    runs = list(dict.fromkeys(runs))
    # Runs of 2-rank layouts alternate between the halves of the world; then 4-rank ones.
    results: dict[tuple[str, str], dict] = {}
    half = comm.Split(rank // 2, rank)
    two = [r for r in runs if ranks(r[0]) == 2]
    for lay, f in two[rank // 2 :: 2]:
        out = train(half, config(LAYOUTS[lay], settings[f]))
        if out is not None:
            results[lay, f] = out
    half.Free()
    for lay, f in [r for r in runs if ranks(r[0]) == 4]:
        out = train(comm, config(LAYOUTS[lay], settings[f]))
        if out is not None:
            results[lay, f] = out
    # References computed on one rank each: single-rank runs and local SGD by hand.
    alone = sorted(k for k in refs_needed if k[0] == "single" or "local_sgd" in k[1])
    mine = {
        (kind, f): train(MPI.COMM_SELF, config({}, settings[f]))
        if kind == "single"
        else local_by_hand(settings[f])
        for kind, f in alone[rank::size]
    }
    refs = {k: r for part in comm.allgather(mine) for k, r in part.items()}
    gathered = comm.gather(results, root=0)
    if rank != 0:
        return
    results = {k: r for part in gathered for k, r in part.items()}
    assert set(results) == set(runs), set(runs) ^ set(results)
    problems = []
    for lay, f in runs:
        key = reference_of(lay, f)
        ref = refs.get(key, results.get(key))
        if (lay, f) == key and key not in refs:
            continue  # a reference itself (bf16 on dp 2: its reduction is test_compression's)
        tol = BF16_TOL if "bf16" in f or "fp16" in f else TOL
        if lay == "dp2" and "local_sgd" in f:
            tol = EXACT  # the by-hand replicas run the same operations as the dp ranks
        problems += compare(f"{lay} {f}", results[lay, f], ref, tol)
    assert not problems, "\n".join(problems)
    # The comparisons mean something: training moved the weights far beyond the tolerances,
    # and clipping (whose norm spans every stage and shard) was active.
    plain = refs["single", "none"]
    start = GPT(MODEL, init_seed=7).state_dict()
    assert min((plain["params"][n] - start[n]).abs().max().item() for n in start) > 1e-3
    assert max(plain["norms"]) > 0.5


def test_at_most_three_pairs_of_features_are_refused_each_saying_why():
    """Every pair of SWITCHES on the tiny dp 2 config: config.validate refuses exactly
    REFUSED's pairs, each in one ConfigError giving its reason, in the words
    docs/parallelism.md uses; at most three pairs of features remain refused."""
    refused = {}
    for a, b in itertools.combinations(SWITCHES, 2):
        if set(SWITCHES[a]) & set(SWITCHES[b]):
            continue  # two values of one key (bf16 or powersgd, pp or interleaved)
        try:
            config({"dp": 2}, {**SWITCHES[a], **SWITCHES[b]})
        except ConfigError as e:
            refused[frozenset((a, b))] = str(e)
    documented = {frozenset(pair): words for pairs, words in REFUSED.values() for pair in pairs}
    assert set(refused) == set(documented), set(refused) ^ set(documented)
    for pair, words in documented.items():
        assert words in refused[pair], refused[pair]
    assert len(REFUSED) <= 3
    docs = " ".join((REPO / "docs" / "parallelism.md").read_text().split())
    for name, (_, words) in REFUSED.items():
        assert name in docs and words in docs, name


def test_tied_embeddings_pp2_and_pp1_resume_each_others_checkpoints(
    reference_run, shards, tmp_path
):
    """`python -m hpcllm.train` with model.tie_embeddings: pp 2 (interleaved, 2 chunks per
    rank) and pp 1 train the same 6 steps; the checkpoints hold the shared weight once (as
    wte.weight), and each layout resumes the other's step-3 checkpoint to the same end."""
    tied = {**SETTINGS, "data.path": shards, "model.tie_embeddings": True}
    layouts = {2: {"parallel.pp": 2, "parallel.virtual_stages": 2}, 1: {}}
    runs = {pp: reference_run(pp, {**tied, **more})[0] for pp, more in layouts.items()}
    for run_dir in runs.values():
        params = merged_params(run_dir / "checkpoints/step_000006")
        assert "wte.weight" in params and "lm_head.weight" not in params
    for source, target in ((2, 1), (1, 2)):
        resume_elsewhere(
            runs[source],
            3,
            tmp_path / f"pp{source}-to-pp{target}",
            target,
            {**tied, **layouts[target]},
            loss_tol=LOSS_TOL,
            param_tol=E2E_PARAM_TOL,
        )
