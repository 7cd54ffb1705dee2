"""Consistency checks of a run's records (CI runs them on the quick CPU sweep): every selected cell
recorded exactly once, every field of the schema present, and the figures agree with one another.
Never a timing threshold: these hold on any machine, however slow or noisy.

``python -m harness.bench.check SUITE.yaml DIR [--filter EXPR]``: exit 0 when consistent, 1 with one
line per problem otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter

from . import records
from .suite import load_suite, select

TOP = ("schema", "kind", "cell_id", "cell", "label", "status", "reason", "context", "started_at", "duration_s")
OK_FIELDS = ("metrics", "samples", "repetitions", "memory", "energy", "kv_cache", "roofline", "model_facts")
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
THROUGHPUTS = ("prefill_tok_s", "decode_tok_s", "output_throughput", "total_token_throughput")
STATS = ("mean", "median", "std", "p90", "p99", "n")
CONTEXT = ("harness", "git", "python", "torch", "transformers", "impl_version", "device", "suite", "suite_hash", "seed")
REL = 0.10  # e2el vs ttft + (G-1) tpot: the 10 %


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def record_problems(record: dict) -> list[str]:
    """What is missing or inconsistent in one record."""
    name = record.get("label", record.get("cell_id", "?"))
    out = [f"{name}: no '{k}'" for k in TOP if k not in record]
    out += [f"{name}: context has no '{k}'" for k in CONTEXT if k not in record.get("context", {})]
    if record.get("status") not in records.STATUSES:
        out.append(f"{name}: status {record.get('status')!r}")
    if record.get("status") != "ok":
        if not record.get("reason"):
            out.append(f"{name}: {record.get('status')} without a reason")
        return out
    out += [f"{name}: no '{k}'" for k in OK_FIELDS if k not in record]
    if out:
        return out
    cell, m, reps = record["cell"], record["metrics"], record["repetitions"]
    g, b = cell["gen"], cell["batch"]
    for key in LATENCIES:
        missing = [s for s in STATS if s not in m.get(key, {})]
        if missing:
            out.append(f"{name}: {key} lacks {missing}")
    out += [f"{name}: no {k}" for k in THROUGHPUTS if k not in m]
    if out:
        return out
    n = reps["n"]
    expect = {"ttft_ms": n, "e2el_ms": n, "tpot_ms": n if g > 1 else 0, "itl_ms": n * (g - 1)}
    out += [f"{name}: {k} has n={m[k]['n']}, expected {v}" for k, v in expect.items() if m[k]["n"] != v]
    for k in ("ttft_ms", "e2el_ms", "tpot_ms"):
        if len(record["samples"].get(k, [])) != expect[k]:
            out.append(f"{name}: samples[{k}] has {len(record['samples'].get(k, []))} values, expected {expect[k]}")
    ttft, e2el, tpot = m["ttft_ms"]["mean"], m["e2el_ms"]["mean"], m["tpot_ms"]["mean"]
    if not (ttft and ttft > 0 and e2el >= ttft):
        out.append(f"{name}: ttft {ttft} / e2el {e2el} not positive and ordered")
    elif g > 1 and not _close(e2el, ttft + (g - 1) * tpot):
        out.append(f"{name}: e2el {e2el:.3f} ms != ttft + (G-1) tpot = {ttft + (g - 1) * tpot:.3f} ms (10 %)")
    if g > 1 and not _close(m["itl_ms"]["mean"], tpot):
        out.append(f"{name}: mean itl {m['itl_ms']['mean']:.3f} != tpot {tpot:.3f} (static batch: the same gaps)")
    rates = {"output_throughput": b * g, "total_token_throughput": b * (cell["prompt"] + g)}
    for key, tokens in rates.items():
        if not _close(m[key], tokens / (e2el / 1e3), rel=1e-6):
            out.append(f"{name}: {key} {m[key]:.3f} != {tokens} tokens / mean e2el")
    if n < 1 or (reps["stable"] and reps["cv"]["e2el_ms"] is not None and reps["cv"]["e2el_ms"] > reps["target_cv"]):
        out.append(f"{name}: repetitions {reps} inconsistent")
    mem = record["memory"]
    if not mem.get("rss_peak_bytes") or mem["rss_peak_bytes"] < mem.get("rss_after_load_bytes", 0) * 0.5:
        out.append(f"{name}: rss peak {mem.get('rss_peak_bytes')} missing or below what was loaded")
    kv = record["kv_cache"]
    if kv["after_prefill_bytes"] is not None and kv["after_last_token_bytes"] is not None \
            and kv["after_last_token_bytes"] < kv["after_prefill_bytes"]:
        out.append(f"{name}: KV cache shrank from {kv['after_prefill_bytes']} to {kv['after_last_token_bytes']} bytes")
    for key, value in record["roofline"].items():
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{name}: roofline {key} = {value}")
    return out


def run_problems(recs: list[dict], expected_ids: set[str]) -> list[str]:
    """Problems of a whole run: cells missing or recorded twice, then each record's own."""
    counts = Counter(r["cell_id"] for r in recs)
    out = [f"{cid}: recorded {n} times" for cid, n in counts.items() if n > 1]
    out += [f"{cid}: not recorded" for cid in sorted(expected_ids - set(counts))]
    out += [f"{cid}: recorded but not in the suite" for cid in sorted(set(counts) - expected_ids)]
    for r in recs:
        out += record_problems(r)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench.check", description=__doc__.splitlines()[0])
    parser.add_argument("suite")
    parser.add_argument("out")
    parser.add_argument("--filter")
    args = parser.parse_args(argv)
    suite = load_suite(args.suite)
    expected = {c.cell_id for c in select(suite.cells, args.filter)}
    recs = records.load([args.out])
    problems = run_problems(recs, expected)
    for line in problems:
        print(line)
    print(f"{len(recs)} records, {len(expected)} cells expected: " + ("consistent" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
