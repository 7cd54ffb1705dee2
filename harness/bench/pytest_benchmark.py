"""pytest-benchmark's ``--benchmark-json`` output as benchmark records (``kind: "kernel"``).

One record per benchmark of the JSON, in the schema of :mod:`harness.bench.records`::

    cell_id     "k-" + 12 hex digits of sha256 of the canonical JSON of [fullname, params]: the same
                benchmark with the same parameters has the same id in every run (the regression gate
                matches on it; write_records skips ids already written)
    cell        {"impl": "kernel", "name", "group", "params", "dtype", "device"} (dtype and device from
                the benchmark's params, else its extra_info, else null)
    label       "kernel <name> (<group>)"
    status      "ok"
    metrics     {"time_ms": {"mean", "median", "std", "p90", "p99", "min", "n"}}: pytest-benchmark's
                per-iteration seconds in ms; n = rounds; p90/p99 (numpy's linear percentiles, as the
                generation records) from the per-round data when the JSON has it (--benchmark-save-data),
                else null
    samples     {"time_ms": [...]}: every round's per-iteration time in ms (--benchmark-save-data), else []
    repetitions {"warmup", "n" (rounds), "iterations" (calls per round), "target_cv": null, "cv": {"time_ms"},
                 "stable": null, "note"}
    context     {"git" (commit_info's id, 12 digits, "+dirty" when dirty), "branch", "python", "torch" and
                 "transformers" (from extra_info when the benchmark recorded them), "host", "device" {"type",
                 "name" (the CPU's brand for a CPU benchmark), ...}, "machine_info" {"cpu", "system",
                 "machine", "python_implementation"}, "source", "pytest_benchmark"}
    started_at  the JSON's datetime; duration_s the timed work (sum of rounds x iterations)
    reason, memory, energy, kv_cache, roofline, profile, model_facts: null or empty (not measured here)

    >>> records = records_from_pytest_benchmark(json.load(open("blocks.json")), source="blocks.json")
    >>> write_records("blocks.json", "results/")   # appends the new ones to results/records.jsonl
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import records

KIND = "kernel"
ID_PREFIX = "k-"
TIME_STATS = ("mean", "median", "std", "p90", "p99", "min", "n")
# Every top-level field of a kernel record (the schema of harness.bench.records, plus "kind").
RECORD_FIELDS = ("schema", "kind", "cell_id", "cell", "label", "status", "reason", "metrics", "samples",
                 "repetitions", "memory", "energy", "kv_cache", "roofline", "profile", "model_facts", "context",
                 "started_at", "duration_s")


class PytestBenchmarkError(ValueError):
    """A file or dict that is not pytest-benchmark's JSON output."""


def cell_id(fullname: str, params: dict | None) -> str:
    canonical = json.dumps([fullname, params], sort_keys=True, separators=(",", ":"), default=str)
    return ID_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _ms(seconds) -> float | None:
    return None if seconds is None else float(seconds) * 1e3


def _fact(bench: dict, key: str) -> str | None:
    """A benchmark's dtype or device: from its params, else its extra_info; "torch.float32" -> "float32"."""
    for source in (bench.get("params") or {}, bench.get("extra_info") or {}):
        value = source.get(key)
        if value is not None:
            text = str(value)
            return text.removeprefix("torch.") if key == "dtype" else text
    return None


def _time_ms(stats: dict) -> tuple[dict, list[float]]:
    data = [float(s) * 1e3 for s in stats.get("data") or []]
    p90 = p99 = None
    if data:
        p90, p99 = (float(np.percentile(data, q)) for q in (90, 99))
    metrics = {"mean": _ms(stats["mean"]), "median": _ms(stats["median"]), "std": _ms(stats["stddev"]),
               "p90": p90, "p99": p99, "min": _ms(stats["min"]), "n": int(stats["rounds"])}
    return metrics, data


