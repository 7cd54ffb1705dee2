"""The sweep: every selected cell in its own child process, one record appended per finished cell.

``run(suite, out_dir, ...)`` is what ``gemma-harness bench`` calls. Records go to
``OUT/records.jsonl`` (:mod:`harness.bench.records`); the machine's measured ceilings to
``OUT/machine.json`` (measured once per device and reused on resume, so every record of a run is judged
against the same roofline).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import configs
from reference_impl.spec import ModelSpec

from ..adapters.base import last_error_line
from ..atomic import write_atomic
from ..kvcache import DTYPE_BYTES
from . import cost, records
from .suite import Cell, Suite, layers_total

REPO_ROOT = Path(__file__).resolve().parents[2]
MACHINE_FILE = "machine.json"
_PROBE_TIMEOUT_S = 300


class RunError(RuntimeError):
    """A sweep that cannot start (its output directory, its machine probe): one line."""


def python_for(impl: str) -> str:
    """The interpreter a cell's child runs in: vLLM's own environment for vllm (it pins its own
    transformers), this one otherwise."""
    if impl == "vllm":
        explicit = os.environ.get("GEMMA_HARNESS_VLLM_PYTHON")
        if explicit:
            return explicit
        tox = REPO_ROOT / ".tox" / "vllm" / "bin" / "python"
        if tox.exists():
            return str(tox)
    return sys.executable


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the runner dies (a SIGKILLed sweep leaves no orphan
    cell running on, holding memory and skewing the resumed run's timings). Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_child(job: dict, python: str, timeout_s: float) -> dict:
    """Run one job in a child process; its result, or {"status": "error", "reason"} for a crash, a kill
    (out of memory) or a timeout."""
    with tempfile.TemporaryDirectory(prefix="gemma-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        proc = subprocess.Popen([python, "-m", "harness.bench.child", result_path], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                env=_child_env(), start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            _, stderr = proc.communicate(json.dumps(job), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s (the cell's timeout_s)"}
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            hint = " (out of memory?)" if sig == "SIGKILL" else ""
            return {"status": "error", "reason": f"the cell's process was killed by {sig}{hint}"}
        return {"status": "error", "reason": f"the cell's process exited with {proc.returncode}: {last_error_line(stderr)}"}


def stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, "median": None, "std": None, "p90": None, "p99": None, "n": 0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "n": int(a.size)}


def cv(values: list[float]) -> float | None:
    """Coefficient of variation (sample std / mean); None below two values."""
    a = np.asarray(values, dtype=float)
    return float(a.std(ddof=1) / a.mean()) if a.size > 1 and a.mean() > 0 else None


def latency_metrics(stamps: list[list[float]], cell: Cell) -> tuple[dict, dict]:
    """vllm-bench metrics from per-repetition step times (seconds from the repetition's start). Every
    request of a static batch gets its tokens at the same step, so one repetition is one sample of
    TTFT/TPOT/E2EL; ITL holds every gap after the first token."""
    b, p, g = cell.batch, cell.prompt, cell.gen
    ttft = [r[0] * 1e3 for r in stamps]
    e2el = [r[-1] * 1e3 for r in stamps]
    tpot = [(r[-1] - r[0]) * 1e3 / (g - 1) for r in stamps] if g > 1 else []
    itl = [(later - earlier) * 1e3 for r in stamps for earlier, later in itertools.pairwise(r)]
    n = len(stamps)
    total_ttft, total_e2el = sum(ttft) / 1e3, sum(e2el) / 1e3  # seconds over all repetitions
    metrics = {  # rates over all repetitions: tokens / time, as vllm bench divides totals
        "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2el_ms": stats(e2el),
        "prefill_tok_s": n * b * p / total_ttft,
        "decode_tok_s": n * b * (g - 1) / (total_e2el - total_ttft) if g > 1 else None,
        "output_throughput": n * b * g / total_e2el,
        "total_token_throughput": n * b * (p + g) / total_e2el,
    }
    samples = {"ttft_ms": ttft, "tpot_ms": tpot, "e2el_ms": e2el}
    return metrics, samples


def model_spec(cell: Cell) -> ModelSpec:
    config = configs.hf_config(cell.model)
    return ModelSpec.from_hf_config(configs.cut(config, cell.layers) if cell.layers else config)


def roofline(cell: Cell, spec: ModelSpec, facts: dict, metrics: dict, machine: dict | None) -> dict:
    dtype_bytes = DTYPE_BYTES[cell.dtype]
    flops = cost.prefill_flops(spec, facts, cell.batch, cell.prompt)
    step_bytes = cost.decode_bytes_per_step(spec, facts, cell.batch, cell.prompt, cell.gen, dtype_bytes)
    out = {"decode_bytes_per_step": step_bytes, "prefill_flops": flops, "bandwidth_gb_s": None,
           "matmul_tflops": None, "decode_bw_pct": None, "prefill_flop_pct": None}
    if not machine:
        return out
    bandwidth = machine["bandwidth_gb_s"] * 1e9
    peak = machine["matmul_tflops"].get(cell.dtype)
    out.update(bandwidth_gb_s=machine["bandwidth_gb_s"], matmul_tflops=peak)
    tpot, ttft = metrics["tpot_ms"]["mean"], metrics["ttft_ms"]["mean"]
    if tpot:
        out["decode_bw_pct"] = 100 * step_bytes / (tpot / 1e3) / bandwidth
    if ttft and peak:
        out["prefill_flop_pct"] = 100 * flops / (ttft / 1e3) / (peak * 1e12)
    return out


def build_record(cell: Cell, result: dict, suite: Suite, machine: dict | None, started: str, duration: float) -> dict:
    env = result.get("environment")
    if env is None:  # the child died before saying (a kill, a timeout): the runner's own view
        from .context import environment

        env = {**environment(cell.device), "context_from": "runner (the cell's process reported none)"}
    record = {
        "schema": records.SCHEMA, "kind": "generation", "cell_id": cell.cell_id,
        "cell": {**cell.params(), "layers_total": layers_total(cell.model)}, "label": cell.label,
        "status": result["status"], "reason": result.get("reason"),
        "context": {**env, "suite": suite.name, "suite_hash": suite.hash, "seed": suite.seed,
                    "machine_probe": machine},
        "started_at": started, "duration_s": round(duration, 3),
    }
    if result["status"] != "ok":
        return record
    metrics, samples = latency_metrics(result["stamps"], cell)
    spec = model_spec(cell)
    facts = cost.model_facts(spec)
    reps = len(result["stamps"])
    cvs = {k: cv(v) for k, v in samples.items()}
    stable = cvs["e2el_ms"] is not None and cvs["e2el_ms"] <= suite.settings["target_cv"]
    record.update(
        metrics=metrics, samples=samples,
        repetitions={"warmup": result["warmup"], "n": reps, "target_cv": suite.settings["target_cv"], "cv": cvs,
                     "stable": stable, "note": result.get("note") or ("" if stable else "target CV not reached")},
        memory=result["memory"], energy=result.get("energy"), kv_cache=result["kv_cache"],
        roofline=roofline(cell, spec, facts, metrics, machine),
        profile=result.get("profile"),
        model_facts={**facts, "layers": len(spec.layers),
                     "layers_total": layers_total(cell.model), "cut": bool(cell.layers)},
    )
    return record


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def machine_facts(out_dir: Path, device: str, dtypes: tuple[str, ...]) -> dict | None:
    """The device's measured ceilings: from OUT/machine.json when this run (or the one it resumes)
    measured them already, else measured now in a child process and stored."""
    path = out_dir / MACHINE_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    have = known.get(device)
    if have and all(d in have["matmul_tflops"] for d in dtypes):
        return have
    result = run_child({"probe": device, "dtypes": list(dtypes)}, sys.executable, _PROBE_TIMEOUT_S)
    if result["status"] != "ok":
        return None  # no ceilings (e.g. no CUDA here): roofline columns stay empty
    known[device] = result["machine"]
    write_atomic(path, json.dumps(known, indent=1))
    return result["machine"]


def _local_results(suite: Suite, todo: list[Cell], out: Path, bar) -> Iterator[tuple[Cell, dict, dict | None, str, float]]:
    """Cells one after another on this machine: (cell, result, machine facts, started, seconds)."""
    dtypes_by_device: dict[str, set[str]] = {}
    for c in todo:
        dtypes_by_device.setdefault(c.device, set()).add(c.dtype)
    machines = {d: machine_facts(out, d, tuple(sorted(ds))) for d, ds in dtypes_by_device.items()}
    for cell in todo:
        bar.set_description(cell.label[:60])
        started, t0 = _now(), time.perf_counter()
        result = run_child(_job(suite, cell), python_for(cell.impl), suite.settings["timeout_s"])
        yield cell, result, machines.get(cell.device), started, time.perf_counter() - t0


def _job(suite: Suite, cell: Cell) -> dict:
    return {"cell": cell.params(), "settings": suite.settings, "seed": suite.seed}


def run(suite: Suite, cells: list[Cell], out_dir: str | Path, resume: bool = False, quiet: bool = False,
        on_record: Callable[[dict], None] | None = None, ray_address: str | None = None) -> list[dict]:
    """Run ``cells`` of ``suite`` into ``out_dir`` (here, one after another, or as tasks of a Ray cluster
    with ``ray_address``); the records written by this call, each appended as its cell finishes."""
    out = Path(out_dir)
    path = records.records_path(out)
    done = records.finished_ids(path) if path.exists() else set()
    if done and not resume:
        raise RunError(f"{out} already holds {len(done)} records: --resume to continue that run, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if c.cell_id not in done]
    written = []
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=quiet, unit="cell", dynamic_ncols=True, file=sys.stderr)
    if done and not quiet:
        bar.write(f"resuming: {len(done)} cells already recorded, {len(todo)} to run")
    if ray_address:
        from .ray_runner import ray_results

        results = ray_results(suite, todo, out, ray_address, _job)
    else:
        results = _local_results(suite, todo, out, bar)
    try:
        for cell, result, machine, started, seconds in results:
            record = build_record(cell, result, suite, machine, started, seconds)
            records.append_record(path, record)
            written.append(record)
            if on_record:
                on_record(record)
            if not quiet:
                bar.write(summary_line(record))
            bar.update(1)
    finally:
        bar.close()
    return written


def summary_line(record: dict) -> str:
    """One line per finished cell for the terminal."""
    if record["status"] != "ok":
        return f"{record['status'].upper():<11} {record['label']}: {record['reason']}"
    m, r = record["metrics"], record["repetitions"]
    parts = [f"ttft {m['ttft_ms']['mean']:.1f} ms"]
    if m["tpot_ms"]["mean"] is not None:
        parts.append(f"tpot {m['tpot_ms']['mean']:.2f} ms")
    parts.append(f"{m['output_throughput']:.1f} tok/s")
    parts.append(f"{r['n']} reps (e2el cv {100 * (r['cv']['e2el_ms'] or 0):.1f}%{'' if r['stable'] else ', unstable'})")
    return f"{'ok':<11} {record['label']}: " + ", ".join(parts)
