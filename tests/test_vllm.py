"""vLLM against the reference, layer by layer, on every tiny twin in float32 and bfloat16, plus its
greedy decode against the reference's cached decode. Needs vLLM (``tox -e vllm``); skipped elsewhere.

Each run starts vLLM in its own process (about 15 s on 2 CPU cores, most of it engine start-up).
Known failures go in ``EXPECTED_FAILURES`` with their evidence and the exact way they are allowed to
fail (which probes, which metric); any other failure of that run still fails the test, and a run that
passes again is reported (XPASS) so the entry can go. No vLLM bug is known for the Gemma 1-4 text
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


EXPECTED_FAILURES: dict[tuple[str, str], Expected] = {
    # Not a vLLM bug: bf16 chaos of the MoE twin over a greedy continuation. Measured 2026-11-26 (vLLM
    # 0.32.0 CPU): the prefill passes at every probe (logits KL 0.19, near-tie expert flips judged
    # with vLLM's routing), float32 passes everywhere (decode max_rel 3.7e-6). Decode, row 0: KL 3.55 >
    # 1.5, rel_rms 0.16 > 0.15. The reference in bf16 is as far from a float64 reference on the same
    # tokens as vLLM is: per step KL(float64 || vLLM) 0.09-4.5, KL(float64 || reference bf16)
    # 0.6-5.4; neither follows float64's greedy choice (137 491 491 137 124 150 150 124). Decode
    # steps are not routed as vLLM was (its routing is only captured during the prefill), so expert
    # flips there are not factored out. Gate Gemma 4 MoE in float32.
    ("gemma-4-26b-a4b-tiny", "bfloat16"): Expected(
        "bf16 decode on the chaotic Gemma 4 MoE twin: the reference's own bf16 decode is as far from "
        "float64 as vLLM's; prefill and float32 pass", frozenset({"decode"}), "kl_max"),
}


def _judge(result, expected: Expected | None) -> None:
    if result.passed or expected is None:
        assert result.passed, result.verdict()
        return
    failed = [p for p in result.probes if not p.passed]
    assert result.error is None and all(p.name in expected.probes for p in failed), result.verdict()
    assert all(p.metrics.get(expected.metric, 0) > p.tolerance.get(expected.metric, float("inf")) for p in failed)
    pytest.xfail(f"{expected.evidence}: {result.verdict()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TWINS)
def test_vllm_conforms(name, dtype):
    result = conform(name, candidate="vllm", dtype=dtype)
    assert result.error is None, result.error
    judged = {p.name: p for p in result.probes if p.judged}
    # every probe of the twin is captured from vLLM's model, and the greedy decode is judged
    assert not result.unsupported, [p.name for p in result.unsupported]
    assert "decode" in judged and judged["decode"].metrics["steps"] == 2 * DECODE_STEPS
    assert result.environment["vllm"] == vllm.__version__ and result.environment["vllm_prefill_forwards"] == [1, 1]
    _judge(result, EXPECTED_FAILURES.get((name, dtype)))


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
