"""Configuration: dataclasses, a TOML file, and `--section.key value` overrides.

Every setting has one home: a field of a section dataclass below, with a docstring.
The resolution order is: defaults, then the TOML file (`--config FILE`), then
command-line overrides. Unknown sections or keys and values of the wrong type are
errors that name the key, so a typo never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

# The [model] section is the model's own config class: one definition of the model's shape,
# in a module of its own that needs no torch, so that this file (and the watchdog and run
# folder, which import it before torch loads) stays torch-free.
from hpcllm.models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file, key or value the user must fix."""


OVERLAP_MODES = ("auto", "on", "off")  # parallel.overlap


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the ranks share the work: the rank grid (dp x pp x tp), the pipeline schedule, and
    how gradients travel over dp."""

    dp: int = 0
    """Data-parallel ranks; 0 means world_size / (pp * tp)."""
    pp: int = 1
    """Pipeline stages."""
    tp: int = 1
    """Tensor-parallel ranks: each holds 1/tp of every block's heads and MLP units and of the
    vocabulary (padded to a multiple of tp). Must divide model.n_head."""
    schedule: str = "1f1b"
    """Pipeline schedule: '1f1b' (bounded activation memory) or 'gpipe'."""
    stage_layers: str = ""
    """Blocks per pipeline stage, e.g. "3,2,2,1"; empty splits them evenly. With
    virtual_stages V > 1: pp * V counts, one per virtual stage in pipeline order."""
    virtual_stages: int = 1
    """Interleaved pipeline (Megatron's virtual stages): each pp rank holds this many chunks
    of blocks, chunk v those of virtual stage v * pp + rank, which divides the pipeline
    bubble by it. Needs train.grad_accum_steps to be a multiple of parallel.pp."""
    bucket_mb: float = 25.0
    """Size of one gradient all-reduce bucket, in MiB."""
    zero: int = 0
    """ZeRO stage: 0 replicates the optimizer state on every dp rank; 1 shards it (and the
    update) over the dp ranks, reduce-scattering gradients and all-gathering parameters
    (Muon: each hidden matrix's momentum on the rank that orthogonalises it)."""
    cuda_aware: str = "auto"
    """CUDA tensors straight to MPI: 'auto' (detect), 'yes', or 'no' (stage through host)."""
    grad_compression: str = "none"
    """Gradient reduction over dp: 'none' (fp32 all-reduce), 'bf16' or 'fp16' (16 bits on the
    wire, summed in fp32), or 'powersgd' (low-rank, with error feedback)."""
    powersgd_rank: int = 4
    """Rank of PowerSGD's factors (grad_compression powersgd)."""
    powersgd_warmup: int = 10
    """Uncompressed steps at the start of a PowerSGD run (grad_compression powersgd)."""
    sync_every: int = 1
    """Local SGD: the dp ranks take this many optimizer steps on their own gradients (no
    gradient all-reduce), then average their models; 1 averages gradients every step."""
    outer_lr: float = 1.0
    """With sync_every > 1: the outer (DiLoCo) step's rate on the averaged change of the
    model since the last average; 1 with outer_momentum 0 is plain model averaging."""
    outer_momentum: float = 0.0
    """With sync_every > 1: the outer step's Nesterov momentum (DiLoCo uses 0.9)."""
    overlap: str = "auto"
    """Gradient reduction: 'on' overlaps it with backward, 'off' reduces bucket after bucket
    once backward is done, 'auto' times both on the first 9 steps and keeps the faster."""
    comm_thread: bool = False
    """Overlap from a communication thread that owns the reduction's MPI calls (needs
    MPI_THREAD_MULTIPLE), instead of launching from the gradient hooks."""
    allreduce: str = "flat"
    """Gradient all-reduce over dp: 'flat' (one MPI all-reduce), 'hierarchical' (inside each
    node, then across nodes: for dp groups spanning nodes), or 'auto' (times both at start-up,
    keeps the faster)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop: steps, batch, sequence length, device and logging."""

    max_steps: int = 500
    """Optimizer steps to train for (the run ends there)."""
    micro_batch_size: int = 16
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    seed: int = 1337
    """Seed for weights, data order and dropout."""
    device: str = "cpu"
    """'cpu' or 'cuda' (one GPU per rank, chosen from the node-local rank)."""
    dtype: str = "float32"
    """Compute dtype under autocast: float32 or bfloat16 (weights and grads stay fp32)."""
    threads: int = 0
    """Torch CPU threads per rank; 0 shares the node's cores between its ranks."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one rank's device, for the logged MFU; 0 takes it from the table of
    known GPUs, or on a CPU from a short matrix-multiply probe (cached)."""
    log_every: int = 10
    """Print and record metrics every N steps."""
    eval_every: int = 200
    """Validation loss every N steps (0 disables; always at the end)."""
    eval_batches: int = 8
    """Micro-batches per rank in one validation pass."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule (linear warmup, then cosine decay to min_lr)."""

    name: str = "muon"
    """muon (Muon for the blocks' hidden matrices, AdamW for the rest), or adamw."""
    lr: float = 2e-3
    """Peak learning rate (AdamW's, also under muon for the embeddings, head and vectors)."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases and norms)."""
    beta1: float = 0.9
    """AdamW's decay rate of the gradients' running mean."""
    beta2: float = 0.95
    """AdamW's decay rate of the squared gradients' running mean."""
    eps: float = 1e-8
    """AdamW's epsilon (also Muon's AdamW part), added to the root of the second moment."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    muon_lr: float = 0.02
    """Peak learning rate of Muon's matrices (optim.name muon)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The token shards to train on."""

    path: str = ""
    """Folder of HDF5 token shards (train-*.h5, val-*.h5). Empty: the default corpus
    (Python's standard library, 1024-token BPE) in data/stdlib-bpe1024, prepared on first use."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The run folder, the end-of-training sample, the time budget and the hang watchdog."""

    dir: str = "runs/default"
    """Run folder: config.toml, metrics.jsonl, checkpoints/."""
    sample_tokens: int = 200
    """Tokens of text generated at the end of training (0 disables)."""
    prompt: str = "def "
    """Prompt of the end-of-training sample."""
    time_limit_s: float = 0.0
    """Wall-clock budget in seconds: when it runs out, all ranks save and exit 0 (0: none)."""
    watchdog_s: float = 300.0
    """Abort the job if a rank makes no progress (e.g. stuck in an MPI wait) this long (0: off)."""
    watchdog_first_step_s: float = 900.0
    """The watchdog's timeout until the first step has completed (start-up is slow)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When checkpoints are saved, how many are kept, and resuming from them."""

    every: int = 200
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep: int = 2
    """Newest checkpoints kept; older ones are deleted after a successful save."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run.dir/checkpoints if there is one."""


# The defaults of a training job (the shape and arch of [model], micro_batch_size, max_steps,
# the optimizer and its lr, the default corpus's BPE vocabulary) are the winner of a sweep for
# the lowest validation bits per byte in ~100 s of training on 2 cores (benchmarks/14-quality.md). model.py's own ModelConfig() stays the plain gpt2 that code and tests build directly.
@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="llama"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert `value` to the type of `default`, or raise naming `key`."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return kind(text) if kind is float else int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got '{value}'") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section_name not in sections or not key:
        raise ConfigError(
            f"unknown config section '{section_name}' in '{dotted}'{_suggest(section_name, sections)}; "
            f"sections are {', '.join(sorted(sections))}"
        )
    section = getattr(cfg, section_name)
    keys = {f.name for f in dataclasses.fields(section)}
    if key not in keys:
        raise ConfigError(f"unknown config key '{dotted}'{_suggest(key, keys)}")
    setattr(section, key, _coerce(dotted, value, getattr(section, key)))


def load_toml(cfg: Config, path: str) -> None:
    """Apply a TOML file of [section] tables to `cfg`."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not readable TOML: {e}") from None
    for section_name, section in table.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: top-level key '{section_name}' must be a [section] table")
        for key, value in section.items():
            try:
                _set(cfg, f"{section_name}.{key}", value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None


def parse_args(argv: list[str]) -> tuple[Config, dict]:
    """Build a Config from `--config FILE` and `--section.key value` arguments.

    Returns the config and the non-config options (`--dry-run`, `--world-size N`).
    """
    cfg = Config()
    options: dict[str, Any] = {"dry_run": False, "world_size": None}
    overrides: list[tuple[str, str]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--dry-run":
            options["dry_run"] = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': options look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_file = value
        elif name == "world-size":
            options["world_size"] = _coerce("--world-size", value, 0)
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(
                f"unknown option --{name}: use --config FILE, --dry-run, --world-size N "
                "or --section.key value"
            )
    if config_file:
        load_toml(cfg, config_file)
    for name, value in overrides:
        _set(cfg, name, value)
    validate(cfg)
    return cfg, options


@dataclass(frozen=True, slots=True)
class Range:
    """The values a numeric setting accepts: from `low` up to `high` (None: no limit), each
    end included unless marked open; never NaN or infinity."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def check(self, key: str, value: float) -> None:
        """Raise ConfigError naming `key` unless `value` is finite and in range."""
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (math.isfinite(value) and low_ok and high_ok):
            raise ConfigError(f"{key} = {value} is out of range: it must be {self}")


COUNT = Range(1)  # a size or count: at least one
NON_NEGATIVE = Range(0)  # for a count, 0 often switches it off or means "derive it"
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)

