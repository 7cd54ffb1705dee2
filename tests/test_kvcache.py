"""Analytic KV bytes from the reference's spec, and `gemma-harness memory` that prints them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import configs
from harness.kvcache import breakdown
from reference_impl.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent


def _spec(name):
    return ModelSpec.from_hf_config(configs.hf_config(name))


def test_gemma3_1b_by_hand():
    """26 layers, 5 sliding (window 512) : 1 full, 1 KV head x 256 dims: per token per layer 2 x 256 values."""
    r = breakdown(_spec("gemma-3-1b"), 32768, batch=2, kv_dtype="bfloat16")
    full, sliding = 4, 22  # layers 5, 11, 17, 23 are full
    per_token = 2 * 256 * 2 * 2  # K and V, 256 dims, 2 bytes, batch 2
    assert r["stored_bytes"] == per_token * (full * 32768 + sliding * 512) == r["minimal_bytes"]
    assert {k: v["layers"] for k, v in r["by_layer_type"].items()} == {"sliding 512 1x256": 22, "full 1x256": 4}


def test_kv_shared_layers_hold_nothing_and_k_eq_v_layers_halve_when_minimal():
    e2b = breakdown(_spec("gemma-4-e2b"), 8192)
    shared = {k: v for k, v in e2b["by_layer_type"].items() if "shared" in k}
    assert shared and all(v["stored_bytes"] == 0 and v["tokens_held"] == 0 for v in shared.values())
    dense = breakdown(_spec("gemma-4-31b"), 8192)
    kv_equal = {k: v for k, v in dense["by_layer_type"].items() if "K=V" in k}
    assert kv_equal and all(v["minimal_bytes"] * 2 == v["stored_bytes"] for v in kv_equal.values())
    assert dense["minimal_bytes"] < dense["stored_bytes"]


@pytest.mark.parametrize("dtype, factor", [("fp8", 0.5), ("int4", 0.25), ("float32", 2)])
def test_cache_dtypes_scale_the_bytes(dtype, factor):
    spec = _spec("gemma-3-4b")
    assert breakdown(spec, 4096, kv_dtype=dtype)["stored_bytes"] == factor * breakdown(spec, 4096)["stored_bytes"]


def _memory(*args):
    return subprocess.run([sys.executable, "-m", "harness.cli", "memory", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_memory_command_json_and_contexts_up_to_the_models_maximum(tmp_path):
    proc = _memory("--model", "gemma-3-1b", "--json", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "m.json").read_text())
    assert [r["tokens"] for r in data["results"]] == [4096, 8192, 32768]  # gemma-3-1b takes 32K
    assert data["results"][0]["stored_bytes"] == breakdown(_spec("gemma-3-1b"), 4096)["stored_bytes"]
    refused = _memory("--model", "gemma-3-1b", "--context", 65536)
    assert refused.returncode == 2 and "takes 1 to 32768 tokens" in refused.stderr
    assert _memory("--model", "gemma-3-1b", "--kv-dtype", "fp4").returncode == 2
