"""One benchmark cell, in its own process: ``python -m harness.bench.child RESULT.json < JOB.json``.

The runner starts one child per cell (with the interpreter the implementation needs), so a crash, an
out-of-memory kill or a hang costs that cell only. The child loads the model, warms up (measuring the
KV cache after prefill and after the last token), then times repetitions of the whole generation until
e2el's coefficient of variation reaches the target, and writes the raw measurements to RESULT.json.
``{"probe": DEVICE}`` as the job measures the machine's ceilings instead (:mod:`harness.bench.machine`).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time

import psutil
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_adapter(cell: dict):
    impl = cell["impl"]
    if impl == "reference":
        from ..adapters.reference import ReferenceAdapter

        return ReferenceAdapter()
    if impl == "hf":
        from ..adapters.hf import hf_adapter

        return hf_adapter(attn=cell.get("attn") or "eager")
    if impl == "vllm":
        from .vllm_engine import VLLMBenchAdapter

        return VLLMBenchAdapter(max_model_len=cell["prompt"] + cell["gen"] + 16, max_num_seqs=cell["batch"],
                                **(cell.get("options") or {}))
    from ..adapters import resolve

    return resolve(impl)


def model_inputs(cell: dict, seed: int):
    """(hf_config, state_dict, prompt ids (B, P)) of the cell: random weights from the config (cut to
    ``layers``), or the real Gemma 3 270M GGUF dequantized with a real prose prompt."""
    import configs
    from reference_impl.spec import ModelSpec

    from ..synthetic import conditioning_for, random_state_dict

    b, p = cell["batch"], cell["prompt"]
    if cell["weights"] == "gguf":
        from ..realweights import load_real_model, prompt_ids

        hf_config, state, meta = load_real_model()
        ids = torch.tensor([prompt_ids(meta, p)] * b)
    else:
        hf_config = configs.hf_config(cell["model"])
        state = None
        ids = None
    if cell.get("layers"):
        hf_config = configs.cut(hf_config, cell["layers"])
        if state is not None:
            keep = [f"layers.{i}." for i in range(cell["layers"])]
            state = {k: v for k, v in state.items() if ".layers." not in k or any(f"model.{s}" in k for s in keep)}
    spec = ModelSpec.from_hf_config(hf_config)
    if state is None:
        state = random_state_dict(spec, seed=seed, conditioning=conditioning_for(cell["dtype"]))
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, spec.vocab_size, (b, p), generator=gen)  # no pad/eos/bos ids
    return hf_config, state, ids


class Peaks:
    """Samples the process's RSS (and, given an NVML handle, the GPU's process/device memory) every few
    ms in a thread."""

    def __init__(self, nvml=None, interval: float = 0.005):
        self.interval = interval
        self.rss = self.nvml_process = self.nvml_device = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._nvml = nvml

    def _sample(self):
        self.rss = max(self.rss, self._proc.memory_info().rss)
        if self._nvml is not None:
            pynvml, h = self._nvml
            self.nvml_device = max(self.nvml_device, pynvml.nvmlDeviceGetMemoryInfo(h).used)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    self.nvml_process = max(self.nvml_process, proc.usedGpuMemory)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _nvml_handle(device: str):
    if not device.startswith("cuda"):
        return None
    from .context import nvml_handle

    try:
        return nvml_handle(torch.device(device).index or 0)
    except Exception:  # noqa: BLE001 - no NVML: the record says so by leaving the fields out
        return None


def _energy_mj(nvml) -> int | None:
    if nvml is None:
        return None
    pynvml, h = nvml
    try:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except Exception:  # noqa: BLE001 - not every GPU has the counter
        return None


def timed_runs(adapter, ids, gen: int, settings: dict, sync) -> tuple[list[list[float]], str]:
    """Repetitions of the whole generation: per repetition the times (s, from its start) at which each
    step's tokens existed. Stops at max_reps, or once min_reps are done and e2el's CV <= target_cv, or
    past max_seconds of timed work."""
    from .runner import cv

    reps: list[list[float]] = []
    spent = 0.0
    note = ""
    while len(reps) < settings["max_reps"]:
        stamps: list[float] = []

        def on_token(_tokens, stamps=stamps):
            sync()
            stamps.append(time.perf_counter())

        sync()
        start = time.perf_counter()
        adapter.bench_generate(ids, gen, on_token)
        if len(stamps) != gen:
            raise RuntimeError(f"bench_generate reported {len(stamps)} steps for {gen} tokens")
        reps.append([s - start for s in stamps])
        spent += stamps[-1] - start
        if len(reps) >= settings["min_reps"]:
            spread = cv([r[-1] for r in reps])
            if spread is not None and spread <= settings["target_cv"]:
                break
            if spent >= settings["max_seconds"]:
                note = f"stopped after {spent:.0f} s of timed work (max_seconds) before reaching the target CV"
                break
    else:
        note = f"max_reps ({settings['max_reps']}) reached before the target CV"
    return reps, note


def profile_generation(adapter, ids, gen: int, cuda: bool, top: int = 12) -> dict:
    """One more (untimed) generation under torch.profiler: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        adapter.bench_generate(ids, gen, lambda _t: None)
    events = prof.key_averages()
    timer = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, timer, 0) for e in events) or 1
    ranked = sorted(events, key=lambda e: getattr(e, timer, 0), reverse=True)[:top]
    return {"timer": timer.removesuffix("_total"), "total_ms": total / 1e3,
            "ops": [{"op": e.key, "ms": getattr(e, timer) / 1e3, "pct": 100 * getattr(e, timer) / total,
                     "calls": e.count} for e in ranked]}


