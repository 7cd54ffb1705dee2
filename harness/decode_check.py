"""Greedy generation of an implementation against the reference's cached decode.

An implementation that can only be driven as a server (vLLM) exposes no cache to feed chunks through,
but it can generate. For each row of the batch it continues the prompt greedily for a few steps and
returns the tokens with full-vocabulary log-probabilities per step. The reference then decodes the
same tokens through its own KV cache (prefill of the prompt, then one token at a time), so every step
is judged on the same context, and:

* the candidate's log-probabilities per step must match the reference's within the dtype's ``logits``
  limits (max_rel, rel_rms, kl_max), which judges the candidate's cache and decode path;
* each generated token must be the argmax of the candidate's own log-probabilities (greedy sampling);
* steps where the reference would have picked another token are counted (``greedy_flips``; not ``tokens_flipped``, which counts MoE expert flips) with
  the reference's own gap between the two (``flip_max_gap``): near-ties that pass the limits above.
"""

from __future__ import annotations

import torch

from .compare import ProbeResult, _metrics
from .synthetic import Batch
from .tolerance import Tolerance

NAME = "decode"
DECODE_STEPS = 8  # greedy steps judged for candidates that generate


def reference_logprobs(reference, prompt: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """(steps, V) log-probs of the reference decoding ``tokens`` after ``prompt`` through its cache."""
    steps = len(tokens)
    ids = torch.tensor([prompt + tokens[:-1].tolist()])
    n = ids.shape[1]
    batch = Batch(ids, torch.ones_like(ids), torch.arange(n)[None])
    logits = reference.decode(batch, [len(prompt)] + [1] * (steps - 1))["logits"][0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def judge_greedy(reference, prompts: list[list[int]], generated: list[tuple[torch.Tensor, torch.Tensor]],
                 tol: Tolerance) -> ProbeResult:
    limits = tol.for_probe("logits")
    if not generated or not len(generated[0][0]):
        return ProbeResult(NAME, "unsupported", tolerance=limits, note="no greedy tokens generated")
    refs, cands, flips, gaps, not_greedy = [], [], 0, [0.0], 0
    for prompt, (tokens, cand) in zip(prompts, generated, strict=True):
        ref = reference_logprobs(reference, prompt, tokens)
        refs.append(ref)
        cands.append(cand.float())
        not_greedy += int((cand.argmax(-1) != tokens).sum())
        flipped = ref.argmax(-1) != tokens
        flips += int(flipped.sum())
        gap = ref.max(-1).values - ref.gather(-1, tokens[:, None])[:, 0]  # (steps,) nats the reference prefers
        gaps += gap[flipped].tolist()
    ref, cand = torch.cat(refs), torch.cat(cands)
    steps = len(generated[0][0])
    if not torch.isfinite(cand).all():
        return ProbeResult(NAME, "nonfinite", tolerance=limits, note="non-finite log-probabilities while decoding")
    metrics = _metrics(ref, cand, logits=True) | {"greedy_flips": float(flips), "flip_max_gap": max(gaps),
                                                  "not_greedy": float(not_greedy), "steps": float(ref.shape[0])}
    failures = [f"decode {key} {metrics[key]:.3g} > {limit:.3g}" for key, limit in limits.items()
                if metrics.get(key, 0.0) > limit]
    if not_greedy:
        failures.append(f"{not_greedy} generated tokens are not the argmax of the candidate's own log-probabilities")
    note = f"{len(prompts)} rows x {steps} greedy steps vs the reference's cached decode"
    if flips:
        note += f"; {flips} steps where the reference prefers another token (gap <= {max(gaps):.2g} nats)"
    return ProbeResult(NAME, "fail" if failures else "pass", metrics, limits, "; ".join(failures + [note]))
