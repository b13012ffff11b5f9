"""Soundness properties of the `tpext plan` cost model, calibration from a bench report, and the
predicted-vs-published table of docs/planner.md (pure Python: no torch, no ranks)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest

from tpext.cli import main
from tpext.planner import cost_model as cm
from tpext.planner.calibration import apply_calibration, load_calibration
from tpext.planner.compare import CASES, comparison_markdown, comparison_rows
from tpext.planner.estimate import Workload, _Net, estimate
from tpext.planner.presets import NCCL_PROTOCOLS, gpu_preset, inter_node_preset, model_preset, resolve_model

ROOT = Path(__file__).resolve().parents[1]
NDR = inter_node_preset("ib-ndr400")


# ------------------------------------------------------------------------------- soundness properties
GRID = list(
    itertools.product(
        ("llama-3b", "llama3-8b", "llama3-70b", "gpt3-175b"),
        (1, 2, 4, 8, 16),
        ("H100", "H200", "A100"),
        (False, True),
        ("train", "prefill", "decode"),
    )
)


def _estimate(model: str, tp: int, gpu: str, sp: bool, mode: str, **workload) -> dict:
    """The estimate of one GRID point: seq 2048, micro-batch 2, SP where the mode has a sequence to split."""
    w = Workload(
        mode=mode,
        seq=2048,
        micro_batch=2,
        sequence_parallel=sp and mode != "decode",
        allow_kv_replication=True,
        **workload,
    )
    return estimate(model_preset(model), gpu_preset(gpu), NDR, w, tp)


@pytest.mark.parametrize("model,tp,gpu,sp,mode", GRID)
def test_auto_overlap_is_never_slower_than_no_overlap(model, tp, gpu, sp, mode):
    r = _estimate(model, tp, gpu, sp, mode)
    assert r["step_s"]["overlap"] <= r["step_s"]["no_overlap"] * (1 + 1e-12)
    assert r["layer"]["exposed_comm_overlap_s"] <= r["layer"]["comm_s"] * (1 + 1e-12)
    assert r["layer"]["exposed_comm_overlap_s"] >= -1e-15  # overlap never hides more than the comm
    if tp == 1:
        assert r["layer"]["comm_s"] == 0 and r["step_s"]["overlap"] == r["step_s"]["no_overlap"]


@pytest.mark.parametrize(
    "model,tp,gpu,sp,mode,chunks",
    [(m, tp, g, sp, mode, c) for (m, tp, g, sp, mode), c in itertools.product(GRID[::3], (2, 8)) if tp > 1],
)
def test_explicit_chunks_lose_at_most_the_named_costs(model, tp, gpu, sp, mode, chunks):
    layer = _estimate(model, tp, gpu, sp, mode, chunks=chunks)["layer"]
    costs = layer["overlap_costs_s"]
    assert costs["nccl_sms"] >= 0
    # the loss against no overlap is bounded by the one cost that can make it: splitting the collective
    assert layer["exposed_comm_overlap_s"] - layer["comm_s"] <= costs["chunk_latency"] + 1e-12


@pytest.mark.parametrize("sms", (0, 16, 64))
def test_without_latency_overlap_never_loses_whatever_the_sms(sms):
    """A latency-free network (a calibration measuring 0 us): splitting costs nothing, and the SMs NCCL
    takes only shrink what overlap hides (a stage is at most GEMM chunk + collective chunk), so every chunk
    count is at least as fast as no overlap, and more SMs taken never hide more."""
    hidden = {}
    for taken in (0, sms):
        gpu = dataclasses.replace(gpu_preset("H100"), measured_latency_us=0.0, nccl_sms=taken)
        for tp, chunks, sp in itertools.product((2, 8), (2, 4, 8), (False, True)):
            w = Workload(seq=1024, chunks=chunks, sequence_parallel=sp)
            layer = estimate(model_preset("llama3-8b"), gpu, NDR, w, tp)["layer"]
            assert layer["overlap_costs_s"]["chunk_latency"] == pytest.approx(0.0, abs=1e-15)
            assert layer["exposed_comm_overlap_s"] <= layer["comm_s"] + 1e-15
            hidden[taken, tp, chunks, sp] = layer["comm_s"] - layer["exposed_comm_overlap_s"]
    for (_taken, *rest), value in hidden.items():
        assert value <= hidden[(0, *rest)] + 1e-15


def test_a_slower_explicit_schedule_is_explained(capsys):
    assert (
        main(["plan", "--model", "llama-7b", "--tp", "8", "--chunks", "8", "--mode", "decode", "--mbs", "16"])
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(
        r"TP=8: overlap with --chunks 8 is slower than none by \d+ us per layer: splitting each "
        r"collective adds \d+ us of latency, more than the GEMMs beside it hide",
        out,
    )
    assert main(["plan", "--model", "llama-7b", "--tp", "8", "--mode", "decode", "--mbs", "16"]) == 0
    assert "slower than none" not in capsys.readouterr().out  # auto: never slower, nothing to explain


@pytest.mark.parametrize(
    "gemm,comm,lat,chunks,f",
    itertools.product(
        (0.0, 1e-5, 1e-4, 1e-3),
        (1e-6, 1e-4, 1e-3),
        (0.0, 5e-6, 5e-5),
        (1, 2, 4, 8),
        (0.0, 16 / 132, 0.5, 0.9),
    ),
)
def test_overlap_loses_only_what_its_named_costs_explain(gemm, comm, lat, chunks, f):
    """An explicit chunk count may be slower than sequential, but by no more than its named cost: one
    collective latency per extra chunk. The SMs the collective takes from the GEMM beside it (f < 1) only
    shrink what is hidden: a stage never takes longer than its GEMM chunk plus its collective chunk."""
    sequential = gemm + comm + lat
    t = cm.overlapped_time_s(gemm, comm / chunks + lat, chunks, f)
    assert t <= sequential + (chunks - 1) * lat + 1e-15
    if lat == 0 and f == 0:
        assert t <= sequential + 1e-15  # free chunks: never slower
    assert t >= max(gemm, comm) - 1e-15  # and never better than the napkin
    assert cm.overlapped_time_s(gemm, comm + lat, 1, f) == pytest.approx(sequential)


def test_sm_cost_hand_computed():
    # GEMM 4, collective 2 in 4 chunks of 0.5, NCCL holding a quarter of the SMs: each overlapped stage is
    # the GEMM chunk (1) plus the quarter of the collective's time it lost (0.125).
    assert cm.overlapped_time_s(4.0, 0.5, 4, 0.25) == 1.0 + 3 * 1.125 + 0.5
    # a collective longer than the slowed GEMM chunk sets the pace: max(c, g + f c)
    assert cm.overlapped_time_s(1.0, 2.0, 2, 0.25) == 0.5 + 2.0 + 2.0


@pytest.mark.parametrize("kind", ("all_reduce", "reduce_scatter", "all_gather"))
@pytest.mark.parametrize("n,nodes", ((2, 1), (4, 1), (8, 1), (16, 2), (32, 4)))
def test_nccl_model_bounds(kind, n, nodes):
    bus = 400.0
    times = [
        sum(cm.nccl_ring_time_s(kind, p, n, nodes, bus, NCCL_PROTOCOLS, net_step_us=9.6))
        for p in (1e3, 1e5, 1e7, 1e9)
    ]
    assert times == sorted(times)  # more bytes never faster
    for p, t in zip((1e3, 1e5, 1e7, 1e9), times):
        assert t >= cm.collective_wire_bytes_per_gpu(kind, p, n) / (bus * 1e9)  # bus bandwidth bound
    # a 1 GB message nearly reaches the bus bandwidth: the Simple protocol's latency is a small share
    assert times[-1] <= 1.15 * cm.collective_wire_bytes_per_gpu(kind, 1e9, n) / (bus * 1e9)


def test_nccl_model_hand_computed():
    p = 4096 * 3200 * 2  # one [T, h] activation of llama-3b at seq 4096
    # 8 GPUs, one node: Simple wins; latency 8.4 + 14 steps x 3.4 us; 2 (n-1)/n of the payload at 460 GB/s
    bw, lat = cm.nccl_ring_time_s("all_reduce", p, 8, 1, 460.0, NCCL_PROTOCOLS)
    assert (bw, lat) == (pytest.approx(1.75 * p / 460e9), pytest.approx(56e-6))
    # 16 GPUs on two nodes: 28 NVLink steps + 2 network steps, x1.9 for a multi-node Simple all-reduce;
    # bus bandwidth min(460, 8 NICs x 50 GB/s)
    bw, lat = cm.nccl_ring_time_s(
        "all_reduce", p, 16, 2, 400.0, NCCL_PROTOCOLS, net_step_us=9.6, multinode_ring_factor=1.9
    )
    assert (bw, lat) == (pytest.approx(1.875 * p / 400e9), pytest.approx((8.4 + 28 * 3.4 + 2 * 9.6) * 1.9e-6))
    # a 4 KB all-reduce takes LL: 3.6 + 14 x 0.47 us, at a quarter of the bandwidth
    bw, lat = cm.nccl_ring_time_s("all_reduce", 4096, 8, 1, 460.0, NCCL_PROTOCOLS)
    assert (bw, lat) == (pytest.approx(1.75 * 4096 / 115e9), pytest.approx((3.6 + 14 * 0.47) * 1e-6))
    # the planner's network for these groups gives the same numbers
    net = _Net(gpu_preset("H100"), NDR, 8)
    assert sum(net.time_s("all_reduce", p, 16)) == pytest.approx(1.875 * p / 400e9 + 233.32e-6)


def test_crossing_a_node_costs_more_per_byte_than_staying_inside():
    h100 = gpu_preset("H100")
    for tp_in, tp_out in ((8, 16),):
        r_in = estimate(model_preset("llama-7b"), h100, NDR, Workload(), tp_in)["layer"]
        r_out = estimate(model_preset("llama-7b"), h100, NDR, Workload(), tp_out)["layer"]
        assert r_out["comm_s"] > r_in["comm_s"]


@pytest.mark.parametrize("m,n", ((4096, 4096), (4096, 400), (12, 8192), (128, 128), (1, 1)))
def test_wave_efficiency_is_a_fraction(m, n):
    e = cm.wave_efficiency(m, n, 132)
    assert 0 < e <= 1
    assert cm.wave_efficiency(m, n, 0) == 1.0
    assert cm.wave_efficiency(128 * 132, 128, 132) == 1.0  # whole waves: nothing idle


def test_gemm_efficiency_only_slows_a_gemm():
    spec = cm.gemm_time_s(8192, 8192, 8192, 2, 989.0, 3350.0)
    real = cm.gemm_time_s(8192, 8192, 8192, 2, 989.0, 3350.0, sms=132, efficiency=0.8)
    assert real >= spec / 0.8 * 0.999


# ----------------------------------------------------------------- calibration from the bench output
def _bench_report(tmp_path, *, bf16=650.0, bus=380.0, latency=22.0):
    """A synthetic `tpext bench` report in the tpext-bench-layers/1 format, as a GPU would write it."""

    def probe(scale):
        return {
            "gemm_n": 8192,
            "matmul_tflops": {"float32": 50.0, "bfloat16": bf16 * scale},
            "allreduce": {
                "sweep": [{"bytes": 1 << 20, "time_us": 40.0, "bus_GBps": 45.0}],
                "latency_us": latency * scale,
                "bus_GBps": bus * scale,
            },
        }

    report = {
        "format": "tpext-bench-layers/1",
        "command": "python -m tpext bench --calibration x.json",
        "device": "nvidia-h100-80gb-hbm3",
        "config": {"backend": "nccl", "tp": [2, 8]},
        "environment": {"memory_GiB": 79.1, "local_ranks": 8, "torch": "2.11.0+cu130"},
        "probes": {"2": probe(0.5), "8": probe(1.0)},
        "results": [],
    }
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(report))
    return path


def test_bench_report_feeds_straight_in(tmp_path):
    cal = load_calibration(_bench_report(tmp_path))
    assert cal.device == "nvidia-h100-80gb-hbm3" and cal.gpus_per_node == 8
    assert cal.matmul_tflops["bfloat16"] == 650.0 and cal.allreduce_bus_GBps == 380.0  # the largest group
    assert cal.collective_latency_us == 22.0 and cal.memory_GiB == 79.1
    h100 = gpu_preset("H100")
    gpu = apply_calibration(h100, cal)
    model, w = model_preset("llama-7b"), Workload(seq=4096)
    spec_r, cal_r = estimate(model, h100, NDR, w, 8), estimate(model, gpu, NDR, w, 8)
    # measured figures replace the public curves: the GEMM runs at the measured 650, not 989 x 0.80
    ratio = cal_r["layer"]["gemm_fwd_s"]["gate_up"] / spec_r["layer"]["gemm_fwd_s"]["gate_up"]
    assert ratio == pytest.approx(989.0 * h100.gemm_efficiency / 650.0)
    assert cal_r["layer"]["gemm_efficiency"] == 1.0
    bw = cal_r["layer"]["collectives"]["all_reduce"]
    payload = 4096 * 4096 * 2
    expected = 4 * (2 * 7 / 8 * payload / 380e9 + 22e-6)
    assert bw["time_s"] == pytest.approx(expected)


def test_bench_report_through_the_command(tmp_path, capsys):
    path = _bench_report(tmp_path)
    assert main(["plan", "--calibration", str(path), "--tp", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "nvidia-h100-80gb-hbm3" in out and f"calibration {path}" in out


def test_bench_report_missing_probe_is_named(tmp_path):
    path = _bench_report(tmp_path)
    data = json.loads(path.read_text())
    del data["probes"]["8"]["allreduce"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layers.json: a tpext-bench-layers/1 report lacks 'allreduce'"):
        load_calibration(path)


def test_committed_cpu_bench_report_loads():
    cal = load_calibration(ROOT / "bench/results/cpu-amd-epyc-2cores/layers.json")
    assert cal.device == "cpu-amd-epyc-2cores" and cal.allreduce_bus_GBps > 0


# ------------------------------------------------------------------- predicted against published
def test_docs_table_is_the_regenerated_one():
    """docs/planner.md carries comparison_markdown() verbatim: a model change that moves a prediction
    must regenerate the table (python -c 'from tpext.planner.compare import comparison_markdown as c;
    print(c())')."""
    text = (ROOT / "docs/planner.md").read_text()
    block = re.search(r"<!-- comparison:begin -->\n(.*?)\n<!-- comparison:end -->", text, re.DOTALL)
    assert block, "docs/planner.md lost its comparison block markers"
    assert block.group(1) == comparison_markdown()


def test_published_figures_are_not_model_inputs():
    """The cases hold published values and configurations only; the GPU presets they run on are the same
    objects `tpext plan` uses (nothing per case)."""
    for case in CASES:
        assert set(case.workload) <= {"seq", "micro_batch", "sequence_parallel", "dtype", "mode"}
        for override in case.per_tp.values():
            assert set(override) <= {"micro_batch"}


def test_rows_and_errors():
    rows = comparison_rows()
    assert {r["case"] for r in rows} == {c.name for c in CASES}
    for r in rows:
        assert r["error_points"] == pytest.approx(100 * (r["predicted"] - r["published"]))
    # the first TP of a relative case is the baseline
    assert all(r["predicted"] == 1.0 for r in rows if r["metric"] != "overlap_gain" and r["published"] == 1.0)


# ------------------------------------------------------------------------------------------- MoE
MIXTRAL = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
QWEN_MOE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 151936,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
DEEPSEEK_MOE = {
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 102400,
}


def _config(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("cfg,billions", [(MIXTRAL, 46.7), (QWEN_MOE, 14.3), (DEEPSEEK_MOE, 16.4)])
def test_moe_configs_have_their_published_parameter_counts(tmp_path, cfg, billions):
    # Mixtral-8x7B: 46.7B; Qwen1.5-MoE-A2.7B: 14.3B; deepseek-moe-16b: 16.4B (their model cards)
    model = resolve_model(_config(tmp_path, cfg))
    assert model.moe
    assert cm.model_params(model) / 1e9 == pytest.approx(billions, rel=0.01)


def test_moe_under_tp_shards_experts_and_keeps_the_dense_collectives(tmp_path):
    moe = resolve_model(_config(tmp_path, MIXTRAL))
    dense = model_preset("llama3-8b")  # same attention and hidden size, one dense MLP
    h100 = gpu_preset("H100")
    for tp in (2, 4, 8):
        r_moe, r_dense = (estimate(m, h100, NDR, Workload(seq=4096), tp) for m in (moe, dense))
        assert r_moe["layer"]["collectives"] == r_dense["layer"]["collectives"]  # all-reduce of [T, h]
        # expert weights shard by TP: 8 experts x 3 x 4096 x 14336 / tp, router replicated
        expert = cm.mlp_params(moe, tp, True) - cm.mlp_params(moe, 1, True) / tp
        assert expert == pytest.approx(4096 * 8 * (1 - 1 / tp), rel=1e-9)

        # two experts per token: about twice the dense MLP's GEMM time
        def mlp(r):
            return r["layer"]["gemm_fwd_s"]["mlp_in"] + r["layer"]["gemm_fwd_s"]["mlp_out"]

        assert 1.9 < mlp(r_moe) / mlp(r_dense) < 2.6
    mem = estimate(moe, h100, NDR, Workload(mode="prefill"), 8)["memory"]["bytes"]["weights"]
    assert mem == cm.params_per_gpu(moe, 8, 1) * 2


def test_moe_leading_dense_layers(tmp_path):
    model = resolve_model(_config(tmp_path, DEEPSEEK_MOE))
    assert (model.dense_layers, model.shared_intermediate) == (1, 2 * 1408)
    assert cm.moe_layer_counts(model) == (1, 27)
    r = estimate(model, gpu_preset("H100"), NDR, Workload(seq=2048), 4)
    assert (r["layer"]["dense_layers_in_stage"], r["layer"]["moe_layers_in_stage"]) == (1, 27)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"kv_lora_rank": 512}, "multi-head latent attention"),
        ({"decoder_sparse_step": 2}, "interleaved with dense ones"),
        ({"num_experts_per_tok": None}, "needs 'num_experts_per_tok' as a positive int"),
    ],
)
def test_moe_configs_not_modelled_are_refused_with_the_reason(tmp_path, extra, message, capsys):
    path = _config(tmp_path, {**QWEN_MOE, **extra})
    with pytest.raises(ValueError, match=message):
        resolve_model(path)
    assert main(["plan", "--model", path, "--tp", "2"]) == 2
    assert message in capsys.readouterr().err


def test_moe_config_through_the_command(tmp_path, capsys):
    path = _config(tmp_path, MIXTRAL)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", path, "--tp", "2", "8", "--gpus", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["inputs"]["model"]["experts"] == 8 and [c["tp"] for c in doc["configs"]] == [2, 8]
    assert doc["configs"][1]["memory_GiB"]["weights"] < doc["configs"][0]["memory_GiB"]["weights"] / 3
