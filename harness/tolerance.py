"""Tolerance policy per dtype (and for Gemma 4, whose twins need their own).

The gate judges each probe on ``max_rel`` (largest absolute error / RMS of the reference tensor:
one bad token is enough to fail) and ``rel_rms`` (RMS of the error / RMS of the reference: a
small error spread over every token); on logits also on ``kl_max`` (largest per-token KL).

The limits are set from ``gemma-harness calibrate``: the spread between *correct* implementations
that differ only in legitimate op order — the reference (bit-identical to HF eager) vs HF with SDPA
attention, and the reference in the gate dtype vs in float64 — over every tiny model, seed 0, judged
as the gate judges (torch 2.13.0 CPU, transformers 5.23.0, measured 2026-11-25). Worst over both
pairs and all models, max_rel / rel_rms (logits kl_max):

==========  ==================  ====================  ====================  =====================
dtype       models              attn                  other probes          logits kl_max
==========  ==================  ====================  ====================  =====================
float32     Gemma 1-3 twins     1.0e-5 / 8.9e-7       3.5e-6 / 5.0e-7       9.8e-13
float32     Gemma 4 twins       1.1e-5 / 1.2e-6       7.1e-5 / 2.9e-6       7.8e-10
bfloat16    Gemma 1-3 twins     0.30 / 0.032          0.078 / 0.014         1.5e-3
bfloat16    Gemma 4 twins       0.30 / 0.041          0.91 / 0.062          0.61
==========  ==================  ====================  ====================  =====================

Gemma 1-3. float32: max_rel 1e-4 and rel_rms 1e-5 (10x and 11x the worst). The smallest classic
bug, exact-erf instead of tanh GELU, shows 7.7e-4 to 8.7e-4 at ``layers.0.mlp`` on every tiny model:
8x above the limit, so it is caught and localised. bfloat16: attention outputs carry the largest
rounding spread (a few tokens with near-cancelling values, worst in the deepest layers), so ``attn``
probes get 0.5 / 0.064 (1.7x / 2x the worst) and every other probe 0.2 / 0.03 (2.6x / 2.2x); logits
kl_max 0.01 (6.5x). The rel_rms limit is what localises a moderate bug in bf16: query scale by
head_dim on gemma-3-27b-tiny has max_rel 0.34 (< 0.5) but rel_rms 0.080 at layers.0.attn.

The ``embed`` probe is a lookup and one multiply, with no op-order freedom (reference vs sdpa: 0),
so in bf16 it gets 2e-3 / 5e-4: a normalizer multiplied in fp32 instead of rounded to bf16 first
(HF #29402, #37109) shows max_rel 0.019 there (bf16 vs float64 is 0.024 only because float64 is
not a bf16 recipe). Other bugs below bf16 rounding are invisible in bf16 by construction — exact
GELU, eps 1e-5, the Gemma 2 attention softcap dropped or the 27B query scale on Gemma 2 (rel_rms
0.016 at layer 0, inside the correct spread there): gate those in float32.

Gemma 4 twins amplify rounding more (10-12 layers, attention scale 1.0 on q/k-normed heads, the
whole stream scaled by layer_scalar each layer, PLE and KV-shared layers): float32 3e-4 / 3e-5
(4.2x / 10x; exact GELU in the experts still shows 1e-3 at layers.0.moe), bfloat16 2.0 / 0.15,
kl_max 1.5 (2.2x / 2.4x / 2.5x). In bf16 the Gemma 4 twins expose only gross bugs; gate the rest
in float32.

MoE router. It is judged alone: the reference router is run on the candidate's own router input
(captured by a hook), so upstream drift cannot flip experts there; the input itself must match the
reference's post-attention residual (judged like an ``out`` probe), which catches a router fed the
wrong tensor. On the same input the expert probabilities may differ by at most 1e-6 (fp32) / 5e-3
(bf16): measured 2.4e-8 / 3.1e-4 (reference in the dtype vs in float64, 26B-A4B twin). A token may
choose other experts than the reference router would at that layer only on a near-tie, the
reference's k-th and (k+1)-th probabilities within 1e-6 / 0.02: bf16 vs float64 routing flips 0-3
tokens per layer, all such ties, and HF's eager experts vs its default grouped_mm flips 0-5 tokens
per layer with margins <= 0.0032. The reference is always rerun routed as the candidate, so every
later probe is judged on the same expert choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .probes import locate


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    limits: dict[str, float]  # metric -> limit, for every probe (kl_max: logits only)
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # probe kind -> overrides
    # a sublayer judged alone (the reference sublayer rerun on the candidate's own input): kind ("*" for
    # every kind) -> overrides of the limits above
    isolated: dict[str, dict[str, float]] = field(default_factory=dict)
    # MoE: a token may pick other experts than the reference only if the reference's k-th and (k+1)-th
    # expert probabilities are closer than this (a near-tie that rounding can flip).
    router_margin: float = 0.0
    # MoE router judged alone (the reference router run on the candidate's router input): largest
    # allowed difference of any expert probability.
    router_probs: float = 0.0

    def for_probe(self, name: str, isolated: bool = False) -> dict[str, float]:
        kind = locate(name)[1]
        limits = {**self.limits, **self.per_kind.get(kind, {})}
        if isolated:
            limits |= {**self.isolated.get("*", {}), **self.isolated.get(kind, {})}
        if name != "logits":
            limits.pop("kl_max", None)
        return limits

    def violations(self, name: str, metrics: dict[str, float], isolated: bool = False) -> list[str]:
        return [f"{key} {metrics[key]:.3g} > {limit:.3g}"
                for key, limit in self.for_probe(name, isolated).items() if key in metrics and metrics[key] > limit]


POLICY_GEMMA4: dict[str, Tolerance] = {
    "float32": Tolerance("float32", {"max_rel": 3e-4, "rel_rms": 3e-5, "kl_max": 1e-6}, router_margin=1e-6,
                         router_probs=1e-6),
    "bfloat16": Tolerance("bfloat16", {"max_rel": 2.0, "rel_rms": 0.15, "kl_max": 1.5},
                          per_kind={"embed": {"max_rel": 2e-3, "rel_rms": 5e-4}}, router_margin=0.02,
                          router_probs=5e-3),
}

POLICY: dict[str, Tolerance] = {
    "float32": Tolerance("float32", {"max_rel": 1e-4, "rel_rms": 1e-5, "kl_max": 1e-6}, router_margin=1e-6),
    "bfloat16": Tolerance("bfloat16", {"max_rel": 0.2, "rel_rms": 0.03, "kl_max": 1e-2},
                          per_kind={"attn": {"max_rel": 0.5, "rel_rms": 0.064},
                                    "embed": {"max_rel": 2e-3, "rel_rms": 5e-4}},
                          router_margin=0.02),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tolerance_for(dtype: str, family: str | None = None) -> Tolerance:
    """The limits for a dtype; Gemma 4 (``family`` gemma4_text) has its own, measured on its twins."""
    if dtype not in POLICY:
        raise ValueError(f"dtype {dtype!r} has no tolerance policy; choose one of {sorted(POLICY)}")
    return (POLICY_GEMMA4 if family == "gemma4_text" else POLICY)[dtype]
