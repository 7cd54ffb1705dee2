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
        ratios = [self.metrics[k] / limit for k, limit in self.tolerance.items() if k in self.metrics and limit]
        return max(ratios, default=0.0)

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(passed=self.passed, layer=self.layer, sublayer=self.sublayer)
        return out


_CHUNK = 64  # tokens per float64 slice: keeps real-vocabulary logits (262k wide) within memory


def _metrics(ref: torch.Tensor, cand: torch.Tensor, logits: bool = False) -> dict[str, float]:
    """Metrics over (tokens, features) tensors, accumulated in float64 over token chunks."""
    sq_err = sq_ref = max_abs = 0.0
    min_cos, kl_sum, kl_max, top1 = float("inf"), 0.0, float("-inf"), 0
    for i in range(0, ref.shape[0], _CHUNK):
        r, c = ref[i:i + _CHUNK].double(), cand[i:i + _CHUNK].double()
        err = c - r
        sq_err += float(err.pow(2).sum())
        sq_ref += float(r.pow(2).sum())
        max_abs = max(max_abs, float(err.abs().max()))
        min_cos = min(min_cos, float(torch.nn.functional.cosine_similarity(r, c, dim=-1, eps=1e-30).min()))
        if logits:
            log_p, log_q = torch.log_softmax(r, dim=-1), torch.log_softmax(c, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
            top1 += int((r.argmax(-1) == c.argmax(-1)).sum())
    n = ref.numel()
    rms_ref = max((sq_ref / n) ** 0.5, 1e-30)
    out = {"max_abs": max_abs, "rel_rms": (sq_err / n) ** 0.5 / rms_ref, "max_rel": max_abs / rms_ref,
           "min_cosine": min_cos}
    if logits:
        tokens = ref.shape[0]
        out |= {"kl_mean": kl_sum / tokens, "kl_max": kl_max, "top1": top1 / tokens}
    return out


def _top_margin(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Probability gap between the k-th and (k+1)-th expert, per token: how close the choice was."""
    top = torch.topk(probs.float(), k=min(k + 1, probs.shape[-1]), dim=-1).values
    return top[..., k - 1] - top[..., k] if top.shape[-1] > k else torch.full(top.shape[:-1], float("inf"))


def _worst_margin(probs: torch.Tensor | None, flipped: torch.Tensor, k: int) -> float:
    return float(_top_margin(probs, k)[flipped].max()) if probs is not None else float("inf")


def _flipped(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tokens whose chosen expert set differs between two (tokens, experts) dispatch tensors, k)."""
    return ((r != 0) != (c != 0)).any(-1), int((r != 0).sum(-1).max())


def routing_flips(ref: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, ref_probs: torch.Tensor | None) -> tuple[int, float]:
    """Tokens whose chosen expert set differs between two dispatch tensors, and the largest reference
    k-th/(k+1)-th probability margin among them (inf without probabilities)."""
    flipped, k = _flipped(ref[valid], cand[valid])
    n = int(flipped.sum())
    return n, (_worst_margin(ref_probs[valid], flipped, k) if n else 0.0)


def compare_router(name: str, ref: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, tol: Tolerance,
                   ref_probs: torch.Tensor | None = None, cand_probs: torch.Tensor | None = None,
                   isolated: bool = False) -> ProbeResult:
    """Dispatch weights (B, T, E): expert choices compared as sets per token, weights where the sets agree.

    A token whose set differs is a flip. A flip is tolerated only on a near-tie: where the reference's
    own k-th and (k+1)-th expert probabilities are closer than the dtype's ``router_margin``.
    ``isolated``: the reference router was run on the candidate's own router input, so the router is
    judged alone (upstream drift excluded) and its probabilities must agree within ``router_probs``.
    """
    limits = tol.for_probe(name)
    r, c = ref[valid].float(), cand[valid].float()  # (tokens, experts)
    flipped, k = _flipped(r, c)
    n_flip, tokens = int(flipped.sum()), r.shape[0]
    metrics = _metrics(r[~flipped], c[~flipped]) if (~flipped).any() else {}
    metrics |= {"tokens_flipped": float(n_flip), "tokens": float(tokens)}
    notes, failed = [], tol.violations(name, metrics) if (~flipped).any() else []
    if isolated and cand_probs is not None and ref_probs is not None:
        p_ref, p_cand = ref_probs[valid].double(), cand_probs[valid].double()
        metrics["probs_max_abs"] = float((p_cand - p_ref).abs().max())
        limits = {**limits, "probs_max_abs": tol.router_probs}
        if metrics["probs_max_abs"] > tol.router_probs:
            failed.append(f"router probabilities on the same input differ by {metrics['probs_max_abs']:.3g} > {tol.router_probs:.3g}")
    if isolated:
        notes.append("router judged on the candidate's own input")
    if n_flip:
        worst = _worst_margin(ref_probs[valid] if ref_probs is not None else None, flipped, k)
        metrics["flip_max_margin"] = worst
        where = "on the same input" if isolated else ""
        notes.append(f"{n_flip} of {tokens} tokens chose other experts {where}(largest reference margin {worst:.2g})")
        if worst > tol.router_margin:
            failed.append(f"expert choice differs beyond a near-tie (margin {worst:.2g} > {tol.router_margin:.2g})")
        elif not isolated:
            notes.append("all on near-ties: later probes judged against the reference routed as the candidate")
    if isolated:  # flips on the same input are the router's own; the count of record is set by the gate
        metrics["same_input_flips"] = metrics.pop("tokens_flipped")
    return ProbeResult(name, "fail" if failed else "pass", metrics, limits, "; ".join(failed + notes))


def compare_probe(name: str, ref: torch.Tensor, cand: torch.Tensor | None, valid: torch.Tensor, tol: Tolerance,
                  unsupported_reason: str = "", ref_probs: torch.Tensor | None = None,
                  cand_probs: torch.Tensor | None = None, isolated: bool = False) -> ProbeResult:
    limits = tol.for_probe(name)
    if cand is None:
        return ProbeResult(name, "unsupported", tolerance=limits, note=unsupported_reason or "not captured by the candidate")
    if tuple(cand.shape) != tuple(ref.shape):
        return ProbeResult(name, "error", tolerance=limits,
                           note=f"shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
    if name.endswith(".router") and torch.isfinite(cand).all():
        return compare_router(name, ref, cand, valid, tol, ref_probs, cand_probs, isolated)
    r, c = ref[valid], cand[valid]  # (tokens, features)
    if not torch.isfinite(r).all():
        return ProbeResult(name, "error", tolerance=limits, note="the reference itself is not finite here")
    if not torch.isfinite(c).all():
        bad = (~torch.isfinite(c)).sum().item()
        kind = "NaN" if torch.isnan(c).any() else "Inf"
        return ProbeResult(name, "nonfinite", tolerance=limits, note=f"{kind} in {bad} of {c.numel()} candidate values")
    metrics = _metrics(r, c, logits=name == "logits")
    failures = tol.violations(name, metrics)
    return ProbeResult(name, "fail" if failures else "pass", metrics, limits, "; ".join(failures))
