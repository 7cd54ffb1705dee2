"""Benchmark reports: tables (pandas), GitHub Markdown, and one self-contained HTML file with plots.

:func:`tables` turns records (see :mod:`harness.bench.records`) into DataFrames: one row per generation
cell, a memory table (each cell's peak memory and KV cache against the analytic KV size of its model,
:func:`memory_table`), a status table (error / unsupported cells and their reasons), a kernel table
(pytest-benchmark building blocks) and an environment table (each distinct context once).
:func:`markdown` and :func:`html` render them, plus the regression section of :mod:`harness.bench.regress`
when a baseline is given; :func:`write_report` is the CLI's entry point.

The HTML needs no network: inline CSS, matplotlib PNGs (Agg canvas, no pyplot state) as base64 ``data:``
URIs, and a small inline script (:data:`harness.bench.screenshot.RENDER_PROBE`) that a headless browser
check reads back.
"""

from __future__ import annotations

import base64
import dataclasses
import html as html_lib
import io
import json
import os
from collections.abc import Iterable, Sequence

import pandas as pd

from ..atomic import write_atomic
from ..kvcache import DTYPE_BYTES
from .records import load, merge
from .regress import Comparison, compare, fmt, markdown_table
from .screenshot import RENDER_PROBE

DEFAULT_TITLE = "Gemma benchmark report"
BASELINE_IMPLS = ("hf[eager]", "reference")
LABEL_COLUMNS = ["impl", "model", "dtype", "device", "batch", "prompt", "gen"]
MIB = 1024 * 1024
MAX_FACETS = 9

Source = str | os.PathLike


# ---------------------------------------------------------------- labels


def kind(record: dict) -> str:
    """'generation' (the default) or 'kernel'."""
    return record.get("kind") or "generation"


def impl_label(cell: dict) -> str:
    """'hf[sdpa]' for an implementation with an attention backend, else the implementation's name."""
    attn = cell.get("attn")
    return f"{cell.get('impl')}[{attn}]" if attn else str(cell.get("impl"))


def model_label(cell: dict) -> str:
    """The model name, '(GGUF)' for real GGUF weights, '(N/M layers)' when cut (as suite.Cell.model_label)."""
    label = str(cell.get("model"))
    weights = cell.get("weights")
    if weights and weights != "random":
        label += f" ({str(weights).upper()})"
    layers, total = cell.get("layers"), cell.get("layers_total")
    if layers and (total is None or layers < total):
        label += f" ({layers}/{total if total is not None else '?'} layers)"
    return label


def options_label(options: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((options or {}).items()))


def _labels(cell: dict) -> dict:
    return {
        "impl": impl_label(cell),
        "model": model_label(cell),
        "dtype": cell.get("dtype"),
        "device": cell.get("device"),
        "batch": cell.get("batch"),
        "prompt": cell.get("prompt"),
        "gen": cell.get("gen"),
    }


# ---------------------------------------------------------------- the generation table


def _stat(metrics: dict, metric: str, stat: str):
    value = metrics.get(metric)
    return value.get(stat) if isinstance(value, dict) else None


def _mib(value) -> float | None:
    return None if value is None else value / MIB


def peak_memory(record: dict) -> tuple[float | None, str]:
    """(peak MiB, source): process RSS on CPU; torch max allocated on CUDA, else NVML, else RSS."""
    memory = record.get("memory") or {}
    sources = [("rss", "rss_peak_bytes"), ("rss (generate)", "rss_peak_generate_bytes")]
    if str(record["cell"].get("device", "")).startswith("cuda"):
        sources = [("torch max allocated", "torch_max_allocated_bytes"), ("nvml", "nvml_process_bytes")] + sources
    for name, key in sources:
        if memory.get(key) is not None:
            return _mib(memory[key]), name
    return None, "-"


def _repetition_columns(record: dict) -> dict:
    reps = record.get("repetitions") or {}
    cvs = [v for v in (reps.get("cv") or {}).values() if v is not None]
    stable = reps.get("stable")
    return {
        "reps": reps.get("n"),
        "max CV": max(cvs) if cvs else None,
        "stable": "-" if stable is None else ("yes" if stable else "NO (unstable)"),
    }


def _generation_row(record: dict) -> dict:
    metrics = record.get("metrics") or {}
    memory = record.get("memory") or {}
    kv = record.get("kv_cache") or {}
    energy = record.get("energy") or {}
    roofline = record.get("roofline") or {}
    peak, peak_source = peak_memory(record)
    row = _labels(record["cell"])
    row.update({
        "ttft_ms mean": _stat(metrics, "ttft_ms", "mean"),
        "ttft_ms p90": _stat(metrics, "ttft_ms", "p90"),
        "tpot_ms mean": _stat(metrics, "tpot_ms", "mean"),
        "tpot_ms p90": _stat(metrics, "tpot_ms", "p90"),
        "itl_ms p99": _stat(metrics, "itl_ms", "p99"),
        "e2el_ms mean": _stat(metrics, "e2el_ms", "mean"),
        "prefill_tok_s": metrics.get("prefill_tok_s"),
        "decode_tok_s": metrics.get("decode_tok_s"),
        "output_throughput": metrics.get("output_throughput"),
        "total_token_throughput": metrics.get("total_token_throughput"),
        **_repetition_columns(record),
        "peak mem MiB": peak,
        "mem source": peak_source,
        "nvml MiB": _mib(memory.get("nvml_process_bytes")),
        "KV after prefill MiB": _mib(kv.get("after_prefill_bytes")),
        "KV after last MiB": _mib(kv.get("after_last_token_bytes")),
        "J/token": energy.get("joules_per_token"),
        "decode_bw_pct": roofline.get("decode_bw_pct"),
        "prefill_flop_pct": roofline.get("prefill_flop_pct"),
        "load 1m": ((record.get("context") or {}).get("device") or {}).get("load_1m"),
        "options": options_label(record["cell"].get("options")),
    })
    return row


