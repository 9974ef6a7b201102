"""Configuration: defaults < TOML file < command line, and errors that name the key."""

import dataclasses
import math
import re

import pytest

from hpcllm.config import (
    RANGES,
    Config,
    ConfigError,
    check_device,
    from_dict,
    load_toml,
    parse_args,
    to_toml,
    validate,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_then_toml_then_overrides(tmp_path):
    toml = write(
        tmp_path / "run.toml",
        """
[train]
max_steps = 50
seq_len = 64
[model]
d_model = 64
n_head = 8
""",
    )
    cfg, options = parse_args(["--config", toml, "--train.max_steps", "7", "--model.n_head=2"])
    assert cfg.train.max_steps == 7  # command line beats the file
    assert cfg.train.seq_len == 64  # file beats the default
    assert cfg.model.d_model == 64
    assert cfg.model.n_head == 2  # --key=value form
    assert cfg.model.n_layer == Config().model.n_layer == 4  # untouched default
    assert options == {"dry_run": False, "world_size": None}

    # The file is applied before the overrides whatever the argument order.
    cfg, _ = parse_args(["--train.max_steps", "9", "--config", toml])
    assert cfg.train.max_steps == 9 and cfg.train.seq_len == 64


def test_non_config_options():
    cfg, options = parse_args(["--dry-run", "--world-size", "1024", "--parallel.pp", "4"])
    assert options == {"dry_run": True, "world_size": 1024}
    assert cfg.parallel.pp == 4
    with pytest.raises(ConfigError, match=r"world-size: expected int, got 'many'"):
        parse_args(["--world-size", "many"])
    with pytest.raises(ConfigError, match=r"option --train.seed needs a value"):
        parse_args(["--train.seed"])
    with pytest.raises(ConfigError, match=r"unexpected argument 'train.seed'"):
        parse_args(["train.seed", "1"])
    with pytest.raises(ConfigError, match=r"unknown option --epochs"):
        parse_args(["--epochs", "3"])


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_args(["--train.max_step", "5"])
    assert "'train.max_step'" in str(e.value) and "did you mean 'max_steps'" in str(e.value)

    with pytest.raises(ConfigError) as e:
        parse_args(["--trian.seed", "1"])
    assert "'trian'" in str(e.value) and "did you mean 'train'" in str(e.value)

    toml = write(tmp_path / "typo.toml", "[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", toml])
    # Errors from a file name the file and the key.
    assert toml in str(e.value) and "'optim.learning_rate'" in str(e.value)


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int, got 'ten'"):
        parse_args(["--train.max_steps", "ten"])
    with pytest.raises(ConfigError, match=r"model.n_layer: expected int, got '2.5'"):
        parse_args(["--model.n_layer", "2.5"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got 'fast'"):
        parse_args(["--optim.lr", "fast"])

    cases = {
        "[model]\nn_layer = 2.5\n": "model.n_layer: expected int, got float 2.5",
        "[optim]\nlr = true\n": "optim.lr: expected float, got bool True",
        "[model]\ntie_embeddings = 1\n": "model.tie_embeddings: expected bool, got int 1",
        "[run]\ndir = 3\n": "run.dir: expected str, got int 3",
        "[train]\nmax_steps = true\n": "train.max_steps: expected int, got bool True",
    }
    for i, (text, message) in enumerate(cases.items()):
        toml = write(tmp_path / f"bad{i}.toml", text)
        with pytest.raises(ConfigError) as e:
            parse_args(["--config", toml])
        assert message in str(e.value) and toml in str(e.value), (text, str(e.value))


@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("1", True),
        ("false", False),
        ("no", False),
        ("0", False),
        (" FALSE ", False),
    ],
)
def test_bool_coercion(text, value):
    cfg, _ = parse_args(["--checkpoint.resume", text])
    assert cfg.checkpoint.resume is value


def test_bool_rejects_other_words():
    with pytest.raises(ConfigError, match=r"checkpoint.resume: expected bool, got 'maybe'"):
        parse_args(["--checkpoint.resume", "maybe"])


