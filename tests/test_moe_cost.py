"""harness.bench.moe_cost: the dispatch strategies agree with each other and with float64, the routing
statistics are right by hand, records are written per row and resumed, unsupported paths say why, and the
report has a row per strategy per token count.

On gemma-4-26b-a4b-tiny (hidden 64, 8 experts, top-2, expert width 16): every strategy computes the same
function at any shape, so the tiny shape tests the dispatch logic in milliseconds; one test runs the real
26B-A4B widths (hidden 2816, expert width 704, top-8) with the expert count cut to 16.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from harness.bench import moe_cost as mc
from harness.bench import records
from reference_impl import ops
from reference_impl.spec import ModelSpec

TINY = "gemma-4-26b-a4b-tiny"
FAST = mc.TimingPolicy(warmup=1, min_reps=2, max_reps=2, target_cv=1.0, max_time_s=0.0)
# The strategies that run on a CPU (the HF hub kernels and vLLM need CUDA).
CPU_STRATEGIES = ["per_expert_loop", "grouped_mm", "dense_all", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]
FAKE_MACHINE = {"bandwidth_gb_s": 10.0, "matmul_tflops": {"float32": 0.05, "bfloat16": 0.1}, "threads": 1,
                "device": "cpu"}


def tiny(dtype: str = "float32", num_experts: int | None = None, model: str = TINY):
    config = mc.model_config(model, num_experts)
    spec = ModelSpec.from_hf_config(config)
    layer = mc.build_layer(spec, 0, mc.DTYPES[dtype], "cpu", 0, config)
    return spec, layer


def opts(tmp_path, **kw) -> mc.Options:
    base = {"out": tmp_path, "model": TINY, "tokens": (1, 3), "dtypes": ("float32",), "routings": ("uniform",),
            "strategies": ("per_expert_loop", "grouped_mm", "vllm_fused"), "threads": None, "timing": FAST}
    return mc.Options(**{**base, **kw})


def seed_machine(out) -> None:
    """A stored machine probe for this thread count, so run() does not measure the machine (seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    machine = {**FAKE_MACHINE, "threads": torch.get_num_threads()}
    (out / mc.MACHINE_FILE).write_text(json.dumps({"cpu": machine}))


@torch.inference_mode()
def naive_float64(layer, x, weights, experts) -> torch.Tensor:
    """Token by token, pair by pair, in float64: independent of the module's own float64 reference."""
    gate_up, down = layer.moe.experts.gate_up.double(), layer.moe.experts.down.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n].tolist(), experts[n].tolist(), strict=True):
            gate, up = (gate_up[e] @ x[n].double()).chunk(2)
            out[n] += w * (down[e] @ (ops.gelu(gate, layer.spec.activation) * up))
    return out


def group_for(layer, tokens, dtype, routing="uniform"):
    return mc.make_group([layer], tokens, dtype, routing, mc.Options(out=None))


def run_strategy(strategy, layer, group, dtype, machine=None, **opt_kw):
    fn, _ = mc.experts_fn(strategy, layer, group.normed[0], group.routings[0], mc.Options(out=None, **opt_kw),
                          machine, dtype)
    with torch.inference_mode():
        return fn()


# ---------------------------------------------------------------- strategies


