"""``harness.lmeval.logit_conformance.compare`` on constructed distributions (no weights), the report and
the command line's argument handling."""

import math
import sys

import pytest
import torch

from harness.lmeval import logit_conformance as lc

T, V, WINDOW = 10, 6, 4  # positions 0-3 before the window, 4-9 past it, 8-9 past twice it


def _base(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(T, V, generator=g) * 3, dim=-1)


IDS = [2, 5, 1, 0, 3, 3, 4, 2, 1, 5]


def test_identical_distributions():
    ref = _base()
    m = lc.compare(ref, ref.clone(), IDS, top_k=3, window=WINDOW)
    assert m["kl"]["mean"] == 0.0 and m["kl"]["max"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["top1_disagreements"] == 0 and m["topk_overlap"] == 1.0
    assert m["next_token"]["max_abs_dlogp"] == 0.0 and m["topk_max_abs_dlogp"] == 0.0
    assert (m["tokens"], m["vocab"], m["next_token"]["n"]) == (T, V, T - 1)


def test_known_perturbation_gives_the_hand_computed_kl_and_lands_past_the_window():
    # p = (1/2, 1/4, 1/4, 0...), q = (1/4, 1/2, 1/4, ...): KL(p || q) = 1/2 ln 2 - 1/4 ln 2 = ln(2) / 4
    ref, cand = _base(), _base()
    cand[:] = ref
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    ref[9] = torch.full((V,), -math.inf)
    cand[9] = torch.full((V,), -math.inf)
    ref[9, :3], cand[9, :3] = p.log(), q.log()
    m = lc.compare(ref, cand, IDS, top_k=2, window=WINDOW)
    want = math.log(2) / 4
    assert m["kl"]["max"] == pytest.approx(want, rel=1e-6) and m["kl"]["max_pos"] == 9
    assert m["kl"]["mean"] == pytest.approx(want / T, rel=1e-6)
    assert m["kl_before_window"] == {"n": 4, "mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0, "max_pos": 0}
    assert m["kl_past_window"]["n"] == 6 and m["kl_past_window"]["mean"] == pytest.approx(want / 6, rel=1e-6)
    assert m["kl_past_window"]["max_pos"] == 9
    assert m["kl_past_2x_window"]["n"] == 2 and m["kl_past_2x_window"]["mean"] == pytest.approx(want / 2, rel=1e-6)
    # the top-1 flips at position 9 (0 -> 1); the top-2 sets {0, 1} and {1, 0|2}: overlap 1/2 there
    assert m["top1_disagree_positions"] == [9] and m["top1_agreement"] == pytest.approx(0.9)
    # position 9 is the last: no next token, so the next-token difference stays 0
    assert m["next_token"]["max_abs_dlogp"] == 0.0
    assert m["topk_max_abs_dlogp"] == pytest.approx(math.log(2), rel=1e-6)


def test_kl_against_a_direct_float64_computation():
    ref, cand = _base(0), _base(1)
    m = lc.compare(ref, cand, IDS, top_k=3, window=WINDOW)
    r, c = ref.double(), cand.double()
    rn, cn = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    kl = (rn.exp() * (rn - cn)).sum(-1)
    assert m["kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-12)
    assert m["kl"]["max"] == pytest.approx(float(kl.max()), rel=1e-12) and m["kl"]["max_pos"] == int(kl.argmax())
    assert m["kl"]["median"] == pytest.approx(float(torch.quantile(kl, 0.5)), rel=1e-12)
    assert m["kl_past_2x_window"]["mean"] == pytest.approx(float(kl[8:].mean()), rel=1e-12)
    d = torch.tensor([abs(float(r[t, IDS[t + 1]] - c[t, IDS[t + 1]])) for t in range(T - 1)])
    assert m["next_token"]["max_abs_dlogp"] == pytest.approx(float(d.max()), rel=1e-9)
    assert m["next_token"]["max_pos"] == int(d.argmax())
    top = ref.topk(3, dim=-1).indices
    want = max(float((r[t, top[t]] - c[t, top[t]]).abs().max()) for t in range(T))
    assert m["topk_max_abs_dlogp"] == pytest.approx(want, rel=1e-9)


def test_swapped_top1_drops_agreement_at_that_position_only():
    ref = _base()
    cand = ref.clone()
    t = 5
    first, second = ref[t].topk(2).indices.tolist()
    cand[t, first], cand[t, second] = ref[t, second], ref[t, first]
    m = lc.compare(ref, cand, IDS, top_k=2, window=WINDOW)
    assert m["top1_disagree_positions"] == [t] and m["top1_agreement"] == pytest.approx(1 - 1 / T)
    assert m["topk_overlap"] == 1.0  # the same two ids, in another order
    assert m["kl"]["max_pos"] == t and m["kl"]["max"] > 0
    assert m["kl_before_window"]["max"] == 0.0 and m["kl_past_2x_window"]["max"] == 0.0
    assert lc.compare(ref, cand, IDS, top_k=1, window=WINDOW)["topk_overlap"] == pytest.approx(1 - 1 / T)
    # position 5's next token is IDS[6] = 4: changed only if 4 is one of the swapped ids
    moved = 4 in (first, second)
    assert (lc.compare(ref, cand, IDS, window=WINDOW, top_k=2)["next_token"]["max_abs_dlogp"] > 0) == moved


def test_chunks_do_not_change_the_result(monkeypatch):
    ref, cand = _base(0), _base(1)
    whole = lc.compare(ref, cand, IDS, top_k=3, window=WINDOW)
    monkeypatch.setattr(lc, "CHUNK", 3)
    assert lc.compare(ref, cand, IDS, top_k=3, window=WINDOW) == whole


def test_bad_inputs():
    ref = _base()
    with pytest.raises(ValueError, match="shapes differ"):
        lc.compare(ref, ref[:5], IDS)
    with pytest.raises(ValueError, match="prompt ids"):
        lc.compare(ref, ref, IDS[:5])
    with pytest.raises(ValueError, match="top_k"):
        lc.compare(ref, ref, IDS, top_k=V + 1)


def test_markdown_table():
    ref, cand = _base(0), _base(1)
    metrics = lc.compare(ref, cand, IDS, top_k=10 if V >= 10 else V, window=WINDOW)
    base = {"tokens": T, "window": WINDOW, "top_k": metrics["top_k"]}
    records = [
        {**base, "impl": "llamacpp", "status": "ok", "weights": lc.WEIGHTS["llamacpp"],
         "isolates": lc.ISOLATES["llamacpp"], "metrics": metrics,
         "separated": {"quantization_kl_mean": 2e-3, "implementation_kl_mean": 1e-6, "total_kl_mean": 2.001e-3,
                       "quantization_share": 0.9995}},
        {**base, "impl": "vllm", "status": "unsupported", "weights": "w", "isolates": "implementation",
         "reason": "ModuleNotFoundError: No module named 'vllm'"},
    ]
    text = lc.markdown(records)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| llamacpp | Q4_K_M")
    assert f"{metrics['kl']['mean']:.2e}" in rows[1] and "unsupported: ModuleNotFoundError" in rows[2]
    assert "past twice the window" in text and "quantization + implementation" in text
    assert "Separated" in text and "(100%)" in text
    assert lc.markdown([]).startswith("No logit-conformance")


@pytest.mark.parametrize("argv", [["--impls", "bogus"], ["--impls", ","], ["--tokens", "1", "--impls", "hf"],
                                  ["--no-such-flag"]])
def test_main_rejects_bad_arguments(argv, capsys):
    assert lc.main(argv) == 2


def test_llamacpp_scorer_without_llama_cpp_says_how_to_install(monkeypatch):
    from harness.lmeval.llamacpp_scorer import LlamaCppNotInstalled, LlamaCppScorer
    from harness.lmeval.scorers import LoadedModel, ScorerError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    model = LoadedModel("gemma-3-270m", {}, {}, None, "none", {"path": "/nonexistent.gguf"})
    with pytest.raises(LlamaCppNotInstalled, match=r"pip install -e '\.\[llamacpp\]' \(builds from its sdist"):
        LlamaCppScorer(model)
    assert lc._unsupported(LlamaCppNotInstalled("x")) and not lc._unsupported(ScorerError("boom"))
    with pytest.raises(ScorerError, match="real GGUF of gemma-3-270m only"):
        LlamaCppScorer(LoadedModel("gemma-3-1b", {}, {}, None, "random(seed=0)"))


def test_kl_is_renormalized_and_never_negative():
    # fp32 rows that do not sum to 1 exactly: shifting a row by a constant changes no distribution
    ref = _base()
    shifted = ref + 2**-16  # exact in fp32 for |x| < 256
    m = lc.compare(ref, shifted, IDS, top_k=3, window=WINDOW)
    assert m["kl"]["max"] < 1e-12 and m["kl"]["mean"] >= 0.0
    assert m["next_token"]["max_abs_dlogp"] == 2**-16  # Δlogp is on the values as given
