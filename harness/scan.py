"""Scan probes in forward order for the first Inf/NaN (Gemma overflows float16 in real checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NonFinite:
    probe: str
    kind: str  # "inf" or "nan"
    count: int
    total: int

    def __str__(self) -> str:
        return f"first non-finite value at {self.probe}: {self.count} of {self.total} values are {self.kind}"


def first_nonfinite(outputs: dict[str, torch.Tensor], order: list[str], valid: torch.Tensor | None = None) -> NonFinite | None:
    """The earliest probe (in `order`) whose values at real tokens are not all finite, or None."""
    for name in order:
        tensor = outputs.get(name)
        if tensor is None:
            continue
        values = tensor[valid] if valid is not None else tensor
        bad = ~torch.isfinite(values)
        if bad.any():
            kind = "nan" if torch.isnan(values).any() else "inf"
            return NonFinite(name, kind, int(bad.sum()), values.numel())
    return None