# The allowed values of every numeric setting, in one place: validate() checks each field
# against its entry, and a numeric field without one is a bug (tests/test_config.py checks).
RANGES: dict[str, Range] = {
    "model.n_layer": COUNT,
    "model.n_head": COUNT,
    "model.d_model": COUNT,
    "model.vocab_size": NON_NEGATIVE,
    "model.block_size": NON_NEGATIVE,
    "model.dropout": FRACTION,
    "model.n_kv_head": NON_NEGATIVE,  # 0 means n_head
    "model.ffn_hidden": NON_NEGATIVE,  # 0 derives it from d_model
    "model.rope_theta": POSITIVE,
    "parallel.dp": NON_NEGATIVE,
    "parallel.pp": COUNT,
    "parallel.tp": COUNT,
    "parallel.virtual_stages": COUNT,
    "parallel.bucket_mb": POSITIVE,
    "parallel.zero": Range(0, 1),
    "parallel.powersgd_rank": COUNT,
    "parallel.powersgd_warmup": NON_NEGATIVE,
    "parallel.sync_every": COUNT,
    "parallel.outer_lr": POSITIVE,
    "parallel.outer_momentum": FRACTION,
    "train.max_steps": COUNT,
    "train.micro_batch_size": COUNT,
    "train.grad_accum_steps": COUNT,
    "train.seq_len": COUNT,
    "train.seed": NON_NEGATIVE,  # numpy's generators take no negative seeds
    "train.threads": NON_NEGATIVE,
    "train.peak_tflops": NON_NEGATIVE,  # 0: automatic
    "train.log_every": COUNT,
    "train.eval_every": NON_NEGATIVE,
    "train.eval_batches": COUNT,  # 0 would average no batches: a NaN val_loss
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": FRACTION,
    "optim.beta2": FRACTION,
    "optim.eps": POSITIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0 disables clipping
    "optim.muon_lr": POSITIVE,
    "optim.muon_momentum": FRACTION,
    "run.sample_tokens": NON_NEGATIVE,
    "run.time_limit_s": NON_NEGATIVE,
    "run.watchdog_s": NON_NEGATIVE,
    "run.watchdog_first_step_s": NON_NEGATIVE,
    "checkpoint.every": NON_NEGATIVE,
    "checkpoint.keep": NON_NEGATIVE,  # 0 keeps every checkpoint
}


