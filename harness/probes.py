"""Canonical probe points, in forward order, and how to name their place in the model."""

from __future__ import annotations

import re

SUBLAYERS = ("attn", "mlp", "out")
_LAYER_PROBE = re.compile(r"^layers\.(\d+)\.(\w+)$")


def canonical(num_layers: int) -> list[str]:
    """embed, then per layer attn / mlp / out, then final_norm and logits."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{sub}" for sub in SUBLAYERS]
    return names + ["final_norm", "logits"]


def for_spec(spec) -> list[str]:
    """The canonical probes plus Gemma 4's own, in forward order: per layer attn, mlp, then router and
    moe (MoE layers), ple (per-layer-embedding models), out."""
    names = ["embed"]
    for layer in spec.layers:
        p = f"layers.{layer.index}"
        names += [f"{p}.attn", f"{p}.mlp"]
        if layer.moe is not None:
            names += [f"{p}.router", f"{p}.moe"]
        if spec.ple is not None:
            names.append(f"{p}.ple")
        names.append(f"{p}.out")
    return names + ["final_norm", "logits"]


def locate(name: str) -> tuple[int | None, str]:
    """'layers.3.mlp' -> (3, 'mlp'); 'embed' -> (None, 'embed')."""
    match = _LAYER_PROBE.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name
