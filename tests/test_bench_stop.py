"""The stop benchmark never leaves its 100,000-step jobs behind."""

import subprocess

import pytest

from hpcllm.bench import stop


def test_an_interrupted_measurement_kills_its_job():
    job = stop.Job.__new__(stop.Job)  # only the process matters here
    job.proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with pytest.raises(KeyboardInterrupt), job:
        raise KeyboardInterrupt  # Ctrl-C in the middle of a measurement
    assert job.proc.poll() is not None, "the job outlived the benchmark"
