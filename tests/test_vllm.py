"""vLLM against the reference, layer by layer, on every tiny twin in float32 and bfloat16, plus its
greedy decode against the reference's cached decode. Needs vLLM (``tox -e vllm``); skipped elsewhere.

Each run starts vLLM in its own process (about 15 s on 2 CPU cores, most of it engine start-up).
Known failures go in ``EXPECTED_FAILURES`` with their evidence and the exact way they are allowed to
fail (which probes, which metric, up to which ceiling), as strict expected failures: any other
failure of that run fails the test, and a run that passes again fails it too (XPASS strict), so the
entry must go. No vLLM bug is known for the Gemma 1-4 text
models vLLM 0.32.0 serves here; vLLM's ``Gemma3nForCausalLM`` is not covered (the reference does not
implement Gemma 3n's AltUp / Laurel layers).
"""

from dataclasses import dataclass

import pytest
import torch

import configs
from harness.adapters.vllm import VLLMAdapter
from harness.gate import DECODE_STEPS, compare_implementations, conform
from harness.synthetic import make_batch, random_state_dict
from reference_impl.spec import ModelSpec

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

TWINS = configs.names(tiny=True)
DTYPES = ["float32", "bfloat16"]


@dataclass(frozen=True)
class Expected:
    evidence: str
    probes: frozenset[str]  # the only probes allowed to fail
    metric: str  # ... and only on this metric
    ceiling: float  # ... and by no more than this


class ExpectedFailure(AssertionError):
    """The one way a known failure may fail (strict xfail: any other failure, or a pass, is reported)."""


EXPECTED_FAILURES: dict[tuple[str, str], Expected] = {}


def _cases():
    for name in TWINS:
        for dtype in DTYPES:
            expected = EXPECTED_FAILURES.get((name, dtype))
            marks = [pytest.mark.xfail(strict=True, raises=ExpectedFailure, reason=expected.evidence)] if expected else []
            yield pytest.param(name, dtype, expected, marks=marks, id=f"{name}-{dtype}")


def _judge(result, expected: Expected | None) -> None:
    if expected is None or result.passed:
        assert result.passed, result.verdict()
        return  # a known failure that passes: XPASS(strict) fails the test, so the entry goes
    failed = [p for p in result.probes if not p.passed]
    assert result.error is None and all(p.name in expected.probes for p in failed), result.verdict()
    for p in failed:
        value, limit = p.metrics.get(expected.metric, 0.0), p.tolerance.get(expected.metric, float("inf"))
        assert value > limit, f"{p.name} fails on another metric than {expected.metric}: {p.note}"
        assert value <= expected.ceiling, f"{p.name} {expected.metric} {value:.3g} exceeds the ceiling {expected.ceiling}"
    raise ExpectedFailure(f"{expected.evidence}: {result.verdict()}")


@pytest.mark.parametrize("name,dtype,expected", list(_cases()))
def test_vllm_conforms(name, dtype, expected):
    result = conform(name, candidate="vllm", dtype=dtype)
    assert result.error is None, result.error
    judged = {p.name: p for p in result.probes if p.judged}
    # every probe of the twin is captured from vLLM's model, and the greedy decode is judged
    assert not result.unsupported, [p.name for p in result.unsupported]
    assert "decode" in judged and judged["decode"].metrics["steps"] == 2 * DECODE_STEPS
    assert result.environment["vllm"] == vllm.__version__ and result.environment["vllm_prefill_forwards"] == [1, 1]
    _judge(result, expected)