def validate(cfg: Config) -> None:
    """Checks that need no data and no MPI; each error names its key."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                key = f"{section.name}.{f.name}"
                assert key in RANGES, f"numeric setting {key} has no entry in config.RANGES"
                RANGES[key].check(key, value)
    m, t, p, o = cfg.model, cfg.train, cfg.parallel, cfg.optim
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    if cfg.run.sample_tokens and not cfg.run.prompt:
        raise ConfigError(
            "run.prompt is empty but run.sample_tokens is not 0: give a prompt for the "
            "end-of-training sample, or set run.sample_tokens 0"
        )
    check_text("run.prompt", cfg.run.prompt)
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})"
        )
    check_arch(m)
    if m.block_size and t.seq_len > m.block_size:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) is longer than the model's context "
            f"model.block_size ({m.block_size})"
        )
    if m.n_head % p.tp:
        # n_head | d_model, so tp then also divides d_model and the MLP's 4 * d_model units.
        raise ConfigError(
            f"parallel.tp = {p.tp} must divide model.n_head ({m.n_head}): each "
            "tensor-parallel rank holds an equal share of the attention heads (and so of "
            "model.d_model and the MLP's 4 * model.d_model units); choose another parallel.tp "
            "or model.n_head"
        )
    if p.tp > 1 and m.arch == "llama" and m.kv_heads() % p.tp:
        raise ConfigError(
            f"parallel.tp = {p.tp} must divide model.n_kv_head ({m.kv_heads()}): each "
            "tensor-parallel rank holds the key/value heads of its own query heads; choose "
            "another parallel.tp or model.n_kv_head"
        )
    if p.tp > 1 and m.ffn_size() % p.tp:
        raise ConfigError(
            f"parallel.tp = {p.tp} must divide the MLP's hidden width ({m.ffn_size()}, "
            "model.ffn_hidden or its default): each tensor-parallel rank holds an equal share "
            "of the MLP's units"
        )
    if o.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name must be adamw or muon, got '{o.name}'")
    check_local_sgd(p)
    if p.overlap not in OVERLAP_MODES:
        raise ConfigError(
            f"parallel.overlap must be one of {', '.join(OVERLAP_MODES)}, got '{p.overlap}'"
        )
    if p.allreduce not in ("flat", "hierarchical", "auto"):
        raise ConfigError(
            f"parallel.allreduce must be flat, hierarchical or auto, got '{p.allreduce}'"
        )
    if p.allreduce == "hierarchical" and p.grad_compression == "powersgd":
        # bf16/fp16 compress the cross-node phase of the two levels (distributed/hierarchical.py).
        raise ConfigError(
            "parallel.allreduce hierarchical does not combine with parallel.grad_compression "
            "powersgd (its all-reduces carry low-rank factors, a small fraction of the "
            "gradient already); use bf16/fp16 compression with it, or allreduce flat"
        )
    if p.schedule not in ("1f1b", "gpipe"):
        raise ConfigError(f"parallel.schedule must be 1f1b or gpipe, got '{p.schedule}'")
    check_compression(p)
    check_interleaving(p, t, m)
    if p.cuda_aware not in ("auto", "yes", "no"):
        raise ConfigError(f"parallel.cuda_aware must be auto, yes or no, got '{p.cuda_aware}'")
    if t.device not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be cpu or cuda, got '{t.device}'")
    if t.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be float32 or bfloat16, got '{t.dtype}'")


def check_text(key: str, text: str) -> None:
    """A string setting must be text the tokenizer can encode: a command-line argument that
    was not valid UTF-8 reaches Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{key} is not valid UTF-8 text ({text.encode('utf-8', 'backslashreplace')!r}); "
            "give it in UTF-8"
        ) from None


