"""A sweep fanned out over a Ray cluster (``gemma-harness bench ... --ray ADDRESS``; ``--ray local``
starts a local instance): one Ray task per cell, asking for the GPUs the cell needs (1 for a ``cuda``
cell, ``tensor_parallel_size x pipeline_parallel_size`` for a vLLM cell that names them). The task runs
the cell exactly as the local runner does (:func:`harness.bench.runner.run_child`: its own process, its
timeout), after measuring its node's ceilings once per run; the driver appends each record as its
result arrives, so a killed driver resumes like a local run.

Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it grants, so inside a task ``cuda:0`` is the task's
first GPU: name devices ``cuda:0`` in suites meant for Ray. Every node needs this project installed
in the same interpreter path (and vLLM's, for vllm cells).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic import write_atomic
from .suite import Cell, Suite


def gpus_for(cell: Cell) -> int:
    if not cell.device.startswith("cuda"):
        return 0
    options = cell.options or {}
    return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))


def cpus_for(cell: Cell, node_cpus: float) -> float:
    """A CPU cell takes a whole node (timings of two cells sharing cores mean nothing); a GPU cell one core."""
    return node_cpus if not cell.device.startswith("cuda") else 1


def _task(job: dict, python: str, timeout_s: float, run_id: str, device: str, dtypes: list[str]) -> dict:
    """On a Ray worker: the node's ceilings (measured once per run and node), then the cell."""
    from .runner import run_child

    node = socket.gethostname()
    probe_path = Path(tempfile.gettempdir()) / f"gemma-harness-probe-{run_id}-{device.replace(':', '')}.json"
    machine = json.loads(probe_path.read_text()) if probe_path.exists() else None
    if machine is None:
        probe = run_child({"probe": device, "dtypes": dtypes}, python, 300)
        machine = probe.get("machine")
        if machine is not None:
            probe_path.write_text(json.dumps(machine))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    result = run_child(job, python, timeout_s)
    result.setdefault("environment", {})
    if isinstance(result["environment"], dict):
        result["environment"]["node"] = node
    return {"result": result, "machine": machine, "started": started, "seconds": time.perf_counter() - t0}


def ray_results(suite: Suite, todo: list[Cell], out: Path, address: str,
                job_of: Callable[[Suite, Cell], dict]) -> Iterator[tuple[Cell, dict, dict | None, str, float]]:
    try:
        import ray
    except ImportError as exc:
        from .runner import RunError

        raise RunError("--ray needs Ray: pip install 'ray>=2.40'") from exc
    from .runner import python_for

    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}})
    remote = ray.remote(_task)
    node_cpus = max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive"))
    run_id = uuid.uuid4().hex[:12]
    dtypes = sorted({c.dtype for c in todo})
    pending = {
        remote.options(num_cpus=cpus_for(cell, node_cpus), num_gpus=gpus_for(cell)).remote(
            job_of(suite, cell), python_for(cell.impl), suite.settings["timeout_s"], run_id, cell.device, dtypes): cell
        for cell in todo
    }
    machine_path = out / "machine.json"
    machines: dict[str, dict] = json.loads(machine_path.read_text()) if machine_path.exists() else {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                done = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - the task itself died (node lost): that cell's error
                done = {"result": {"status": "error", "reason": f"Ray task failed: {type(exc).__name__}: {exc}"},
                        "machine": None, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "seconds": 0.0}
            node = (done["result"].get("environment") or {}).get("node", "?")
            if done["machine"]:
                machines[f"{node}/{cell.device}"] = done["machine"]
            yield cell, done["result"], done["machine"], done["started"], done["seconds"]
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        write_atomic(machine_path, json.dumps(machines, indent=1))
