"""The building-block benchmarks (benchmarks/test_blocks.py) and their conversion into benchmark records.

(a) a real pytest-benchmark JSON, from a short run of the cheapest benchmarks in a subprocess, converted
by harness.bench.pytest_benchmark: every record complete, times in ms = s * 1000, ids stable, writes
idempotent. (b) the whole benchmark file with --benchmark-disable (each benchmark once, as a test): the
CI smoke test.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.bench import pytest_benchmark as pb
from harness.bench import records

# The benchmarks need the plugin's `benchmark` fixture; the converter does not.
needs_plugin = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                  reason="pytest-benchmark is not installed")

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = "benchmarks/test_blocks.py"
CHEAP = "test_kv_cache"  # 4 benchmarks (sliding/full x float32/bfloat16), ~50 µs a call


def run_pytest(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", BLOCKS, "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("bench") / "blocks.json"
    proc = run_pytest("-k", CHEAP, f"--benchmark-json={path}", "--benchmark-save-data",
                      "--benchmark-min-rounds=3", "--benchmark-max-time=0.05")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path, json.loads(path.read_text())


def schema_fields() -> set[str]:
    """The top-level fields the records module documents (its docstring's field list)."""
    block = records.__doc__.split("::", 1)[1]
    return {name for line in re.findall(r"^ {4}(\w+(?:, \w+)*)", block, re.M) for name in line.split(", ")}


@pytest.mark.slow
@needs_plugin
def test_records_from_real_pytest_benchmark_json(bench_json, tmp_path):
    path, data = bench_json
    benches = data["benchmarks"]
    assert len(benches) == 4 and all(b["stats"].get("data") for b in benches)
    converted = pb.records_from_pytest_benchmark(data, source=str(path))
    assert len(converted) == len(benches)

    documented = schema_fields()
    assert {"cell_id", "cell", "repetitions", "model_facts", "started_at", "duration_s"} <= documented
    assert documented <= set(pb.RECORD_FIELDS)
    for record, bench in zip(converted, benches, strict=True):
        assert set(record) == set(pb.RECORD_FIELDS)
        json.dumps(record, allow_nan=False)  # what append_record writes
        assert record["schema"] == records.SCHEMA and record["kind"] == "kernel" and record["status"] == "ok"
        canonical = json.dumps([bench["fullname"], bench["params"]], sort_keys=True, separators=(",", ":"))
        assert record["cell_id"] == "k-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

        cell = record["cell"]
        assert cell == {"impl": "kernel", "name": bench["name"], "group": bench["group"], "params": bench["params"],
                        "dtype": bench["params"]["dtype"], "device": "cpu"}
        assert cell["dtype"] in ("float32", "bfloat16") and bench["name"] in record["label"]

        stats, time_ms = bench["stats"], record["metrics"]["time_ms"]
        assert set(time_ms) == set(pb.TIME_STATS)
        for ours, theirs in (("mean", "mean"), ("median", "median"), ("std", "stddev"), ("min", "min")):
            assert time_ms[ours] == pytest.approx(stats[theirs] * 1000, rel=1e-12), ours
        assert time_ms["n"] == stats["rounds"] == len(stats["data"]) >= 3
        samples = record["samples"]["time_ms"]
        assert samples == pytest.approx([s * 1000 for s in stats["data"]], rel=1e-12)
        assert time_ms["p90"] == pytest.approx(np.percentile(samples, 90))
        assert time_ms["p99"] == pytest.approx(np.percentile(samples, 99))
        assert time_ms["min"] <= time_ms["median"] <= time_ms["p90"] <= time_ms["p99"] <= max(samples)
        assert record["repetitions"]["n"] == stats["rounds"]
        assert record["repetitions"]["iterations"] == stats["iterations"]
        assert record["duration_s"] == pytest.approx(stats["total"] * stats["iterations"], abs=1e-6)

        context = record["context"]
        assert context["source"] == str(path) and context["pytest_benchmark"] == data["version"]
        assert context["git"].split("+")[0] == data["commit_info"]["id"][:12]
        assert context["python"] == data["machine_info"]["python_version"]
        assert context["machine_info"]["cpu"] == data["machine_info"]["cpu"]["brand_raw"]
        assert context["device"]["type"] == "cpu" and context["device"]["name"] == context["machine_info"]["cpu"]
        assert context["torch"] == bench["extra_info"]["torch"] and context["transformers"]
        assert record["started_at"] == data["datetime"]

    # Stable ids: a second conversion, and a converted copy in another order, give the same ids.
    again = pb.records_from_pytest_benchmark(copy.deepcopy(data), source="elsewhere.json")
    assert [r["cell_id"] for r in again] == [r["cell_id"] for r in converted]
    assert len({r["cell_id"] for r in converted}) == len(converted)

    # Without --benchmark-save-data: no percentiles, no samples.
    bare = copy.deepcopy(data)
    for bench in bare["benchmarks"]:
        del bench["stats"]["data"]
    for record in pb.records_from_pytest_benchmark(bare, source="bare.json"):
        assert record["metrics"]["time_ms"]["p90"] is None and record["metrics"]["time_ms"]["p99"] is None
        assert record["samples"] == {"time_ms": []} and record["metrics"]["time_ms"]["mean"] is not None

    # Idempotent writes: the second conversion of the same file adds nothing.
    out = tmp_path / "out"
    assert pb.write_records(path, out) == len(converted)
    assert pb.write_records(path, out) == 0
    written = list(records.iter_records(records.records_path(out)))
    assert [r["cell_id"] for r in written] == [r["cell_id"] for r in converted]
    assert written == json.loads(json.dumps(converted))


def test_not_pytest_benchmark_json(tmp_path):
    with pytest.raises(pb.PytestBenchmarkError, match="not pytest-benchmark JSON"):
        pb.records_from_pytest_benchmark({"records": []}, source="x.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(pb.PytestBenchmarkError, match="not JSON"):
        pb.write_records(bad, tmp_path / "out")


@pytest.mark.slow
@needs_plugin
def test_blocks_smoke():
    """CI's smoke test: every benchmark runs once, as a test (its output checks included)."""
    proc = run_pytest("--benchmark-disable")
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "failed" not in proc.stdout, tail
