"""`python -m hpcllm.generate`: sample text from a checkpoint (one process, no mpirun needed).

    python -m hpcllm.generate --run-dir runs/default --prompt "def " --tokens 300
    python -m hpcllm.generate --checkpoint runs/default/checkpoints/step_000300

Works with checkpoints of any parallel layout: the stage files are merged by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hpcllm import checkpoint
from hpcllm.config import from_dict
from hpcllm.data.shards import open_shards
from hpcllm.data.tokenizer import load_tokenizer
from hpcllm.model import GPT


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The whole model from checkpoint folder `path`, and its meta.json."""
    meta = checkpoint.read_meta(path)
    model = GPT(from_dict(meta["config"]).model)
    weights = {}
    for f in sorted(path.glob("model-pp*.pt")):
        weights.update(torch.load(f, map_location=device, weights_only=True))
    model.load_state_dict(weights)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.generate", description=__doc__.splitlines()[0]
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--run-dir", default="runs/default", help="use the newest checkpoint of this run"
    )
    where.add_argument("--checkpoint", help="a checkpoint folder (…/checkpoints/step_NNNNNN)")
    parser.add_argument(
        "--data", help="shard folder holding the tokenizer (default: the run's data.path)"
    )
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    args = parser.parse_args(argv)

    try:
        if args.checkpoint:
            path: Path | None = Path(args.checkpoint)
            if not (Path(args.checkpoint) / "meta.json").is_file():
                raise ValueError(f"{path} is not a complete checkpoint folder (no meta.json)")
        else:
            path, _ = checkpoint.find_latest(args.run_dir)
        if path is None:
            raise ValueError(f"no complete checkpoint under {args.run_dir}/checkpoints")
        model, meta = load_model(path)
        tokenizer = load_run_tokenizer(args.data or meta["config"]["data"]["path"])
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