def _git(commit_info: dict) -> str | None:
    commit = commit_info.get("id")
    if not commit:
        return None
    return commit[:12] + ("+dirty" if commit_info.get("dirty") else "")


def _context(data: dict, bench: dict, device: str | None, source: str) -> dict:
    machine, commit = data.get("machine_info") or {}, data.get("commit_info") or {}
    cpu = machine.get("cpu") or {}
    extra = bench.get("extra_info") or {}
    brand = cpu.get("brand_raw") or cpu.get("brand") or machine.get("processor") or None
    device_type = (device or "cpu").split(":")[0]
    device_facts = {"type": device_type, "name": brand if device_type == "cpu" else extra.get("device_name"),
                    "machine": machine.get("machine"), "logical_cores": cpu.get("count"),
                    "threads": extra.get("threads")}
    return {
        "git": _git(commit),
        "branch": commit.get("branch"),
        "python": machine.get("python_version"),
        "torch": extra.get("torch"),
        "transformers": extra.get("transformers"),
        "host": machine.get("node"),
        "device": device_facts,
        "machine_info": {"cpu": brand, "system": machine.get("system"), "release": machine.get("release"),
                         "machine": machine.get("machine"),
                         "python_implementation": machine.get("python_implementation")},
        "source": source,
        "pytest_benchmark": data.get("version"),
    }


def _record(data: dict, bench: dict, source: str) -> dict:
    stats = bench.get("stats")
    if not isinstance(stats, dict) or "mean" not in stats:
        raise PytestBenchmarkError(f"{source}: benchmark {bench.get('fullname')!r} has no stats")
    params = bench.get("params")
    name, group = bench.get("name") or bench["fullname"], bench.get("group")
    dtype, device = _fact(bench, "dtype"), _fact(bench, "device")
    time_ms, samples = _time_ms(stats)
    iterations = int(stats.get("iterations") or 1)
    options = bench.get("options") or {}
    total = stats.get("total")
    return {
        "schema": records.SCHEMA,
        "kind": KIND,
        "cell_id": cell_id(bench["fullname"], params),
        "cell": {"impl": "kernel", "name": name, "group": group, "params": params or {}, "dtype": dtype,
                 "device": device},
        "label": f"kernel {name}" + (f" ({group})" if group else ""),
        "status": "ok",
        "reason": None,
        "metrics": {"time_ms": time_ms},
        "samples": {"time_ms": samples},
        "repetitions": {"warmup": options.get("warmup"), "n": time_ms["n"], "iterations": iterations,
                        "target_cv": None,
                        "cv": {"time_ms": time_ms["std"] / time_ms["mean"] if time_ms["mean"] else None},
                        "stable": None, "note": "pytest-benchmark rounds (each the mean of its iterations)"},
        "memory": {},
        "energy": None,
        "kv_cache": None,
        "roofline": None,
        "profile": None,
        "model_facts": None,
        "context": _context(data, bench, device, source),
        "started_at": data.get("datetime"),
        "duration_s": None if total is None else round(float(total) * iterations, 6),
    }


def records_from_pytest_benchmark(data: dict, source: str) -> list[dict]:
    """One kernel record per benchmark of pytest-benchmark's JSON ``data`` (``source``: where it came from)."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise PytestBenchmarkError(f"{source}: not pytest-benchmark JSON (no 'benchmarks' list)")
    return [_record(data, bench, source) for bench in data["benchmarks"]]


def write_records(json_path: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Append the records of one pytest-benchmark JSON file to ``out_dir``'s records file, skipping cell ids
    already there (so converting the same file twice adds nothing); returns how many were added."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PytestBenchmarkError(f"{path}: not JSON ({exc.msg})") from None
    target = records.records_path(out_dir)
    seen = records.finished_ids(target)
    added = 0
    for record in records_from_pytest_benchmark(data, source=str(path)):
        if record["cell_id"] in seen:
            continue
        records.append_record(target, record)
        seen.add(record["cell_id"])
        added += 1
    return added
