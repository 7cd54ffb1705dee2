"""The comparisons behind the properties, as plain functions (usable outside hypothesis)."""

from __future__ import annotations

import torch

from harness import probes as probe_names
from harness.compare import ProbeResult, compare_probe
from harness.synthetic import Batch
from harness.tolerance import tolerance_for


def decode_divergence(adapter, spec, batch: Batch, chunks: list[int], dtype: str = "float32") -> ProbeResult | None:
    """The first probe (forward order) at which decoding through the adapter's own cache, `chunks`
    tokens at a time, departs from its full forward without cache; None if none does."""
    tol = tolerance_for(dtype, spec.family)
    full, decoded = adapter.run(batch), adapter.decode(batch, chunks)
    for probe in probe_names.for_spec(spec):
        res = compare_probe(probe, full[probe], decoded.get(probe), batch.valid, tol, ref_probs=full.get(probe + "_probs"))
        if not res.passed:
            return res
    return None


def padding_divergence(adapter, spec, batch: Batch, row: int = 1, dtype: str = "float32") -> ProbeResult | None:
    """The first probe at which a left-padded row (at its real tokens) departs from the same row run
    alone; None if none does."""
    tol = tolerance_for(dtype, spec.family)
    real = batch.attention_mask[row].bool()
    ids = batch.input_ids[row:row + 1, real]
    alone = adapter.run(Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None]))
    padded = adapter.run(batch)
    everywhere = torch.ones_like(ids, dtype=torch.bool)
    for probe in probe_names.for_spec(spec):
        if probe not in padded or probe not in alone:
            continue
        res = compare_probe(probe, alone[probe], padded[probe][row:row + 1, real], everywhere, tol,
                            ref_probs=alone.get(probe + "_probs"))
        if not res.passed:
            return res
    return None
