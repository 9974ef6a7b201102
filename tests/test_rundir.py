"""The run folder: nothing outside it is written through a link planted in it, and a full disk
under metrics.jsonl costs a warning, not the run or a logged step."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from hpcllm import checkpoint
from hpcllm.runtime.rundir import ENTRIES, FOLDERS, MetricsLog, RunDir, replace_file

from helpers import prepare_data, refusal

# Every name a run writes in its folder, in checkpoints/ and in heartbeat/, including the
# temporaries older versions wrote there.
PLANTED = [
    *ENTRIES,
    *FOLDERS,
    "checkpoints/latest",
    "checkpoints/latest.tmp",
    "checkpoints/step_000002",
    "heartbeat/rank-000000.json",
    "status.tmp",
]


@pytest.fixture
def outside(tmp_path):
    """A file outside the run folder that must never change."""
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text("keep me\n")
    return target


@pytest.mark.parametrize("name", PLANTED)
def test_a_link_in_the_run_folder_is_refused_naming_it(tmp_path, outside, name):
    run_dir = tmp_path / "run"
    link = run_dir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    if name == "status.tmp":  # no longer written: harmless, and not refused
        RunDir(run_dir).write_status({"state": "complete"})
        assert not (run_dir / "status.json").is_symlink()
    else:
        with pytest.raises(ValueError, match=f"{link} is a symbolic link \\(to {outside}\\)"):
            RunDir(run_dir)
    assert outside.read_text() == "keep me\n"


def test_replace_file_never_writes_through_a_link(tmp_path, outside):
    path = tmp_path / "latest"
    path.symlink_to(outside)
    (tmp_path / f".latest.{os.getpid()}.tmp").symlink_to(outside)  # its temporary's name too
    replace_file(path, "step_000004\n")
    assert not path.is_symlink() and path.read_text() == "step_000004\n"
    assert outside.read_text() == "keep me\n"


def test_checkpoint_latest_is_replaced_not_followed(tmp_path, outside):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "meta.json").write_text("{}")
    (root / "latest").symlink_to(outside)
    checkpoint.set_aside(root / "step_000004", "diverged")  # rewrites latest
    assert (root / "latest").read_text() == "step_000002\n"
    assert outside.read_text() == "keep me\n"


def test_metrics_wait_through_a_full_disk_and_none_is_lost(tmp_path, monkeypatch, capsys):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1})
    real_write, full = os.write, [True]

    def write(fd, data):
        if fd == log.fd and full[0]:
            real_write(fd, data[:5])  # half a line reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    log.write({"step": 2})
    log.write({"step": 3})
    out = capsys.readouterr().out
    assert out.count("warning: cannot append to") == 1 and "No space left on device" in out
    full[0] = False
    log.write({"step": 4})
    assert "written again, with 2 waiting record(s)" in capsys.readouterr().out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"step": 1}', '{"step": 2}', '{"step": 3}', '{"step": 4}']


def test_metrics_on_a_really_full_file_system(tmp_path):
    """A tmpfs filled to the last byte, then emptied: every record arrives, in order."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the test above covers it"
        )
    log = None
    try:
        log = MetricsLog(mount / "metrics.jsonl")
        log.write({"step": 1})
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 4096)
        for step in (2, 3):
            log.write({"step": step, "pad": uuid.uuid4().hex * 200})  # more than a page
        assert len(log.waiting) == 2
        filler.unlink()
        log.write({"step": 4})
        steps = [line.split(",")[0] for line in (mount / "metrics.jsonl").read_text().splitlines()]
        assert steps == ['{"step": 1}', '{"step": 2', '{"step": 3', '{"step": 4}']
    finally:
        if log is not None:
            os.close(log.fd)
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_with_a_planted_link_is_refused_naming_it(tmp_path, outside):
    """hpcllm.train's start-up (in process) refuses the run, naming the link; nothing is
    written through it."""
    data_dir = prepare_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(outside)
    message = refusal({"data.path": data_dir, "run.dir": run_dir, "train.max_steps": 2})
    assert f"{run_dir / 'metrics.jsonl'} is a symbolic link" in message, message
    assert outside.read_text() == "keep me\n"