def _ok_generation(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if kind(r) == "generation" and r.get("status", "ok") == "ok"]


def baseline_impl(records: Iterable[dict], preferred: str | None = None) -> str | None:
    """The implementation speed ratios are taken against: ``preferred`` when given and present, else the
    first of :data:`BASELINE_IMPLS` present among the ok generation cells, else None."""
    present = {impl_label(r["cell"]) for r in _ok_generation(records)}
    for name in ([preferred] if preferred else []) + list(BASELINE_IMPLS):
        if name in present:
            return name
    return None


def _sibling_key(row: pd.Series) -> tuple:
    return tuple(row[c] for c in LABEL_COLUMNS if c != "impl")


def add_speed_ratios(frame: pd.DataFrame, base: str) -> pd.DataFrame:
    """Columns 'decode x vs BASE' and 'prefill x vs BASE': a cell's tokens/s over those of its sibling (same
    model, dtype, device, batch, prompt, gen) run by ``base``; a sibling with the same options is preferred."""
    base_rows = frame[frame["impl"] == base]
    siblings: dict[tuple, list[pd.Series]] = {}
    for _, row in base_rows.iterrows():
        siblings.setdefault(_sibling_key(row), []).append(row)
    for speed, column in (("decode_tok_s", f"decode x vs {base}"), ("prefill_tok_s", f"prefill x vs {base}")):
        frame[column] = [_ratio(row, siblings.get(_sibling_key(row), []), speed) for _, row in frame.iterrows()]
    return frame


def _ratio(row: pd.Series, siblings: list[pd.Series], speed: str) -> float | None:
    if not siblings:
        return None
    sibling = next((s for s in siblings if s["options"] == row["options"]), siblings[0])
    mine, theirs = row[speed], sibling[speed]
    if mine is None or theirs is None or pd.isna(mine) or pd.isna(theirs) or theirs == 0:
        return None
    return float(mine) / float(theirs)


def generation_table(records: Iterable[dict], baseline: str | None = None) -> pd.DataFrame:
    """One row per ok generation cell (index: cell_id), sorted so that siblings sit together."""
    ok = _ok_generation(records)
    frame = pd.DataFrame([_generation_row(r) for r in ok], index=[r["cell_id"] for r in ok])
    if frame.empty:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    frame = frame.sort_values(["model", "dtype", "device", "prompt", "gen", "batch", "impl"], kind="stable")
    base = baseline_impl(records, baseline)
    if base is not None:
        frame = add_speed_ratios(frame, base)
    return frame


# ---------------------------------------------------------------- the memory table

KV_MEASURED = "KV measured MiB"
KV_STORED = "KV analytic stored MiB"
KV_MINIMAL = "KV analytic minimal MiB"
KV_RATIO = "KV measured / analytic stored"
RSS_GROWTH = "RSS gen peak - after load MiB"
NOT_EXPOSED = "not exposed"
NOT_EXPOSED_COLUMNS = ("KV after prefill MiB", "KV after last MiB", KV_MEASURED)  # missing = no cache figure
MEMORY_SOURCES = (("RSS peak MiB", "rss_peak_bytes"), ("RSS after load MiB", "rss_after_load_bytes"),
                  ("RSS gen peak MiB", "rss_peak_generate_bytes"),
                  ("torch max allocated MiB", "torch_max_allocated_bytes"),
                  ("torch max reserved MiB", "torch_max_reserved_bytes"),
                  ("nvml process MiB", "nvml_process_bytes"), ("nvml device used MiB", "nvml_device_used_bytes"))


def kv_dtype(cell: dict) -> str | None:
    """The dtype the cell's KV cache is held in: the ``kv_cache_dtype`` option when set (vLLM's 'fp8_e4m3'
    and the like count as 'fp8'), else the cell's dtype; None when :mod:`harness.kvcache` has no size for it."""
    option = str((cell.get("options") or {}).get("kv_cache_dtype") or "auto")
    name = cell.get("dtype") if option == "auto" else ("fp8" if option.startswith("fp8") else option)
    return name if name in DTYPE_BYTES else None


def _suite_cell(cell: dict):
    """The record's cell as the suite's :class:`~harness.bench.suite.Cell` (extra record keys dropped)."""
    from .suite import Cell

    names = {f.name for f in dataclasses.fields(Cell)}
    return Cell(**{k: v for k, v in cell.items() if k in names})