def check_compression(p: ParallelConfig) -> None:
    """parallel.grad_compression's value."""
    modes = ("none", "bf16", "fp16", "powersgd")
    if p.grad_compression not in modes:
        raise ConfigError(
            f"parallel.grad_compression must be one of {', '.join(modes)}, got "
            f"'{p.grad_compression}'"
        )


def check_interleaving(p: ParallelConfig, t: TrainConfig, m: ModelConfig) -> None:
    """What an interleaved pipeline (parallel.virtual_stages > 1) needs."""
    if p.virtual_stages == 1:
        return
    if p.pp == 1:
        raise ConfigError(
            f"parallel.virtual_stages = {p.virtual_stages} interleaves pipeline stages, but "
            "parallel.pp = 1; set parallel.pp > 1 or parallel.virtual_stages 1"
        )
    if t.grad_accum_steps % p.pp:
        raise ConfigError(
            f"parallel.virtual_stages = {p.virtual_stages} (interleaved schedule) needs "
            f"train.grad_accum_steps ({t.grad_accum_steps}) to be a multiple of parallel.pp "
            f"({p.pp}): micro-batches go through each chunk in groups of pp"
        )
    if p.pp * p.virtual_stages > m.n_layer:
        raise ConfigError(
            f"parallel.pp x parallel.virtual_stages = {p.pp} x {p.virtual_stages} = "
            f"{p.pp * p.virtual_stages} chunks but the model has only model.n_layer = "
            f"{m.n_layer} blocks; every chunk needs at least one block"
        )


