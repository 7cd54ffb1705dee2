"""Full next-token distributions of an implementation against the reference, token by token, on real weights.

The row lm-eval scores hang on: for every position of a long real prompt (default 1100 tokens of English
prose, BOS once: past 2x the 512-token sliding window of Gemma 3 270M) both implementations give a
log-probability for each of the 262,144 ids; :func:`compare` reports how far apart they are:

* KL(reference || candidate) per position: mean, median, p99, max and where the max is; the same split
  before the window (positions < 512), past it (>= 512) and past twice it (>= 1024), so a sliding-window
  bug shows as a jump past the window;
* max |Δ log-prob| on the prompt's actual next tokens (what a loglikelihood request sums) and over the
  reference's top-k ids;
* top-1 agreement (and the positions that disagree) and mean top-k overlap ``|topk_ref ∩ topk_cand| / k``.

What a row isolates. The reference runs the Q4_K_M GGUF's weights *dequantized* to fp32, so

* ``hf``, ``vllm`` (and ``llamacpp-f32``, whose all-F32 GGUF holds exactly those values) differ from it
  by their implementation only;
* ``llamacpp`` (the Q4_K_M file itself) has the same weight values, so weight rounding is not what it
  adds: llama.cpp does not dequantize a Q4_K/Q5_0/Q6_K/Q8_0 matrix before a matmul, it quantizes the
  activations too (``vec_dot_type``: Q8_K for the K-quants, Q8_0 for Q5_0/Q8_0, per row of 256 / 32
  values) and takes integer dot products. Its row is "quantization + implementation" and
  ``separated`` estimates the quantization part as ``llamacpp`` minus ``llamacpp-f32`` mean KL.

Both llama.cpp rows keep llama.cpp's default F16 KV cache: part of "implementation".

``python -m harness.lmeval.logit_conformance --impls hf,llamacpp,llamacpp-f32 --out results``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REAL_MODEL = "gemma-3-270m"
DEFAULT_TOKENS = 1100
DEFAULT_IMPLS = ("hf", "vllm", "llamacpp", "llamacpp-f32")
KNOWN_IMPLS = ("reference", "hf", "hf-sdpa", "vllm", "llamacpp", "llamacpp-f32")
CHUNK = 32  # positions per chunk: (32, 262144) fp64 is 64 MiB
JSONL = "logit-conformance.jsonl"

WEIGHTS = {
    "llamacpp": "Q4_K_M GGUF (quantized matmuls)",
    "llamacpp-f32": "F32 GGUF = dequantized Q4_K_M",
    "reference": "dequantized Q4_K_M, fp32",
}
ISOLATES = {
    "llamacpp": "quantization + implementation",
    "llamacpp-f32": "implementation",
    "reference": "nothing (the reference against itself: determinism)",
}
WHY = {
    "llamacpp": "same weight values as the reference (it runs them dequantized); llama.cpp quantizes the "
                "activations (Q8_K for Q4_K/Q6_K, Q8_0 for Q5_0/Q8_0 tensors, the tied LM head included) for "
                "integer dot products, and keeps an F16 KV cache",
    "llamacpp-f32": "float32 weights equal to the reference's; llama.cpp's kernels, its F16 KV cache",
}


# ----------------------------------------------------------------------------- the comparison


def _stats(kl: torch.Tensor, offset: int = 0) -> dict:
    """Summary of a 1-D float64 tensor of per-position KL; ``max_pos`` is a position in the prompt."""
    if kl.numel() == 0:
        return {"n": 0, "mean": None, "median": None, "p99": None, "max": None, "max_pos": None}
    return {"n": int(kl.numel()), "mean": float(kl.mean()), "median": float(torch.quantile(kl, 0.5)),
            "p99": float(torch.quantile(kl, 0.99)), "max": float(kl.max()), "max_pos": offset + int(kl.argmax())}


def compare(reference: torch.Tensor, candidate: torch.Tensor, ids: Sequence[int], top_k: int = 10,
            window: int = 512) -> dict:
    """Per-position comparison of two (T, V) fp32 log-probability tensors over the prompt ``ids`` (T tokens;
    position t predicts ``ids[t + 1]``). KL in float64 on the renormalized rows (rounding below 0 clamped),
    CHUNK positions at a time; the |Δ log-prob| figures are on the log-probs as given.

    Returns ``kl`` (stats over all T positions) and ``kl_before_window`` (t < window), ``kl_past_window``
    (t >= window), ``kl_past_2x_window`` (t >= 2 * window); ``next_token`` (|Δ log-prob| at ``ids[t + 1]``,
    t < T - 1: max, its position, mean); ``topk_max_abs_dlogp`` (over the reference's top-k ids) and its
    position; ``top1_agreement`` and the first disagreeing positions; ``topk_overlap``."""
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}")
    T, V = reference.shape
    if len(ids) != T:
        raise ValueError(f"{len(ids)} prompt ids for {T} positions")
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k={top_k} outside 1..{V}")
    targets = torch.tensor(list(ids[1:]) + [0], dtype=torch.long)  # the last position has no next token
    kl = torch.empty(T, dtype=torch.float64)
    next_d = torch.empty(T, dtype=torch.float64)
    topk_d = torch.empty(T, dtype=torch.float64)
    top1 = torch.empty(T, dtype=torch.bool)
    overlap = torch.empty(T, dtype=torch.float64)
    for a in range(0, T, CHUNK):
        r, c = reference[a:a + CHUNK].double(), candidate[a:a + CHUNK].double()
        # renormalized in float64: an fp32 log-softmax row sums to 1 +- ~1e-7, which alone moves a KL by
        # ~1e-8 either way (a KL of two nearly equal distributions came out at -2e-8 before this)
        rn, cn = r - r.logsumexp(-1, keepdim=True), c - c.logsumexp(-1, keepdim=True)
        p = rn.exp()
        # p log(p/q), with p = 0 contributing 0 (also where both are -inf); >= 0 but for float64 rounding
        kl[a:a + len(r)] = torch.where(p > 0, p * (rn - cn), torch.zeros_like(p)).sum(-1).clamp_min(0)
        del rn, cn
        t = targets[a:a + len(r), None]
        next_d[a:a + len(r)] = (r.gather(1, t) - c.gather(1, t)).abs()[:, 0]
        top_r = reference[a:a + CHUNK].topk(top_k, dim=-1).indices
        top_c = candidate[a:a + CHUNK].topk(top_k, dim=-1).indices
        topk_d[a:a + len(r)] = (r.gather(1, top_r) - c.gather(1, top_r)).abs().amax(-1)
        top1[a:a + len(r)] = reference[a:a + CHUNK].argmax(-1) == candidate[a:a + CHUNK].argmax(-1)
        overlap[a:a + len(r)] = (top_r[:, :, None] == top_c[:, None, :]).any(-1).sum(-1).double() / top_k
        del r, c, p
    next_d = next_d[:T - 1]
    disagree = (~top1).nonzero()[:, 0].tolist()
    return {
        "tokens": T, "vocab": V, "top_k": top_k, "window": window,
        "kl": _stats(kl),
        "kl_before_window": _stats(kl[:window]),
        "kl_past_window": _stats(kl[window:], window),
        "kl_past_2x_window": _stats(kl[2 * window:], 2 * window),
        "next_token": {"n": T - 1,
                       "max_abs_dlogp": float(next_d.max()) if T > 1 else None,
                       "max_pos": int(next_d.argmax()) if T > 1 else None,
                       "mean_abs_dlogp": float(next_d.mean()) if T > 1 else None},
        "topk_max_abs_dlogp": float(topk_d.max()),
        "topk_max_pos": int(topk_d.argmax()),
        "top1_agreement": float(top1.double().mean()),
        "top1_disagreements": len(disagree),
        "top1_disagree_positions": disagree[:20],
        "topk_overlap": float(overlap.mean()),
    }


# ----------------------------------------------------------------------------- running implementations


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def _unsupported(exc: BaseException) -> bool:
    from .llamacpp_scorer import LlamaCppNotInstalled

    return isinstance(exc, (ImportError, LlamaCppNotInstalled)) or "not installed" in str(exc)


def _write(out_dir: Path | None, record: dict) -> None:
    if out_dir is not None:
        with open(out_dir / JSONL, "a") as f:
            f.write(json.dumps(record) + "\n")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for dist in ("transformers", "llama-cpp-python", "vllm", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run(impls: Sequence[str], tokens: int = DEFAULT_TOKENS, out_dir=None, top_k: int = 10) -> list[dict]:
    """Load the 270M once, the reference's distribution once, then each implementation's; a record per
    implementation (appended to ``out_dir/logit-conformance.jsonl`` as soon as it is computed). An
    implementation that fails or is not installed gives ``status`` ``error`` / ``unsupported`` and a
    one-line ``reason``; the others still run. When both llama.cpp rows are there, ``separated`` (on both
    records; in the file, on the later one) splits llamacpp's mean KL into quantization and implementation."""
    from ..realweights import prompt_ids
    from .scorers import build_scorer, load_model

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    started = time.perf_counter()
    model = load_model(REAL_MODEL)
    window = int(model.hf_config.get("sliding_window") or 512)
    ids = prompt_ids(model.meta, tokens)
    load_s = time.perf_counter() - started

    began = time.perf_counter()
    ref_scorer = build_scorer("reference", model)
    reference = ref_scorer.distribution(ids)
    ref_env = dict(ref_scorer.environment)
    ref_scorer.close()
    del ref_scorer
    ref_s = time.perf_counter() - began

    base = {"run": run_id, "model": REAL_MODEL, "tokens": len(ids), "window": window, "top_k": top_k,
            "prompt": "harness/data/real_prompt.txt (real English prose, BOS once, repeated if short)",
            "reference": {"impl": "reference", "dtype": "float32", "weights": model.weights, **ref_env,
                          "seconds": round(ref_s, 1)},
            "versions": _versions(), "load_seconds": round(load_s, 1)}
    records: list[dict] = []
    for impl in impls:
        began = time.perf_counter()
        record = {**base, "impl": impl, "weights": WEIGHTS.get(impl, "dequantized Q4_K_M, fp32 (the reference's)"),
                  "isolates": ISOLATES.get(impl, "implementation"), "dtype": "float32"}
        if impl in WHY:
            record["why"] = WHY[impl]
        try:
            scorer = build_scorer(impl, model)
            try:
                candidate = scorer.distribution(ids)
                record["environment"] = dict(scorer.environment)
                record["scorer"] = scorer.name
            finally:
                scorer.close()
                del scorer
            record["metrics"] = compare(reference, candidate, ids, top_k=top_k, window=window)
            record["status"] = "ok"
            del candidate
        except Exception as exc:  # noqa: BLE001 - one implementation failing must not stop the others
            record["status"] = "unsupported" if _unsupported(exc) else "error"
            record["reason"] = _one_line(exc)
        record["seconds"] = round(time.perf_counter() - began, 1)
        records.append(record)
        _separate(records)
        _write(out, record)
    return records


def _separate(records: list[dict]) -> None:
    ok = {r["impl"]: r for r in records if r.get("status") == "ok"}
    if "llamacpp" not in ok or "llamacpp-f32" not in ok:
        return
    q, f = ok["llamacpp"]["metrics"]["kl"]["mean"], ok["llamacpp-f32"]["metrics"]["kl"]["mean"]
    separated = {"quantization_kl_mean": q - f, "implementation_kl_mean": f, "total_kl_mean": q,
                 "quantization_share": (q - f) / q if q > 0 else None,
                 "how": "llamacpp minus llamacpp-f32 mean KL (KL is not additive: an estimate)"}
    for r in (ok["llamacpp"], ok["llamacpp-f32"]):
        r["separated"] = separated


# ----------------------------------------------------------------------------- report


def _e(x) -> str:
    return "–" if x is None else f"{x:.2e}"


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(records: Sequence[dict]) -> str:
    if not records:
        return "No logit-conformance records.\n"
    first = records[0]
    tokens, window, k = first["tokens"], first["window"], first.get("top_k", 10)
    rows = [f"| impl | weights | mean KL | p99 KL | max KL (pos) | max \\|Δlogp\\| next token | "
            f"max \\|Δlogp\\| top-{k} | top-1 agreement | top-{k} overlap | mean KL past 2x window |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            rows.append(f"| {r['impl']} | {r.get('weights', '')} | {r.get('status')}: {r.get('reason', '')} "
                        "| | | | | | | |")
            continue
        m = r["metrics"]
        rows.append(f"| {r['impl']} | {r['weights']} | {_e(m['kl']['mean'])} | {_e(m['kl']['p99'])} | "
                    f"{_e(m['kl']['max'])} ({m['kl']['max_pos']}) | {_f(m['next_token']['max_abs_dlogp'], 4)} | "
                    f"{_f(m['topk_max_abs_dlogp'], 4)} | {m['top1_agreement']:.2%} "
                    f"({m['top1_disagreements']} of {m['tokens']}) | {m['topk_overlap']:.3f} | "
                    f"{_e(m['kl_past_2x_window']['mean'])} |")
    isolates = "; ".join(f"{r['impl']}: {r.get('isolates', '')}" for r in records)
    text = [
        f"Per-position comparison of full next-token distributions (262,144 ids) with the reference "
        f"(reference_impl, fp32, on the Gemma 3 270M Q4_K_M weights dequantized), on {tokens} tokens of real "
        f"English prose (BOS once); sliding window {window}, so positions >= {2 * window} are past twice the "
        f"window. KL is KL(reference || implementation) in nats per position; Δlogp is on the prompt's actual "
        f"next tokens and on the reference's top-{k} ids. Each row isolates: {isolates}. The reference runs "
        f"the quantized file's own values, so llamacpp's extra is its quantized arithmetic (activations "
        f"quantized to Q8_K/Q8_0 for integer dot products), not weight rounding.",
        "",
        *rows,
    ]
    sep = next((r["separated"] for r in records if r.get("separated")), None)
    if sep:
        share = sep["quantization_share"]
        text += ["", f"Separated (llamacpp minus llamacpp-f32 mean KL): quantized arithmetic "
                     f"{_e(sep['quantization_kl_mean'])}" + (f" ({share:.0%})" if share is not None else "")
                 + f", implementation {_e(sep['implementation_kl_mean'])} of {_e(sep['total_kl_mean'])}."]
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every implementation ran or is not installed, 1 when one failed (or the real weights are
    missing), 2 on bad arguments. No thresholds: this row measures, the tests bound."""
    parser = argparse.ArgumentParser(prog="gemma-harness logprobs", description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated: {', '.join(KNOWN_IMPLS)} or MODULE:OBJECT (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="prompt length (default %(default)s)")
    parser.add_argument("--out", help=f"directory for {JSONL} (appended)")
    parser.add_argument("--md", help="also write the markdown table to this file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in KNOWN_IMPLS and ":" not in i]
    if not impls or bad:
        print(f"logit-conformance: unknown implementation(s) {bad or '(none given)'}; "
              f"known: {', '.join(KNOWN_IMPLS)} or MODULE:OBJECT", file=sys.stderr)
        return 2
    if args.tokens < 2:
        print(f"logit-conformance: --tokens must be at least 2, not {args.tokens}", file=sys.stderr)
        return 2
    try:
        records = run(impls, tokens=args.tokens, out_dir=args.out)
    except ImportError as exc:  # the real weights (or gguf) are not installed
        print(f"logit-conformance: {_one_line(exc)}", file=sys.stderr)
        return 1
    text = markdown(records)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
