"""Benchmark reports (tables, Markdown, self-contained HTML), the regression gate, and the headless-chromium
render check, on synthetic but schema-complete records drawn from seeded random generators."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from harness.bench import records as rec
from harness.bench.regress import (
    BELOW_THRESHOLD,
    IMPROVEMENT,
    NOT_ENOUGH_REPS,
    NOT_SIGNIFICANT,
    REGRESSION,
    compare,
)
from harness.bench.report import html, markdown, tables, write_report

BATCHES = (1, 2, 4)
PROMPTS = (32, 128)
GEN = 16
IMPLS = (("hf", "eager"), ("reference", None))
MODEL = {"model": "gemma-3-1b", "layers": 4, "layers_total": 26, "weights": "random", "dtype": "float32",
         "device": "cpu"}
MIB = 1024 * 1024


def make_context(torch="2.13.0", device_name="Intel Xeon Platinum 8480", git="abc1234") -> dict:
    return {"harness": "0.1.0", "git": git, "suite": "smoke", "suite_hash": "s-1", "seed": 0, "python": "3.11.2",
            "torch": torch, "transformers": "5.23.0", "vllm": None, "impl_version": "5.23.0", "host": "bench-1",
            "device": {"type": "cpu", "name": device_name, "cores": 2}}


def cell_id(cell: dict) -> str:
    return "c-" + hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:12]


def summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std(ddof=1))
            if len(values) > 1 else 0.0, "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "n": int(len(values))}


def generation_record(impl, attn, batch, prompt, rng, scale=1.0, noise=0.01, reps=5, context=None) -> dict:
    """An ok cell whose latencies grow with batch and prompt; hf[eager] 1.5x slower than reference."""
    cell = {"impl": impl, "attn": attn, **MODEL, "batch": batch, "prompt": prompt, "gen": GEN, "options": {}}
    slow = (1.5 if attn == "eager" else 1.0) * scale
    means = {"ttft_ms": (5 + 0.05 * prompt * batch) * slow, "tpot_ms": (2 + 0.2 * batch) * slow}
    means["e2el_ms"] = means["ttft_ms"] + (GEN - 1) * means["tpot_ms"]
    samples = {m: np.abs(rng.normal(mu, noise * mu, reps)) for m, mu in means.items()}
    itl = np.abs(rng.normal(means["tpot_ms"], 0.05 * means["tpot_ms"], reps * (GEN - 1)))
    ttft, tpot, e2el = (float(samples[m].mean()) for m in ("ttft_ms", "tpot_ms", "e2el_ms"))
    return {
        "schema": rec.SCHEMA, "kind": "generation", "cell_id": cell_id(cell), "cell": cell, "status": "ok",
        "label": f"{impl}{f'[{attn}]' if attn else ''} gemma-3-1b (4/26 layers) float32 B={batch} P={prompt} G={GEN} cpu",
        "metrics": {**{m: summary(v) for m, v in samples.items()}, "itl_ms": summary(itl),
                    "prefill_tok_s": batch * prompt * 1000 / ttft, "decode_tok_s": batch * 1000 / tpot,
                    "output_throughput": batch * GEN * 1000 / e2el,
                    "total_token_throughput": batch * (prompt + GEN) * 1000 / e2el},
        "samples": {m: [float(x) for x in v] for m, v in samples.items()},
        "repetitions": {"warmup": 1, "n": reps, "target_cv": 0.05,
                        "cv": {m: float(v.std() / v.mean()) for m, v in samples.items()},
                        "stable": bool(noise < 0.05), "note": ""},
        "memory": {"rss_peak_bytes": 600 * MIB + batch * (prompt + GEN) * 40_000,
                   "rss_after_load_bytes": 500 * MIB, "rss_peak_generate_bytes": 550 * MIB},
        "energy": None,
        "kv_cache": {"after_prefill_bytes": batch * prompt * 8192, "after_last_token_bytes": batch * (prompt + GEN) * 8192,
                     "source": "past_key_values"},
        "roofline": {"bandwidth_gb_s": 100.0, "matmul_tflops": 20.0, "decode_bytes_per_step": 4e7,
                     "decode_bw_pct": 4e7 / (tpot / 1000) / 1e11 * 100, "prefill_flops": 2e9 * batch * prompt,
                     "prefill_flop_pct": 2e9 * batch * prompt / (ttft / 1000) / 2e13 * 100},
        "model_facts": {"params": 1e9, "weight_bytes": 4e9, "layers": 4, "layers_total": 26, "cut": True},
        "context": context or make_context(), "started_at": "2026-01-01T00:00:00Z", "duration_s": 3.0,
    }


def failed_record(impl, status, reason, batch=1, context=None) -> dict:
    cell = {"impl": impl, "attn": None, **MODEL, "batch": batch, "prompt": 32, "gen": GEN, "options": {}}
    return {"schema": rec.SCHEMA, "kind": "generation", "cell_id": cell_id(cell), "cell": cell, "status": status,
            "reason": reason, "label": f"{impl} B={batch}", "context": context or make_context(),
            "started_at": "2026-01-01T00:00:00Z", "duration_s": 0.1}


def kernel_record(rng, scale=1.0, context=None) -> dict:
    cell = {"impl": "kernel", "name": "test_rmsnorm[1024]", "group": "norm", "params": {"hidden": 1024},
            "dtype": "float32", "device": "cpu"}
    times = rng.normal(0.2 * scale, 0.002, 20)
    return {"schema": rec.SCHEMA, "kind": "kernel", "cell_id": cell_id(cell), "cell": cell, "status": "ok",
            "label": "kernel test_rmsnorm[1024]", "metrics": {"time_ms": {**summary(times), "min": float(times.min())}},
            "samples": {"time_ms": [float(t) for t in times]}, "context": context or make_context(),
            "started_at": "2026-01-01T00:00:00Z", "duration_s": 1.0}


def make_records(seed=0, scale=1.0, noise=0.01, reps=5, context=None, batches=BATCHES) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = [generation_record(impl, attn, b, p, rng, scale, noise, reps, context)
           for impl, attn in IMPLS for b in batches for p in PROMPTS]
    out.append(failed_record("vllm", "error", "RuntimeError: engine died during warmup", context=context))
    out.append(failed_record("vllm", "unsupported", "vllm is not installed in this environment", batch=2,
                             context=context))
    out.append(kernel_record(rng, scale, context))
    return out


OK_CELLS = len(IMPLS) * len(BATCHES) * len(PROMPTS)
GATED = OK_CELLS * 3  # three latency metrics per generation cell (kernel records only with kernels=True)


@pytest.fixture(scope="module")
def records():
    return make_records(seed=0)


@pytest.fixture(scope="module")
def html_text(records):
    return html(records, make_records(seed=1), title="synthetic")


# ---------------------------------------------------------------- tables


def test_tables_rows_and_columns(records):
    out = tables(records)
    generation = out["generation"]
    assert len(generation) == OK_CELLS
    for column in ["impl", "model", "dtype", "device", "batch", "prompt", "gen", "ttft_ms mean", "ttft_ms p90",
                   "tpot_ms mean", "tpot_ms p90", "itl_ms p99", "e2el_ms mean", "prefill_tok_s", "decode_tok_s",
                   "output_throughput", "total_token_throughput", "reps", "max CV", "stable", "peak mem MiB",
                   "KV after prefill MiB", "KV after last MiB", "J/token", "decode_bw_pct", "prefill_flop_pct"]:
        assert column in generation.columns, column
    assert set(generation["impl"]) == {"hf[eager]", "reference"}
    assert set(generation["model"]) == {"gemma-3-1b (4/26 layers)"}
    assert set(generation["mem source"]) == {"rss"}
    assert (generation["reps"] == 5).all()

    status = out["status"]
    assert sorted(status["status"]) == ["error", "unsupported"]
    assert "engine died" in " ".join(status["reason"])
    kernels = out["kernels"]
    assert list(kernels["name"]) == ["test_rmsnorm[1024]"] and kernels["time_ms mean"].iloc[0] == pytest.approx(0.2, rel=0.05)
    environment = out["environment"]
    assert len(environment) == 1 and environment["torch"].iloc[0] == "2.13.0"
    assert environment["cells"].iloc[0] == len(records) and environment["device.name"].iloc[0].startswith("Intel")


def test_speed_ratios_against_hf_eager(records):
    generation = tables(records)["generation"]
    decode, prefill = "decode x vs hf[eager]", "prefill x vs hf[eager]"
    assert decode in generation.columns and prefill in generation.columns
    base = generation[generation["impl"] == "hf[eager]"]
    assert np.allclose(base[decode].astype(float), 1.0)
    reference = generation[generation["impl"] == "reference"]
    # reference is 1.5x faster by construction; 1% noise on each side
    assert np.allclose(reference[decode].astype(float), 1.5, rtol=0.05)
    assert np.allclose(reference[prefill].astype(float), 1.5, rtol=0.05)


def test_ratio_baseline_falls_back_to_reference(records):
    without_eager = [r for r in records if (r.get("cell") or {}).get("attn") != "eager"]
    generation = tables(without_eager)["generation"]
    assert "decode x vs reference" in generation.columns and "decode x vs hf[eager]" not in generation.columns



def test_cuda_memory_energy_and_empty_inputs():
    record = generation_record("hf", "sdpa", 1, 32, np.random.default_rng(0))
    record["cell"]["device"] = "cuda"
    record["memory"].update(torch_max_allocated_bytes=3 * 1024 * MIB, nvml_process_bytes=4 * 1024 * MIB)
    record["energy"] = {"joules_per_token": 0.25, "joules": 4.0, "source": "nvml"}
    row = tables([record])["generation"].iloc[0]
    assert row["peak mem MiB"] == 3 * 1024 and row["mem source"] == "torch max allocated"
    assert row["nvml MiB"] == 4 * 1024 and row["J/token"] == 0.25
    assert "decode x vs hf[eager]" not in tables([record])["generation"].columns  # no baseline impl present
    empty = markdown([])
    assert "0 generation cell(s)" in empty and empty.count("None.") == 4
    assert "No ok generation cells" in html([])

def _table_rows(markdown_text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in markdown_text.splitlines() if line.startswith("|") and not line.startswith("|-")]


def test_markdown_has_every_cell(records):
    text = markdown(records, title="synthetic")
    assert text.startswith("# synthetic")
    rows = {tuple(r[:7]) for r in _table_rows(text)}
    for record in records:
        if record["kind"] != "generation":
            continue
        cell = record["cell"]
        impl = f"{cell['impl']}[{cell['attn']}]" if cell["attn"] else cell["impl"]
        key = (impl, "gemma-3-1b (4/26 layers)", "float32", "cpu", str(cell["batch"]), str(cell["prompt"]), str(GEN))
        assert key in rows, key
    assert "engine died during warmup" in text and "vllm is not installed" in text
    assert "test_rmsnorm[1024]" in text and "## Environment" in text and "2.13.0" in text
    assert "## Regression check" not in text
    assert "1.50x" in text or "1.49x" in text or "1.51x" in text


# ---------------------------------------------------------------- HTML


def test_html_is_self_contained(html_text):
    assert not re.search(r"https?://", html_text)
    assert "<link" not in html_text and "@import" not in html_text
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html_text)
    assert len(sources) == 5  # throughput vs batch, TTFT/TPOT vs prompt, memory vs context, KV vs context, roofline
    assert all(s.startswith("data:image/png;base64,") and len(s) > 2000 for s in sources)
    for title in ("Output throughput vs batch", "TTFT and TPOT vs prompt length", "Peak memory vs context",
                  "KV cache vs context", "Roofline"):
        assert title in html_text
    assert "Regression check" in html_text and "Welch" in html_text
    assert "engine died during warmup" in html_text and "test_rmsnorm[1024]" in html_text


def test_html_skips_a_plot_that_does_not_vary():
    text = html(make_records(batches=(1,)))
    assert "Skipped: the records do not vary in batch size" in text
    assert len(re.findall(r'<img[^>]*src="data:image/png', text)) == 4


# ---------------------------------------------------------------- the regression gate


def test_gate_flags_a_20_percent_slowdown():
    result = compare(make_records(seed=2, scale=1.2), make_records(seed=1))
    assert result.failed
    assert len(result.regressions) == GATED and not result.improvements
    assert all(0.15 < c.rel_change < 0.25 and c.p_value < 1e-4 for c in result.regressions)
    text = result.markdown()
    assert "Welch's two-sample t-test" in text and "p < 0.05" in text and "5%" in text
    assert "+20" in text or "+19" in text or "+21" in text


@pytest.mark.parametrize("seeds", [(3, 4), (5, 6), (7, 8)])
def test_gate_is_quiet_on_two_draws_of_one_distribution(seeds):
    result = compare(make_records(seed=seeds[0]), make_records(seed=seeds[1]))
    assert not result.failed and not result.regressions and not result.improvements
    assert len(result.checks) == GATED  # every metric was tested, not skipped
    assert all(c.p_value is not None and abs(c.rel_change) < 0.05 for c in result.checks)
    assert {c.verdict for c in result.checks} <= {BELOW_THRESHOLD, NOT_SIGNIFICANT}


def test_gate_quiet_below_threshold_even_when_significant():
    result = compare(make_records(seed=2, scale=1.03, noise=0.001), make_records(seed=1, noise=0.001))
    assert not result.failed
    assert all(c.verdict == BELOW_THRESHOLD for c in result.checks)
    assert all(c.p_value < 0.05 for c in result.checks)  # the test alone would have flagged them


def test_gate_quiet_when_not_significant():
    current, baseline = make_records(seed=1), make_records(seed=1)
    for now, before in zip(current, baseline, strict=True):
        if now["status"] == "ok" and now["kind"] == "generation":
            before["samples"]["ttft_ms"] = [100.0, 140.0, 60.0]
            now["samples"]["ttft_ms"] = [110.0, 150.0, 70.0]  # +10%, far inside the noise
    result = compare(current, baseline)
    ttft = [c for c in result.checks if c.metric == "ttft_ms"]
    assert len(ttft) == OK_CELLS and all(c.verdict == NOT_SIGNIFICANT and c.p_value > 0.5 for c in ttft)
    assert not result.failed


def test_gate_does_not_test_single_repetitions():
    result = compare(make_records(seed=2, scale=1.5, reps=1), make_records(seed=1, reps=1))
    assert len(result.checks) == GATED and all(c.verdict == NOT_ENOUGH_REPS for c in result.checks)
    assert all(c.p_value is None for c in result.checks) and not result.failed
    assert "not enough repetitions to test" in result.markdown().lower()



def test_gate_kernels_only_when_asked():
    current, baseline = make_records(seed=2, scale=1.2), make_records(seed=1)
    assert "1 kernel record(s) not gated" in " ".join(compare(current, baseline).context_notes)
    result = compare(current, baseline, kernels=True)
    kernel = [c for c in result.checks if c.metric == "time_ms"]
    assert len(kernel) == 1 and kernel[0].verdict == REGRESSION

def test_gate_lists_improvements():
    result = compare(make_records(seed=2, scale=0.8), make_records(seed=1))
    assert not result.failed and len(result.improvements) == GATED
    assert all(c.verdict == IMPROVEMENT and c.rel_change < -0.15 for c in result.improvements)
    assert "Improvements" in result.markdown()


def test_gate_refuses_other_torch_or_device():
    baseline = make_records(seed=1, context=make_context(torch="2.12.0"))
    result = compare(make_records(seed=2, scale=1.2), baseline)
    assert not result.failed and not result.checks
    assert len(result.not_compared) == len(baseline) - 1  # every generation cell; the kernel is not gated
    assert all("torch 2.13.0 vs 2.12.0" in s.why for s in result.not_compared)
    assert "torch 2.13.0 vs 2.12.0" in result.markdown()

    baseline = make_records(seed=1, context=make_context(device_name="AMD EPYC 9654"))
    result = compare(make_records(seed=2, scale=1.2), baseline)
    assert not result.failed
    assert all("device.name Intel Xeon Platinum 8480 vs AMD EPYC 9654" in s.why for s in result.not_compared)


def test_gate_reports_other_commits_without_blocking():
    result = compare(make_records(seed=2, scale=1.2, context=make_context(git="def5678")), make_records(seed=1))
    assert result.failed
    assert result.context_notes[0] == "compared across git def5678 vs abc1234"



def test_gate_compares_a_device_given_as_a_string():
    current, baseline = make_records(seed=2), make_records(seed=1)
    for record in current:
        record["context"] = {**record["context"], "device": "NVIDIA H200"}
    result = compare(current, baseline)
    assert all("device.name NVIDIA H200 vs Intel Xeon Platinum 8480" in s.why for s in result.not_compared)

def test_gate_lists_unmatched_and_failed_cells():
    current, baseline = make_records(seed=2), make_records(seed=1)
    dropped_now, dropped_before = current.pop(0), baseline.pop(1)
    result = compare(current, baseline)
    unmatched = {(s.cell_id, s.why) for s in result.unmatched}
    assert unmatched == {(dropped_before["cell_id"], "current only"), (dropped_now["cell_id"], "baseline only")}
    not_compared = {s.why for s in result.not_compared}
    assert any(w.startswith("status error vs error") for w in not_compared)


# ---------------------------------------------------------------- files


def _write(directory, records_list):
    for record in records_list:
        rec.append_record(rec.records_path(directory), record)
    return directory


@pytest.fixture(scope="module")
def record_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {name: _write(root / name, records_list) for name, records_list in (
        ("baseline", make_records(seed=1)), ("same", make_records(seed=3)), ("slow", make_records(seed=2, scale=1.2)))}


def test_write_report_exit_codes(record_dirs, tmp_path):
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    assert write_report([record_dirs["slow"]], html_path=page, md_path=md, baseline=record_dirs["baseline"]) == 1
    assert "Regression gate FAILED" in md.read_text() and "Regression gate FAILED" in page.read_text()
    assert write_report([record_dirs["same"]], md_path=md, baseline=[record_dirs["baseline"]]) == 0
    assert "Regression gate passed" in md.read_text()
    assert write_report(record_dirs["same"], md_path=md) == 0
    assert "Regression check" not in md.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_report_merges_shards_and_rejects_a_missing_dir(record_dirs, tmp_path):
    md = tmp_path / "r.md"
    assert write_report([record_dirs["same"], record_dirs["slow"]], md_path=md) == 0
    assert "Merge conflict" in md.read_text()
    with pytest.raises(rec.RecordsError, match="no benchmark records"):
        write_report([tmp_path / "missing"], md_path=md)


# ---------------------------------------------------------------- headless chromium


def test_html_renders_offline_in_chromium(html_text, tmp_path):
    from harness.bench.screenshot import ChromiumMissing, check, screenshot

    if not shutil.which("chromium"):
        pytest.skip("headless chromium not installed (/usr/bin/chromium missing)")
    page = tmp_path / "report.html"
    page.write_text(html_text, encoding="utf-8")
    try:
        shot = screenshot(page, tmp_path / "report.png")
    except ChromiumMissing as exc:
        pytest.skip(str(exc))
    assert shot["images"] == 5 and shot["rendered"] == 5
    assert shot["external_requests"] == []
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and shot["bytes"] > 10_000 and shot["height"] > 1000

    # the check can fail: a page with an external image and stylesheet, and an image that cannot decode
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<html><body><img src="http://example.invalid/x.png"><img src="data:image/png;base64,AAAA">'
                     '<link rel="stylesheet" href="https://cdn.example.invalid/a.css"></body></html>')
    result = check(leaky)
    assert result["images"] == 2 and result["rendered"] == 0
    assert "http://example.invalid/x.png" in result["external_requests"]
    assert "https://cdn.example.invalid/a.css" in result["external_requests"]