@pytest.mark.parametrize("chunk", [5, 17])  # below every twin's window (8-16), and above it
@pytest.mark.parametrize("name", ["gemma-2-2b-tiny", "gemma-3-270m-tiny", "gemma-4-e2b-tiny", "gemma-4-26b-a4b-tiny"])
def test_vllm_chunked_prefill_conforms(name, chunk):
    """Prefill through vLLM's own KV cache, ``chunk`` tokens per forward: every probe of the later
    chunks depends on keys and values vLLM cached (sliding windows included), judged as before."""
    result = conform(name, candidate=VLLMAdapter(prefill_chunk=chunk), dtype="float32")
    lengths = [len(p) for p in make_batch(ModelSpec.from_hf_config(VLLMAdapter().prepare_config(
        configs.hf_config(name)))).prompts()]
    assert result.environment.get("vllm_prefill_forwards") == [-(-n // chunk) for n in lengths], result.verdict()
    assert result.passed, result.verdict()


def test_unknown_architecture_is_that_runs_error():
    cfg = VLLMAdapter().prepare_config(configs.hf_config("gemma-2b-tiny"))
    spec = ModelSpec.from_hf_config(cfg)
    cfg["architectures"] = ["GemmaNotAModelForCausalLM"]
    result = compare_implementations("gemma-2b-tiny-renamed", cfg, random_state_dict(spec), make_batch(spec),
                                     candidate=VLLMAdapter(timeout_s=300))
    assert result.error and result.error.startswith("vllm failed") and "GemmaNotAModel" in result.error, result.error


def test_a_wrong_weight_in_vllm_is_located():
    """A corrupted tensor inside vLLM's copy (layer 1's MLP down projection) is blamed on layers.1.mlp."""
    class Corrupted(VLLMAdapter):
        def load(self, hf_config, state_dict, dtype):
            state = dict(state_dict)
            name = "model.layers.1.mlp.down_proj.weight"
            state[name] = state[name] * torch.linspace(0.99, 1.01, state[name].shape[1])
            super().load(hf_config, state, dtype)

    result = conform("gemma-3-1b-tiny", candidate=Corrupted(), dtype="float32")
    assert not result.passed and result.first_divergence.name == "layers.1.mlp", result.verdict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gemma-2-2b-tiny", "gemma-3-1b-tiny", "gemma-4-26b-a4b-tiny"])
def test_vllm_conforms_on_gpu(name):
    result = conform(name, candidate="vllm", dtype="bfloat16")
    assert result.environment["vllm_device"] == "cuda"
    assert result.passed, result.verdict()


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_of_this_env_conforms(dtype):
    """HF Transformers as installed beside vLLM (an older version than the main env's): the same gate,
    so a transformers upgrade that changes Gemma numerics shows up as a difference between the two
    envs' reports (``gemma-harness diff``)."""
    for name in TWINS:
        result = conform(name, candidate="hf", dtype=dtype)
        assert result.passed, result.verdict()


def test_vllm_benchmark_cell_is_recorded_with_its_cache(tmp_path):
    """The benchmark runner's vLLM cell: vLLM's offline engine stepped one step at a time, timed like the
    others; its records pass the runner's consistency checks and carry vLLM's KV block pool figure."""
    import subprocess
    import sys

    import yaml

    from harness.bench import check, records
    from harness.bench.suite import load_suite

    suite = tmp_path / "v.yaml"
    suite.write_text(yaml.safe_dump({"name": "v", "settings": {"min_reps": 2, "max_reps": 2, "timeout_s": 600},
                                     "sweep": [{"impl": ["vllm"], "model": [{"name": "gemma-3-1b", "layers": 1}],
                                                "dtype": ["float32"], "batch": [2], "prompt": [24], "gen": [3]}]}))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "bench", str(suite), "--out", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, timeout=900)
    recs = records.load([tmp_path / "out"])
    assert proc.returncode == 0, recs[0].get("reason") if recs else proc.stderr[-2000:]
    assert check.run_problems(recs, {c.cell_id for c in load_suite(suite).cells}) == []
    record = recs[0]
    assert record["context"]["impl_version"].startswith("vllm-") and record["context"]["vllm"]
    assert record["kv_cache"]["after_last_token_bytes"] > 0
    # One sliding layer, 1 KV head x 256, fp32; 27 tokens fit one block of 128 (the CPU backend's block
    # size) per request: 2 requests x 1 block x 128 tokens x 256 x (K, V) x 4 bytes. Counting every pool
    # block in use x the bytes of a block in every tensor would count a hybrid model's blocks once per group.
    if not torch.cuda.is_available():
        assert record["kv_cache"]["after_last_token_bytes"] == 2 * 128 * 256 * 2 * 4