@pytest.mark.parametrize("routing", ["uniform", "zipf"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strategies_agree_with_float64_and_each_other(dtype, routing):
    _, layer = tiny(dtype)
    with torch.inference_mode():
        group = group_for(layer, 7, dtype, routing)
    r, x = group.routings[0], group.normed[0]
    expected = naive_float64(layer, x, r.weights, r.experts)
    # the module's float64 reference is the naive one on the checked tokens
    assert torch.allclose(group.expected[0], expected[group.checked], rtol=1e-12, atol=1e-12)
    outputs = {s: run_strategy(s, layer, group, dtype) for s in CPU_STRATEGIES}
    peak = expected.abs().max().item()
    assert peak > 0.1  # a real signal, not all zeros
    for strategy, out in outputs.items():
        assert out.shape == x.shape and out.dtype == mc.DTYPES[dtype], strategy
        err = (out.double() - expected).abs().max().item()
        assert err <= mc.TOLERANCE[dtype] * peak, (strategy, err, peak)
        check = mc.check_outputs([out], group, dtype, [outputs["per_expert_loop"]])
        assert check["ok"] and check["checked_tokens"] == 7
        spread = (out.double() - outputs["per_expert_loop"].double()).abs().max().item()
        assert spread <= 2 * mc.TOLERANCE[dtype] * peak, (strategy, spread)


def test_strategies_agree_on_the_real_widths_cut_to_16_experts():
    _, layer = tiny("bfloat16", num_experts=16, model=mc.MODEL)
    assert (layer.spec.hidden_size, layer.moe_spec.intermediate_size, layer.moe_spec.top_k) == (2816, 704, 8)
    with torch.inference_mode():
        group = group_for(layer, 3, "bfloat16")
    r = group.routings[0]
    expected = naive_float64(layer, group.normed[0], r.weights, r.experts)
    for strategy in ["per_expert_loop", "grouped_mm", "hf_eager", "hf_grouped_mm"]:
        out = run_strategy(strategy, layer, group, "bfloat16")
        err = (out.double() - expected).abs().max().item()
        assert err <= mc.TOLERANCE["bfloat16"] * expected.abs().max().item(), (strategy, err)


def test_padded_bmm_is_the_grouped_matmul():
    g = torch.Generator().manual_seed(1)
    weight_t = torch.randn(5, 8, 4, generator=g)  # (E, in, out); torch's grouped_mm wants 16-byte strides
    counts = torch.tensor([2, 0, 3, 0, 1])  # empty groups in the middle and none at the end
    rows = torch.randn(int(counts.sum()), 8, generator=g)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    expected = torch.cat([rows[0:2] @ weight_t[0], rows[2:5] @ weight_t[2], rows[5:6] @ weight_t[4]])
    assert torch.allclose(mc.padded_bmm(rows, weight_t, offs), expected, atol=1e-6)
    name, kernel = mc.grouped_kernel()
    if kernel is not None:  # torch 2.13 has it on the CPU
        assert torch.allclose(kernel(rows, weight_t, offs=offs), expected, atol=1e-6)


def test_grouped_experts_with_the_padded_bmm_fallback():
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 9, "float32")
        ex, r = layer.moe.experts, group.routings[0]
        fallback = mc.grouped_experts(ex.gate_up, ex.down, group.normed[0], r.weights, r.experts, ex.activation, None)
        loop = ex(group.normed[0], r.weights, r.experts)
    assert torch.allclose(fallback, loop, atol=1e-5)


def test_each_hf_strategy_runs_its_own_implementation(monkeypatch):
    """HF strategies share one config; made in one order and called in another (as the interleaved
    rounds do), each call must still run its own implementation."""
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 2, "float32")
    seen = []
    for impl in ("grouped_mm", "batched_mm"):
        real = ALL_EXPERTS_FUNCTIONS[impl]
        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, impl, lambda *a, _i=impl, _f=real, **k: seen.append(_i) or _f(*a, **k))
    made = {s: mc.experts_fn(s, layer, group.normed[0], group.routings[0], mc.Options(out=None), None, "float32")[0]
            for s in ("hf_eager", "hf_grouped_mm", "hf_batched_mm")}
    with torch.inference_mode():
        made["hf_eager"]()
        assert seen == []
        made["hf_grouped_mm"]()
        made["hf_batched_mm"]()
        made["hf_eager"]()
    assert seen == ["grouped_mm", "batched_mm"]


def test_hf_modules_compute_what_the_reference_does():
    _, layer = tiny()
    x = torch.randn(5, layer.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        _, ref_w, ref_e = layer.moe.router(x)
        _, hf_w, hf_e = layer.hf.router(x)
        assert torch.equal(ref_e, hf_e) and torch.allclose(ref_w, hf_w, atol=1e-7)
        assert torch.allclose(layer.mlp(layer.mlp_norm(x)), layer.hf.mlp(layer.hf.mlp_norm(x)), atol=1e-6)
        assert torch.equal(layer.moe.input_norm(x), layer.hf.input_norm(x))
    assert layer.hf.experts.gate_up_proj is layer.moe.experts.gate_up  # shared, not copied


# ---------------------------------------------------------------- routing statistics


def test_histogram_and_balance_by_hand():
    experts = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # N=4, K=2 over E=8
    stats = mc.routing_stats(experts, 8)
    assert stats["histogram"] == [4, 2, 1, 1, 0, 0, 0, 0]
    assert sum(stats["histogram"]) == 4 * 2 == stats["pairs"]
    assert stats["mean_load"] == 1.0 and stats["max_load"] == 4
    assert stats["balance"] == 4.0  # max 4 / mean (8 pairs / 8 experts)
    assert stats["distinct"] == 4
    assert stats["expected_distinct"] == pytest.approx(8 * (1 - (1 - 2 / 8) ** 4))


@pytest.mark.parametrize("routing", ["uniform", "zipf"])
def test_histogram_sums_to_tokens_times_top_k(routing):
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 33, "float32", routing)
    r = group.routings[0]
    stats = mc.routing_stats(r.experts, layer.moe_spec.num_experts)
    assert sum(stats["histogram"]) == 33 * layer.moe_spec.top_k
    assert all(len(set(row)) == layer.moe_spec.top_k for row in r.experts.tolist())  # k distinct per token
    assert torch.allclose(r.weights.sum(-1), torch.ones(33), atol=0.5)  # renormalised, x per-expert scale ~1
    assert (r.forced is not None) == (routing == "zipf")


