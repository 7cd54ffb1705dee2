"""Measure the spread between correct implementations, the basis of the tolerance policy.

Pairs, on every tiny model, in each gate dtype:

* ``eager-vs-sdpa``: the reference (bit-identical to HF eager) vs HF with torch SDPA attention
  (Gemma 2 has no SDPA path in HF, so it is skipped there) — a legitimate kernel difference a port
  may have;
* ``dtype-vs-float64``: the reference in the gate dtype vs the reference in float64 — the rounding
  a port in that dtype cannot avoid.

Each pair is judged as the gate judges a candidate (so a MoE expert choice flipped on a near-tie
reroutes the reference as the candidate before the later probes are measured).

``gemma-harness calibrate`` prints, per pair and probe kind, the largest ``max_rel``, ``rel_rms``
and logits ``kl_max`` seen; :mod:`harness.tolerance` sets its limits from these figures.
"""

from __future__ import annotations

import torch

import configs
from reference_impl.spec import ModelSpec

from .adapters.hf import _HFAuto
from .adapters.reference import ReferenceAdapter
from .gate import compare_implementations
from .probes import locate
from .synthetic import make_batch, random_state_dict
from .tolerance import Tolerance, tolerance_for


class _HFSdpa(_HFAuto):
    def build(self, config, dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


class _Reference64(ReferenceAdapter):
    name = "reference-float64"

    def load(self, hf_config, state_dict, dtype):
        super().load(hf_config, state_dict, torch.float64)


def _unbounded(dtype: str) -> Tolerance:
    """No limits, but the policy's near-tie rule for MoE routing, so flips are judged as the gate does."""
    inf = float("inf")
    return Tolerance("calibration", {"max_rel": inf, "rel_rms": inf, "kl_max": inf},
                     router_margin=tolerance_for(dtype).router_margin, router_probs=inf)


def _candidates(family: str):
    yield "dtype-vs-float64", _Reference64()
    if family != "gemma2":  # HF Gemma 2 has no SDPA path
        yield "eager-vs-sdpa", _HFSdpa(name="hf-sdpa")


def measure(models: list[str] | None = None, dtypes=("float32", "bfloat16"), seed: int = 0) -> list[dict]:
    """Per probe metrics of each correct-implementation pair, judged the way the gate judges (a MoE
    near-tie flip reroutes the reference as the candidate)."""
    rows = []
    for model in models or configs.names(tiny=True):
        hf_config = configs.hf_config(model)
        spec = ModelSpec.from_hf_config(hf_config)
        state, batch = random_state_dict(spec, seed), make_batch(spec, seed)
        for dtype in dtypes:
            for pair, candidate in _candidates(spec.family):
                result = compare_implementations(model, hf_config, state, batch, candidate=candidate, dtype=dtype,
                                                 tol=_unbounded(dtype))
                if result.error:
                    raise RuntimeError(f"calibration pair {pair} on {model} [{dtype}]: {result.error}")
                for res in result.probes:
                    rows.append({"model": model, "dtype": dtype, "pair": pair, "probe": res.name,
                                 "kind": locate(res.name)[1], "status": res.status, **res.metrics})
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(dtype, pair, probe kind) -> worst max_rel and rel_rms (and logits kl_max), with where."""
    out: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        if "max_rel" not in row:
            continue
        agg = out.setdefault((row["dtype"], row["pair"], row["kind"]), {"max_rel": 0.0, "rel_rms": 0.0, "kl_max": 0.0, "at": ""})
        if row["max_rel"] >= agg["max_rel"]:
            agg["max_rel"], agg["at"] = row["max_rel"], f"{row['model']}:{row['probe']}"
        agg["rel_rms"] = max(agg["rel_rms"], row["rel_rms"])
        agg["kl_max"] = max(agg["kl_max"], row.get("kl_max", 0.0))
    return out
