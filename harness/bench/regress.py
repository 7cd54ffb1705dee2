"""The regression gate: a current set of benchmark records against a baseline set.

Cells are matched by ``cell_id``. For each latency metric (lower is better) the per-repetition samples
of the two sides go through Welch's two-sample t-test (``scipy.stats.ttest_ind``, ``equal_var=False``);
a change is flagged only when BOTH the relative change of the mean exceeds ``threshold`` AND the test's
p-value is below ``alpha``. Slower is a regression, faster an improvement.

Measurements from different devices or library versions are never compared: such a cell is listed under
"not compared" with what differs (``torch 2.13.0 vs 2.12.0``). Differences that are the point of a
regression check (harness version, git commit, suite hash, python, host) are reported, not blocking.
Cells whose status is not "ok" on either side are listed under "not compared" too. Kernel records
(pytest-benchmark, metric ``time_ms``) are gated only when asked (``compare(..., kernels=True)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

# Latency metrics the gate tests, per record kind; all lower-is-better.
GATED_METRICS = {"generation": ("ttft_ms", "tpot_ms", "e2el_ms"), "kernel": ("time_ms",)}
# Context fields whose difference makes two measurements incomparable.
BLOCKING_LIBRARIES = ("torch", "transformers", "vllm", "impl_version")
# The device's identity (harness.bench.context: NVML/CPU name, torch's name, compute capability, CUDA version).
DEVICE_FIELDS = ("type", "name", "torch_name", "model", "capability", "cuda")
# Context fields whose difference is reported next to the comparison, without blocking it.
INFORMATIONAL_FIELDS = ("harness", "git", "suite_hash", "python", "host", "device.threads", "device.driver",
                        "device.power_limit_w")

REGRESSION = "regression"
IMPROVEMENT = "improvement"
BELOW_THRESHOLD = "below threshold"
NOT_SIGNIFICANT = "not significant"
NOT_ENOUGH_REPS = "not enough repetitions to test"

TEST_NAME = "Welch's two-sample t-test (scipy.stats.ttest_ind, equal_var=False)"


@dataclass
class MetricCheck:
    """One metric of one matched cell: the two means, the relative change, the test's p-value, the verdict."""

    cell_id: str
    label: str
    metric: str
    baseline_mean: float | None
    current_mean: float | None
    rel_change: float | None
    p_value: float | None
    n_baseline: int
    n_current: int
    verdict: str


@dataclass
class SkippedCell:
    """A cell that was not gated, and why (what differs, or which side it is missing from)."""

    cell_id: str
    label: str
    why: str


@dataclass
class Comparison:
    """The gate's result. ``failed`` is True when any metric of any cell regressed."""

    checks: list[MetricCheck] = field(default_factory=list)
    not_compared: list[SkippedCell] = field(default_factory=list)
    unmatched: list[SkippedCell] = field(default_factory=list)
    context_notes: list[str] = field(default_factory=list)
    threshold: float = 0.05
    alpha: float = 0.05

    @property
    def regressions(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.verdict == REGRESSION]

    @property
    def improvements(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.verdict == IMPROVEMENT]

    @property
    def quiet(self) -> list[MetricCheck]:
        """Checks that flagged nothing (below threshold, not significant, or not enough repetitions)."""
        return [c for c in self.checks if c.verdict not in (REGRESSION, IMPROVEMENT)]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def rule(self) -> str:
        """The flagging rule in one sentence, with both numbers."""
        return (f"A change is flagged when |relative change of the mean| > {self.threshold:.0%} and "
                f"{TEST_NAME} on the per-repetition samples gives p < {self.alpha:g}.")

    def summary(self) -> str:
        verdict = "FAILED" if self.failed else "passed"
        return (f"Regression gate {verdict}: {len(self.regressions)} regression(s), "
                f"{len(self.improvements)} improvement(s), {len(self.quiet)} unflagged check(s), "
                f"{len(self.not_compared)} cell(s) not compared, {len(self.unmatched)} unmatched.")

    def tables(self) -> dict[str, pd.DataFrame]:
        """The comparison as display tables (strings), keyed by section title."""
        untested = [c for c in self.quiet if c.verdict == NOT_ENOUGH_REPS]
        tested_quiet = [c for c in self.quiet if c.verdict != NOT_ENOUGH_REPS]
        return {
            "Regressions": _checks_frame(self.regressions),
            "Improvements": _checks_frame(self.improvements),
            "Not compared": _skipped_frame(self.not_compared, "what differs"),
            "Unmatched cells": _skipped_frame(self.unmatched, "present in"),
            "Not flagged": _checks_frame(tested_quiet),
            "Not enough repetitions to test": _checks_frame(untested),
        }

    def markdown(self, heading_level: int = 2) -> str:
        """The comparison as a GitHub Markdown section."""
        hashes = "#" * heading_level
        lines = [f"{hashes} Regression check", "", self.summary(), "", self.rule(), ""]
        lines += [f"- {note}" for note in self.context_notes]
        if self.context_notes:
            lines.append("")
        for title, frame in self.tables().items():
            if frame.empty:
                continue
            lines += [f"{hashes}# {title} ({len(frame)})", "", markdown_table(frame), ""]
        return "\n".join(lines).rstrip() + "\n"


