"""Prefill and per-step decode time of the reference vs HF Transformers (eager and sdpa), in one process.

The setup of the measurement that once reported the reference ~6.8x slower than HF eager in bfloat16
decode: gemma-3-1b cut to 4 layers, random weights, batch 1, a 512-token prompt, then greedy steps
through each implementation's own KV cache, on CPU. Run from the repository root::

    .venv/bin/python benchmarks/reference_vs_hf_decode.py                  # ~1.5 min on 2 cores
    .venv/bin/python benchmarks/reference_vs_hf_decode.py --steps 32 --prefill-reps 3 --passive

* prefill: the prompt through an empty cache; logits of the last position only, as ``generate`` does
  (the reference: ``with_logits=False`` then ``Gemma.head`` on the last position; HF: ``logits_to_keep=1``);
* decode: one token per step, logits (1, 1, vocab), each implementation fed its own greedy token.

Every round runs one prefill (or one decode step) of each implementation in turn, in a rotating order,
so load from other processes falls on all of them alike; the table gives the median and the minimum
per call and the ratios of both to HF eager. Compare ratios, not absolute times, across runs.

Why interleave: with 2 OpenMP threads on a 2-core machine shared with other work, oneDNN's bfloat16
GEMV (``brg_matmul:avx512_core_bf16``, every matmul of a decode step) stalls whenever a worker thread
is descheduled. Measured here with two other busy processes: a bf16 decode step's median 430-510 ms
for the reference and HF alike, against 48-85 ms on a quiet machine or with ``OMP_WAIT_POLICY=PASSIVE``
(fp32, on MKL: 280 vs 115 ms). Two implementations timed in separate processes at different moments
can so differ several-fold in bf16 decode for no reason of their own. ``--passive`` or ``--threads 1``
removes most of that noise.

The reference's prefill row goes through ``Gemma.head(hidden[:, -1:])``: before ``ops.linear`` that
sliced input made the bf16 head copy the whole transposed embedding (reference/HF eager 5.1x here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

IMPLS = ("reference", "hf-eager", "hf-sdpa")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-1b", help="config name (configs.names())")
    p.add_argument("--layers", type=int, default=4, help="cut the model to this many layers (0: all)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    p.add_argument("--prefill-reps", type=int, default=2, help="timed prefills per implementation")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (set before torch loads)")
    return p.parse_args(argv)


def build_all(cfg: dict, state_dict: dict, dtype) -> dict:
    """name -> model: the reference (as the harness builds it) and HF eager / sdpa loaded with the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from reference_impl.spec import ModelSpec
    from reference_impl.weights import build

    models = {"reference": build(ModelSpec.from_hf_config(cfg), state_dict, dtype)}
    for attn in ("eager", "sdpa"):
        config = AutoConfig.for_model(**cfg)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        params = hf.state_dict()
        cast = {k: v.to(params[k].dtype) if k in params else v for k, v in state_dict.items()}
        missing, unexpected = hf.load_state_dict(cast, strict=False)
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [m for m in missing if not (tied and m == "lm_head.weight")]
        if missing or unexpected:
            raise SystemExit(f"HF {attn}: state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if tied:
            hf.tie_weights()
        models[f"hf-{attn}"] = hf.eval()
    torch.manual_seed(0)
    return models


def prefill(name: str, model, ids):
    """(state for decode, next token (B, 1)) after the prompt; logits of the last position only."""
    if name == "reference":
        from reference_impl.cache import KVCache

        cache = KVCache.for_model(model.spec)
        hidden = model(ids, cache=cache, with_logits=False)
        return cache, model.head(hidden[:, -1:]).argmax(-1)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def step(name: str, model, state, token):
    """One decode step: (new state, next token (B, 1))."""
    if name == "reference":
        logits = model(token, cache=state)
        return state, logits[:, -1:].argmax(-1)
    out = model(input_ids=token, past_key_values=state, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def measure(models: dict, ids, args) -> dict:
    """name -> {"prefill": [s, ...], "decode": [s per step, ...]}, every round interleaved."""
    import torch

    times = {name: {"prefill": [], "decode": []} for name in models}
    states: dict = {}
    order = list(models)
    with torch.no_grad():
        for rep in range(args.prefill_reps):
            for name in order[rep % len(order):] + order[:rep % len(order)]:
                start = time.perf_counter()
                states[name] = prefill(name, models[name], ids)
                times[name]["prefill"].append(time.perf_counter() - start)
        for i in range(args.warmup + args.steps):
            for name in order[i % len(order):] + order[:i % len(order)]:
                start = time.perf_counter()
                states[name] = step(name, models[name], *states[name])
                if i >= args.warmup:
                    times[name]["decode"].append(time.perf_counter() - start)
    return times


def report(dtype_name: str, times: dict) -> None:
    base = times["hf-eager"]
    print(f"\n{dtype_name}: ms per call, median (min); ratios to hf-eager, of medians (of mins)")
    print(f"  {'impl':10s} {'prefill':>18s} {'ratio':>13s}   {'decode step':>16s} {'ratio':>13s}")
    for name, t in times.items():
        cells = []
        for kind in ("prefill", "decode"):
            med, low = statistics.median(t[kind]), min(t[kind])
            ratio = f"{med / statistics.median(base[kind]):.2f} ({low / min(base[kind]):.2f})"
            cells.append(f"{med * 1e3:9.1f} ({low * 1e3:6.1f}) {ratio:>13s}")
        print(f"  {name:10s} {cells[0]}   {cells[1]}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when the OpenMP runtime starts, i.e. on torch's import
    import torch

    import configs
    from harness.synthetic import random_state_dict
    from reference_impl.spec import ModelSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = configs.hf_config(args.model)
    if args.layers:
        cfg = configs.cut(cfg, args.layers)
    spec = ModelSpec.from_hf_config(cfg)
    state_dict = random_state_dict(spec)  # fp32; each model casts it to its dtype
    ids = torch.randint(3, spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"{args.model} ({spec.num_layers} layers), batch 1, prompt {args.prompt}, {args.steps} decode steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    for dtype_name in args.dtypes.split(","):
        models = build_all(cfg, state_dict, getattr(torch, dtype_name))
        report(dtype_name, measure(models, ids, args))
        del models
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (above ~1.5 on 2 cores: expect noisy medians)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
