"""The machine's own ceilings, measured once per run: memory read bandwidth and matmul throughput.

Decode is bound by reading weights and K/V, prefill by matmuls; dividing a cell's achieved rate by
these gives its "% of roofline" — how much headroom the implementation leaves on this machine.

* bandwidth: the best of several timed full reads of a buffer far larger than the last-level cache
  (a sum, and a matrix-vector product — decode's own access pattern), in GB/s (1e9 bytes/s);
* matmul: the best of several square matmuls per dtype, in TFLOP/s (2 n^3 per product).

Best-of-N, not mean: the ceiling is what the machine can do, and noise only ever slows a run down.
"""

from __future__ import annotations

import time

import torch

# CPU: 512 MiB reads, 2048^2 matmuls; CUDA: 2 GiB reads, 8192^2 matmuls (large enough to saturate).
_SIZES = {"cpu": (512 << 20, 2048), "cuda": (2 << 30, 8192)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (first-touch page faults, kernel selection)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> dict:
    n = nbytes // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    side = int(n ** 0.5)
    mat, vec = x[: side * side].view(side, side), torch.ones(side, device=device)
    summed = _best(lambda: x.sum(), device, reps)
    gemv = _best(lambda: mat @ vec, device, reps)
    return {"bandwidth_gb_s": max(n * 4 / summed, side * side * 4 / gemv) / 1e9,
            "sum_gb_s": n * 4 / summed / 1e9, "gemv_gb_s": side * side * 4 / gemv / 1e9, "buffer_bytes": n * 4}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _best(lambda: a @ b, device, reps) / 1e12


def probe(device: str = "cpu", dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    """Measure the ceilings of ``device`` (a few seconds on a CPU)."""
    dev = torch.device(device)
    nbytes, n = _SIZES[dev.type]
    t0 = time.perf_counter()
    with torch.no_grad():
        facts = read_bandwidth(dev, nbytes)
        facts["matmul_tflops"] = {d: matmul_tflops(dev, _DTYPES[d], n) for d in dtypes}
    facts.update(device=device, matmul_n=n, threads=torch.get_num_threads(),
                 probe_seconds=round(time.perf_counter() - t0, 2))
    return facts