def test_float_coercion(tmp_path):
    cfg, _ = parse_args(["--optim.lr", "3e-4", "--parallel.bucket_mb", "1"])
    assert cfg.optim.lr == pytest.approx(3e-4) and type(cfg.optim.lr) is float
    assert cfg.parallel.bucket_mb == 1.0 and type(cfg.parallel.bucket_mb) is float
    # A TOML integer is accepted where a float is expected, and becomes a float.
    cfg, _ = parse_args(
        ["--config", write(tmp_path / "f.toml", "[optim]\nlr = 1\ngrad_clip = 0\n")]
    )
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.grad_clip == 0.0 and type(cfg.optim.grad_clip) is float


def test_to_toml_round_trips_through_load_toml(tmp_path):
    cfg = Config()
    cfg.model.n_layer, cfg.model.tie_embeddings, cfg.model.dropout = 6, True, 0.1
    cfg.optim.lr, cfg.optim.min_lr = 3e-05, 1e-16
    cfg.parallel.bucket_mb, cfg.parallel.cuda_aware = 0.5, "no"
    cfg.checkpoint.resume = False
    cfg.run.dir = "runs/with space/and\\backslash"
    cfg.run.prompt = 'def "quoted"(x):\n\tretürn ✓ \u0001'
    path = write(tmp_path / "resolved.toml", to_toml(cfg))

    loaded = Config()
    load_toml(loaded, path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.to_dict() != Config().to_dict()
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_unreadable_config_files(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"config file .*nope.toml does not exist"):
        parse_args(["--config", missing])

    broken = write(tmp_path / "broken.toml", "[train\nmax_steps = 5\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", broken])
    assert broken in str(e.value) and "is not readable TOML" in str(e.value)

    with pytest.raises(ConfigError, match=r"is not readable TOML"):
        parse_args(["--config", str(tmp_path)])  # a folder

    flat = write(tmp_path / "flat.toml", "max_steps = 5\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", flat])
    assert flat in str(e.value) and "'max_steps' must be a [section] table" in str(e.value)


# An interleaved pipeline that validates: 2 pp ranks of 2 chunks, 2 micro-batches per step.
INTERLEAVED = [
    "--parallel.pp",
    "2",
    "--parallel.virtual_stages",
    "2",
    "--train.grad_accum_steps",
    "2",
]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model.d_model", "30", "--model.n_head", "4"],
            "model.d_model (30) must be divisible by model.n_head (4)",
        ),
        (
            ["--model.block_size", "16", "--train.seq_len", "32"],
            "train.seq_len (32) is longer than the model's context model.block_size (16)",
        ),
        (["--train.micro_batch_size", "0"], "train.micro_batch_size = 0 is out of range"),
        (
            ["--parallel.tp", "3", "--model.n_head", "4"],
            "parallel.tp = 3 must divide model.n_head (4)",
        ),
        (
            ["--parallel.pp", "2", "--parallel.schedule", "zigzag"],
            "parallel.schedule must be 1f1b or gpipe, got 'zigzag'",
        ),
        (["--train.dtype", "fp8"], "train.dtype must be float32 or bfloat16"),
        (["--parallel.cuda_aware", "maybe"], "parallel.cuda_aware must be auto, yes or no"),
        (["--parallel.allreduce", "ring"], "parallel.allreduce must be flat, hierarchical or auto"),
        (
            ["--parallel.allreduce", "hierarchical", "--parallel.grad_compression", "powersgd"],
            "parallel.allreduce hierarchical does not combine with parallel.grad_compression "
            "powersgd",
        ),
        (
            [*INTERLEAVED, "--train.grad_accum_steps", "3"],
            "parallel.virtual_stages = 2 (interleaved schedule) needs train.grad_accum_steps (3) "
            "to be a multiple of parallel.pp (2)",
        ),
        (
            [*INTERLEAVED, "--parallel.virtual_stages", "3", "--model.n_layer", "4"],
            "parallel.pp x parallel.virtual_stages = 2 x 3 = 6 chunks but the model has only "
            "model.n_layer = 4 blocks",
        ),
        (
            ["--parallel.virtual_stages", "2"],
            "parallel.virtual_stages = 2 interleaves pipeline stages, but parallel.pp = 1",
        ),
    ],
)
def test_validate_names_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert message in str(e.value)