def run_cell(cell: dict, settings: dict, seed: int) -> dict:
    from ..adapters.base import Unsupported, supports
    from .context import environment

    device = cell["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unsupported("device", f"{device}: no CUDA device here (torch {torch.__version__})")
    adapter = make_adapter(cell)
    if not supports(adapter, "bench_generate"):
        raise Unsupported("generate", f"{adapter.name} has no bench_generate() (see harness.adapters.base.Adapter)")
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    torch.manual_seed(seed)
    hf_config, state, ids = model_inputs(cell, seed)
    rss_start = psutil.Process().memory_info().rss
    adapter.load(hf_config, state, DTYPES[cell["dtype"]])
    del state
    gc.collect()
    if device != "cpu":
        adapter.to_device(device)
        ids = ids.to(device)
    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    out: dict = {"environment": environment(device, getattr(adapter, "version", None) or adapter.name)}
    rss_after_load = psutil.Process().memory_info().rss

    # warm-up: a prefill alone, then whole generations; the cache is measured after each first one
    adapter.bench_generate(ids, 1, lambda _t: None)
    kv_prefill = adapter.cache_bytes()
    for i in range(max(1, settings["warmup"])):
        adapter.bench_generate(ids, cell["gen"], lambda _t: None)
        if i == 0:
            kv_last = adapter.cache_bytes()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    nvml = _nvml_handle(device)
    energy_start = _energy_mj(nvml)
    with Peaks(nvml) as peaks:
        reps, note = timed_runs(adapter, ids, cell["gen"], settings, sync)
    energy_end = _energy_mj(nvml)
    memory = {"rss_start_bytes": rss_start, "rss_after_load_bytes": rss_after_load,
              "rss_peak_generate_bytes": peaks.rss,
              "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        memory.update(torch_max_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      torch_max_reserved_bytes=torch.cuda.max_memory_reserved(device))
        if nvml is not None:
            memory.update(nvml_process_bytes=peaks.nvml_process, nvml_device_used_bytes=peaks.nvml_device)
    tokens = len(reps) * cell["batch"] * cell["gen"]
    energy = None
    if energy_start is not None and energy_end is not None:
        joules = (energy_end - energy_start) / 1000
        energy = {"joules": joules, "joules_per_token": joules / tokens, "source": "nvml"}
    if settings.get("profile"):
        out["profile"] = profile_generation(adapter, ids, cell["gen"], cuda)
    adapter.close()
    out.update(stamps=reps, note=note, memory=memory, energy=energy, warmup=max(1, settings["warmup"]) + 1,
               kv_cache={"after_prefill_bytes": kv_prefill, "after_last_token_bytes": kv_last,
                         "source": f"{adapter.name}.cache_bytes()"})
    return out


def main(argv: list[str]) -> int:
    from ..adapters.base import Unsupported
    from ..atomic import write_atomic
    from ..gate import crash_line
    from .context import environment

    result_path = argv[0]
    job = json.load(sys.stdin)
    device = job.get("probe") or job["cell"]["device"]
    try:
        if "probe" in job:
            from .machine import probe

            result = {"status": "ok", "machine": probe(job["probe"], tuple(job.get("dtypes", ("float32",))))}
        else:
            result = {"status": "ok", **run_cell(job["cell"], job["settings"], job["seed"])}
    except Unsupported as exc:
        result = {"status": "unsupported", "reason": f"{exc.feature}: {exc.reason}", "environment": environment(device)}
    except Exception as exc:  # noqa: BLE001 - the cell's error, recorded; the sweep goes on
        if os.environ.get("GEMMA_HARNESS_DEBUG") == "1":
            raise
        result = {"status": "error", "reason": crash_line(exc), "environment": environment(device)}
    write_atomic(result_path, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
