"""``gemma-harness eval``: lm-eval tasks through implementations, into benchmark records.

One cell per (implementation, task): lm-eval runs the task through the ``gemma-harness`` model, the
record is appended to ``OUT/records.jsonl`` when the cell finishes (the benchmark runner's format,
``kind: "eval"``; ``gemma-harness report OUT`` renders it) and the per-document results to
``OUT/samples/<cell_id>.jsonl`` (what ``--compare`` pairs). ``--resume`` skips finished cells; a cell
that fails is an error record with a one-line reason and the others still run.

An eval record::

    cell     {"impl", "model", "weights", "dtype", "batch", "task", "num_fewshot", "limit", "split",
              "chat_template", "device": "cpu"}
    metrics  {metric: {"value", "stderr"}}     (fractions; lm-eval's own aggregation)
    n        documents scored
    eval     {"lm_eval", "task_hash" (tasks.config_hash), "lm_eval_task_hash", "bos_policy",
              "chat_template", "batch_size", "first_ids" (the first 8 token ids of the first request),
              "published_split", "samples" (relative path), "truncated", "scorer_environment"}
    context  the benchmark runner's environment (versions, git, host, device), plus lm-eval's seeds
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..bench import records as records_mod
from . import tasks as tasks_mod

KIND = "eval"
# implementations that read weights of their own instead of the loaded model's (the record names them)
OWN_WEIGHTS = {"llamacpp": "gguf-q4_k_m (quantized matmuls)", "llamacpp-f32": "gguf-f32 (= dequantized q4_k_m)"}
BOS_POLICY = "exactly one BOS at the start of every request (checked before scoring)"
SAMPLES_DIR = "samples"


def cell_for(impl: str, model: str, weights: str, dtype: str, batch: int, task: tasks_mod.LocalTask,
             num_fewshot: int, limit: int | None, chat_template: bool, device: str = "cpu") -> dict:
    return {"impl": impl, "model": model, "weights": weights, "dtype": dtype, "batch": batch, "task": task.name,
            "num_fewshot": num_fewshot, "limit": limit, "split": task.split, "chat_template": chat_template,
            "device": device}


def label(cell: dict) -> str:
    shots = f"{cell['num_fewshot']}-shot"
    limit = f" limit={cell['limit']}" if cell["limit"] else ""
    return f"{cell['impl']} {cell['model']} {cell['task']} {shots}{limit} {cell['dtype']} B={cell['batch']}"


def _metrics(task_results: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s}`` -> ``{"acc": {"value", "stderr"}}``."""
    out = {}
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        metric = name if filt == "none" else f"{name},{filt}"
        stderr = task_results.get(f"{name}_stderr,{filt}")
        out[metric] = {"value": float(value),
                       "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def sample_rows(samples: list[dict], metrics: Sequence[str]) -> list[dict]:
    """Per document: its id, target, per-choice log-likelihoods and greedy flags (multiple choice) or
    the response (generation), and each metric's value."""
    rows = []
    for s in samples:
        row = {"doc_id": int(s["doc_id"]), "target": s.get("target")}
        resps = s.get("filtered_resps") or []
        if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2:
            row["loglikelihoods"] = [float(r[0]) for r in resps]
            row["greedy"] = [bool(r[1]) for r in resps]
        elif resps:
            row["response"] = resps[0] if isinstance(resps[0], str) else str(resps[0])
        for metric in metrics:
            if metric in s and isinstance(s[metric], (bool, int, float)):
                row[metric] = float(s[metric])
        rows.append(row)
    return sorted(rows, key=lambda r: r["doc_id"])


def _write_samples(out: Path, cell_id: str, rows: list[dict]) -> str:
    from ..atomic import write_atomic

    relative = f"{SAMPLES_DIR}/{cell_id}.jsonl"
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(out / relative, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return relative


def evaluate_cell(lm, task: tasks_mod.LocalTask, task_manager, cell: dict, out: Path) -> dict:
    """Run one task through an instantiated GemmaHarnessLM; the record (samples written)."""
    import lm_eval

    lm.first_ids, lm.truncated = None, 0
    result = lm_eval.simple_evaluate(model=lm, tasks=[task.name], task_manager=task_manager,
                                     num_fewshot=cell["num_fewshot"], limit=cell["limit"], log_samples=True,
                                     apply_chat_template=cell["chat_template"], random_seed=0, numpy_random_seed=1234,
                                     torch_random_seed=1234, fewshot_random_seed=1234, bootstrap_iters=1000)
    metrics = _metrics(result["results"][task.name])
    cell_id = records_mod.stable_id("e-", cell)
    samples = sample_rows(result["samples"][task.name], [m for m in metrics if "," not in m])
    n = result.get("n-samples", {}).get(task.name, {}).get("effective", len(samples))
    return {
        "metrics": metrics, "n": int(n),
        "eval": {"lm_eval": lm_eval.__version__, "task_hash": tasks_mod.config_hash(task),
                 "lm_eval_task_hash": result.get("task_hashes", {}).get(task.name),
                 "bos_policy": BOS_POLICY, "chat_template": cell["chat_template"], "batch_size": cell["batch"],
                 "first_ids": lm.first_ids, "published_split": task.published_split,
                 "samples": _write_samples(out, cell_id, samples), "truncated": lm.truncated,
                 "scorer_environment": dict(lm.scorer.environment)},
        "seeds": {k: result.get("config", {}).get(k) for k in ("random_seed", "numpy_seed", "torch_seed",
                                                                 "fewshot_seed")},
    }


def _record(cell: dict, status: str, reason: str | None, started: str, duration: float, body: dict) -> dict:
    from ..bench.context import environment

    seeds = body.pop("seeds", {})
    return {"schema": records_mod.SCHEMA, "kind": KIND, "cell_id": records_mod.stable_id("e-", cell), "cell": cell,
            "label": label(cell), "status": status, "reason": reason, "metrics": body.get("metrics", {}),
            "n": body.get("n"), "eval": body.get("eval"), "context": {**environment(cell["device"]), "seeds": seeds},
            "started_at": started, "duration_s": round(duration, 2)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]


def run(impls: Sequence[str], model: str, task_names: Sequence[str], out_dir: str | Path, *, limit: int | None = None,
        num_fewshot: int = 0, batch: int = 8, dtype: str = "float32", chat_template: bool = False,
        resume: bool = False, quiet: bool = False, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Every (implementation, task) cell; records appended as they finish. The records of this call."""
    import torch
    from lm_eval.tasks import TaskManager

    from .lm import GemmaHarnessLM
    from .preflight import PreflightError
    from .scorers import load_model

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = records_mod.records_path(out)
    local = tasks_mod.resolve(list(task_names))
    # the YAMLs hold this machine's paths to the data: a temporary directory, not the (committable) output
    task_dir = tasks_mod.write_task_dir(tempfile.mkdtemp(prefix="gemma-harness-tasks-"), local)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    loaded = load_model(model, seed)
    done = {}
    if resume and path.exists():
        records_mod.drop_errors(path)
        done = {r["cell_id"]: r for r in records_mod.iter_records(path) if r.get("kind") == KIND}
    written = []
    for impl in impls:
        weights = OWN_WEIGHTS.get(impl, loaded.weights)
        cells = [cell_for(impl, model, weights, dtype, batch, t, num_fewshot, limit, chat_template, device)
                 for t in local]
        todo = [(t, c) for t, c in zip(local, cells, strict=True) if records_mod.stable_id("e-", c) not in done]
        if not todo:
            continue
        started_load = time.perf_counter()
        try:
            lm = GemmaHarnessLM(impl=impl, model=model, dtype=dtype, batch_size=batch, loaded=loaded, device=device)
        except Exception as exc:  # noqa: BLE001 - an implementation that cannot load fails its cells only
            for _, cell in todo:
                record = _record(cell, "error", f"loading {impl}: {_one_line(exc)}", _now(),
                                 time.perf_counter() - started_load, {})
                records_mod.append_record(path, record)
                written.append(record)
                _say(record, quiet)
            continue
        try:
            for task, cell in todo:
                started, t0 = _now(), time.perf_counter()
                try:
                    record = _record(cell, "ok", None, started, 0.0, evaluate_cell(lm, task, manager, cell, out))
                except PreflightError:
                    raise  # a malformed request stops the run: nothing may be scored on it
                except Exception as exc:  # noqa: BLE001 - one failed cell is its record; the rest still run
                    record = _record(cell, "error", _one_line(exc), started, 0.0, {})
                record["duration_s"] = round(time.perf_counter() - t0, 2)
                records_mod.append_record(path, record)
                written.append(record)
                _say(record, quiet)
        finally:
            lm.close()
    return written


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def summary_line(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['label']}: {record['status']}: {record['reason']}"
    parts = [f"{m} {v['value'] * 100:.2f}" + (f" ± {v['stderr'] * 100:.2f}" if v.get("stderr") is not None else "")
             for m, v in record["metrics"].items() if "," not in m]
    return f"{record['label']}: {', '.join(parts)} (n={record['n']}, {record['duration_s']:.0f} s)"


def _say(record: dict, quiet: bool) -> None:
    if not quiet:
        print(summary_line(record), flush=True)


def load_samples(out_dir: str | Path, record: dict) -> dict[int, dict]:
    """doc_id -> per-document row of a record's samples file."""
    path = Path(out_dir) / record["eval"]["samples"]
    return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines()) if row}