def numeric_keys(cfg: Config) -> list[str]:
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if f.type in ("int", "float", int, float)
    ]


def test_every_numeric_setting_has_a_range():
    keys = numeric_keys(Config())
    assert len(keys) > 25 and sorted(keys) == sorted(RANGES)
    validate(Config())  # the defaults are in range


def out_of_range_values(key: str) -> list:
    """Values just outside the key's range, and the non-finite ones for a float."""
    r = RANGES[key]
    values = [r.low if r.low_open else r.low - 1]
    if r.high is not None:
        values.append(r.high if r.high_open else r.high + 1)
    if isinstance(getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1]), float):
        values += [math.nan, math.inf, -math.inf]
    return values


@pytest.mark.parametrize("key", sorted(RANGES))
def test_out_of_range_values_name_the_key_value_and_range(key):
    for value in out_of_range_values(key):
        text = str(value).lower()
        with pytest.raises(ConfigError) as e:
            parse_args([f"--{key}", text])
        assert f"{key} = {value}" in str(e.value) and str(RANGES[key]) in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train.eval_batches", "0"], "train.eval_batches = 0 is out of range: it must be >= 1"),
        (["--model.dropout", "1"], "model.dropout = 1.0 is out of range: it must be in [0, 1)"),
        (["--optim.beta2", "1.0"], "optim.beta2 = 1.0 is out of range: it must be in [0, 1)"),
        (["--optim.lr", "0"], "optim.lr = 0.0 is out of range: it must be > 0"),
        (["--optim.lr", "nan"], "optim.lr = nan is out of range: it must be > 0"),
        (["--checkpoint.keep", "-1"], "checkpoint.keep = -1 is out of range: it must be >= 0"),
        (["--optim.lr", "1e-4", "--optim.min_lr", "1e-3"], "optim.min_lr (0.001) must not exceed"),
        (["--run.prompt", ""], "run.prompt is empty but run.sample_tokens is not 0"),
    ],
)
def test_range_messages(args, message):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert message in str(e.value)


def test_zero_means_off_where_documented():
    cfg, _ = parse_args(
        [
            *("--train.eval_every", "0", "--checkpoint.every", "0", "--checkpoint.keep", "0"),
            *("--optim.grad_clip", "0", "--run.watchdog_s", "0", "--run.sample_tokens", "0"),
            *("--run.prompt", "", "--optim.min_lr", "0", "--model.dropout", "0.99"),
        ]
    )
    assert cfg.run.prompt == "" and cfg.optim.grad_clip == 0


def test_check_device_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, _ = parse_args(["--train.device", "cuda"])  # a dry run may plan a GPU job anywhere
    with pytest.raises(ConfigError, match=r"train.device = cuda but this process sees no GPU"):
        check_device(cfg)
    cfg.train.device = "cpu"
    check_device(cfg)


def test_text_that_is_not_utf8_is_refused_naming_the_key_or_file(tmp_path):
    # A command-line argument that was not UTF-8 reaches Python as lone surrogates.
    with pytest.raises(ConfigError, match=r"run\.prompt is not valid UTF-8 text"):
        parse_args(["--run.prompt", b"caf\xe9".decode("utf-8", "surrogateescape")])
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[train]\nmax_steps = 5\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {bad} is not readable TOML")):
        parse_args(["--config", str(bad)])


def test_a_model_that_cannot_fit_is_refused_before_allocating():
    from hpcllm.config import check_memory

    cfg, _ = parse_args(["--model.d_model", "100000", "--model.n_head", "100"])
    cfg.model.vocab_size = 1024
    with pytest.raises(ConfigError, match="the model does not fit: its") as refused:
        check_memory(cfg, {"pp": 1, "dp": 2, "tp": 1}, ranks_on_node=2)
    assert "GiB per rank" in str(refused.value) and "--dry-run" in str(refused.value)
    check_memory(Config(), {"pp": 1, "dp": 2, "tp": 1}, ranks_on_node=2)  # the default fits
