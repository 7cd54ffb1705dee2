"""Per-probe metrics and verdicts.

Only real tokens are compared (padding positions are excluded). A probe's values may come from one
forward over a padded batch or from several forwards (each row alone): ``ref``, ``cand`` and ``valid``
are then lists, one entry per forward, and the metrics cover all of their real tokens. Metrics,
accumulated in float64 over chunks of tokens (real-vocabulary logits are 262k wide; nothing is
copied whole):

* ``max_abs``: largest absolute difference;
* ``rel_rms``: RMS of the difference / RMS of the reference tensor;
* ``max_rel``: ``max_abs`` / RMS of the reference tensor (what the gate judges: one bad token is enough);
* ``min_cosine``: the lowest per-token cosine similarity;
* logits also: ``kl_mean`` / ``kl_max`` (KL(reference ‖ candidate) per token, nats) and ``top1`` (agreement).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    # judged on the candidate's own values: a sublayer rerun on its input, a stream probe recomputed from
    # its upstream probes (else against the reference's own stream, accumulated drift included)
    isolated: bool = False

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

Tensors = torch.Tensor | Sequence[torch.Tensor]


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class _LazyRows:
    """Some tokens of one row of a lazily computed tensor (``LazyLogits``): (tokens, vocab), computed a
    slice at a time when sliced."""

    def __init__(self, lazy, row: int, tokens: slice | torch.Tensor, n: int):
        self.lazy, self.row, self.tokens = lazy, row, tokens
        self.shape = (n, lazy.shape[-1])

    def __getitem__(self, part: slice) -> torch.Tensor:
        if isinstance(self.tokens, slice):
            start = self.tokens.start + part.start
            return self.lazy[self.row, slice(start, min(self.tokens.start + part.stop, self.tokens.stop))]
        return self.lazy[self.row, self.tokens[part]]


def real_tokens(t, valid: torch.Tensor) -> Iterator:
    """(B, T, ...) -> one (real tokens, features) tensor per row: a view when the row's real tokens are
    contiguous (left padding), a copy otherwise; rows of a lazily computed tensor stay lazy."""
    for b in range(valid.shape[0]):
        idx = valid[b].nonzero().flatten()
        if not idx.numel():
            continue
        start, end = int(idx[0]), int(idx[-1]) + 1
        tokens = slice(start, end) if end - start == idx.numel() else idx
        if not isinstance(t, torch.Tensor):
            yield _LazyRows(t, b, tokens, idx.numel())
            continue
        part = t[b, tokens]
        yield part.reshape(part.shape[0], -1)


def token_pairs(ref: Tensors, cand: Tensors, valid: Tensors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (tokens, features) slices of the reference and the candidate over every real token."""
    pairs = []
    for r, c, v in zip(_as_list(ref), _as_list(cand), _as_list(valid), strict=True):
        pairs += list(zip(real_tokens(r, v), real_tokens(c, v), strict=True))
    return pairs