def analytic_kv(cell: dict) -> dict | None:
    """:func:`harness.kvcache.breakdown` of the cell's model, built as the runner builds it (its config cut
    to ``layers``, :func:`harness.bench.runner.model_spec`), at the tokens a cache holds after the last
    token (prompt + gen - 1: the last token is never fed back), the cell's batch and KV dtype; None when
    the model or the dtype is unknown here."""
    from ..kvcache import breakdown
    from .runner import model_spec

    dtype = kv_dtype(cell)
    try:
        spec = model_spec(_suite_cell(cell))
    except (KeyError, TypeError, ValueError):  # a model this checkout has no config of
        return None
    return None if dtype is None else breakdown(spec, cell["prompt"] + cell["gen"] - 1, cell["batch"], dtype)


def _rss_growth(memory: dict) -> float | None:
    peak, loaded = memory.get("rss_peak_generate_bytes"), memory.get("rss_after_load_bytes")
    return None if peak is None or loaded is None else _mib(peak - loaded)


def _kv_columns(record: dict) -> dict:
    measured = _mib((record.get("kv_cache") or {}).get("after_last_token_bytes"))
    analytic = analytic_kv(record["cell"]) or {}
    stored, minimal = _mib(analytic.get("stored_bytes")), _mib(analytic.get("minimal_bytes"))
    ratio = measured / stored if measured is not None and stored else None
    return {KV_MEASURED: measured, KV_STORED: stored, KV_MINIMAL: minimal, KV_RATIO: ratio}


def _memory_row(record: dict) -> dict:
    cell, memory = record["cell"], record.get("memory") or {}
    peak, source = peak_memory(record)
    row = {**_labels(cell), "context": cell["prompt"] + cell["gen"], "peak MiB": peak, "peak source": source}
    row.update({name: _mib(memory.get(key)) for name, key in MEMORY_SOURCES})
    row[RSS_GROWTH] = _rss_growth(memory)
    return {**row, **_kv_columns(record)}


def memory_table(records: Iterable[dict]) -> pd.DataFrame:
    """One row per ok generation cell (index: cell_id): the peak :func:`peak_memory` picks and every memory
    source measured, the RSS growth during generation, the KV cache measured after the last token and the
    analytic one of :func:`analytic_kv` (stored, minimal), and measured / analytic stored."""
    ok = _ok_generation(records)
    if not ok:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    frame = pd.DataFrame([_memory_row(r) for r in ok], index=[r["cell_id"] for r in ok])
    return frame.sort_values(["model", "dtype", "device", "batch", "context", "impl"], kind="stable")


# ---------------------------------------------------------------- status, kernels, environment


def status_table(records: Iterable[dict]) -> pd.DataFrame:
    """Error and unsupported cells (both kinds) with their reasons."""
    rows = []
    for record in records:
        if record.get("status", "ok") == "ok":
            continue
        cell = record.get("cell") or {}
        if kind(record) == "generation":
            labels = _labels(cell)
        elif kind(record) == "eval":
            labels = {**cell, "prompt": cell.get("task")}
        else:
            labels = {"impl": "kernel", "model": cell.get("name"), "dtype": cell.get("dtype"),
                      "device": cell.get("device")}
        rows.append({**{c: labels.get(c) for c in LABEL_COLUMNS}, "status": record.get("status"),
                     "reason": record.get("reason") or "-"})
    return pd.DataFrame(rows, columns=LABEL_COLUMNS + ["status", "reason"])


KERNEL_STATS = ("mean", "median", "std", "p90", "p99", "min", "n")


def kernel_table(records: Iterable[dict]) -> pd.DataFrame:
    """One row per ok kernel record: its time_ms statistics."""
    rows = []
    for record in records:
        if kind(record) != "kernel" or record.get("status", "ok") != "ok":
            continue
        cell = record.get("cell") or {}
        time_ms = (record.get("metrics") or {}).get("time_ms") or {}
        rows.append({"name": cell.get("name"), "group": cell.get("group"), "params": options_label(cell.get("params")),
                     "dtype": cell.get("dtype"), "device": cell.get("device"),
                     **{f"time_ms {s}": time_ms.get(s) for s in KERNEL_STATS}})
    columns = ["name", "group", "params", "dtype", "device"] + [f"time_ms {s}" for s in KERNEL_STATS]
    return pd.DataFrame(rows, columns=columns)


# Context fields that change from cell to cell on one machine (a GPU's current clock): left out of the
# environment table so that it lists each machine/software combination once.
VOLATILE_CONTEXT = ("device.sm_clock_mhz", "device.load_1m")  # per cell: load 1m is a generation column
CONTEXT_ORDER = ("harness", "git", "suite", "suite_hash", "python", "torch", "transformers", "vllm",
                 "impl_version", "host", "seed")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return {prefix.rstrip("."): value}


def _context_order(name: str) -> tuple:
    top = name.split(".")[0]
    return (CONTEXT_ORDER.index(top) if top in CONTEXT_ORDER else len(CONTEXT_ORDER), name)


