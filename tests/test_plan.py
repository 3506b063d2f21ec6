"""The capacity planner: memory math by hand, the catalog's sources, the CLI's JSON, the
scheduler replay, the calibration fit, and one check of a prediction against a fresh
measurement of the engine on this machine (a bound that can fail)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tuili.plan import hardware as hwmod
from tuili.plan.calibrate import fit, predict_point
from tuili.plan.cli import main
from tuili.plan.planner import Options, Workload, plan_one
from tuili.plan.roofline import StepModel
from tuili.plan.shapes import load_config, load_shape, shape_from_config, shipped_models
from tuili.plan.simulate import draw_lengths, simulate


# --- memory math against hand-computed numbers ------------------------------------------

def test_default_model_bytes_by_hand():
    s = load_shape("smollm2-135m-instruct")
    # 30 layers x (q 576x576 + k,v 576x192 each + o 576x576 + gate/up/down 3 x 576x1536)
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    assert s.linear_params == 30 * per_layer
    head = 49152 * 576
    # bf16: embedding + layers + the tied head's own copy (what the engine holds)
    assert s.weight_bytes("none") == 2 * (head + 30 * per_layer + head)
    # int8: 16-bit embedding, int8 layers and head, a float32 scale per output row
    rows = 30 * (576 + 192 + 192 + 576 + 3 * 1536) + 49152
    assert s.weight_bytes("int8") == 2 * head + 30 * per_layer + head + 4 * rows
    # within 0.2% of the engine's own count (docs/BENCHMARKS.md: 325.7 MB and 192.0 MB)
    assert s.weight_bytes("none") == pytest.approx(325.7e6, rel=2e-3)
    assert s.weight_bytes("int8") == pytest.approx(192.0e6, rel=2e-3)
    # KV: 30 layers x K and V x 3 kv heads x 64 dims x 2 bytes; int8 adds a float32 scale per head
    assert s.kv_bytes_per_token() == 30 * 2 * 3 * 64 * 2 == 23_040
    assert s.kv_bytes_per_token("int8") == 30 * 2 * 3 * (64 + 4) == 12_240
    # one decode step reads the layers and the head, not the embedding table
    assert s.read_bytes_per_step(1, "none") == 2 * (30 * per_layer + head)


def test_llama_70b_and_moe_counts():
    s = load_shape("llama-3.1-70b")
    assert s.total_params == pytest.approx(70.55e9, rel=1e-3)
    assert s.kv_bytes_per_token() == 80 * 2 * 8 * 128 * 2
    m = load_shape("mixtral-8x7b")
    assert m.num_experts == 8 and m.experts_per_token == 2
    assert m.total_params == pytest.approx(46.70e9, rel=5e-3)  # Mixtral 8x7B: 46.7B total, 12.9B active
    assert m.active_params == pytest.approx(12.9e9, rel=1e-2)
    assert m.expert_fraction(1) == pytest.approx(2 / 8)
    assert m.expert_fraction(64) == pytest.approx(1.0, abs=1e-6)
    g = load_shape("gemma-3-27b")
    assert g.num_sliding_layers == 52 and g.sliding_window == 1024  # 5 local layers in 6 of 62
    assert g.kv_read_bytes(4096) < g.kv_read_bytes(4096 * 2)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "llama-3.1-8b", "llama-3.1-70b", "gemma-3-27b"])
def test_shapes_agree_with_model_config(name):
    from tuili.config import ModelConfig

    _, cfg = load_config(name)
    mc = ModelConfig.from_hf_config(cfg)
    s = shape_from_config(cfg, name)
    assert (s.vocab_size, s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads,
            s.head_dim, s.tie_word_embeddings) == (mc.vocab_size, mc.hidden_size, mc.intermediate_size,
                                                   mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                                   mc.tie_word_embeddings)
    if mc.layer_types:
        assert s.num_sliding_layers == sum(t == "sliding_attention" for t in mc.layer_types)


def test_parse_size_agrees_with_config():
    from tuili.config import parse_size

    for text in ("512MiB", "2GiB", "1.5GB", "100", "3t"):
        assert hwmod.parse_size(text) == parse_size(text)


# --- catalog ----------------------------------------------------------------------------

def test_catalog_has_a_source_for_every_figure():
    cat = hwmod.load_catalog()
    assert {"h100-sxm", "h200", "b200", "mi300x", "tpu-v5e", "tpu-v6e", "xeon-6980p", "apple-m4-max"} <= set(cat["hardware"])
    figures = ("memory_GB", "bandwidth_GBps", "bf16_TFLOPs", "int8_TOPs", "interconnect_GBps")
    for key, entry in cat["hardware"].items():
        for f in figures:
            assert isinstance(entry[f], (int, float)), (key, f)
            assert len(entry["sources"].get(f, "")) > 20, f"{key}.{f} has no source"
        for f in ("efficiency", "step_token_budget", "int4_bytes_per_param"):
            if f in entry:
                assert f in entry["sources"], f"{key}.{f} has no source"
    for f in cat["defaults"]:
        if f != "sources":
            assert f in cat["defaults"]["sources"]
    for f in ("bandwidth_GBps", "bf16_TFLOPs", "memory_GB", "efficiency"):
        assert f in cat["local"]["sources"]
    for name in shipped_models():
        assert load_shape(name).num_layers > 0


def test_planner_does_not_import_torch_or_the_engine():
    code = ("import sys; from tuili.plan.cli import main; "
            "main(['llama-3.1-70b', '--tokens-per-day', '1e9', '--slo-ttft', '1', '--slo-tpot', '0.05']); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('tuili.engine', 'tuili.serve'))]; "
            "print('IMPORTED', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED []" in out
    assert "h100-sxm" in out and "replicas" in out


# --- the CLI's JSON ---------------------------------------------------------------------

def test_json_keys(capsys):
    rc = main(["llama-3.1-8b", "--hardware", "h100-sxm", "--concurrency", "8", "--prompt-len", "200",
               "--output-len", "128", "--price-per-hour", "2.5", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("output_tok_s", "ttft_s_p50", "tpot_s_p50", "max_batch", "bound", "replicas", "memory",
                "cost_per_million_output_tokens"):
        assert key in d
    assert set(d["bound"]) == {"prefill", "decode"}
    assert d["bound"]["decode"] == "memory" and d["bound"]["prefill"] == "compute"
    assert d["output_tok_s"] > 0 and d["max_batch"] > 100
    assert d["memory"]["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 2


def test_traffic_needs_more_replicas_for_more_traffic(capsys):
    base = ["llama-3.1-8b", "--hardware", "h100-sxm", "--slo-ttft", "1", "--slo-tpot", "0.05", "--json"]
    main(base + ["--requests-per-second", "5"])
    small = json.loads(capsys.readouterr().out)
    main(base + ["--requests-per-second", "200"])
    big = json.loads(capsys.readouterr().out)
    assert 1 <= small["replicas"] < big["replicas"]
    assert big["tpot_s_p50"] <= 0.05 and big["ttft_s_p50"] <= 1


# --- the step model and the scheduler replay --------------------------------------------

def _h100_model(name="llama-3.1-8b"):
    return StepModel(load_shape(name), hwmod.get("h100-sxm"))


def test_single_request_replay_matches_step_times():
    m = _h100_model()
    res = simulate(m, [(200, 50)], concurrency=1)
    overhead = m.e["request_overhead_s"]
    assert res.ttft[0] == pytest.approx(m.prefill_time(200) + overhead, rel=1e-6)
    # TPOT: decode steps at contexts 201..249, one sequence
    steps = [m.decode_step(1, 201 + i) for i in range(49)]
    assert res.tpot[0] == pytest.approx(sum(steps) / 49, rel=1e-6)


def test_throughput_grows_with_concurrency_and_latency_with_it():
    m = _h100_model()
    lengths = draw_lengths(64, (100, 300), (128, 128))
    runs = [simulate(m, lengths, concurrency=c) for c in (1, 8, 32)]
    tok = [r.output_tok_s for r in runs]
    assert tok[0] < tok[1] < tok[2]
    assert runs[0].percentile("tpot", 50) < runs[2].percentile("tpot", 50)


def test_decode_is_memory_bound_and_prefill_compute_bound_on_a_gpu():
    m = _h100_model("llama-3.1-70b")
    m = StepModel(m.shape, m.hw, count=4)
    assert m.bound(1, 500, [], 1) == "memory"
    assert m.bound(0, 0, [(2048, 0)], 1) == "compute"


def test_calibration_fit_recovers_known_factors():
    shape = load_shape("smollm2-135m-instruct")
    hw = hwmod.get("xeon-6980p")
    truth = {"step_overhead_s": 0.004, "seq_overhead_s": 0.0003, "chunk_overhead_s": 0.01,
             "weight_bw": 0.5, "kv_bw": 0.3, "matmul": 0.2}
    hw.efficiency = {**hw.efficiency, "by_quantization": {"none": truth}}
    m = StepModel(shape, hw)
    points = [{"kind": "decode", "batch": b, "context": c} for b, c in ((1, 80), (8, 80), (16, 80), (16, 420), (32, 300))]
    points += [{"kind": "prefill", "tokens": n} for n in (64, 256, 512)] + [{"kind": "prefill", "tokens": 128, "prompts": 4}]
    for p in points:
        p["step_s"] = predict_point(m, p)
    hw2 = hwmod.get("xeon-6980p")
    factors = fit(shape, hw2, "none", points)
    hw2.efficiency = {**hw2.efficiency, "by_quantization": {"none": factors}}
    m2 = StepModel(shape, hw2)
    for p in points:
        assert predict_point(m2, p) == pytest.approx(p["step_s"], rel=0.03)


# --- a prediction against a fresh measurement on this machine ---------------------------

def test_prediction_matches_a_fresh_measurement():
    """Fit `local`'s factors on some engine steps (subprocess probe: batch 1 and 16 decode,
    prefill of 64 and 512 tokens and of 4 prompts x 128 in one step), then predict what was not fitted: an offline run of 8 prompts
    of 100-300 tokens x 24 output tokens at once through the scheduler replay, against
    the same run measured in this process. The bound is wide (this machine is shared and
    noisy) but a wrong step model or scheduler replay misses it by far more. Both sides run
    one thread: on a machine shared by several test runs, two threads that wait for each
    other at every kernel's barrier make step times erratic."""
    import torch

    from tuili.plan.calibrate import run_probe

    model = "smollm2-135m-instruct"
    probe = run_probe(model, "none", ["--decode", "1:64,16:64", "--prefill", "64,512,4x128", "--repeats", "1",
                                      "--long", "16"], timeout=300, env={"OMP_NUM_THREADS": "1"})
    shape = load_shape(model)
    hw = hwmod.get("local")
    hw.efficiency = {**hw.efficiency, "by_quantization": {"none": fit(shape, hw, "none", probe["points"])}}
    hw.efficiency["by_quantization"]["none"]["request_overhead_s"] = 0.0  # offline: no HTTP

    from tuili import LLM, SamplingParams

    import random
    rng = random.Random(7)
    lengths = draw_lengths(8, (100, 300), (24, 24), seed=7)
    prompts = [[rng.randrange(100, 49000) for _ in range(p)] for p, _ in lengths]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model, dtype="bfloat16")
        llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2, ignore_eos=True))
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0))
        measured = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    predicted = simulate(StepModel(shape, hw), lengths, concurrency=8).duration
    assert predicted == pytest.approx(measured, rel=0.35), (predicted, measured, probe["points"])


@pytest.mark.slow
def test_served_prediction_within_the_issue_targets(tmp_path):
    """The issue's check, end to end (minutes): calibrate `local`, then `tuili serve` driven
    by `tuili bench serve` at concurrency 1 and 8, int8 weights, prompts of 100-300 tokens
    and 128 out; predicted output tok/s within 15% and TTFT p50 within 30%. Meaningful on
    a quiet machine only (docs/BENCHMARKS.md, "Capacity planner")."""
    from tuili.plan.calibrate import calibrate
    from tuili.plan.compare import main as compare

    calibrate("smollm2-135m-instruct", ["int8"], verbose=False)
    out = tmp_path / "compare.jsonl"
    assert compare(["--quantizations", "int8", "--concurrency", "1,8", "--num-prompts", "1=4,8=16",
                    "--output", str(out)]) == 0
    for line in out.read_text().splitlines():
        row = json.loads(line)
        m, p = row["measured"], row["predicted"]
        assert p["output_tok_s"] == pytest.approx(m["output_tok_s"], rel=0.15), row
        assert p["ttft_s_p50"] == pytest.approx(m["ttft_s_p50"], rel=0.30), row
