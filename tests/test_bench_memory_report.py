"""The report's memory section: the memory table (peak memory, RSS growth, measured vs analytic KV cache)
and the memory plots' analytic KV lines, on synthetic records (no model runs)."""

from __future__ import annotations

import numpy as np
import pytest

import configs
from harness.bench import report
from harness.bench.report import (
    KV_MEASURED,
    KV_MINIMAL,
    KV_RATIO,
    KV_STORED,
    markdown,
    memory_table,
    plots,
    tables,
)
from harness.kvcache import breakdown
from reference_impl.spec import ModelSpec
from tests.test_bench_report import MIB, _table_rows, cell_id, generation_record

STORED_LABEL = "analytic KV, stored (K and V)"
MINIMAL_LABEL = "analytic KV, minimal (K=V once)"


def record(impl="reference", attn=None, prompt=32, model="gemma-3-1b", layers=4, dtype="float32", batch=1,
           kv_bytes=None, **cell) -> dict:
    """A schema-complete ok record (tests.test_bench_report's) for another model / cut / dtype / KV figure."""
    out = generation_record(impl, attn, batch, prompt, np.random.default_rng(prompt))
    out["cell"].update(model=model, layers=layers, dtype=dtype, **cell)
    out["cell_id"] = cell_id(out["cell"])
    if kv_bytes is not None:
        out["kv_cache"]["after_last_token_bytes"] = kv_bytes
    return out


def spec_of(model: str, layers: int | None) -> ModelSpec:
    config = configs.hf_config(model)
    return ModelSpec.from_hf_config(configs.cut(config, layers) if layers else config)


def sweep(model="gemma-4-31b", layers=6, dtype="bfloat16", prompts=(512, 2048)) -> list[dict]:
    """Two implementations over two prompt lengths; hf's cache not exposed (None) at the second."""
    out = [record(impl, attn, p, model, layers, dtype) for impl, attn in (("reference", None), ("hf", "sdpa"))
           for p in prompts]
    out[-1]["kv_cache"].update(after_prefill_bytes=None, after_last_token_bytes=None)
    return out


def captured_figures(monkeypatch, records: list[dict]) -> dict[str, object]:
    """{plot title: matplotlib Figure} of the report's plots of ``records``."""
    figures = []
    monkeypatch.setattr(report, "_png_data_uri", lambda figure: figures.append(figure) or f"data:{len(figures)}")
    frames = tables(records)
    drawn = [(title, uri) for title, uri, _ in plots(frames["generation"], frames["memory"]) if uri]
    return {title: figures[int(uri.split(":")[1]) - 1] for title, uri in drawn}


def test_analytic_kv_equals_breakdown_of_the_cut_model():
    for model, layers, dtype, prompt in (("gemma-3-1b", 4, "float32", 32), ("gemma-4-31b", 6, "bfloat16", 2048),
                                         ("gemma-4-e2b", 20, "bfloat16", 1024), ("gemma-2-2b", None, "bfloat16", 256)):
        row = memory_table([record(prompt=prompt, model=model, layers=layers, dtype=dtype, batch=2)]).iloc[0]
        expected = breakdown(spec_of(model, layers), prompt + 16 - 1, 2, dtype)  # held after the last token
        assert row["context"] == prompt + 16
        assert row[KV_STORED] == pytest.approx(expected["stored_bytes"] / MIB)
        assert row[KV_MINIMAL] == pytest.approx(expected["minimal_bytes"] / MIB)
    kv_eq_v = memory_table([record(prompt=2048, model="gemma-4-31b", layers=6, dtype="bfloat16")]).iloc[0]
    assert kv_eq_v[KV_MINIMAL] < kv_eq_v[KV_STORED]  # its full layer keeps K=V once


def test_kv_dtype_and_unknown_models():
    fp8 = record(impl="vllm", options={"kv_cache_dtype": "fp8_e4m3"}, dtype="bfloat16")
    assert report.kv_dtype(fp8["cell"]) == "fp8"
    expected = breakdown(spec_of("gemma-3-1b", 4), 48 - 1, 1, "fp8")["stored_bytes"] / MIB
    assert memory_table([fp8]).iloc[0][KV_STORED] == pytest.approx(expected)
    unknown = memory_table([record(model="no-such-model")]).iloc[0]
    assert pd_missing(unknown[KV_STORED]) and pd_missing(unknown[KV_RATIO])


