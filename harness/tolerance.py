"""Tolerance policy per dtype (and, in float32, for Gemma 4, whose deeper twins drift more).

Every probe is judged on one operation alone: a sublayer (attention, MLP, router, experts, per-layer
projection, final norm) is rerun by the reference on the candidate's own input, and a stream probe (a
sublayer's input, a layer's output) is recomputed by the reference from the candidate's own upstream
probes. What two correct implementations differ by there is that operation's rounding, not the drift of
every layer before it, so the limits (``isolated``) are small and the same for every generation. The
logits are judged end to end (the model's output), and so is every probe of a candidate that does not
give the values a probe is computed from (``limits``: drift included).

The gate judges ``max_rel`` (largest absolute error / RMS of the reference tensor: one bad token is
enough to fail) and ``rel_rms`` (RMS of the error / RMS of the reference: a small error on every
token); on logits also ``kl_max`` (largest per-token KL); on MoE routers the expert choice (below).

Calibration (``gemma-harness calibrate``, ``reports/calibration.md``, checked by
``tests/test_tolerance.py``): the spread between correct implementations — the reference vs HF with
SDPA attention, and the reference in the gate dtype vs in float64 — over every tiny twin, seeds 0-2 and
30 configs drawn by the property suites, judged as the gate judges; and every mutant of the mutation
suites. Every limit is at least 3x the worst correct spread, and every bug meant to be caught in a
dtype exceeds its limit at least 3x (torch 2.13.0 CPU, transformers 5.23.0, 2026-11-30). Worst correct
spread, max_rel / rel_rms (logits kl_max):

=========  ==========  ====================  ====================  ===========================
dtype      models      one operation alone   against the stream    logits
=========  ==========  ====================  ====================  ===========================
float32    Gemma 1-3   9.9e-6 / 7.6e-7       1.1e-5 / 9.7e-7       3.8e-6 / 2.8e-7 (2.6e-11)
float32    Gemma 4     3.7e-6 / 4.3e-7       8.6e-5 / 4.4e-6       5.5e-5 / 3.0e-6 (7.8e-10)
bfloat16   Gemma 1-3   0.070 / 0.0079        0.11 / 0.013          0.068 / 0.0080 (3.2e-3)
bfloat16   Gemma 4     0.092 / 0.0074        0.36 / 0.023          0.23 / 0.017 (5.2e-3)
=========  ==========  ====================  ====================  ===========================

Limits: float32, alone 5e-5 / 5e-6 (every generation); against the stream and logits 1e-4 / 1e-5 on
Gemma 1-3, 3e-4 / 3e-5 on Gemma 4, kl_max 1e-6. The smallest float32 bug, exact-erf instead of tanh GELU,
shows rel_rms 1.9e-4 at ``layers.0.mlp`` (or ``.moe``), 39x the limit. bfloat16, the same for every generation: alone 0.3 /
0.025; logits 0.7 / 0.06, kl_max 0.02; against the stream 1.2 / 0.1. The smallest bug meant to be caught
in bf16 (query scale by head_dim on Gemma 3) shows rel_rms 0.092, 3.7x the limit; the Gemma 4 bf16 limits
were 2.0 / 0.15 (kl_max 1.5) before the per-operation judging and the trained-like bf16 weights
(:data:`harness.synthetic.TRAINED`), at which a run with 88 % top-1 agreement passed.

The ``embed`` probe's bf16 limit, 2e-3 / 5e-4, is a recipe check, not a noise bound: the embedding is a
lookup and one multiply by the normalizer rounded to bf16, so there is one right answer (reference vs
SDPA: 0). It catches a normalizer multiplied in fp32 instead of rounded to bf16 first (HF #29402,
#37109): max_rel 0.019, 9.7x the limit. A float64 embedding (0.025 from the bf16 one) is no bf16 recipe.
The image-text ``merge`` (soft tokens scattered into the embedded text, judged on the candidate's own
``embed`` and ``vision.proj``) gets the same bf16 limits for the same reason: it rounds nothing (reference
vs HF: 0). The text tokens, ~13x larger than the soft tokens on the twins, dominate the RMS the errors
are divided by, so the general bf16 limit of 0.3 let two images merged in swapped order (max_rel 0.27)
pass at ``merge`` and fail only at the logits (kl_max 27).
Bugs below bf16 rounding (exact GELU, eps 1e-5, the Gemma 2 attention softcap dropped, the 27B query
scale on Gemma 2) are invisible in bf16 by construction: gate those in float32.

MoE router. It is judged alone: the reference router is run on the candidate's own router input (which
is itself judged like any stream probe). On the same input the expert probabilities may differ by at
most 1e-6 (fp32) / 0.02 (bf16; measured 3.1e-8 / 6.4e-3). A token may choose other experts than the
reference router would only on a near-tie: the reference's k-th and (k+1)-th probabilities within 1e-6
/ 0.02 (correct pairs flip only at margins <= 4.9e-3 in bf16; an off-by-one expert index shows 0.30).
A router whose input the candidate does not give is compared with the reference's own routing under the
same rule. The reference is always rerun routed as the candidate, so every later probe is judged on the
same expert choices.
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


# Each probe is judged on one operation alone (the candidate's own inputs), so what differs between
# correct implementations is that operation's rounding, which hardly depends on the generation: the
# isolated limits are one for all. Only the logits (judged end to end) and the probes of a candidate that
# gives no inputs (judged against the reference's stream) carry accumulated drift, larger on the deeper,
# less tame Gemma 4 twins in float32; in bfloat16 the trained-like weights keep both groups alike.
_BF16 = Tolerance(
    "bfloat16", {"max_rel": 1.2, "rel_rms": 0.1, "kl_max": 2e-2},
    per_kind={"logits": {"max_rel": 0.7, "rel_rms": 0.06},
              "embed": {"max_rel": 2e-3, "rel_rms": 5e-4}},  # a recipe check, not a noise bound: see above
    isolated={"*": {"max_rel": 0.3, "rel_rms": 0.025},
              "merge": {"max_rel": 2e-3, "rel_rms": 5e-4}},  # a scatter, no rounding: see above
    router_margin=0.02, router_probs=2e-2)
_FP32_ISOLATED = {"*": {"max_rel": 5e-5, "rel_rms": 5e-6}}

POLICY: dict[str, Tolerance] = {
    "float32": Tolerance("float32", {"max_rel": 1e-4, "rel_rms": 1e-5, "kl_max": 1e-6}, isolated=_FP32_ISOLATED,
                         router_margin=1e-6, router_probs=1e-6),
    "bfloat16": _BF16,
}
POLICY_GEMMA4: dict[str, Tolerance] = {
    "float32": Tolerance("float32", {"max_rel": 3e-4, "rel_rms": 3e-5, "kl_max": 1e-6}, isolated=_FP32_ISOLATED,
                         router_margin=1e-6, router_probs=1e-6),
    "bfloat16": _BF16,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tolerance_for(dtype: str, family: str | None = None) -> Tolerance:
    """The limits for a dtype; Gemma 4 (``family`` gemma4_text) has its own in float32 (see above)."""
    if dtype not in POLICY:
        raise ValueError(f"dtype {dtype!r} has no tolerance policy; choose one of {sorted(POLICY)}")
    return (POLICY_GEMMA4 if family == "gemma4_text" else POLICY)[dtype]
