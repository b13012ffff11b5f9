"""`python -m tpext demo` (and the `tpext` console script): the main job, end to end on 2 gloo ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here spawns `python -m tpext demo` processes

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_demo_trains_and_matches_dense():
    out = _run([sys.executable, "-m", "tpext", "demo", "--sp"])
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "loss check: OK" in text
    assert "tp=2 dp=1 sp=True" in text
    for line in (
        "memory per rank",
        "rank 0",
        "rank 1",
        "communication of one step",
        "layer 0",
        "layer 1",
        "forward all_gather",
        "backward reduce_scatter",
        "step time",
    ):
        assert line in text, f"{line!r} missing from the demo output:\n{text}"


def test_demo_exits_nonzero_when_the_loss_check_fails():
    # Tensor-parallel sums are ordered differently from the dense ones, so fp32 losses differ in the last
    # bits and a zero tolerance must fail.
    out = _run([sys.executable, "-m", "tpext", "demo", "--steps", "2", "--rtol", "0"])
    assert out.returncode != 0, out.stdout + out.stderr
    assert "loss check: FAILED" in out.stdout


@pytest.mark.skipif(shutil.which("tpext") is None, reason="the tpext console script is not installed")
def test_console_script():
    out = _run(["tpext", "demo", "--help"])
    assert out.returncode == 0 and "--sp" in out.stdout
