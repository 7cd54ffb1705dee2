"""Benchmark records: JSON Lines, one object per cell, appended when the cell finishes.

A record (``schema`` = :data:`SCHEMA`)::

    cell_id     stable id of the cell's parameters ("c-" + 12 hex digits); --resume and merge key on it
    cell        {"impl", "attn" (hf: eager/sdpa, else null), "model", "layers" (cut to N, null = all),
                 "layers_total", "weights" ("random" | "gguf"), "dtype", "batch", "prompt", "gen",
                 "device", "options" {...}}
    label       one line naming the cell ("hf[sdpa] gemma-3-1b (4/26 layers) bfloat16 B=1 P=128 G=16 cpu")
    status      "ok" | "error" | "unsupported"
    reason      why, for error / unsupported (one line)
    metrics     ttft_ms, tpot_ms, itl_ms, e2el_ms: {"mean", "median", "std", "p90", "p99", "n"};
                prefill_tok_s, decode_tok_s, output_throughput, total_token_throughput: floats (means
                over repetitions); tpot excludes the first token, itl holds every gap after it
    samples     per repetition: {"ttft_ms": [...], "tpot_ms": [...], "e2el_ms": [...]} (the regression
                gate's two-sample test reads these)
    repetitions {"warmup", "n", "target_cv", "cv": {metric: cv}, "stable": bool, "note"}
    memory      rss_peak_bytes (process lifetime peak), rss_after_load_bytes, rss_peak_generate_bytes;
                on CUDA torch_max_allocated_bytes, torch_max_reserved_bytes, nvml_process_bytes,
                nvml_device_used_bytes (absent keys = not measurable there)
    energy      {"joules_per_token", "joules", "source": "nvml"} or null
    kv_cache    {"after_prefill_bytes", "after_last_token_bytes", "source"} (null values = the
                implementation does not expose its cache)
    roofline    {"bandwidth_gb_s", "matmul_tflops", "decode_bytes_per_step", "decode_bw_pct",
                 "prefill_flops", "prefill_flop_pct"}
    profile     {"timer", "total_ms", "ops": [{"op", "ms", "pct", "calls"}]} (suite setting profile: true;
                one untimed generation under torch.profiler) or null
    model_facts {"params", "weight_bytes", "layers", "layers_total", "cut"}
    context     {"harness", "git", "suite", "suite_hash", "seed", "python", "torch", "transformers",
                 "vllm", "impl_version", "host", "device": {...}}
    started_at, duration_s

Writing is atomic per line: a record is one ``write`` of one line, and a file whose last line was cut
by a kill is repaired (the partial line dropped) before the next append, so no half record survives.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..atomic import write_atomic

SCHEMA = "gemma-harness/bench-record/1"
RECORDS_FILE = "records.jsonl"
STATUSES = ("ok", "error", "unsupported")


class RecordsError(ValueError):
    """A records file or directory that cannot be read as benchmark records."""


def stable_id(prefix: str, value) -> str:
    """``prefix`` + 12 hex digits of sha256 over ``value`` as canonical JSON: a cell's id from its parameters."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return prefix + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def records_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RECORDS_FILE


def _repair(path: Path) -> None:
    """Drop a partial last line (a write cut by a kill), so the next append starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n"


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line, in one write, flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair(path)
    line = _line(record).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_records(path: str | os.PathLike, schema: str = SCHEMA, key: str = "cell_id") -> Iterator[dict]:
    """The complete records of one file; a partial last line is skipped, a malformed line elsewhere is an
    error, and so is a record of another ``schema`` or without its ``key`` (other record kinds, e.g. the KV
    measurements', use these files too)."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: a write cut by a kill
                return
            raise RecordsError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict) or record.get("schema") != schema or key not in record:
            raise RecordsError(f"{path}:{number}: not a benchmark record (schema {schema!r} expected)")
        yield record


def load(sources: Iterable[str | os.PathLike]) -> list[dict]:
    """Records from directories (their records.jsonl) or files, in order."""
    out: list[dict] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            path = records_path(path)
        if not path.exists():
            raise RecordsError(f"{source}: no benchmark records ({RECORDS_FILE} not found)")
        out.extend(iter_records(path))
    return out


def drop_errors(path: str | os.PathLike, schema: str = SCHEMA, key: str = "cell_id",
                ids: set[str] | None = None) -> int:
    """Rewrite the file without its error records (atomically: a temporary file replaces it), so that
    their cells run again; with ``ids``, only the errors whose ``key`` is among them. How many were
    dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    every = list(iter_records(path, schema, key))
    kept = [r for r in every if r.get("status") != "error" or (ids is not None and r[key] not in ids)]
    if len(kept) < len(every):
        write_atomic(path, "".join(_line(r) for r in kept))
    return len(every) - len(kept)


def finished_ids(path: str | os.PathLike) -> set[str]:
    path = Path(path)
    return {r["cell_id"] for r in iter_records(path)} if path.exists() else set()


def _same(a: dict, b: dict) -> bool:
    """Two records of one cell agree when their measurements come from the same run."""
    keys = ("status", "metrics", "started_at")
    return all(a.get(k) == b.get(k) for k in keys)


def merge(record_lists: Iterable[list[dict]]) -> tuple[list[dict], list[str]]:
    """Join shards: one record per cell id, in first-seen order. Two different records of one cell are a
    conflict: the first is kept and the conflict reported (never silently overwritten)."""
    kept: dict[str, dict] = {}
    conflicts: list[str] = []
    for records in record_lists:
        for record in records:
            cid = record["cell_id"]
            if cid not in kept:
                kept[cid] = record
            elif not _same(kept[cid], record):
                conflicts.append(f"{cid} ({record.get('label', '?')}): two different records; the first is kept")
    return list(kept.values()), conflicts
