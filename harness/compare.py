"""Per-probe metrics and verdicts.

Only real tokens are compared (padding positions are excluded). Metrics, computed in float64:

* ``max_abs``: largest absolute difference;
* ``rel_rms``: RMS of the difference / RMS of the reference tensor;
* ``max_rel``: ``max_abs`` / RMS of the reference tensor (what the gate judges: one bad token is enough);
* ``min_cosine``: the lowest per-token cosine similarity;
* logits also: ``kl_mean`` / ``kl_max`` (KL(reference ‖ candidate) per token, nats) and ``top1`` (agreement).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .probes import locate
from .tolerance import Tolerance


@dataclass
class ProbeResult:
    name: str
    status: str  # pass | fail | unsupported | nonfinite | error
    metrics: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "unsupported")

    @property
    def judged(self) -> bool:
        return self.status != "unsupported"

    @property
    def layer(self) -> int | None:
        return locate(self.name)[0]

    @property
    def sublayer(self) -> str:
        return locate(self.name)[1]

    def headroom(self) -> float:
        """Largest metric / tolerance ratio (1.0 = at the limit)."""
        ratios = []
        if "max_rel" in self.metrics and self.tolerance.get("max_rel"):
            ratios.append(self.metrics["max_rel"] / self.tolerance["max_rel"])
        if "kl_max" in self.metrics and self.tolerance.get("kl_max"):
            ratios.append(self.metrics["kl_max"] / self.tolerance["kl_max"])
        return max(ratios, default=0.0)

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(passed=self.passed, layer=self.layer, sublayer=self.sublayer)
        return out


def _metrics(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, float]:
    r, c = ref.double(), cand.double()
    err = c - r
    rms_ref = r.pow(2).mean().sqrt().clamp_min(1e-30)
    max_abs = err.abs().max()
    cosine = torch.nn.functional.cosine_similarity(r, c, dim=-1, eps=1e-30)
    return {
        "max_abs": float(max_abs),
        "rel_rms": float(err.pow(2).mean().sqrt() / rms_ref),
        "max_rel": float(max_abs / rms_ref),
        "min_cosine": float(cosine.min()),
    }


def _logit_metrics(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, float]:
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(cand.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).double().mean()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(top1)}


def compare_probe(name: str, ref: torch.Tensor, cand: torch.Tensor | None, valid: torch.Tensor, tol: Tolerance,
                  unsupported_reason: str = "") -> ProbeResult:
    limits = tol.for_probe(name)
    if cand is None:
        return ProbeResult(name, "unsupported", tolerance=limits, note=unsupported_reason or "not captured by the candidate")
    if tuple(cand.shape) != tuple(ref.shape):
        return ProbeResult(name, "error", tolerance=limits,
                           note=f"shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
    r, c = ref[valid], cand[valid]  # (tokens, features)
    if not torch.isfinite(r).all():
        return ProbeResult(name, "error", tolerance=limits, note="the reference itself is not finite here")
    if not torch.isfinite(c).all():
        bad = (~torch.isfinite(c)).sum().item()
        kind = "NaN" if torch.isnan(c).any() else "Inf"
        return ProbeResult(name, "nonfinite", tolerance=limits, note=f"{kind} in {bad} of {c.numel()} candidate values")
    metrics = _metrics(r, c)
    if name == "logits":
        metrics |= _logit_metrics(r, c)
    failures = tol.violations(name, metrics)
    return ProbeResult(name, "fail" if failures else "pass", metrics, limits, "; ".join(failures))
