"""Tolerance policy per dtype.

The gate judges each probe on ``max_rel`` (largest absolute error / RMS of the reference tensor:
one bad token is enough to fail) and ``rel_rms`` (RMS of the error / RMS of the reference: a
small error spread over every token); on logits also on ``kl_max`` (largest per-token KL).

The limits are set from ``gemma-harness calibrate``, which measures the spread between *correct*
implementations that differ only in legitimate op order, over the 10 tiny models, seed 0
(torch 2.13.0 CPU, transformers 5.23.0, measured 2026-11-25):

=========  ================  ==========  =========  =========  ==========  =========  ===============
dtype      pair              embed       attn       mlp        out         final_norm logits (kl_max)
=========  ================  ==========  =========  =========  ==========  =========  ===============
float32    eager vs sdpa     0           6.6e-6     2.2e-6     1.1e-6      1.3e-6     2.3e-6 (7e-17)
float32    fp32 vs float64   2.8e-7      7.6e-6     3.1e-6     1.4e-6      1.5e-6     3.4e-6 (1.2e-12)
bfloat16   eager vs sdpa     0           0.11       0.051      0.047       0.048      0.038 (2.6e-11)
bfloat16   bf16 vs float64   0.024       0.26       0.063      0.080       0.083      0.060 (1.9e-3)
=========  ================  ==========  =========  =========  ==========  =========  ===============

float32: limit 1e-4, 13x the worst correct spread (7.6e-6). The smallest classic bug, exact-erf
instead of tanh GELU, shows 7.7e-4 to 8.3e-4 at ``layers.0.mlp`` on every tiny model: 8x above
the limit, so it is caught and localised.

MoE router. It is judged alone: the reference router is run on the candidate's own router input
(captured by a hook), so upstream drift cannot flip experts there; the input itself must match the
reference's post-attention residual (judged like an ``out`` probe), which catches a router fed the
wrong tensor. On the same input the expert probabilities may differ by at most 1e-6 (fp32) / 5e-3
(bf16): measured 2.4e-8 / 3.1e-4 (reference in the dtype vs in float64, 26B-A4B twin). A token may
choose other experts only on a near-tie, the reference's k-th and (k+1)-th probabilities within
1e-6 / 0.02: bf16 vs float64 routing on the same inputs flips 0-3 tokens per layer, all such ties,
and HF's eager experts vs its default grouped_mm (different upstream rounding) flips 1-3 tokens
per layer with margins <= 0.0019.

``rel_rms`` spread (same runs): float32 at most 9.7e-7 (attn) → limit 1e-5; bfloat16 at most
0.032 on attn and 0.013 elsewhere (bf16 vs float64; eager vs sdpa: 0.015 / 0.0099).

bfloat16: attention outputs carry the largest rounding spread (a few tokens with near-cancelling
values, worst in the deepest layers), so ``attn`` probes get max_rel 0.5 (1.9x the worst, 0.26)
and rel_rms 0.064 (2x 0.032); every other probe max_rel 0.2 (2.4x the worst, 0.083) and rel_rms
0.03 (2.3x 0.013); logits kl_max 0.01 (5x the worst, 1.9e-3). The rel_rms limit is what localises
a moderate bug in bf16: query scale by head_dim on gemma-3-27b-tiny has max_rel 0.34 (< 0.5) but
rel_rms 0.080 at layers.0.attn. The ``embed`` probe is a lookup and one multiply, with no op-order freedom (eager vs sdpa: 0), so
in bf16 it gets max_rel 2e-3 / rel_rms 5e-4: a normalizer multiplied in fp32 instead of rounded to
bf16 first (HF #29402, #37109) shows max_rel 0.019 there. Other bugs below bf16 rounding are
invisible in bf16 by construction —
exact GELU, eps 1e-5, the Gemma 2 attention softcap dropped or the 27B query scale on Gemma 2
(rel_rms 0.016 at layer 0, inside the 0.013–0.017 correct spread there), the embed normalizer not
rounded to bf16 first: gate those in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .probes import locate


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    limits: dict[str, float]  # metric -> limit, for every probe (kl_max: logits only)
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # sublayer kind -> overrides
    # MoE: a token may pick other experts than the reference only if the reference's k-th and (k+1)-th
    # expert probabilities are closer than this (a near-tie that rounding can flip).
    router_margin: float = 0.0
    # MoE router judged alone (the reference router run on the candidate's router input): largest
    # allowed difference of any expert probability.
    router_probs: float = 0.0

    def for_probe(self, name: str) -> dict[str, float]:
        limits = {**self.limits, **self.per_kind.get(locate(name)[1], {})}
        if name != "logits":
            limits.pop("kl_max", None)
        return limits

    def violations(self, name: str, metrics: dict[str, float]) -> list[str]:
        return [f"{key} {metrics[key]:.3g} > {limit:.3g}"
                for key, limit in self.for_probe(name).items() if key in metrics and metrics[key] > limit]



# Gemma 4 twins amplify rounding more (10-12 layers, attention scale 1.0 on q/k-normed heads, the
# whole stream scaled by layer_scalar each layer, PLE and KV-shared layers). `gemma-harness calibrate`
# on the four Gemma 4 twins (seed 0, same run conditions as above), judged as the gate judges:
#   float32 : worst max_rel 4.2e-5 (mlp/out, e4b), rel_rms 2.8e-6, logits kl_max 4.5e-10
#   bfloat16: worst max_rel 0.73 (ple, e2b; mlp 0.63, out 0.69, logits 0.56, attn 0.41, moe 0.36),
#             rel_rms 0.059, logits kl_max 0.20; embed as before (0 vs sdpa, 0.021 vs float64).
# So float32 gets 3e-4 / 3e-5 (7x / 10x the worst; exact GELU still shows ~8e-4 at layers.0.mlp)
# and bfloat16 1.5 / 0.12 / kl 0.5 (about 2x the worst): in bf16 the Gemma 4 twins only expose
# gross bugs — gate the rest in float32.
POLICY_GEMMA4: dict[str, Tolerance] = {
    "float32": Tolerance("float32", {"max_rel": 3e-4, "rel_rms": 3e-5, "kl_max": 1e-6}, router_margin=1e-6,
                         router_probs=1e-6),
    "bfloat16": Tolerance("bfloat16", {"max_rel": 1.5, "rel_rms": 0.12, "kl_max": 0.5},
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
