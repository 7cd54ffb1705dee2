"""The committed lm-eval reports agree with their own records: every score is the mean of its documents,
and the committed comparison is what --compare computes from the committed samples today."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bench import records

EVAL = Path(__file__).resolve().parents[1] / "reports" / "eval-gemma-3-270m-cpu"


def _records():
    return [r for r in records.iter_records(EVAL / "records.jsonl") if r.get("kind") == "eval"]


def test_every_score_is_the_mean_of_its_documents():
    from harness.lmeval.run import load_samples

    committed = _records()
    assert {r["cell"]["impl"] for r in committed} == {"reference", "hf", "vllm", "llamacpp", "llamacpp-f32"}
    for record in committed:
        samples = load_samples(EVAL, record)
        assert len(samples) == record["n"], record["label"]
        for metric in ("acc", "acc_norm"):
            mean = sum(s[metric] for s in samples.values()) / len(samples)
            assert mean == pytest.approx(record["metrics"][metric]["value"], abs=1e-12), (record["label"], metric)
        first = record["eval"]["first_ids"]
        assert len(first) == 8 and first[0] == 2 and 2 not in first[1:]  # one BOS, checked before scoring


def test_the_committed_comparison_is_recomputed_from_the_samples():
    pytest.importorskip("scipy")
    from harness.lmeval.cli import compare_markdown, compare_runs

    comparisons = [c for b in ("hf", "vllm", "llamacpp", "llamacpp-f32")
                   for c in compare_runs(str(EVAL), "reference", b, "acc", 0.05, 0.8)]
    assert compare_markdown(comparisons) == (EVAL / "compare.md").read_text()
    assert not any(c.significant_loss for c in comparisons)
    by_pair = {(c.name_b, c.task): c for c in comparisons}
    assert by_pair[("hf", "arc_easy")].loglik.max_abs == 0.0  # identical per document
    assert by_pair[("llamacpp-f32", "arc_easy")].diff_points == 0.0