def _checks_frame(checks: list[MetricCheck]) -> pd.DataFrame:
    rows = [{
        "cell": c.label,
        "metric": c.metric,
        "baseline mean": fmt(c.baseline_mean),
        "current mean": fmt(c.current_mean),
        "change": "-" if c.rel_change is None else f"{c.rel_change:+.1%}",
        "p (Welch)": "-" if c.p_value is None else f"{c.p_value:.3g}",
        "n base/cur": f"{c.n_baseline}/{c.n_current}",
        "verdict": c.verdict,
    } for c in checks]
    return pd.DataFrame(rows)


def _skipped_frame(cells: list[SkippedCell], why_title: str) -> pd.DataFrame:
    return pd.DataFrame([{"cell": s.label, "cell_id": s.cell_id, why_title: s.why} for s in cells])


# ---------------------------------------------------------------- shared formatting (report uses these)


def fmt(value) -> str:
    """A table value as short text: '-' for missing, ints as ints, floats to about 3-4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        size = abs(value)
        if size == 0:
            return "0"
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 0.001:
            return f"{value:.3g}" if size < 1 else f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


_NUMBER_TEXT = re.compile(r"^(-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?[x%]?)$")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no ``tabulate`` needed); numbers right-aligned."""
    columns = [str(c) for c in frame.columns]
    rows = [[_md_escape(fmt(_plain(v))) for v in row] for row in frame.itertuples(index=False)]
    numeric = [bool(rows) and all(_NUMBER_TEXT.match(r[i]) for r in rows) for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line([_md_escape(c) for c in columns]), rule] + [line(r) for r in rows])


def _plain(value):
    """numpy scalars as Python ones, so :func:`fmt` sees int / float / bool."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


# ---------------------------------------------------------------- the comparison


def _kind(record: dict) -> str:
    return record.get("kind") or "generation"


def _label(record: dict) -> str:
    return record.get("label") or record["cell_id"]


def _get(context: dict, dotted: str):
    value = context
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _device_as_dict(context: dict) -> dict:
    """A context whose device is a plain string reads as {"name": that string}."""
    device = context.get("device")
    return context if device is None or isinstance(device, dict) else {**context, "device": {"name": device}}


def context_differences(current: dict, baseline: dict, fields: tuple[str, ...]) -> list[str]:
    """Lines 'field current vs baseline' for the context fields (dotted paths) that differ."""
    current, baseline = _device_as_dict(current), _device_as_dict(baseline)
    out = []
    for name in fields:
        now, before = _get(current, name), _get(baseline, name)
        if now != before:
            out.append(f"{name} {_show(now)} vs {_show(before)}")
    return out


def _show(value) -> str:
    return "absent" if value is None else str(value)


def _blocking_fields() -> tuple[str, ...]:
    return tuple(f"device.{f}" for f in DEVICE_FIELDS) + BLOCKING_LIBRARIES


def _status_difference(current: dict, baseline: dict) -> str | None:
    now, before = current.get("status", "ok"), baseline.get("status", "ok")
    if now == before == "ok":
        return None
    reason = current.get("reason") or baseline.get("reason") or ""
    return f"status {now} vs {before}" + (f" ({reason})" if reason else "")


def _samples(record: dict, metric: str) -> list[float]:
    values = (record.get("samples") or {}).get(metric) or []
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _welch_p(current: list[float], baseline: list[float]) -> float:
    """Welch's t-test p-value; two constant samples give 0 when their means differ, 1 when not."""
    from scipy.stats import ttest_ind

    p = float(ttest_ind(current, baseline, equal_var=False).pvalue)
    if math.isnan(p):
        return 0.0 if _mean(current) != _mean(baseline) else 1.0
    return p