def _chunks(pairs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for r, c in pairs:
        for i in range(0, r.shape[0], _CHUNK):
            yield r[i:i + _CHUNK], c[i:i + _CHUNK]


def _first_nonfinite(pairs, side: int) -> tuple[int, int, bool] | None:
    """(non-finite count, total count, any NaN) on one side of the pairs, or None if all finite. A lazily
    computed side is not scanned here (it would be computed twice); its metrics show a non-finite value."""
    bad = total = 0
    nan = False
    for chunk in _chunks([p for p in pairs if isinstance(p[side], torch.Tensor)]):
        t = chunk[side]
        finite = torch.isfinite(t)
        total += t.numel()
        if not finite.all():
            bad += int((~finite).sum())
            nan = nan or bool(torch.isnan(t).any())
    return (bad, total, nan) if bad else None


def _metrics(ref: Tensors | list, cand: Tensors | None = None, logits: bool = False) -> dict[str, float]:
    """Metrics over (tokens, features) pairs (or one ref/cand pair of tensors), in float64 chunks."""
    pairs = list(zip(_as_list(ref), _as_list(cand), strict=True)) if cand is not None else ref
    sq_err = sq_ref = max_abs = 0.0
    min_cos, kl_sum, kl_max, top1, n, tokens = float("inf"), 0.0, float("-inf"), 0, 0, 0
    for r, c in _chunks(pairs):
        r, c = r.double(), c.double()
        err = c - r
        sq_err += float(err.pow(2).sum())
        sq_ref += float(r.pow(2).sum())
        max_abs = max(max_abs, float(err.abs().max()))
        min_cos = min(min_cos, float(torch.nn.functional.cosine_similarity(r, c, dim=-1, eps=1e-30).min()))
        n, tokens = n + r.numel(), tokens + r.shape[0]
        if logits:
            log_p, log_q = torch.log_softmax(r, dim=-1), torch.log_softmax(c, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
            top1 += int((r.argmax(-1) == c.argmax(-1)).sum())
    rms_ref = max((sq_ref / max(n, 1)) ** 0.5, 1e-30)
    out = {"max_abs": max_abs, "rel_rms": (sq_err / max(n, 1)) ** 0.5 / rms_ref, "max_rel": max_abs / rms_ref,
           "min_cosine": min_cos}
    if logits:
        out |= {"kl_mean": kl_sum / max(tokens, 1), "kl_max": kl_max, "top1": top1 / max(tokens, 1)}
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


def _cat_real(t: Tensors, valid: Tensors) -> torch.Tensor:
    """Every real token of (B, T, features) tensors, as one (tokens, features) tensor (small probes only)."""
    return torch.cat([p for x, v in zip(_as_list(t), _as_list(valid), strict=True) for p in real_tokens(x, v)])


def routing_flips(ref: Tensors, cand: Tensors, valid: Tensors, ref_probs: Tensors | None) -> tuple[int, float]:
    """Tokens whose chosen expert set differs between two dispatch tensors, and the largest reference
    k-th/(k+1)-th probability margin among them (inf without probabilities)."""
    flipped, k = _flipped(_cat_real(ref, valid), _cat_real(cand, valid))
    n = int(flipped.sum())
    probs = _cat_real(ref_probs, valid) if ref_probs is not None else None
    return n, (_worst_margin(probs, flipped, k) if n else 0.0)


def compare_router(name: str, ref: Tensors, cand: Tensors, valid: Tensors, tol: Tolerance,
                   ref_probs: Tensors | None = None, cand_probs: Tensors | None = None,
                   isolated: bool = False) -> ProbeResult:
    """Dispatch weights (B, T, E): expert choices compared as sets per token, weights where the sets agree.

    A token whose set differs is a flip. A flip is tolerated only on a near-tie: where the reference's
    own k-th and (k+1)-th expert probabilities are closer than the dtype's ``router_margin``.
    ``isolated``: the reference router was run on the candidate's own router input, so the router is
    judged alone (upstream drift excluded) and its probabilities must agree within ``router_probs``.
    """
    limits = tol.for_probe(name, isolated)
    r, c = _cat_real(ref, valid).float(), _cat_real(cand, valid).float()  # (tokens, experts)
    flipped, k = _flipped(r, c)
    n_flip, tokens = int(flipped.sum()), r.shape[0]
    metrics = _metrics(r[~flipped], c[~flipped]) if (~flipped).any() else {}
    metrics |= {"tokens_flipped": float(n_flip), "tokens": float(tokens)}
    notes, failed = [], tol.violations(name, metrics, isolated) if (~flipped).any() else []
    p_ref = _cat_real(ref_probs, valid) if ref_probs is not None else None
    if isolated and cand_probs is not None and p_ref is not None:
        p_cand = _cat_real(cand_probs, valid)
        metrics["probs_max_abs"] = float((p_cand.double() - p_ref.double()).abs().max())
        limits = {**limits, "probs_max_abs": tol.router_probs}
        if metrics["probs_max_abs"] > tol.router_probs:
            failed.append(f"router probabilities on the same input differ by {metrics['probs_max_abs']:.3g} > {tol.router_probs:.3g}")
    if n_flip:
        worst = _worst_margin(p_ref, flipped, k)
        metrics["flip_max_margin"] = worst
        where = "on the same input " if isolated else ""
        notes.append(f"{n_flip} of {tokens} tokens chose other experts {where}(largest reference margin {worst:.2g})")
        if worst > tol.router_margin:
            failed.append(f"expert choice differs beyond a near-tie (margin {worst:.2g} > {tol.router_margin:.2g})")
        elif not isolated:
            notes.append("all on near-ties: later probes judged against the reference routed as the candidate")
    if isolated:  # flips on the same input are the router's own; the count of record is set by the gate
        metrics["same_input_flips"] = metrics.pop("tokens_flipped")
    return ProbeResult(name, "fail" if failed else "pass", metrics, limits, "; ".join(failed + notes))


def _shapes_differ(ref: Tensors, cand: Tensors) -> str:
    for r, c in zip(_as_list(ref), _as_list(cand), strict=True):
        if tuple(c.shape) != tuple(r.shape):
            return f"shape {tuple(c.shape)} differs from the reference's {tuple(r.shape)}"
    return ""


def compare_probe(name: str, ref: Tensors, cand: Tensors | None, valid: Tensors, tol: Tolerance,
                  unsupported_reason: str = "", ref_probs: Tensors | None = None,
                  cand_probs: Tensors | None = None, isolated: bool = False) -> ProbeResult:
    """One probe judged: ``isolated`` means ``ref`` is the reference's sublayer run on the candidate's
    own input (so the sublayer alone is judged, with the isolated limits)."""
    limits = tol.for_probe(name, isolated)
    if cand is None or (not isinstance(cand, torch.Tensor) and any(c is None for c in cand)):
        return ProbeResult(name, "unsupported", tolerance=limits, note=unsupported_reason or "not captured by the candidate")
    shape = _shapes_differ(ref, cand)
    if shape:
        return ProbeResult(name, "error", tolerance=limits, note=shape)
    pairs = token_pairs(ref, cand, valid)
    bad = _first_nonfinite(pairs, 1)
    if name.endswith(".router") and bad is None:
        return compare_router(name, ref, cand, valid, tol, ref_probs, cand_probs, isolated)
    if _first_nonfinite(pairs, 0) is not None:
        return ProbeResult(name, "error", tolerance=limits, note="the reference itself is not finite here")
    if bad is not None:
        count, total, nan = bad
        return ProbeResult(name, "nonfinite", tolerance=limits,
                           note=f"{'NaN' if nan else 'Inf'} in {count} of {total} candidate values")
    metrics = _metrics(pairs, logits=name == "logits")
    failures = tol.violations(name, metrics, isolated)
    return ProbeResult(name, "fail" if failures else "pass", metrics, limits, "; ".join(failures))