def check_local_sgd(p: ParallelConfig) -> None:
    """What local SGD (parallel.sync_every > 1) does not combine with."""
    if p.sync_every == 1:
        if p.outer_lr != 1.0 or p.outer_momentum != 0.0:
            raise ConfigError(
                "parallel.outer_lr and parallel.outer_momentum apply to local SGD only "
                "(parallel.sync_every > 1); remove them or set parallel.sync_every"
            )
        return
    if p.zero:
        raise ConfigError(
            f"parallel.sync_every = {p.sync_every} does not combine with parallel.zero 1: "
            "ZeRO-1 shards the update over dp, which needs the averaged gradient every step; "
            "use parallel.zero 0"
        )
    if p.grad_compression != "none":
        raise ConfigError(
            f"parallel.sync_every = {p.sync_every} does not combine with "
            f"parallel.grad_compression {p.grad_compression}: local SGD averages models, not "
            "gradients, so there is no gradient all-reduce to compress; use one of them"
        )


def check_arch(m: ModelConfig) -> None:
    """The architecture's own constraints on the [model] keys."""
    if m.arch not in ("gpt2", "llama"):
        raise ConfigError(f"model.arch must be gpt2 or llama, got '{m.arch}'")
    if m.arch == "gpt2":
        # gpt2 has no rotary embedding, no grouped-query attention and no QK-norm: a value
        # that would change nothing is refused rather than silently ignored.
        default = ModelConfig()
        for key in ("n_kv_head", "qk_norm", "rope_theta"):
            if getattr(m, key) != getattr(default, key):
                raise ConfigError(
                    f"model.{key} = {getattr(m, key)} applies to model.arch = llama only; "
                    f"remove it or set model.arch llama"
                )
        return
    if m.n_head % m.kv_heads():
        raise ConfigError(
            f"model.n_head ({m.n_head}) must be divisible by model.n_kv_head ({m.n_kv_head}): "
            "each key/value head serves an equal group of query heads"
        )
    if (m.d_model // m.n_head) % 2:
        raise ConfigError(
            f"model.d_model / model.n_head = {m.d_model // m.n_head} must be even for llama: "
            "the rotary embedding rotates pairs of dimensions"
        )


def check_device(cfg: Config) -> None:
    """Check the config against this machine. Not part of validate(): a dry run may plan a
    GPU job on a login node that has none."""
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device = cuda but this process sees no GPU (torch.cuda.is_available() "
                "is False); run on a GPU node (check CUDA_VISIBLE_DEVICES) or use --train.device cpu"
            )


# Bytes per parameter that every layout holds at least: the fp32 weight, its gradient and
# AdamW's two moments (Muon keeps one momentum for its matrices; ZeRO-1 shards the state).
BYTES_PER_PARAM = {"adamw": 16, "muon": 12}


def check_memory(cfg: Config, dims: dict[str, int], ranks_on_node: int) -> None:
    """Refuse, before allocating, a model whose weights, gradients and optimizer state alone
    need more memory per rank than its share of the node (or its GPU): a size nobody can run
    should be one line, not an allocation error or the kernel's OOM killer."""
    per_rank = cfg.model.num_matrix_params() / (dims["pp"] * dims["tp"])
    state = (BYTES_PER_PARAM[cfg.optim.name] - 8) / (dims["dp"] if cfg.parallel.zero else 1)
    need = (8 + state) * per_rank  # weight and gradient, and the (sharded) optimizer state
    if cfg.train.device == "cuda":
        import torch

        have, where = torch.cuda.get_device_properties(0).total_memory, "its GPU"
    else:
        try:
            with open("/proc/meminfo") as f:
                total = next(
                    int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")
                )
        except (OSError, StopIteration, ValueError):
            return  # not Linux: nothing to check against
        have, where = total // ranks_on_node, f"1/{ranks_on_node} of this node's memory"
    if need > have:
        gib = 2.0**30
        raise ConfigError(
            f"the model does not fit: its {cfg.model.num_matrix_params():,} matrix parameters "
            f"need at least {need / gib:.1f} GiB per rank for weights, gradients and "
            f"{cfg.optim.name} state (pp {dims['pp']} x tp {dims['tp']}"
            f"{', ZeRO-1 over dp ' + str(dims['dp']) if cfg.parallel.zero else ''}), and a rank "
            f"has {have / gib:.1f} GiB ({where}); use more pp or tp ranks, parallel.zero 1, or "
            "a smaller model (python -m hpcllm.train --dry-run prints every rank's memory)"
        )


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML document that load_toml reads back."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            # JSON literals are valid TOML for the bool/int/float/str values used here.
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from to_dict() output (as stored in checkpoints)."""
    cfg = Config()
    for section, values in d.items():
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    return cfg
