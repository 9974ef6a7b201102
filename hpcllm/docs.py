"""What the code already knows, written out for people: the configuration reference
(`python -m hpcllm.train --help` and docs/configuration.md) from the config's field
docstrings and ranges, and the dry-run examples of the docs from the planner itself.

    python -m hpcllm.docs            # rewrite docs/configuration.md and the dry-run examples
    python -m hpcllm.docs --check    # exit 1 naming each file that is not current

A dry-run example in a Markdown file is the line `<!-- ci:dry-run -->`, then a code block
holding one `python -m hpcllm.train --dry-run ...` command, then a code block holding what
it prints. Nothing here imports torch until a dry run is computed, so `--help` is instant
and starts no MPI.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from hpcllm.config import RANGES, Config

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path("docs/configuration.md")
DRY_RUN_MARKER = "<!-- ci:dry-run -->"
TRAIN = "python -m hpcllm.train"

USAGE = f"""\
usage: {TRAIN} [--config FILE] [--section.key VALUE ...]
       {TRAIN} --dry-run [--world-size N] [--section.key VALUE ...]
       mpirun -np N {TRAIN} [...]

Every rank runs the same command. Settings resolve in order: the defaults below, then the TOML
file of --config (one [section] table per section), then --section.key VALUE (or
--section.key=VALUE) on the command line. Unknown keys and values of the wrong type or outside
their range are refused, naming the key.

options:
  -h, --help      print this text and exit
  --config FILE   a TOML file of settings
  --dry-run       print the rank layout and every rank's memory and traffic, then exit (one
                  process, no mpirun needed)
  --world-size N  with --dry-run: plan for N ranks (default: the ranks launched)"""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), read from
    its source: Python keeps no such docstrings at run time."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]  # the one ClassDef of the source
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def class_doc(cls: type) -> str:
    """The class's own docstring as written (a dataclass without one gets a generated
    signature as its __doc__, which is not wanted here)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    doc = ast.get_docstring(tree.body[0])  # type: ignore[arg-type]  # the one ClassDef
    return " ".join((doc or "").split())


@dataclass(frozen=True, slots=True)
class Setting:
    section: str
    key: str
    type: str
    default: str  # as TOML writes it
    range: str  # config.RANGES' entry, "" for none
    meaning: str

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def settings() -> list[Setting]:
    """Every configuration key, section by section, in the order of the dataclasses."""
    cfg = Config()
    rows = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        docs = field_docs(type(values))
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            name = f"{section.name}.{f.name}"
            rows.append(
                Setting(
                    section=section.name,
                    key=f.name,
                    type=type(value).__name__,
                    default=json.dumps(value),
                    range=str(RANGES[name]) if name in RANGES else "",
                    meaning=docs.get(f.name, ""),
                )
            )
    return rows


def sections() -> dict[str, str]:
    """Each section's name and its class docstring."""
    return {f.name: class_doc(type(getattr(Config(), f.name))) for f in dataclasses.fields(Config)}


def train_help() -> str:
    """`python -m hpcllm.train --help`: usage, then every key with its default, range and meaning."""
    lines = [USAGE]
    titles = sections()
    section = None
    for s in settings():
        if s.section != section:
            section = s.section
            lines += ["", f"[{section}]  {titles[section]}".rstrip()]
        limits = f"; {s.range}" if s.range else ""
        lines.append(f"  --{s.name} {s.type.upper()}  (default {s.default}{limits})")
        lines += textwrap.wrap(s.meaning, 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def configuration_md() -> str:
    """docs/configuration.md: one table per section."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m hpcllm.docs` from the field docstrings of hpcllm/config.py",
        "and hpcllm/models/config.py and from config.RANGES: edit those, not this file. -->",
        "",
        "Every setting is a key of a section, set in a TOML file (`--config FILE`, one `[section]`",
        "table each) or on the command line as `--section.key VALUE`; the command line wins over",
        "the file, the file over the defaults. `python -m hpcllm.train --help` prints the same.",
        "A numeric value outside its range, an unknown key, or a value of the wrong type is",
        "refused at start-up with one line naming the key. Defaults are those of a training job",
        "(`Config()`): the `[model]` defaults are the llama of the default job.",
    ]
    titles = sections()
    section = None
    for s in settings():
        if s.section != section:
            section = s.section
            out += ["", f"## `[{section}]`", ""]
            if titles[section]:
                out += [titles[section], ""]
            out += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        out.append(
            f"| `{s.name}` | {s.type} | `{_cell(s.default)}` | {_cell(s.range)} "
            f"| {_cell(s.meaning)} |"
        )
    return "\n".join(out) + "\n"


def dry_run_output(command: str) -> str:
    """What `command`, a `python -m hpcllm.train --dry-run --world-size N ...` line that sets
    model.vocab_size (so it needs no data), prints."""
    from hpcllm import planner  # torch: only for the examples, not for --help
    from hpcllm.config import parse_args

    words = shlex.split(command.replace("\\\n", " "))
    prefix = TRAIN.split()
    if words[: len(prefix)] != prefix:
        raise ValueError(f"a dry-run example must be a `{TRAIN}` command: {command!r}")
    cfg, options = parse_args(words[len(prefix) :])
    if not (options["dry_run"] and options["world_size"] and cfg.model.vocab_size):
        raise ValueError(
            f"a dry-run example needs --dry-run, --world-size and --model.vocab_size: {command!r}"
        )
    return planner.dry_run(cfg, options["world_size"], default_data="")


# The marker, a fenced block (the command), then a fenced block (its output).
_EXAMPLE = re.compile(
    "^"
    + re.escape(DRY_RUN_MARKER)
    + r"\n```(?P<lang>[a-z]*)\n(?P<command>.*?)\n```\n```\n(?P<output>.*?)\n```",
    re.DOTALL | re.MULTILINE,
)


def count_examples(text: str) -> int:
    """The dry-run markers of `text` (each on a line of its own)."""
    return len(re.findall(rf"^{re.escape(DRY_RUN_MARKER)}$", text, re.MULTILINE))


def refresh_examples(text: str) -> str:
    """`text` with the output block of every dry-run example recomputed."""
    if count_examples(text) != len(_EXAMPLE.findall(text)):
        raise ValueError(
            f"each {DRY_RUN_MARKER} marker must be followed by a command block and an output block"
        )
    return _EXAMPLE.sub(
        lambda m: (
            f"{DRY_RUN_MARKER}\n```{m['lang']}\n{m['command']}\n```\n```\n"
            f"{dry_run_output(m['command'])}\n```"
        ),
        text,
    )


def generated(root: Path = REPO) -> dict[Path, str]:
    """Every generated file and every Markdown file with dry-run examples: its current text."""
    files = {root / REFERENCE: configuration_md()}
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if path in files:
            continue
        text = path.read_text()
        if DRY_RUN_MARKER in text:
            files[path] = refresh_examples(text)
    return files


def stale(root: Path = REPO) -> list[Path]:
    """The files whose text differs from what `python -m hpcllm.docs` would write."""
    return [
        path
        for path, text in generated(root).items()
        if not path.exists() or path.read_text() != text
    ]


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print("usage: python -m hpcllm.docs [--check]", file=sys.stderr)
        return 2
    if argv == ["--check"]:
        old = stale()
        for path in old:
            print(f"{path.relative_to(REPO)} is not current: run python -m hpcllm.docs")
        return 1 if old else 0
    for path, text in generated().items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
