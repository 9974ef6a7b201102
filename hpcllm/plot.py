"""Loss curves from `metrics.jsonl`: `python -m hpcllm.plot RUN_DIR [RUN_DIR ...]`.

One run: train and validation loss against steps, tokens seen on a second axis, written to
`RUN_DIR/loss.png` (the trainer writes the same picture at every evaluation). Several runs:
their curves overlaid in one picture (`--out`, default `loss.png` here), so runs with different
settings compare at a glance. Where the runs record validation bits per byte, a second panel
shows it: runs with different tokenizers compare there, not in nats per token.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.runtime.rundir import replace_file

METRICS_FILE = "metrics.jsonl"


@dataclass
class Curves:
    """What one run's metrics.jsonl holds, by step (the last record of a step wins)."""

    name: str
    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    val_bpb: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def tokens_per_step(self) -> float | None:
        """Tokens per optimizer step, from the records that carry the running token count."""
        if not self.tokens:
            return None
        step = max(self.tokens)
        return self.tokens[step] / step


def read_metrics(run_dir: str | Path) -> Curves:
    """Parse RUN_DIR/metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {run_dir} a hpcllm run folder?")
    curves = Curves(name=Path(run_dir).name or str(run_dir))
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = int(record["step"])
        if "loss" in record:
            curves.train[step] = float(record["loss"])
        if "val_loss" in record:
            curves.val[step] = float(record["val_loss"])
        if "val_bpb" in record:
            curves.val_bpb[step] = float(record["val_bpb"])
        if "tokens" in record:
            curves.tokens[step] = int(record["tokens"])
    return curves


def plot(runs: list[Curves], out: str | Path) -> Path:
    """Draw the runs' curves into `out` (PNG), atomically: a reader never sees half a file."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    with_bpb = any(r.val_bpb for r in runs)
    fig, axes = plt.subplots(
        1, 2 if with_bpb else 1, figsize=(12 if with_bpb else 7, 4.5), squeeze=False
    )
    ax = axes[0][0]
    for i, run in enumerate(runs):
        color = f"C{i}"
        label = run.name if len(runs) > 1 else ""
        if run.train:
            steps = sorted(run.train)
            ax.plot(
                steps,
                [run.train[s] for s in steps],
                color=color,
                alpha=0.6,
                lw=1,
                label=f"{label} train".strip(),
            )
        if run.val:
            steps = sorted(run.val)
            ax.plot(
                steps,
                [run.val[s] for s in steps],
                color=color,
                marker="o",
                ms=4,
                lw=2,
                label=f"{label} val".strip(),
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # Tokens on a second axis, when every run advances the same number of tokens per step
    # (otherwise one top axis would be wrong for some of them).
    rates = {r.tokens_per_step() for r in runs}
    if len(rates) == 1 and (rate := rates.pop()):
        top = ax.secondary_xaxis("top", functions=(lambda s: s * rate, lambda t: t / rate))
        top.set_xlabel("tokens")
    if with_bpb:
        bx = axes[0][1]
        for i, run in enumerate(runs):
            steps = sorted(run.val_bpb)
            bx.plot(
                steps,
                [run.val_bpb[s] for s in steps],
                color=f"C{i}",
                marker="o",
                ms=4,
                label=run.name,
            )
        bx.set_xlabel("step")
        bx.set_ylabel("validation bits per byte")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    fig.suptitle(", ".join(r.name for r in runs), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    replace_file(out, buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders (each holding metrics.jsonl)")
    parser.add_argument(
        "--out",
        help="the PNG to write (default: RUN_DIR/loss.png for one run, loss.png here for several)",
    )
    args = parser.parse_args(argv)
    try:
        runs = [read_metrics(d) for d in args.run_dirs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(r.train or r.val for r in runs):
        print(f"error: no loss records in {', '.join(args.run_dirs)}", file=sys.stderr)
        return 2
    out = Path(args.out or (Path(args.run_dirs[0]) / "loss.png" if len(runs) == 1 else "loss.png"))
    if out.is_dir():
        out = out / "loss.png"  # --out names a folder: the picture goes into it
    try:
        print(f"wrote {plot(runs, out)}")
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
