"""Measure the spread between correct implementations, the basis of the tolerance policy.

Pairs, on every tiny model, in each gate dtype:

* ``eager-vs-sdpa``: HF with eager attention vs HF with torch SDPA (Gemma 2 has no SDPA path in
  HF, so it is skipped there) — a legitimate kernel difference a port may have;
* ``dtype-vs-float64``: the reference in the gate dtype vs the reference in float64 — the rounding
  a port in that dtype cannot avoid.

``gemma-harness calibrate`` prints, per pair and probe kind, the largest ``max_rel``, ``rel_rms``
and logits ``kl_max`` seen; :mod:`harness.tolerance` sets its limits from these figures.
"""

from __future__ import annotations

import torch

import configs
from reference_impl.spec import ModelSpec

from .adapters.hf import _HFAuto
from .adapters.reference import ReferenceAdapter
from .compare import compare_probe
from .probes import canonical, locate
from .synthetic import make_batch, random_state_dict
from .tolerance import DTYPES, Tolerance

_UNBOUNDED = Tolerance("calibration", {"max_rel": float("inf"), "rel_rms": float("inf"), "kl_max": float("inf")})


class _HFSdpa(_HFAuto):
    def build(self, config, dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


class _Reference64(ReferenceAdapter):
    def load(self, hf_config, state_dict, dtype):
        super().load(hf_config, state_dict, torch.float64)


def _pairs(family: str, dtype: str):
    yield "dtype-vs-float64", ReferenceAdapter(), _Reference64()
    if family != "gemma2":
        yield "eager-vs-sdpa", _HFAuto(name="hf-eager"), _HFSdpa(name="hf-sdpa")


def measure(models: list[str] | None = None, dtypes=("float32", "bfloat16"), seed: int = 0) -> list[dict]:
    rows = []
    for model in models or configs.names(tiny=True):
        hf_config = configs.hf_config(model)
        spec = ModelSpec.from_hf_config(hf_config)
        state, batch = random_state_dict(spec, seed), make_batch(spec, seed)
        for dtype in dtypes:
            for pair, a, b in _pairs(spec.family, dtype):
                a.load(hf_config, state, DTYPES[dtype])
                b.load(hf_config, state, DTYPES[dtype])
                out_a, out_b = a.run(batch), b.run(batch)
                for name in canonical(spec.num_layers):
                    res = compare_probe(name, out_a[name].double(), out_b[name].double(), batch.valid, _UNBOUNDED)
                    rows.append({"model": model, "dtype": dtype, "pair": pair, "probe": name,
                                 "kind": locate(name)[1], **res.metrics})
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(dtype, pair, probe kind) -> worst max_rel and rel_rms (and logits kl_max), with where."""
    out: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        agg = out.setdefault((row["dtype"], row["pair"], row["kind"]), {"max_rel": 0.0, "rel_rms": 0.0, "kl_max": 0.0, "at": ""})
        if row["max_rel"] >= agg["max_rel"]:
            agg["max_rel"], agg["at"] = row["max_rel"], f"{row['model']}:{row['probe']}"
        agg["rel_rms"] = max(agg["rel_rms"], row["rel_rms"])
        agg["kl_max"] = max(agg["kl_max"], row.get("kl_max", 0.0))
    return out
