"""Will a gate run fit in memory? An estimate made before any work, so a model too large for the
machine is refused up front with the figure instead of being killed by the kernel an hour in.

The dominant terms on full-size configs, per run: the weights (the state dict in float32, which the
reference shares in float32 and copies in other dtypes, plus the candidate's own copy), the candidate's
logits (batch x tokens x a 262k vocabulary; the reference computes its own a slice at a time while
they are compared), the probes both keep until compared (about
a dozen (batch, tokens, hidden) tensors per layer), and the comparison's float64 working chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from reference_impl.spec import ModelSpec
from reference_impl.weights import count_parameters

from .compare import _CHUNK
from .probes import for_spec

GIB = 1024**3
_HELD_WHILE_JUDGED = 3  # the isolated recomputation, its comparison and the drift comparison of one probe
# the interpreter, torch and transformers themselves, and allocator slack. Measured full-size float32 runs
# against HF: gemma-3-270m 8.7 GB peak RSS (estimate 9.0 GB), gemma-3-1b 17.6 GB (estimate 17.2 GB).
_BASELINE = GIB
_HEADROOM = 0.9  # of the available memory, for what the estimate leaves out (allocator slack, Python)


@dataclass(frozen=True)
class Footprint:
    weights: int
    logits: int
    probes: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.logits + self.probes + self.working

    def describe(self) -> str:
        return (f"about {self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, logits {self.logits / GIB:.1f}, "
                f"probes {self.probes / GIB:.1f}, working {self.working / GIB:.1f})")


def estimate(spec: ModelSpec, batch: int, tokens: int, dtype: torch.dtype) -> Footprint:
    """Bytes a gate run of ``spec`` on a (batch, tokens) input in ``dtype`` holds at its peak."""
    size = torch.empty(0, dtype=dtype).element_size()
    params = count_parameters(spec)["total"]
    reference_copy = 0 if dtype == torch.float32 else params * size
    weights = params * 4 + reference_copy + params * size  # state dict (fp32), reference, candidate
    logits = batch * tokens * spec.vocab_size * max(size, 4)  # the candidate's (the reference's are lazy)
    per_layer = len(for_spec(spec)) / spec.num_layers  # inputs, outputs and the stream, held by both sides
    probes = int((2 * per_layer * spec.num_layers + _HELD_WHILE_JUDGED) * batch * tokens * spec.hidden_size * size)
    heads = max(layer.num_heads for layer in spec.layers)
    attention = 3 * batch * heads * tokens * tokens * 4  # eager scores, softmax and its cast
    mlp = 3 * batch * tokens * max(layer.intermediate_size for layer in spec.layers) * 4  # gate, up, product
    working = _BASELINE + max(attention, mlp, 8 * _CHUNK * spec.vocab_size * 8)
    return Footprint(weights, logits, probes, working)


def available() -> int:
    """Bytes of memory available to this process now (MemAvailable, or psutil's figure)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits(footprint: Footprint, free: int | None = None) -> bool:
    return footprint.total <= _HEADROOM * (available() if free is None else free)


def largest_cut(spec_for, batch: int, tokens: int, dtype: torch.dtype, total_layers: int, free: int) -> int:
    """The most leading layers of a model that fit (0 if not even one): ``spec_for(n)`` is the spec cut to n."""
    best = 0
    for n in range(1, total_layers + 1):
        if not fits(estimate(spec_for(n), batch, tokens, dtype), free):
            break
        best = n
    return best
