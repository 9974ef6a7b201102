"""Docs that stay true: the generated configuration reference, the README's stated defaults and
the dry-run examples are compared with what the code says now (in-process, no MPI)."""

import dataclasses
import re
import subprocess
import sys

from hpcllm import docs
from hpcllm.config import Config, _coerce

from helpers import REPO, subprocess_env


def test_every_setting_has_a_meaning():
    missing = [s.name for s in docs.settings() if not s.meaning]
    assert not missing, f"config fields without a docstring: {missing}"
    assert all(docs.sections().values()), docs.sections()


def test_field_docs_reads_the_docstring_under_each_field():
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """First line,
        second line."""
        b: int = 2
        c: str = "x"
        """C."""

    assert docs.field_docs(Example) == {"a": "First line, second line.", "c": "C."}


def test_the_configuration_reference_is_current():
    path = REPO / docs.REFERENCE
    assert path.read_text() == docs.configuration_md(), (
        f"{docs.REFERENCE} is not current: run python -m hpcllm.docs"
    )


def test_the_dry_run_examples_print_what_the_planner_prints():
    examples = 0
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        examples += docs.count_examples(text)
        assert docs.refresh_examples(text) == text, (
            f"{path.name}: a dry-run example's output is not current: run python -m hpcllm.docs"
        )
    assert examples >= 1


def test_the_readme_defaults_are_the_configs():
    """The README's table of the default job (after <!-- ci:defaults -->) equals Config()."""
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- ci:defaults -->\n", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| ([^|]+?) \|", table, re.MULTILINE)
    assert len(rows) >= 8, table
    cfg = Config()
    for section, key, stated in rows:
        default = getattr(getattr(cfg, section), key)
        assert _coerce(f"{section}.{key}", stated.strip("` "), default) == default, (
            f"README says {section}.{key} = {stated}, Config() has {default!r}"
        )


def test_help_lists_every_key_without_starting_mpi_or_torch():
    text = docs.train_help()
    for s in docs.settings():
        assert f"--{s.name} {s.type.upper()}  (default {s.default}" in text, s.name
        assert s.range in text and s.meaning.split()[0] in text
    # The CLI prints it and exits 0 before the watchdog, MPI or torch load.
    probe = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('hpcllm.train', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, [m for m in ('torch', 'mpi4py.MPI') if m in sys.modules])\n"
    )
    for flag in ("--help", "-h"):
        out = subprocess.run(
            [sys.executable, "-c", probe, "--train.max_steps", "3", flag],
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout == text + "\nexit 0 []\n", out


def test_the_readme_layout_names_every_module():
    """The README's layout of the code (after <!-- ci:layout -->) lists every module."""
    text = (REPO / "README.md").read_text()
    layout = text.split("<!-- ci:layout -->\n", 1)[1].split("\n```\n", 1)[0]
    package = REPO / "hpcllm"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if path.name == "__init__.py" or relative.parts[0] == "bench":
            continue  # bench/ is listed as a folder of subjects
        # A module of a package folder is named after its folder: its file name suffices.
        name = path.name if len(relative.parts) > 1 else relative.as_posix()
        if f" {name}" not in layout and f" {name}," not in layout:
            missing.append(relative.as_posix())
    assert not missing, f"README's layout of the code lacks {missing}"