def check_metric(current: dict, baseline: dict, metric: str, threshold: float, alpha: float) -> MetricCheck:
    """Test one metric of one matched, comparable pair of records."""
    now, before = _samples(current, metric), _samples(baseline, metric)
    mean_now, mean_before = _mean(now), _mean(before)
    rel = (mean_now - mean_before) / mean_before if mean_now is not None and mean_before else None
    check = MetricCheck(current["cell_id"], _label(current), metric, mean_before, mean_now, rel, None,
                        len(before), len(now), NOT_ENOUGH_REPS)
    if len(now) < 2 or len(before) < 2 or rel is None:
        return check
    check.p_value = _welch_p(now, before)
    if abs(rel) <= threshold:
        check.verdict = BELOW_THRESHOLD
    elif check.p_value >= alpha:
        check.verdict = NOT_SIGNIFICANT
    else:
        check.verdict = REGRESSION if rel > 0 else IMPROVEMENT
    return check


def _by_id(records: list[dict]) -> dict[str, dict]:
    return {r["cell_id"]: r for r in records}


def _unmatched(current: dict[str, dict], baseline: dict[str, dict]) -> list[SkippedCell]:
    only_now = [SkippedCell(cid, _label(r), "current only") for cid, r in current.items() if cid not in baseline]
    only_before = [SkippedCell(cid, _label(r), "baseline only") for cid, r in baseline.items() if cid not in current]
    return only_now + only_before


def _context_notes(pairs: list[tuple[dict, dict]]) -> list[str]:
    """Informational context differences over all compared pairs, each distinct line once."""
    seen: dict[str, None] = {}
    for now, before in pairs:
        for line in context_differences(now.get("context") or {}, before.get("context") or {}, INFORMATIONAL_FIELDS):
            seen.setdefault(f"compared across {line}", None)
    return list(seen)


def compare(current: list[dict], baseline: list[dict], threshold: float = 0.05, alpha: float = 0.05,
            kernels: bool = False) -> Comparison:
    """Gate ``current`` records against ``baseline`` records (see the module docstring for the rule).
    Kernel records (pytest-benchmark's time_ms) are gated only with ``kernels=True``; otherwise they are
    left out, and a note says how many."""
    result = Comparison(threshold=threshold, alpha=alpha)
    if not kernels:
        current, left_out = _without_kernels(current)
        baseline, _ = _without_kernels(baseline)
    now_by_id, before_by_id = _by_id(current), _by_id(baseline)
    result.unmatched = _unmatched(now_by_id, before_by_id)
    compared: list[tuple[dict, dict]] = []
    for cid, now in now_by_id.items():
        before = before_by_id.get(cid)
        if before is None:
            continue
        status = _status_difference(now, before)
        blocking = context_differences(now.get("context") or {}, before.get("context") or {}, _blocking_fields())
        if status or blocking:
            why = "; ".join(([status] if status else []) + blocking)
            result.not_compared.append(SkippedCell(cid, _label(now), why))
            continue
        compared.append((now, before))
        for metric in GATED_METRICS.get(_kind(now), ()):
            result.checks.append(check_metric(now, before, metric, threshold, alpha))
    result.context_notes = _context_notes(compared)
    if not kernels and left_out:
        result.context_notes.append(f"{left_out} kernel record(s) not gated (compare(..., kernels=True) gates time_ms)")
    return result


def _without_kernels(records: list[dict]) -> tuple[list[dict], int]:
    kept = [r for r in records if _kind(r) != "kernel"]
    return kept, len(records) - len(kept)
