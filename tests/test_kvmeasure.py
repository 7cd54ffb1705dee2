"""Measured KV-cache bytes per implementation against the analytic figure, every difference explained.

The measuring tests run each implementation's real cache on KV twins at contexts past the windows and
require the measured bytes of every layer to equal what the implementation's explanation predicts: if
an implementation starts holding something else (a transformers upgrade, a reference change), the test
fails until :data:`harness.kvmeasure.EXPLANATIONS` says why. vLLM's are in test_kvmeasure_vllm.py
(``tox -e vllm``).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import configs
from harness import kvmeasure
from harness.kvcache import breakdown, layer_type
from reference_impl.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "kv-memory" / "records.jsonl"
RELEASED = configs.names(tiny=False)


def _spec(config):
    return ModelSpec.from_hf_config(config)


@pytest.mark.parametrize("name", RELEASED)
def test_the_twin_keeps_every_layers_kv_geometry(name):
    config = configs.hf_config(name)
    twin = kvmeasure.kv_twin(config)
    assert twin["hidden_size"] < config["hidden_size"]  # it did shrink what the cache does not hold
    full, small = _spec(config), _spec(twin)
    assert [layer_type(a) for a in full.layers] == [layer_type(b) for b in small.layers]
    assert breakdown(small, 32768) == breakdown(full, 32768)


@pytest.mark.parametrize("name", RELEASED)
def test_a_cut_holds_every_layer_type_and_scales_back_to_the_full_model(name):
    config = configs.hf_config(name)
    cut = kvmeasure.cut_for(config)
    assert cut is not None and cut < config["num_hidden_layers"]  # every released model has a shorter cut
    full, part = _spec(config), _spec(configs.cut(config, cut))
    per_layer = kvmeasure.analytic_per_layer(part, 8192, 2)
    assert kvmeasure.scaled_total(per_layer, part, full) == breakdown(full, 8192)["stored_bytes"]


def test_scaling_refuses_a_cut_without_some_layer_type():
    config = configs.hf_config("gemma-3-1b")
    full, part = _spec(config), _spec(configs.cut(config, 3))  # three sliding layers, no full one
    with pytest.raises(ValueError, match="full 1x256"):
        kvmeasure.scaled_total([1, 1, 1], part, full)


def test_vllm_explanation_by_hand():
    """gemma-3-1b twin cut to 6 layers (5 sliding 512 + 1 full), 1 KV head x 256, bf16, 1501 tokens,
    blocks of 128: full = ceil(1501/128) = 12 blocks; sliding: the next query sees positions 990..1500,
    blocks 7..11 = 5 blocks. One token of one layer = 2 x 256 x 2 bytes = 1 KiB."""
    spec = _spec(configs.cut(configs.hf_config("gemma-3-1b"), 6))
    got = kvmeasure.explain("vllm", spec, 1501, 2, 128)
    assert got["per_layer"] == [5 * 128 * 1024] * 5 + [12 * 128 * 1024]
    off = kvmeasure.explain("vllm-nohybrid", spec, 1501, 2, 128)
    assert off["per_layer"] == [12 * 128 * 1024] * 6
    analytic = 5 * 512 * 1024 + 1501 * 1024
    assert sum(step["bytes"] for step in got["steps"]) == sum(got["per_layer"]) - analytic


def test_k_eq_v_and_shared_layers_in_the_explanation():
    spec = _spec(configs.hf_config("gemma-4-31b"))
    steps = kvmeasure.explain("hf", spec, 4096, 2)["steps"]
    k_eq_v = [s for s in steps if s["why"].startswith("K=V")]
    full_layers = sum(layer.window is None for layer in spec.layers)  # 10 global layers, 4 KV heads x 512
    assert k_eq_v and k_eq_v[0]["bytes"] == full_layers * 4 * 512 * 2 * 4096
    e2b = _spec(configs.hf_config("gemma-4-e2b"))
    predicted = kvmeasure.explain("reference", e2b, 4096, 2)["per_layer"]
    assert all(p == 0 for p, layer in zip(predicted, e2b.layers, strict=True) if not layer.has_kv)


# Contexts past each twin's window (gemma-2: 4096, gemma-3-1b: 512, gemma-4-31b: 1024, e2b: 512), so
# the sliding rules are exercised; the cuts keep every layer type.
MEASURED = [("gemma-3-1b", 6, 700), ("gemma-2-9b", 2, 4200), ("gemma-4-31b", 6, 1100), ("gemma-4-e2b", None, 600)]


@pytest.mark.parametrize("impl", ["reference", "hf"])
@pytest.mark.parametrize("name, layers, context", MEASURED)
def test_measured_bytes_equal_the_explanation_layer_by_layer(impl, name, layers, context):
    twin = kvmeasure.kv_twin(configs.hf_config(name), layers)
    measured = kvmeasure.MEASURES[impl](twin, context, torch.bfloat16, chunk=512)
    predicted = kvmeasure.explain(impl, _spec(twin), context, 2)["per_layer"]
    assert measured == predicted


def test_llama_log_parser_reads_each_cache_and_its_layers():
    log = "\n".join([
        "llama_kv_cache_iswa: creating non-SWA KV cache, size = 4096 cells",
        "llama_kv_cache: layer   0: filtered", "llama_kv_cache: layer   1: dev = CPU",
        "llama_kv_cache: size =    4.00 MiB (  4096 cells,   1 layers,  1/1 seqs), K (f16): 2.00 MiB, V (f16): 2.00 MiB",
        "llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells",
        "llama_kv_cache: layer   0: dev = CPU", "llama_kv_cache: layer   1: filtered",
        "llama_kv_cache: size =    1.00 MiB (  1024 cells,   1 layers,  1/1 seqs), K (f16): 0.50 MiB, V (f16): 0.50 MiB",
    ])
    got = kvmeasure.parse_llama_log(log, 2)
    assert got["per_layer"] == [2**20, 4 * 2**20]
    assert [c["cells"] for c in got["caches"]] == [4096, 1024]
    with pytest.raises(ValueError, match="no KV cache sizes"):
        kvmeasure.parse_llama_log("nothing here", 2)


@pytest.mark.parametrize("impl", ["llamacpp", "llamacpp-swa"])
def test_llamacpp_allocation_equals_its_explanation(impl):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    record = kvmeasure.measure_one("gemma-3-270m", 4096, impl)
    assert record["explained"], record["residual_bytes"]
    sliding_cells = {c["cells"] for c in record["details"]["caches"] if len(c["layers"]) == 15}
    assert sliding_cells == ({4096} if impl == "llamacpp" else {1024})


def _committed():
    return [json.loads(line) for line in REPORT.read_text().splitlines() if line.strip()]


def test_the_committed_report_covers_the_issue_and_is_explained_by_the_current_rules():
    """Every committed measurement is explained, and still by today's rules: changing an explanation
    without measuring again (or the reverse) fails here."""
    records = _committed()
    ok = [r for r in records if r["status"] == "ok"]
    for model in ("gemma-2-9b", "gemma-3-27b", "gemma-4-31b", "gemma-4-e2b"):
        for context in (4096, 8192 if model == "gemma-2-9b" else 32768):  # gemma-2 takes 8K at most
            impls = {r["impl"] for r in ok if r["model"] == model and r["context"] == context}
            # vllm-nohybrid: vLLM fails to start on KV-shared models with its hybrid allocator off
            wanted = {"reference", "hf", "vllm"} | (set() if model == "gemma-4-e2b" else {"vllm-nohybrid"})
            assert wanted <= impls, (model, context, impls)
    for r in ok:
        assert r["explained"], r["id"]
        config = configs.hf_config(r["model"])
        spec = _spec(config) if r["impl"].startswith("llamacpp") else _spec(
            kvmeasure.kv_twin(config, r["layers"] if r["cut"] else None))
        predicted = kvmeasure.explain(r["impl"], spec, r["context"], 2, r["block"])["per_layer"]
        tolerance = 0.005 * 2**20 if r["impl"].startswith("llamacpp") else 0
        assert all(math.isclose(m, p, abs_tol=tolerance) for m, p in zip(r["per_layer"], predicted, strict=True)), \
            r["id"]


def test_kv_measure_command_refuses_bad_input_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "harness.cli", "kv-measure", *args, "--out", str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    for args, words in [(["--models", "gemma-3-1b", "--impls", "tgi"], "unknown implementation 'tgi'"),
                        (["--models", "gemma-3-1b", "--contexts", "64k"], "at most 32768 tokens"),
                        (["--models", "gemma-3-1b", "--contexts", "lots"], "not a token count")]:
        proc = run(*args)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_kv_measure_command_writes_records_and_a_report(tmp_path):
    """--resume measures this run's errors again and keeps other runs' records, errors included."""
    def failed(model, impl):
        return {"schema": kvmeasure.SCHEMA, "kind": "kv", "id": kvmeasure.record_id(model, 600, impl, "bfloat16"),
                "model": model, "context": 600, "impl": impl, "dtype": "bfloat16", "status": "error", "reason": "x"}

    (tmp_path / "records.jsonl").write_text("".join(json.dumps(failed(m, i)) + "\n" for m, i in
                                                    [("gemma-3-1b", "reference"), ("gemma-2-2b", "hf")]))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "kv-measure", "--models", "gemma-3-1b",
                           "--contexts", "600", "--impls", "reference", "--out", str(tmp_path), "-q", "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # the other run's error is still there
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["model"], r["status"]) for r in records] == [("gemma-2-2b", "error"), ("gemma-3-1b", "ok")]
    record = records[1]
    assert record["explained"] and record["cut"] and record["layers"] == 6
    assert "sliding layers keep window-1 tokens" in (tmp_path / "report.md").read_text()


def test_the_planners_kv_term_is_the_smallest_measured_cache_less_its_explained_differences():
    """Issue 11 (6): the planner's KV term against the implementation that stores the least. No
    implementation here keeps only K on K=V layers, and all keep window-1 on sliding ones, so the smallest
    measured figure differs from the planner's by exactly its explanation lines."""
    from harness.planner import plan

    ok = [r for r in _committed() if r["status"] == "ok"]
    for model, context in {(r["model"], r["context"]) for r in ok}:
        group = [r for r in ok if r["model"] == model and r["context"] == context]
        least = min(group, key=lambda r: r["measured_bytes"])
        planned = plan(model, "bf16", "bf16", context)["breakdown"]["kv_minimal_bytes"]
        explained = least["measured_bytes"] - sum(step["bytes"] for step in least["explanation"])
        assert math.isclose(explained, planned, rel_tol=1e-9, abs_tol=0.005 * 2**20 * 2), (model, context, least["impl"])