def environment_table(records: Iterable[dict]) -> pd.DataFrame:
    """Each distinct context once (flattened: 'device.name', ...), with how many cells and which
    implementations ran under it."""
    contexts: dict[str, dict] = {}
    for record in records:
        flat = {k: v for k, v in _flatten(record.get("context") or {}).items() if k not in VOLATILE_CONTEXT}
        key = json.dumps(flat, sort_keys=True, default=str)
        entry = contexts.setdefault(key, {"context": flat, "cells": 0, "impls": []})
        entry["cells"] += 1
        impl = {"generation": impl_label(record.get("cell") or {}), "eval": (record.get("cell") or {}).get("impl")}.get(
            kind(record), "kernel")
        if impl not in entry["impls"]:
            entry["impls"].append(impl)
    rows = [{"cells": e["cells"], "impls": ", ".join(e["impls"]), **e["context"]} for e in contexts.values()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    fields = sorted((c for c in frame.columns if c not in ("cells", "impls")), key=_context_order)
    return frame[["cells", "impls"] + fields]


def _percent(entry: dict | None) -> tuple[float | None, float | None]:
    if not entry or entry.get("value") is None:
        return None, None
    stderr = entry.get("stderr")
    return entry["value"] * 100, None if stderr is None else stderr * 100


def accuracy_table(records: Iterable[dict]) -> pd.DataFrame:
    """One row per ok eval cell (``gemma-harness eval``): its scores in percent with lm-eval's stderr,
    the documents scored, and what the score depends on (shots, limit, split, batch, BOS, first ids)."""
    rows = []
    for record in records:
        if kind(record) != "eval" or record.get("status") != "ok":
            continue
        cell, info = record["cell"], record.get("eval") or {}
        row = {"impl": cell["impl"], "model": cell["model"], "weights": cell.get("weights"), "dtype": cell["dtype"],
               "task": cell["task"], "shots": cell["num_fewshot"], "limit": cell.get("limit"),
               "split": cell.get("split"), "n": record.get("n")}
        for metric, entry in sorted((record.get("metrics") or {}).items()):
            if "," in metric:
                continue
            row[f"{metric} %"], row[f"{metric} ± %"] = _percent(entry)
        row.update({"batch": cell["batch"], "chat": cell.get("chat_template"), "seconds": record.get("duration_s"),
                    "first ids": " ".join(map(str, info.get("first_ids") or [])),
                    "lm-eval": info.get("lm_eval"), "task hash": info.get("task_hash")})
        rows.append(row)
    return pd.DataFrame(rows)


def tables(records: Sequence[dict], baseline: str | None = None) -> dict[str, pd.DataFrame]:
    """{"generation", "memory", "status", "kernels", "profile", "environment"}: see the module docstring.
    ``baseline`` names the implementation speed ratios are taken against (default: hf[eager] if present,
    else reference)."""
    return {
        "generation": generation_table(records, baseline),
        "accuracy": accuracy_table(records),
        "memory": memory_table(records),
        "status": status_table(records),
        "kernels": kernel_table(records),
        "profile": profile_table(records),
        "environment": environment_table(records),
    }


def profile_table(records: Iterable[dict]) -> pd.DataFrame:
    """Where the time goes: for each cell profiled (suite setting ``profile: true``), the operators with
    the most self time in one untimed generation, with their share of it."""
    rows = []
    for r in _ok_generation(records):
        prof = r.get("profile")
        if not prof:
            continue
        top = ", ".join(f"{op['op']} {op['pct']:.0f}%" for op in prof["ops"][:6])
        rows.append({**_labels(r["cell"]), "profiled ms": prof["total_ms"], "timer": prof["timer"], "top operators": top})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- display helpers


def _environment_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The environment table turned on its side: one row per context field, one column per context."""
    shown = _display(frame).T
    shown.columns = [f"context {i + 1}" for i in range(shown.shape[1])]
    shown.insert(0, "field", shown.index)
    return shown.reset_index(drop=True)


def _shown(name: str, frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A table as displayed (empty columns left out, the environment on its side), and what was left out."""
    shown, omitted = _drop_empty_columns(frame)
    return (_environment_display(shown) if name == "environment" else shown), omitted


def _missing(value) -> bool:
    return value is None or value == "" or value == "-" or (isinstance(value, float) and pd.isna(value))


def _drop_empty_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Columns with no value in any row are left out of the display (and named in a note); a KV cache
    column stays, its empty cells reading 'not exposed'."""
    empty = [c for c in frame.columns if c not in NOT_EXPOSED_COLUMNS and frame[c].map(_missing).all()]
    return frame.drop(columns=empty), empty


def _display_value(value, column: str, integral: bool) -> str:
    value = value.item() if hasattr(value, "item") else value
    missing = value is None or (isinstance(value, float) and pd.isna(value))
    if " x vs " in column:
        return "-" if missing else f"{value:.2f}x"
    if missing and column in NOT_EXPOSED_COLUMNS:
        return NOT_EXPOSED
    if column == KV_RATIO and not missing:
        return f"{value:.3f}"
    if integral and isinstance(value, float) and not missing:
        return str(int(value))
    return fmt(value)


def _integral(column: pd.Series) -> bool:
    """A float column whose values are all whole numbers (counts that pandas turned into floats for a NaN)."""
    values = column.dropna()
    return pd.api.types.is_float_dtype(column) and not values.empty and bool((values % 1 == 0).all())


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Values as text: ratios as '1.85x', whole-number columns as integers, the rest through :func:`fmt`."""
    shown = frame.copy()
    for column in shown.columns:
        integral = _integral(frame[column])
        shown[column] = shown[column].map(lambda v, c=str(column), i=integral: _display_value(v, c, i))
    return shown


OPTIONAL_SECTIONS = ("accuracy", "memory", "profile")  # left out when no record has one
SECTION_TITLES = {
    "generation": "Generation cells",
    "accuracy": "Accuracy (lm-eval)",
    "memory": "Memory",
    "status": "Errors and unsupported cells",
    "kernels": "Kernels",
    "profile": "Where the time goes",
    "environment": "Environment",
}


MEMORY_NOTES = (
    "Sizes in MiB. 'peak MiB' is what the memory plot draws (peak source): on CPU the process RSS, its "
    "lifetime peak (loading and the random weights' creation included); on CUDA torch's max allocated, else "
    "NVML's figure for the process. Every source the cell measured has its own column.",
    f"'{RSS_GROWTH}': the RSS peak during the timed generation minus the RSS after loading, the part that "
    "grows with context (KV cache, activations, allocator slack); on CUDA it is host memory only.",
    f"'{KV_MEASURED}': the implementation's own figure for its cache after the last token, which holds "
    "prompt + gen - 1 tokens (vLLM: its blocks per KV-cache group x page size); 'not exposed' when it gives "
    "none.",
    "Analytic: harness.kvcache.breakdown of the cell's model, cut as the runner cuts it, at the same "
    "prompt + gen - 1 tokens, the cell's batch and KV dtype; stored = K and V of every layer with its own cache (sliding "
    "layers at most their window, KV-shared layers nothing), minimal = K=V layers keep one. "
    f"'{KV_RATIO}' above 1 means the implementation holds more than the spec needs.",
)


def _section_notes(name: str, frame: pd.DataFrame, omitted: list[str]) -> list[str]:
    notes = list(MEMORY_NOTES) if name == "memory" else []
    ratio_columns = [c for c in frame.columns if " x vs " in str(c)]
    if name == "generation":
        notes.append("Latencies in ms; throughputs in tokens/s; 'max CV' is the largest coefficient of variation "
                     "over the repetitions' metrics, 'stable' whether it met the runner's target.")
        if ratio_columns:
            notes.append(f"Speed ratios ({', '.join(ratio_columns)}) are tokens/s over those of the same-parameter "
                         "cell of the baseline implementation; above 1 is faster.")
    if omitted:
        notes.append(f"Columns with no values left out: {', '.join(omitted)}.")
    return notes


def _summary(records: Sequence[dict]) -> str:
    generation = [r for r in records if kind(r) == "generation"]
    count = {s: sum(r.get("status", "ok") == s for r in generation) for s in ("ok", "error", "unsupported")}
    kernels = sum(kind(r) == "kernel" for r in records)
    evals = [r for r in records if kind(r) == "eval"]
    tail = (f"; {len(evals)} eval cell(s), {sum(r.get('status') == 'ok' for r in evals)} ok" if evals else "")
    return (f"{len(generation)} generation cell(s): {count['ok']} ok, {count['error']} error, "
            f"{count['unsupported']} unsupported; {kernels} kernel record(s){tail}.")


# ---------------------------------------------------------------- Markdown


def _markdown(records: Sequence[dict], comparison: Comparison | None, title: str, notes: Sequence[str]) -> str:
    lines = [f"# {title}", "", _summary(records), ""]
    if comparison is not None:
        lines += [f"**{comparison.summary()}** (details under Regression check)", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    for name, frame in tables(records).items():
        if _left_out(name, frame, records):
            continue
        lines.append(f"## {SECTION_TITLES[name]}")
        lines.append("")
        if frame.empty:
            lines += ["None.", ""]
            continue
        shown, omitted = _shown(name, frame)
        notes_lines = [f"- {n}" for n in _section_notes(name, frame, omitted)]
        lines += notes_lines + ([""] if notes_lines else []) + [markdown_table(_display(shown)), ""]
    if comparison is not None:
        lines.append(comparison.markdown())
    return "\n".join(lines).rstrip() + "\n"


def markdown(records: Sequence[dict], baseline_records: Sequence[dict] | None = None,
             title: str = DEFAULT_TITLE) -> str:
    """The report as GitHub Markdown; with ``baseline_records``, the regression section too."""
    comparison = compare(list(records), list(baseline_records)) if baseline_records is not None else None
    return _markdown(records, comparison, title, [])


# ---------------------------------------------------------------- plots


def _png_data_uri(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _impl_colors(frame: pd.DataFrame) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
    return {impl: palette[i % len(palette)] for i, impl in enumerate(sorted(frame["impl"].unique()))}


def _facets(frame: pd.DataFrame, keys: list[str], x: str, ys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """Groups of ``frame`` by ``keys`` in which ``x`` takes at least two values and some ``y`` is present."""
    out = []
    for values, group in frame.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        usable = group.dropna(subset=[x])
        if usable[x].nunique() >= 2 and any(usable[y].notna().any() for y in ys):
            title = " ".join(_facet_part(k, v) for k, v in zip(keys, values, strict=True))
            out.append((title, usable))
    return out


def _facet_part(key: str, value) -> str:
    short = {"batch": "B", "prompt": "P", "gen": "G"}
    return f"{short[key]}={value}" if key in short else str(value)


MARKERS = "os^Dv<>ph"


def _impl_lines(axis, group: pd.DataFrame, x: str, y: str, colors: dict[str, str]) -> None:
    """One line per implementation; hollow markers of a shape and size of their own, so that curves lying
    on each other stay visible."""
    for impl, lines in group.groupby("impl", sort=True):
        points = lines.dropna(subset=[y]).groupby(x)[y].mean().sort_index()
        index = list(colors).index(impl)
        if not points.empty:
            axis.plot(points.index, points.values, marker=MARKERS[index % len(MARKERS)], markerfacecolor="none",
                      markersize=max(4, 10 - 2 * index), label=impl, color=colors[impl])


def _style_axis(axis, title: str, xlabel: str, ylabel: str, xs: pd.Series) -> None:
    axis.set_title(title, fontsize=9)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if xs.min() > 0 and xs.max() / xs.min() >= 8:
        axis.set_xscale("log", base=2)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", color="#57606a")


def _line_figure(facets, x: str, ys: list[tuple[str, str]], colors: dict[str, str], xlabel: str, overlay=None):
    """Small multiples, one panel per (facet, y), one line per implementation; several ys share a row.
    A y label may be a function of the facet's rows; ``overlay(axis, rows, x)`` draws more on each panel."""
    from matplotlib.figure import Figure

    panels = [(title, group, y, ylabel) for title, group in facets[:MAX_FACETS] for y, ylabel in ys]
    columns = len(ys) if len(ys) > 1 else min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (title, group, y, ylabel) in zip(axes, panels, strict=False):
        _impl_lines(axis, group, x, y, colors)
        if overlay is not None:
            overlay(axis, group, x)
        _style_axis(axis, title, xlabel, ylabel(group) if callable(ylabel) else ylabel, group[x])
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def _analytic_lines(group: pd.DataFrame, x: str) -> list[tuple[pd.Series, str, str]]:
    """[(analytic MiB by context, line style, label)]: stored, and minimal where it differs from stored."""
    by_x = group.groupby(x)[[KV_STORED, KV_MINIMAL]].first().astype(float).sort_index()
    stored, minimal = by_x[KV_STORED].dropna(), by_x[KV_MINIMAL].dropna()
    lines = [(stored, "--", "analytic KV, stored (K and V)")] if not stored.empty else []
    if not minimal.empty and not minimal.equals(stored):
        lines.append((minimal, ":", "analytic KV, minimal (K=V once)"))
    return lines


def _analytic_overlay(axis, group: pd.DataFrame, x: str) -> None:
    """The analytic KV size over the measured curves; a log y axis when the values span 8x or more."""
    for series, style, label in _analytic_lines(group, x):
        axis.plot(series.index, series.values, style, color="black", label=label, zorder=1.5)
    values = [v for line in axis.get_lines() for v in line.get_ydata()]
    if values and min(values) > 0 and max(values) / min(values) >= 8:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())


def _peak_label(group: pd.DataFrame) -> str:
    sources = sorted(set(group["peak source"].dropna()) - {"-"})
    return f"peak MiB ({', '.join(s.replace('rss', 'process RSS') for s in sources) or '-'})"


def _roofline_figure(frame: pd.DataFrame):
    from matplotlib.figure import Figure

    cells = frame[frame["decode_bw_pct"].notna() | frame["prefill_flop_pct"].notna()]
    labels = [f"{r.impl} {r.model} {r.dtype} {r.device} B={r.batch} P={r.prompt} G={r.gen}"
              for r in cells.itertuples()]
    figure = Figure(figsize=(9, 0.6 + 0.42 * len(cells)))
    axis = figure.subplots()
    positions = range(len(cells))
    height = 0.4
    axis.barh([p - height / 2 for p in positions], cells["decode_bw_pct"].fillna(0), height,
              label="decode: % of memory bandwidth", color="#1f77b4")
    axis.barh([p + height / 2 for p in positions], cells["prefill_flop_pct"].fillna(0), height,
              label="prefill: % of matmul peak", color="#ff7f0e")
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("% of the device's roofline")
    axis.legend(fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


SPEED_PLOTS = (
    ("Output throughput vs batch", ["prompt", "gen"], "batch", "batch size", [("output_throughput", "output tokens/s")]),
    ("TTFT and TPOT vs prompt length", ["batch", "gen"], "prompt", "prompt tokens",
     [("ttft_ms mean", "TTFT ms"), ("tpot_ms mean", "TPOT ms")]),
)
MEMORY_PLOTS = (
    ("Peak memory vs context (prompt + gen)", [("peak MiB", _peak_label), (RSS_GROWTH, "RSS gen peak - after load MiB")],
     "Left: the peak memory of each cell (CPU: process RSS, lifetime peak, loading included; CUDA: torch max "
     "allocated, else NVML); right: the RSS growth from after loading to the generation's peak, the part that "
     "scales with context. Black: the analytic KV cache after the last token (prompt + gen - 1 tokens; dashed: stored, K and V; "
     "dotted, where it differs: minimal, K=V layers keep one); its gap to the right panel's curves is "
     "activations and allocator slack."),
    ("KV cache vs context", [(KV_MEASURED, "KV cache after the last token MiB")],
     "Each implementation's own figure for its cache after the last token (vLLM: blocks per group x page size; "
     "implementations that expose none are left out) against the analytic KV size (black; see the memory "
     "table): a curve above the dashed line holds more than the spec needs."),
)
BASE_KEYS = ["model", "dtype", "device"]


def _line_plot(frame: pd.DataFrame, colors: dict[str, str], title: str, keys: list[str], x: str, xlabel: str,
               ys: list, note: str = "", overlay=None) -> tuple[str, str | None, str]:
    facets = _facets(frame, keys, x, [y for y, _ in ys])
    if not facets:
        return title, None, f"Skipped: the records do not vary in {xlabel} within any {'/'.join(keys)} group."
    count = f"{len(facets)} group(s)" + (f"; the first {MAX_FACETS} shown" if len(facets) > MAX_FACETS else "")
    figure = _line_figure(facets, x, ys, colors, xlabel, overlay)
    return title, _png_data_uri(figure), f"{note} {count}." if note else count


def _memory_plots(memory: pd.DataFrame | None, colors: dict[str, str]) -> list[tuple[str, str | None, str]]:
    if memory is None or memory.empty:
        return [(title, None, "Skipped: no memory table.") for title, *_ in MEMORY_PLOTS]
    return [_line_plot(memory, colors, title, BASE_KEYS + ["batch"], "context", "context tokens (prompt + gen)", ys,
                       note, _analytic_overlay) for title, ys, note in MEMORY_PLOTS]


def _roofline_plot(frame: pd.DataFrame) -> tuple[str, str | None, str]:
    title = "Roofline: share of the device's peak"
    if not frame[["decode_bw_pct", "prefill_flop_pct"]].notna().any().any():
        return title, None, "Skipped: no cell has roofline figures."
    return (title, _png_data_uri(_roofline_figure(frame)),
            "decode_bw_pct: bytes moved per decode step / (time x memory bandwidth); prefill_flop_pct: "
            "prefill FLOPs / (time x matmul peak).")


def plots(frame: pd.DataFrame, memory: pd.DataFrame | None = None) -> list[tuple[str, str | None, str]]:
    """[(title, PNG data URI or None, note)]: a None URI means the plot was skipped, the note says why.
    ``frame`` is the generation table; ``memory`` the memory table (:func:`memory_table`), whose plots
    carry the analytic KV size."""
    if frame.empty:
        return [("Plots", None, "No ok generation cells: nothing to plot.")]
    colors = _impl_colors(frame)
    out = [_line_plot(frame, colors, title, BASE_KEYS + keys, x, xlabel, ys)
           for title, keys, x, xlabel, ys in SPEED_PLOTS]
    return out + _memory_plots(memory, colors) + [_roofline_plot(frame)]


def accuracy_plot(frame: pd.DataFrame) -> tuple[str, str, str]:
    """Accuracy per task, one bar per implementation, lm-eval's stderr as the error bar."""
    from matplotlib.figure import Figure

    metric = "acc %" if "acc %" in frame.columns else next(c for c in frame.columns if c.endswith(" %"))
    keys = frame.apply(lambda r: f"{r['task']} ({r['model']}, {r['shots']}-shot"
                       + (f", first {int(r['limit'])}" if pd.notna(r["limit"]) and r["limit"] else "") + ")", axis=1)
    groups = list(dict.fromkeys(keys))
    impls = list(dict.fromkeys(frame["impl"]))
    figure = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(impls)) / 2), 4.0), dpi=100)
    axis = figure.add_subplot()
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys, errs = [], [], []
        for g, group in enumerate(groups):
            rows = frame[(keys == group) & (frame["impl"] == impl)]
            if rows.empty or pd.isna(rows.iloc[0][metric]):
                continue
            xs.append(g + (k - (len(impls) - 1) / 2) * width)
            ys.append(rows.iloc[0][metric])
            errs.append(rows.iloc[0].get(metric.replace(" %", " ± %")) or 0.0)
        axis.bar(xs, ys, width, yerr=errs, capsize=3, label=impl)
    axis.set_xticks(range(len(groups)), groups, rotation=15, ha="right", fontsize=8)
    axis.set_ylabel(metric)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return (f"Accuracy by task ({metric.removesuffix(' %')})", _png_data_uri(figure),
            "Bars: lm-eval's score per implementation; error bars: its standard error. Whether two "
            "implementations differ is a paired question: gemma-harness eval --compare A B.")


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1b1f23; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0 16px; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
.note { color: #57606a; font-size: 13px; margin: 4px 0; }
.failed { color: #b31d28; font-weight: bold; } .passed { color: #22863a; font-weight: bold; }
.wide { overflow-x: auto; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #eaecef; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    return '<div class="wide">' + _display(frame).to_html(index=False, escape=True, border=0) + "</div>"


def _html_notes(notes: Iterable[str]) -> str:
    return "".join(f'<p class="note">{html_lib.escape(n)}</p>' for n in notes)


def _left_out(name: str, frame: pd.DataFrame, records: Sequence[dict]) -> bool:
    """An empty optional section, or the generation section (and its plots) of eval-only records."""
    if not frame.empty:
        return False
    return name in OPTIONAL_SECTIONS or (name == "generation" and all(kind(r) == "eval" for r in records)
                                         and bool(records))


def _html_tables(records: Sequence[dict], plot_after: str = "generation") -> list[str]:
    """The tables, with the plots right after the ``plot_after`` table."""
    parts = []
    frames = tables(records)
    for name, frame in frames.items():
        if _left_out(name, frame, records):
            continue
        parts.append(f"<h2>{SECTION_TITLES[name]}</h2>")
        if frame.empty:
            parts.append('<p class="note">None.</p>')
        else:
            shown, omitted = _shown(name, frame)
            parts += [_html_notes(_section_notes(name, frame, omitted)), _html_table(shown)]
        if name == plot_after:
            parts += _html_plots(frame, frames["memory"])
        if name == "accuracy" and not frame.empty:
            title, uri, note = accuracy_plot(frame)
            parts.append(f'<figure><h3>{html_lib.escape(title)}</h3><img alt="{html_lib.escape(title)}" '
                         f'src="{uri}">{_html_notes([note])}</figure>')
    return parts


def _html_plots(frame: pd.DataFrame, memory: pd.DataFrame | None = None) -> list[str]:
    parts = ["<h2>Plots</h2>"]
    for title, uri, note in plots(frame, memory):
        if uri is None:
            parts.append(f"<h3>{html_lib.escape(title)}</h3>{_html_notes([note])}")
        else:
            parts.append(f'<figure><h3>{html_lib.escape(title)}</h3><img alt="{html_lib.escape(title)}" '
                         f'src="{uri}">{_html_notes([note])}</figure>')
    return parts


def _html_comparison(comparison: Comparison) -> list[str]:
    verdict = "failed" if comparison.failed else "passed"
    parts = ['<h2 id="regression-check">Regression check</h2>', f'<p class="{verdict}">{html_lib.escape(comparison.summary())}</p>',
             _html_notes([comparison.rule()] + comparison.context_notes)]
    for title, frame in comparison.tables().items():
        if not frame.empty:
            parts += [f"<h3>{html_lib.escape(title)} ({len(frame)})</h3>", _html_table(frame)]
    return parts


def _html(records: Sequence[dict], comparison: Comparison | None, title: str, notes: Sequence[str]) -> str:
    body = [f"<h1>{html_lib.escape(title)}</h1>", f'<p class="note">{html_lib.escape(_summary(records))}</p>',
            _html_notes(notes)]
    if comparison is not None:
        verdict = "failed" if comparison.failed else "passed"
        body.append(f'<p class="{verdict}">{html_lib.escape(comparison.summary())} '
                    '(<a href="#regression-check">details</a>)</p>')
    body += _html_tables(records)
    if comparison is not None:
        body += _html_comparison(comparison)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html_lib.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n" + RENDER_PROBE + "</body>\n</html>\n")


def html(records: Sequence[dict], baseline_records: Sequence[dict] | None = None, title: str = DEFAULT_TITLE) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data: URIs, no network)."""
    comparison = compare(list(records), list(baseline_records)) if baseline_records is not None else None
    return _html(records, comparison, title, [])


# ---------------------------------------------------------------- files and the CLI entry point


def _as_list(sources: Source | Iterable[Source]) -> list[Source]:
    return [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)


def load_merged(sources: Source | Iterable[Source]) -> tuple[list[dict], list[str]]:
    """Records of several directories/files joined into one per cell (see :func:`records.merge`), and the
    merge's conflict lines."""
    return merge(load([source]) for source in _as_list(sources))


def write_report(sources: Source | Iterable[Source], html_path: Source | None = None, md_path: Source | None = None,
                 baseline: Source | Iterable[Source] | None = None, title: str = DEFAULT_TITLE,
                 threshold: float = 0.05, alpha: float = 0.05, gate_kernels: bool = False) -> int:
    """Render the records of ``sources`` to ``html_path`` and/or ``md_path``, gated against ``baseline``
    records when given (kernel records too with ``gate_kernels``). Returns 1 when the gate flags a
    regression, else 0."""
    records, conflicts = load_merged(sources)
    notes = [f"Merge conflict: {c}" for c in conflicts]
    comparison = None
    if baseline is not None:
        baseline_records, baseline_conflicts = load_merged(baseline)
        notes += [f"Baseline merge conflict: {c}" for c in baseline_conflicts]
        comparison = compare(records, baseline_records, threshold=threshold, alpha=alpha, kernels=gate_kernels)
    if md_path is not None:
        write_atomic(md_path, _markdown(records, comparison, title, notes))
    if html_path is not None:
        write_atomic(html_path, _html(records, comparison, title, notes))
    return 1 if comparison is not None and comparison.failed else 0
