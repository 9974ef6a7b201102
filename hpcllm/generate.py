"""`python -m hpcllm.generate`: sample text from a checkpoint (one process, no mpirun needed).

    python -m hpcllm.generate --run-dir runs/default --prompt "def " --tokens 300
    python -m hpcllm.generate --checkpoint runs/default/checkpoints/step_000300

Works with checkpoints of any parallel layout: the shards are merged through meta.json's
index. Refuses a damaged checkpoint or a tokenizer other than the one it was trained with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hpcllm import checkpoint
from hpcllm.config import COUNT, NON_NEGATIVE, POSITIVE, ConfigError, check_text, from_dict
from hpcllm.data.shards import open_shards
from hpcllm.data.tokenizer import load_tokenizer
from hpcllm.models.gpt import GPT


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The whole model from checkpoint folder `path` (every stage's shards merged), and its
    meta.json. Raises checkpoint.CheckpointError (a ValueError) naming a damaged file."""
    meta = checkpoint.read_meta(path)
    m = from_dict(meta["config"]).model
    model = GPT(m)
    # strict=False: a tied LM head is stored once, as the token embedding.
    missing, unexpected = model.load_state_dict(checkpoint.read_model(path, meta), strict=False)
    if unexpected or [k for k in missing if not (m.tie_embeddings and k == "lm_head.weight")]:
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.META}: the index does not match the model of its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval(), meta


def load_run_tokenizer(data_path: str):
    """The tokenizer the shards in `data_path` were made with."""
    with open_shards(data_path, "train") as shards:
        return load_tokenizer(data_path, shards.tokenizer)


def sample(
    model: GPT,
    tokenizer,
    prompt: str,
    tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """`tokens` sampled tokens continuing `prompt`, decoded (prompt included)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokenizer.encode(prompt))], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0].tolist())


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """--run-dir or --checkpoint (which checkpoint), and --data (where its tokenizer is)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--run-dir", default="runs/default", help="use the newest checkpoint of this run"
    )
    where.add_argument("--checkpoint", help="a checkpoint folder (…/checkpoints/step_NNNNNN)")
    parser.add_argument(
        "--data", help="shard folder holding the tokenizer (default: the run's data.path)"
    )


def load_checkpoint(args: argparse.Namespace):
    """(path, model, meta, tokenizer) of the checkpoint that add_checkpoint_options' options
    name, its tokenizer checked against the one it was trained with. Raises ValueError."""
    if args.checkpoint:
        path: Path | None = Path(args.checkpoint)
        if not (Path(args.checkpoint) / "meta.json").is_file():
            raise ValueError(f"{path} is not a complete checkpoint folder (no meta.json)")
    else:
        path, _ = checkpoint.find_latest(args.run_dir)
    if path is None:
        raise ValueError(f"no complete checkpoint under {args.run_dir}/checkpoints")
    model, meta = load_model(path)
    data_path = args.data or meta["config"]["data"]["path"]
    tokenizer = load_run_tokenizer(data_path)
    checkpoint.check_tokenizer(meta["tokenizer"], tokenizer, data_path, path)
    return path, model, meta, tokenizer


def check_options(args: argparse.Namespace) -> None:
    """Refuse sampling options that cannot give sensible text, naming the option."""
    for option, value, allowed in (
        ("--tokens", args.tokens, COUNT),
        ("--temperature", args.temperature, POSITIVE),
        ("--top-k", args.top_k, NON_NEGATIVE),
        ("--num-samples", args.num_samples, COUNT),
        ("--seed", args.seed, NON_NEGATIVE),
    ):
        allowed.check(option, value)
    if not args.prompt:
        raise ConfigError("--prompt is empty: the model needs at least one token to continue")
    check_text("--prompt", args.prompt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.generate", description=__doc__.splitlines()[0]
    )
    add_checkpoint_options(parser)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--top-k", type=int, default=40, help="sample from the k likeliest (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    args = parser.parse_args(argv)

    try:
        check_options(args)
        path, model, meta, tokenizer = load_checkpoint(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"# {path} (step {meta['step']})", file=sys.stderr)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        print(
            sample(
                model,
                tokenizer,
                args.prompt,
                args.tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed + i,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
