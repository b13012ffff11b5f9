"""`python -m tpext bench`: a real --quick run on 2 gloo ranks (JSON, PNG, calibration file), the
correctness gate that must stop a wrong implementation before anything is timed, and argument errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from dist import run_ranks

from tpext.cli import main
from tpext.commands.benchmark_layers import (
    IMPLS,
    LAYERS,
    MODES,
    Spec,
    check_close,
    check_layer,
    dense_layer,
    tpext_layer,
)
from tpext.planner.calibration import REQUIRED, from_bench_report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # spawns `python -m tpext bench`
def test_quick_run_writes_checked_results(tmp_path):
    cal = tmp_path / "cal" / "calibration.json"
    cmd = [
        sys.executable,
        "-m",
        "tpext",
        "bench",
        "--quick",
        "--out",
        str(tmp_path),
        "--calibration",
        str(cal),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"tpext bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )

    report = json.loads((tmp_path / "layers.json").read_text())
    assert report["format"] == "tpext-bench-layers/1"
    assert "--quick" in report["command"]
    env_info = report["environment"]
    assert env_info["backend"] == "gloo" and env_info["torch"] == torch.__version__
    assert env_info["threads_per_rank"] == 1 and env_info["commit"]
    rows = report["results"]
    assert {(r["layer"], r["mode"]) for r in rows} == {(lay, m) for lay in LAYERS for m in MODES}
    for r in rows:
        what = f"{r['layer']} {r['mode']}"
        assert r["tp"] == 2, what
        assert set(r["ms"]) == set(IMPLS) and all(v > 0 for v in r["ms"].values()), what
        assert r["correct"] == {k: True for k in IMPLS}, what
        assert all(0 <= v <= 1 for v in r["max_error_ratio"].values()), what
        assert r["napkin_ms"] > 0 and r["napkin_ms"] == max(r["t_gemm_ms"], r["t_comm_ms"]), what
        assert r["speedup_vs_torch_tp"] == pytest.approx(r["ms"]["torch_tp"] / r["ms"]["tpext"]), what
    # Column layers without SP have no forward collective; every other case communicates.
    for r in rows:
        no_comm = r["layer"] == "column" and r["mode"] == "fwd"
        assert (r["t_comm_ms"] == 0) == no_comm, f"{r['layer']} {r['mode']}: t_comm_ms {r['t_comm_ms']}"
    assert "tpext bench" in proc.stdout and "mlp_sp" in proc.stdout

    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG_MAGIC

    calibration = json.loads(cal.read_text())
    assert set(calibration) == set(REQUIRED)
    assert calibration["format"] == "tpext-calibration/1"
    assert calibration["device"] == report["device"] and calibration["device"].startswith("cpu-")
    assert calibration["source"] == report["command"]
    assert set(calibration["matmul_tflops"]) == {"float32", "bfloat16"}
    assert calibration["matmul_tflops"]["float32"] > 0 and calibration["matmul_tflops"]["bfloat16"] is None
    assert calibration["allreduce_bus_GBps"] > 0 and calibration["collective_latency_us"] > 0
    assert calibration["memory_GiB"] > 0 and calibration["gpus_per_node"] == 2
    assert calibration == from_bench_report(report)  # what the planner reads from the report itself


def test_check_close_tolerance():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 64, generator=g, dtype=torch.float64)
    dense = (ref + 1e-6 * torch.randn(64, 64, generator=g, dtype=torch.float64)).float()
    dense_err = (dense.double() - ref).abs().max().item()
    err, tol = check_close(dense, ref, dense_err)
    assert err <= tol
    bad = dense.clone()
    bad[3, 5] += 10 * dense_err
    err, tol = check_close(bad, ref, dense_err)
    assert err > tol
    with pytest.raises(ValueError, match=r"shape \(64, 63\)"):
        check_close(dense[:, :63], ref, dense_err)


def _check_catches_wrong_shard():
    rank, world = tdist.get_rank(), tdist.get_world_size()
    spec = Spec("mlp_sp", tokens=8, hidden=4, ffn=12)
    dense = dense_layer(spec, seed=0)
    good, broken = tpext_layer(dense, spec, "auto"), tpext_layer(dense, spec, "auto")
    if rank == 1:  # one rank's shard of the second weight is off by a little
        with torch.no_grad():
            broken[2].weight[0, 0] += 1e-3
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    return check_layer(spec, dense, {"good": good, "broken": broken}, x, dy, rank, world)


def test_correctness_gate_names_the_wrong_implementation():
    (ratios0, failures0), (ratios1, failures1) = run_ranks(_check_catches_wrong_shard, 2)
    assert ratios0["good"] <= 1 and ratios1["good"] <= 1
    assert ratios1["broken"] > 1 and failures1
    # The forward output of every rank depends on rank 1's weight; grads of rank 1's shard do too.
    assert any(m.startswith("broken on mlp_sp") and "y differs" in m for m in failures1)
    assert any("broken" in m and "rank 0" in m for m in failures0)
    assert not any(m.startswith("good") for m in failures0 + failures1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "65x32", "--tp", "2"], "needs tokens and ffn"),
        (["--layers", "mlp", "attention"], "unknown attention"),
        (["--reps", "0"], "--reps must be >= 1"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert message in str(exc.value)


def test_bad_size_format(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "2048by512"])
    assert "expected TOKENSxHIDDEN such as 2048x512, got '2048by512'" in capsys.readouterr().err
