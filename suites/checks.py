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


def padding_divergence(adapter, batch: Batch, row: int = 1) -> float:
    """Max abs logit difference between a left-padded row (at its real tokens) and that row run alone,
    relative to the logits' RMS."""
    real = batch.attention_mask[row].bool()
    ids = batch.input_ids[row:row + 1, real]
    alone = Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    padded = adapter.run(batch)["logits"][row, real].float()
    single = adapter.run(alone)["logits"][0].float()
    return float((padded - single).abs().max() / single.pow(2).mean().sqrt().clamp_min(1e-30))
