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


def locate(name: str) -> tuple[int | None, str]:
    """'layers.3.mlp' -> (3, 'mlp'); 'embed' -> (None, 'embed')."""
    match = _LAYER_PROBE.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name
