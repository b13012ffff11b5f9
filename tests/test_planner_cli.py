"""`tpext plan` end to end: the command, its JSON and PNG, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpext.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # spawns `python -m tpext plan`
def test_plan_command_writes_json_and_png(tmp_path):
    out = tmp_path / "plan"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpext",
            "plan",
            "--model",
            "llama-7b",
            "--gpu",
            "H100",
            "--tp",
            "1",
            "2",
            "4",
            "--gpus",
            "8",
            "--seq",
            "2048",
            "--sp",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "llama-7b on H100" in proc.stdout and "tok/s/GPU" in proc.stdout
    doc = json.loads((out / "plan.json").read_text())
    assert doc["format"] == "tpext-plan/1" and doc["errors"] == []
    assert doc["command"].startswith("python -m tpext plan --model llama-7b")
    assert [c["tp"] for c in doc["configs"]] == [1, 2, 4]
    assert [c["dp"] for c in doc["configs"]] == [8, 4, 2]
    for c in doc["configs"]:
        assert set(c["memory_GiB"]) == {"weights", "grads", "optimizer", "activations", "kv_cache"}
        assert c["memory_GiB"]["weights"] > 0 and c["compute_ms"] > 0
    assert doc["configs"][0]["comm_per_layer_us"] == 0 and doc["configs"][0]["comm_per_layer"] == {}
    rs = doc["configs"][2]["comm_per_layer"]["reduce_scatter"]
    assert rs["count"] == 4 and rs["payload_bytes"] == 2048 * 4096 * 2
    assert doc["configs"][0]["relative_throughput"]["no_overlap"] == 1
    assert doc["inputs"]["nccl_model"]["protocols"]["simple"]["base_us"] == 8.4  # every constant recorded
    assert doc["inputs"]["gpu"]["gemm_efficiency"] == 0.80
    for c in doc["configs"]:  # both columns relative to the baseline without overlap: overlap never below
        assert c["relative_throughput"]["overlap"] >= c["relative_throughput"]["no_overlap"]
        assert c["overlap_gain"] >= 1.0
        assert set(c["overlap_costs_per_layer_us"]) == {"chunk_latency", "nccl_sms"}
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_reports_what_does_not_fit(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["plan", "--model", "llama-70b", "--tp", "4", "8", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "TP=4 does not fit: needs" in text and "largest term: optimizer" in text
    doc = json.loads(path.read_text())
    assert [c["fits"] for c in doc["configs"]] == [False, False]
    assert "over by" in doc["configs"][0]["not_fitting_reason"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-9b"], "unknown model preset 'llama-9b'; known: llama-3b, llama-7b"),
        (["--model", "llama-7b", "--tp", "3"], "TP=3 does not divide the 32 attention heads"),
        (["--model", "llama-70b", "--tp", "16"], "useful TP is at most the kv head count (8)"),
        (
            ["--model", "llama-7b", "--tp", "4", "--gpus", "6"],
            "--gpus 6 is not a multiple of TP * PP = 4 * 1",
        ),
        (["--calibration", "/nonexistent/cal.json"], "calibration /nonexistent/cal.json: cannot read it"),
    ],
)
def test_plan_errors(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_bad_config_json_names_the_missing_key(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
        )
    )
    assert main(["plan", "--model", str(cfg), "--tp", "1"]) == 2
    assert "missing required key 'vocab_size'" in capsys.readouterr().err