def test_zipf_routing_is_skewed_and_seeded():
    drawn = mc.zipf_experts(128, 8, 512, seed=5)
    assert drawn.shape == (512, 8) and all(len(set(row)) == 8 for row in drawn.tolist())
    assert torch.equal(drawn, mc.zipf_experts(128, 8, 512, seed=5))
    skewed = mc.routing_stats(drawn, 128)
    uniform = mc.routing_stats(even_routing(512), 128)
    assert skewed["balance"] > 8 > 2 > uniform["balance"]  # a hot expert in most tokens vs near-even load
    # fewer distinct experts at a batch of 64 (at 512 both use all 128)
    assert mc.routing_stats(drawn[:64], 128)["distinct"] < mc.routing_stats(even_routing(64), 128)["distinct"] - 10


def even_routing(tokens: int) -> torch.Tensor:
    """Each token's 8 experts uniformly at random (seeded)."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(128, generator=g)[:8] for _ in range(tokens)])


# ---------------------------------------------------------------- skips, unsupported, errors


def test_vllm_strategy_is_unsupported_with_a_reason_without_cuda():
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 2, "float32")
    with pytest.raises(mc.StrategyUnsupported) as info:
        mc.experts_fn("vllm_fused", layer, group.normed[0], group.routings[0], mc.Options(out=None), None, "float32")
    reason = str(info.value)
    assert "CUDA" in reason and "\n" not in reason
    assert ("vllm" in reason) == (not _importable("vllm"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_skip_rules_for_the_naive_strategies():
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 4, "float32")
    x, r = group.normed[0], group.routings[0]
    slow = {"matmul_tflops": {"float32": 1e-9}}  # 1 kFLOP/s: any call is predicted too slow
    with pytest.raises(mc.StrategyUnsupported, match=r"^skipped: every token through all 8 experts"):
        mc.experts_fn("dense_all", layer, x, r, mc.Options(out=None), slow, "float32")
    mc.experts_fn("dense_all", layer, x, r, mc.Options(out=None), FAKE_MACHINE, "float32")  # fast enough
    gathered = mc.gathered_bytes(layer, 4, 4)
    assert gathered == 4 * 2 * 3 * 16 * 64 * 4  # N x K pairs x one expert's params x fp32
    with pytest.raises(mc.StrategyUnsupported, match="batched_mm copies"):
        mc.experts_fn("hf_batched_mm", layer, x, r, mc.Options(out=None, max_gather_gib=gathered / 2 / mc.GIB),
                      None, "float32")


# ---------------------------------------------------------------- timing, roofline


def test_timing_stops_at_the_policy_and_rounds_interleave():
    timing, out = mc.time_calls(lambda: 7, "cpu", mc.TimingPolicy(min_reps=3, max_reps=10, target_cv=10.0))
    assert out == 7 and timing["n"] == 3 and len(timing["samples"]) == 3
    timing, _ = mc.time_calls(lambda: None, "cpu", mc.TimingPolicy(min_reps=2, max_reps=5, target_cv=-1.0,
                                                                    max_time_s=60))
    assert timing["n"] == 5 and not timing["stable"]
    order = []
    entries = {k: mc.Timed(lambda k=k: order.append(k)) for k in "ab"}
    mc.warm(entries, "cpu", FAST)
    mc.rounds(entries, "cpu", FAST)
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then one call of each per round


def test_roofline_bytes_by_hand():
    _, layer = tiny()
    with torch.inference_mode():
        group = group_for(layer, 1, "float32")
    roof = mc.roofline([layer], group, 2.0, FAKE_MACHINE, 4)
    h, i, e, k, d = 64, 16, 8, 2, 48
    expert, router, dense = 3 * i * h * 4, (e * h + h + e) * 4, 3 * d * h * 4
    assert (roof["expert_bytes"], roof["router_bytes"], roof["dense_mlp_bytes"]) == (expert, router, dense)
    assert roof["distinct"] == k and roof["expected_distinct"] == pytest.approx(k)  # one token: k experts
    assert roof["bytes_read"] == router + dense + k * expert == roof["active_bytes_per_token"]
    assert roof["achieved_gb_s"] == pytest.approx(roof["bytes_read"] / 2e-3 / 1e9)
    assert roof["bw_pct"] == pytest.approx(100 * roof["achieved_gb_s"] / 10.0)


# ---------------------------------------------------------------- records, resume, report


def test_records_per_row_resume_and_report(tmp_path):
    out = tmp_path / "run"
    seed_machine(out)
    written = mc.run(opts(out))
    assert len(written) == 2 * 3  # tokens x strategies
    lines = mc.read_records(records.records_path(out))
    assert [r["cell_id"] for r in lines] == [r["cell_id"] for r in written]
    assert len({r["cell_id"] for r in lines}) == 6
    for r in lines:
        assert r["schema"] == mc.SCHEMA and r["kind"] == "moe" and r["cell_id"].startswith("m-")
        assert r["context"]["threads"] == torch.get_num_threads() and r["context"]["seed"] == 0
        assert r["context"]["device"]["type"] == "cpu" and r["context"]["machine_probe"]["bandwidth_gb_s"] == 10.0
        assert sum(r["routing"][0]["histogram"]) == r["cell"]["tokens"] * r["cell"]["top_k"]
        if r["cell"]["strategy"] == "vllm_fused":
            assert r["status"] == "unsupported" and "CUDA" in r["reason"] and r["timings"] is None
        else:
            assert r["status"] == "ok" and r["check"]["ok"], r["reason"]
            assert {"router", "experts", "dense_mlp", "combine", "total"} <= set(r["timings"])
            assert r["timings"]["experts"]["n"] == 2 and r["roofline"]["achieved_gb_s"] > 0

    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(mc.RunError, match="--resume"):
        mc.run(opts(out))
    assert mc.run(opts(out, resume=True)) == []  # everything recorded: nothing runs
    assert (out / "records.jsonl").read_bytes() == before
    # drop the last row: a resumed run redoes exactly that one
    kept = before.split(b"\n")[:-2]
    (out / "records.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    again = mc.run(opts(out, resume=True))
    assert [r["cell_id"] for r in again] == [lines[-1]["cell_id"]]

    paths = mc.write_report(out)
    md = paths[0].read_text()
    table = [line for line in md.split("## Timings")[1].split("##")[0].splitlines() if line.startswith("| ")][1:]
    assert len(table) == 6
    for r in lines:  # a row per strategy per token count
        assert any(line.split("|")[1].strip() == r["cell"]["strategy"]
                   and line.split("|")[2].strip() == str(r["cell"]["tokens"]) for line in table)
    assert paths[1].read_bytes().startswith(b"\x89PNG")
    page = paths[2].read_text()
    assert "data:image/png;base64," in page
    inlined = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(inlined) == paths[1].read_bytes()


def test_a_crashing_strategy_is_its_rows_error(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(mc, "grouped_experts", boom)
    real_dense = mc.dense_all_experts
    monkeypatch.setattr(mc, "dense_all_experts", lambda *a: real_dense(*a) * 1.5)  # wrong by half: the check fails
    out = tmp_path / "run"
    seed_machine(out)
    written = mc.run(opts(out, tokens=(2,), strategies=("per_expert_loop", "grouped_mm", "dense_all")))
    status = {r["cell"]["strategy"]: (r["status"], r["reason"]) for r in written}
    assert status["per_expert_loop"] == ("ok", None)
    assert status["grouped_mm"] == ("error", "experts: RuntimeError: boom")
    assert status["dense_all"][0] == "error" and "differs from float64" in status["dense_all"][1]
    assert mc.main(["--out", str(out), "--report-only", "-q"]) == 1  # an errored row: exit 1
    assert "boom" in (out / "report.md").read_text()


def test_main_runs_and_reports(tmp_path):
    out = tmp_path / "cli"
    seed_machine(out)
    argv = ["--out", str(out), "--model", TINY, "--tokens", "1,2", "--dtype", "bfloat16", "--routing", "zipf",
            "--strategies", "per_expert_loop,hf_eager", "--threads", "0", "--max-time-s", "0", "-q"]
    assert mc.main(argv) == 0
    assert {p.name for p in out.iterdir()} >= {"records.jsonl", "report.md", "report.html", mc.PLOT_FILE}
    recs = mc.read_records(out / "records.jsonl")
    assert {(r["cell"]["strategy"], r["cell"]["tokens"], r["cell"]["routing"], r["status"]) for r in recs} == {
        (s, n, "zipf", "ok") for s in ("per_expert_loop", "hf_eager") for n in (1, 2)}
    assert mc.main(argv) == 2  # records there and no --resume
    assert mc.main([*argv, "--resume"]) == 0
    assert len(mc.read_records(out / "records.jsonl")) == 4
    assert os.path.getsize(out / "report.md") > 0


def test_the_cli_runs_it_as_a_subcommand(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harness.cli", "moe-cost", "--out", str(tmp_path), "--report-only"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")  # nothing recorded there yet: one line
    assert len(proc.stderr.strip().splitlines()) == 1