def pd_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def test_memory_table_ratio_and_rss_growth_by_hand():
    # gemma-3-1b cut to 4 layers: all sliding (window 512), 1 KV head x 256; prompt 32 + gen 16 - 1 = 47
    # tokens held after the last token, float32, batch 3
    by_hand = 4 * 47 * 1 * 256 * 2 * 4 * 3
    rec = record(batch=3, kv_bytes=int(1.25 * by_hand))
    rec["memory"].update(rss_peak_bytes=900 * MIB, rss_after_load_bytes=500 * MIB, rss_peak_generate_bytes=560 * MIB)
    row = memory_table([rec]).iloc[0]
    assert row[KV_STORED] == pytest.approx(by_hand / MIB) and row[KV_MINIMAL] == pytest.approx(by_hand / MIB)
    assert row[KV_MEASURED] == pytest.approx(1.25 * by_hand / MIB)
    assert row[KV_RATIO] == pytest.approx(1.25)
    assert row["RSS gen peak - after load MiB"] == 60 and row["RSS after load MiB"] == 500
    assert row["peak MiB"] == 900 and row["peak source"] == "rss"
    text = markdown([rec])
    assert "## Memory" in text and "1.250" in text and "process RSS" not in text.split("## Memory")[0]


def test_cuda_memory_shows_every_source():
    rec = record(device="cuda:0")
    rec["memory"].update(torch_max_allocated_bytes=3 * 1024 * MIB, torch_max_reserved_bytes=4 * 1024 * MIB,
                         nvml_process_bytes=5 * 1024 * MIB, nvml_device_used_bytes=6 * 1024 * MIB)
    row = memory_table([rec]).iloc[0]
    assert row["peak source"] == "torch max allocated" and row["peak MiB"] == 3 * 1024
    assert (row["torch max reserved MiB"], row["nvml process MiB"], row["nvml device used MiB"]) == (4096, 5120, 6144)
    header = next(r for r in _table_rows(markdown([record()])) if KV_RATIO in r)
    assert "RSS peak MiB" in header and "torch max allocated MiB" not in header  # CPU: CUDA columns left out


def test_not_exposed_kv_is_not_zero():
    records = sweep()
    hidden = records[-1]
    frame = memory_table(records)
    assert pd_missing(frame.loc[hidden["cell_id"], KV_MEASURED]) and pd_missing(frame.loc[hidden["cell_id"], KV_RATIO])
    table = _table_rows(markdown(records))
    rows = [r for r in table if r[0] == "hf[sdpa]" and r[5] == "2048"]
    assert len(rows) == 2 and all("not exposed" in r for r in rows)  # the generation and the memory table's rows
    header = next(r for r in table if KV_RATIO in r)
    memory_row = next(r for r in rows if len(r) == len(header))
    assert memory_row[header.index(KV_MEASURED)] == "not exposed" and memory_row[header.index(KV_RATIO)] == "-"


def test_plots_draw_the_analytic_kv_lines(monkeypatch):
    records = sweep()
    figures = captured_figures(monkeypatch, records)
    assert {"Peak memory vs context (prompt + gen)", "KV cache vs context"} <= set(figures)
    expected = {p: breakdown(spec_of("gemma-4-31b", 6), p + 16 - 1, 1, "bfloat16") for p in (512, 2048)}
    for title in ("Peak memory vs context (prompt + gen)", "KV cache vs context"):
        for axis in figures[title].axes:
            lines = {line.get_label(): line for line in axis.get_lines()}
            assert {STORED_LABEL, MINIMAL_LABEL} <= set(lines), (title, set(lines))
            stored, minimal = lines[STORED_LABEL], lines[MINIMAL_LABEL]
            assert list(stored.get_xdata()) == [528, 2064]
            assert np.allclose(stored.get_ydata(), [expected[p]["stored_bytes"] / MIB for p in (512, 2048)])
            assert np.allclose(minimal.get_ydata(), [expected[p]["minimal_bytes"] / MIB for p in (512, 2048)])
    kv_axis = figures["KV cache vs context"].axes[0]
    hf_line = next(line for line in kv_axis.get_lines() if line.get_label() == "hf[sdpa]")
    assert list(hf_line.get_xdata()) == [528]  # the record without a KV figure is left out, not drawn as 0
    assert "process RSS" in figures["Peak memory vs context (prompt + gen)"].axes[0].get_ylabel()


def test_minimal_line_only_where_it_differs(monkeypatch):
    figures = captured_figures(monkeypatch, sweep(model="gemma-3-1b", layers=6, prompts=(256, 1024)))
    labels = {line.get_label() for line in figures["KV cache vs context"].axes[0].get_lines()}
    assert STORED_LABEL in labels and MINIMAL_LABEL not in labels
