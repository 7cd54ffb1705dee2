"""MoE routing cost on the Gemma 4 26B-A4B shape: one MoE layer (or a few) with random weights, its parts
timed separately for 1-4096 flattened tokens, and the experts part under several dispatch strategies.

    python -m harness.bench.moe_cost --out DIR [--tokens 1,8,64,512,4096] [--dtype bfloat16,float32]
        [--layers 1] [--threads 1] [--resume] [--report-only] [-q]

The layer (hidden 2816, 128 experts, top-8, expert width 704, dense MLP 2112) is built from
``configs/gemma-4-26b-a4b.json`` twice, sharing one set of weights: the reference's modules
(:mod:`reference_impl.model`) and HF's (``Gemma4TextRouter``/``Gemma4TextMLP``/``Gemma4TextExperts``/
``Gemma4RMSNorm``). The parts of one layer, each timed on its own:

* ``router``: the router (norm, projection, fp32 softmax, top-k, renormalise, per-expert scale);
* ``experts``: the routed experts on the experts' normed input, under the row's strategy;
* ``dense_mlp``: the parallel dense MLP branch (its pre-norm and the GeGLU MLP);
* ``combine``: the experts' pre-norm and ``MoE.mix`` (the two post-norms and the sum).

Reference-family strategies (and vLLM's) take the reference's router / dense MLP / combine; HF-family
strategies HF's. Those three parts do not depend on the strategy: they are timed once per group (token
count, dtype, routing kind) and family, and the same timings go into every row of the family.

Timing (:class:`TimingPolicy`): every entry of a group (each strategy's experts, each family's router,
dense MLP and combine) is warmed up, then timed in rounds, one call of each unfinished entry per round,
until it has ``min_reps`` calls and a coefficient of variation <= ``target_cv`` (or ``max_time_s`` of
timed calls, or ``max_reps``). Interleaving, not back-to-back timing: on a machine shared with other work
the load changes during a run, and rounds let every strategy of a group see the same changes. The
report's tables use the median of the calls (the records carry mean, median, std, p90, p99, n, cv).

Dispatch strategies of the experts part (:data:`STRATEGIES`), all given the same routing:

* ``per_expert_loop``: the reference's ``Experts.forward`` (sort the (token, k) pairs by expert, one
  ``mm`` pair per used expert, weighted sum in fp32);
* ``grouped_mm``: the pairs sorted by expert, ``torch.nn.functional.grouped_mm`` (or
  ``torch._grouped_mm``) over the expert weights with per-expert offsets; where torch has neither, a
  padded ``bmm`` over the used experts' gathered weights (the record's ``kernel`` says which ran);
* ``dense_all``: every token through every expert, masked by the dispatch weights (E/k times the routed
  work; skipped where one call is predicted to exceed ``--max-call-s`` at the measured matmul peak);
* ``hf_<impl>``: HF's ``Gemma4TextExperts`` under each ``experts_implementation`` transformers offers
  ("eager" plus the keys of ``ALL_EXPERTS_FUNCTIONS``); ``batched_mm`` copies every pair's weights
  (skipped beyond ``--max-gather-gib``), ``deepgemm``/``sonicmoe`` need CUDA and the ``kernels`` package;
* ``vllm_fused``: vLLM's Triton ``fused_experts`` (CUDA only, in an interpreter with vLLM: on a GPU
  machine run this module with ``.tox/vllm/bin/python`` or a CUDA vLLM env); elsewhere ``unsupported``.

Each experts output is checked against a float64 computation of the same routing on up to
:data:`CHECKED_TOKENS` tokens (MoE tokens are independent: a token's output depends only on its own
input and routing): max |error| <= :data:`TOLERANCE` [dtype] x max |expected|, else the row is an error.

Routings: ``uniform`` is the router's own choice (random weights route near-uniformly), ``zipf`` forces
each token's k experts drawn without replacement with P(expert) ~ 1/rank^:data:`ZIPF_EXPONENT` (ranks a
seeded permutation of the experts), the router's probabilities at those experts as weights.

One record per (strategy, token count, dtype, routing kind), appended (when its group finishes) to
``OUT/records.jsonl`` with :func:`harness.bench.records.append_record`::

    schema      "gemma-harness/moe-record/1";  kind "moe"
    cell_id     "m-" + 12 hex digits of sha256 of the canonical JSON of ``cell`` (--resume skips these)
    cell        {"strategy", "family", "model", "layers", "tokens", "dtype", "routing", "device",
                 "threads", "seed", "num_experts", "top_k", "hidden", "expert_intermediate",
                 "dense_intermediate"}
    label       one line naming the row
    status      "ok" | "error" | "unsupported" (skips too); reason: one line for the latter two
    timings     {part: {"mean", "median", "std", "p90", "p99", "n", "cv", "stable", "samples"}} in ms for
                router, experts, dense_mlp, combine; total: sums of the parts' means / medians, std in
                quadrature; shared_parts: the parts timed once per group and family (shared by its rows)
    check       {"max_abs_err", "max_abs_expected", "bound", "tolerance", "checked_tokens", "ok",
                 "max_abs_diff_vs_loop"}
    routing     per layer: {"layer", "histogram" (tokens per expert, E counts), "balance" (max / mean tokens
                per expert), "distinct", "expected_distinct", "max_load", "mean_load", "pairs"}
    roofline    {"dtype_bytes", "expert_bytes", "router_bytes", "dense_mlp_bytes", "active_bytes_per_token",
                 "expected_distinct", "distinct", "bytes_read", "bytes_read_expected", "achieved_gb_s",
                 "bandwidth_gb_s", "bw_pct", "flops", "achieved_gflop_s", "matmul_tflops", "flop_pct"}
    kernel      what the strategy ran (e.g. "torch.nn.functional.grouped_mm"), or null
    context     harness.bench.context.environment(device) + threads, seed, dtype, timing policy, the
                machine probe, transformers' experts implementations, the grouped kernel, the Zipf
                exponent, load_1m_at_group (the load average when the row's group started)
    started_at, duration_s (the group's: its rows are timed together)

The report (:func:`write_report`): ``report.md`` (pandas tables as GitHub Markdown), ``moe-cost.png``
(experts time vs token count per strategy, log-log) and ``report.html`` (the tables and the plot inlined).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import html as html_lib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import configs
from reference_impl import ops
from reference_impl.model import MLP, MoE, RMSNorm
from reference_impl.spec import ModelSpec, MoESpec

from ..atomic import write_atomic
from . import cost, records
from .runner import cv, stats

SCHEMA = "gemma-harness/moe-record/1"
KIND = "moe"
ID_PREFIX = "m-"
MODEL = "gemma-4-26b-a4b"
TOKENS = (1, 8, 64, 512, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUTINGS = ("uniform", "zipf")
PARTS = ("router", "experts", "dense_mlp", "combine")
ZIPF_EXPONENT = 1.0
SEED = 0
CHECKED_TOKENS = 64
# Max |error| of an experts output vs float64, as a fraction of max |expected|. The float64 computation
# takes the same dtype-rounded inputs and weights, so only the strategy's own rounding counts: fp32 (unit
# roundoff 6e-8) accumulating 2816- and 704-long dot products, measured <= 1.8e-6 (10x margin); bf16 (unit
# roundoff 3.9e-3) rounds the gate/up products, the GELU, their product and the down product (4 roundings,
# each <= 2^-9 relative): measured <= 5.4e-3 where the k-sum is in fp32, <= 9.4e-3 in HF's eager path,
# which sums the k experts in bf16 (index_add_): 2.1x margin. (Full-size run, reports/moe-cost-26b-a4b-cpu.)
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
MACHINE_FILE = "machine.json"
PLOT_FILE = "moe-cost.png"
LOOP = "per_expert_loop"
GIB = 1 << 30


class StrategyUnsupported(Exception):
    """A strategy that cannot run here (no kernel, no CUDA, over a limit): its row's one-line reason."""


class RunError(RuntimeError):
    """A run that cannot start (its output directory): one line."""


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class TimingPolicy:
    """Repeated timed calls after warm-up, until the coefficient of variation reaches ``target_cv`` (at
    least ``min_reps`` calls), or ``max_time_s`` of timed calls, or ``max_reps`` calls."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 50
    target_cv: float = 0.05
    max_time_s: float = 2.0


@dataclass(frozen=True)
class Options:
    out: Path
    model: str = MODEL
    tokens: tuple[int, ...] = TOKENS
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    routings: tuple[str, ...] = ROUTINGS
    strategies: tuple[str, ...] | None = None  # None: every strategy of strategy_names()
    layers: int = 1
    threads: int | None = 1
    device: str = "cpu"
    seed: int = SEED
    num_experts: int | None = None  # cut the expert count (tests); None: the config's
    max_call_s: float = 5.0  # dense_all: skip where one call is predicted to take longer
    max_gather_gib: float = 2.0  # hf_batched_mm: skip where the per-pair weight copies exceed this
    resume: bool = False
    quiet: bool = False
    timing: TimingPolicy = field(default_factory=TimingPolicy)


# ---------------------------------------------------------------- the layer


@dataclass
class HFParts:
    """HF's modules of one MoE layer, sharing the reference's weight tensors."""

    router: nn.Module
    mlp: nn.Module
    mlp_norm: nn.Module  # pre_feedforward_layernorm
    mlp_out_norm: nn.Module  # post_feedforward_layernorm_1
    input_norm: nn.Module  # pre_feedforward_layernorm_2
    out_norm: nn.Module  # post_feedforward_layernorm_2
    experts: nn.Module
    config: object


@dataclass
class Layer:
    index: int
    spec: ModelSpec
    moe_spec: MoESpec
    mlp_norm: RMSNorm
    mlp: MLP
    moe: MoE
    hf: HFParts | None = None
    hf_error: str | None = None


def model_config(model: str, num_experts: int | None = None) -> dict:
    """The HF config dict of ``model``, its expert count cut to ``num_experts`` when given."""
    config = configs.hf_config(model)
    if num_experts is not None:
        config = {**config, "num_experts": num_experts, "top_k_experts": min(config["top_k_experts"], num_experts)}
    return config


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fill(param: torch.Tensor, seed: int, scale: float, mean: float = 0.0) -> None:
    """Fill ``param`` with mean + scale * N(0, 1) from ``seed``, a leading slice at a time (a 3-D expert
    tensor never needs an fp32 copy of the whole)."""
    g = _generator(seed)
    slices = param if param.dim() == 3 else [param]
    for part in slices:
        part.copy_(torch.randn(part.shape, generator=g) * scale + mean)


def _init_weights(modules: dict[str, nn.Module], spec: ModelSpec, seed: int) -> None:
    """Random weights like a trained layer's scales: matrices N(0, 1/fan_in); norm weights, the router's
    scale and per-expert scale 1 + N(0, 0.01)."""
    params = sorted((f"{prefix}.{name}", p) for prefix, m in modules.items() for name, p in m.named_parameters())
    neutral = 1 - spec.norm_offset
    with torch.no_grad():
        for k, (name, p) in enumerate(params):
            if p.dim() >= 2:
                _fill(p, seed + k, p.shape[-1] ** -0.5)
            else:
                _fill(p, seed + k, 0.1, neutral if name.endswith("norm.weight") else 1.0)


def build_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: str, seed: int,
                hf_config: dict | None = None) -> Layer:
    """Layer ``index`` of ``spec`` (an MoE layer) with random weights from ``seed``, in ``dtype`` on
    ``device``; with ``hf_config``, HF's modules too, sharing the weights."""
    layer_spec = spec.layers[index]
    if layer_spec.moe is None:
        raise ValueError(f"layer {index} of the spec has no experts")
    h = spec.hidden_size
    with torch.device("meta"):
        mlp_norm, mlp = RMSNorm(h, spec), MLP(h, layer_spec.intermediate_size, spec.activation)
        moe = MoE(spec, layer_spec.moe)
    modules = {"mlp_norm": mlp_norm, "mlp": mlp, "moe": moe}
    for name, m in modules.items():
        modules[name] = m.to(dtype).to_empty(device=device).eval().requires_grad_(False)  # inference only
    _init_weights(modules, spec, seed + 7919 * index)
    layer = Layer(index, spec, layer_spec.moe, modules["mlp_norm"], modules["mlp"], modules["moe"])
    if hf_config is not None:
        try:
            layer.hf = hf_parts(hf_config, layer)
        except Exception as exc:  # noqa: BLE001 - no HF Gemma 4 here: the HF rows say so
            layer.hf_error = one_line(exc)
    return layer


def _share(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Put the reference's parameter into an HF module (the same tensor: no copy)."""
    setattr(module, name, param)


def hf_parts(hf_config: dict, layer: Layer) -> HFParts:
    from transformers.models.gemma4 import modeling_gemma4 as g4

    from ..adapters.hf import hf_config_object

    config = hf_config_object(hf_config)
    h, eps = config.hidden_size, config.rms_norm_eps
    with torch.device("meta"):
        parts = HFParts(router=g4.Gemma4TextRouter(config), mlp=g4.Gemma4TextMLP(config, layer.index),
                        mlp_norm=g4.Gemma4RMSNorm(h, eps=eps), mlp_out_norm=g4.Gemma4RMSNorm(h, eps=eps),
                        input_norm=g4.Gemma4RMSNorm(h, eps=eps), out_norm=g4.Gemma4RMSNorm(h, eps=eps),
                        experts=g4.Gemma4TextExperts(config), config=config)
    moe, mlp = layer.moe, layer.mlp
    for module, name, param in [
        (parts.router.proj, "weight", moe.router.proj.weight), (parts.router, "scale", moe.router.scale),
        (parts.router, "per_expert_scale", moe.router.per_expert_scale),
        (parts.mlp.gate_proj, "weight", mlp.gate.weight), (parts.mlp.up_proj, "weight", mlp.up.weight),
        (parts.mlp.down_proj, "weight", mlp.down.weight), (parts.mlp_norm, "weight", layer.mlp_norm.weight),
        (parts.mlp_out_norm, "weight", moe.mlp_out_norm.weight), (parts.input_norm, "weight", moe.input_norm.weight),
        (parts.out_norm, "weight", moe.out_norm.weight), (parts.experts, "gate_up_proj", moe.experts.gate_up),
        (parts.experts, "down_proj", moe.experts.down),
    ]:
        _share(module, name, param)
    for module in (parts.router, parts.mlp, parts.mlp_norm, parts.mlp_out_norm, parts.input_norm,
                   parts.out_norm, parts.experts):
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"HF {type(module).__name__} has parameters the reference does not fill: {left}")
        module.eval()
    return parts


# ---------------------------------------------------------------- routing


@dataclass
class Routing:
    """One layer's routing of N tokens: weights (N, K) fp32, experts (N, K) int64, and the router's
    ``forced`` choice (None for the router's own)."""

    weights: torch.Tensor
    experts: torch.Tensor
    forced: torch.Tensor | None


def zipf_experts(num_experts: int, top_k: int, tokens: int, seed: int, exponent: float = ZIPF_EXPONENT,
                 device: str = "cpu") -> torch.Tensor:
    """(N, K) expert ids, each token's K distinct, drawn with P(expert) ~ 1/rank^exponent; the ranks a
    seeded permutation of the experts (the hot experts are not simply 0..K-1)."""
    g = _generator(seed)
    rank = torch.randperm(num_experts, generator=g) + 1  # expert e has rank rank[e]
    p = rank.double() ** -exponent
    drawn = torch.multinomial((p / p.sum()).expand(tokens, -1), top_k, replacement=False, generator=g)
    return drawn.to(device)


def route(layer: Layer, x: torch.Tensor, kind: str, seed: int) -> Routing:
    """The reference router's routing of x (N, H): its own choice (``uniform``) or a forced Zipf one."""
    forced = None
    if kind == "zipf":
        forced = zipf_experts(layer.moe_spec.num_experts, layer.moe_spec.top_k, x.shape[0], seed, device=str(x.device))
    elif kind != "uniform":
        raise ValueError(f"unknown routing {kind!r} (one of {', '.join(ROUTINGS)})")
    _, weights, experts = layer.moe.router(x, forced)
    return Routing(weights.float(), experts, forced)


def routing_stats(experts: torch.Tensor, num_experts: int) -> dict:
    """Tokens per expert of a (N, K) routing: the histogram (E counts, summing to N*K), balance = max / mean
    load over all E experts, the number of distinct experts used, and the uniform expectation of it."""
    n, k = experts.shape
    counts = torch.bincount(experts.reshape(-1).cpu(), minlength=num_experts)
    mean = n * k / num_experts
    expected = num_experts * (1 - (1 - k / num_experts) ** n)
    return {"histogram": counts.tolist(), "balance": float(counts.max()) / mean, "distinct": int((counts > 0).sum()),
            "expected_distinct": expected, "max_load": int(counts.max()), "mean_load": mean, "pairs": n * k}


# ---------------------------------------------------------------- dispatch strategies


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def grouped_kernel() -> tuple[str, Callable | None]:
    """torch's grouped matmul, if this build has one: (its name, the function); else ("padded bmm", None)."""
    if hasattr(torch.nn.functional, "grouped_mm"):
        return "torch.nn.functional.grouped_mm", torch.nn.functional.grouped_mm
    if hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm", torch._grouped_mm
    return "padded bmm", None


def padded_bmm(rows: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped matmul as one ``bmm``: rows (S, in) sorted by group, weight_t (E, in, out), offs (E,)
    cumulative row counts -> (S, out). Only the used groups' weights are gathered; each group's rows are
    padded to the largest group."""
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    used = torch.nonzero(counts).squeeze(1)  # (U,)
    group = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), counts)  # (S,) group of each row
    slot = torch.searchsorted(used, group)  # (S,) index into the used groups
    position = torch.arange(rows.shape[0], device=rows.device) - (offs.long() - counts)[group]  # (S,) row in group
    padded = rows.new_zeros(len(used), int(counts.max()), rows.shape[1])  # (U, M, in)
    padded[slot, position] = rows
    return torch.bmm(padded, weight_t[used])[slot, position]  # (U, M, out) -> (S, out)


def grouped_matmul(rows: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor, kernel: Callable | None):
    return padded_bmm(rows, weight_t, offs) if kernel is None else kernel(rows, weight_t, offs=offs)


def grouped_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                    experts: torch.Tensor, activation: str, kernel: Callable | None) -> torch.Tensor:
    """Sorted / grouped dispatch: x (N, H), gate_up (E, 2I, H), down (E, H, I) -> (N, H); two grouped
    matmuls over the (token, k) pairs sorted by expert, the weighted k-sum in fp32 (as the reference)."""
    n, k = experts.shape
    flat = experts.reshape(-1)  # (N*K,) token-major
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)  # (E,)
    gate, up = grouped_matmul(x[order // k], gate_up.transpose(1, 2), offs, kernel).chunk(2, dim=-1)  # (S, I) x2
    y = grouped_matmul(ops.gelu(gate, activation) * up, down.transpose(1, 2), offs, kernel)  # (S, H)
    out = torch.empty(n * k, x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    out[order] = y * weights.reshape(-1)[order, None]  # dtype x fp32 weight -> fp32, back in token order
    return out.view(n, k, -1).sum(dim=1).to(x.dtype)


def dense_all_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, dispatch: torch.Tensor,
                      activation: str) -> torch.Tensor:
    """Every token through every expert, masked: x (N, H), dispatch (N, E) fp32 (a token's weight at its
    chosen experts, 0 elsewhere) -> (N, H). E/K times the routed work; summed in fp32."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in range(gate_up.shape[0]):
        gate, up = torch.mm(x, gate_up[e].T).chunk(2, dim=-1)  # (N, I) x2
        out += torch.mm(ops.gelu(gate, activation) * up, down[e].T) * dispatch[:, e, None]  # (N, H) fp32
    return out.to(x.dtype)


def hf_experts_implementations() -> list[str]:
    """HF's experts implementations in this transformers: "eager" and the keys of ALL_EXPERTS_FUNCTIONS."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    known = ["eager", "grouped_mm", "batched_mm"]
    return [name for name in known if name == "eager" or name in ALL_EXPERTS_FUNCTIONS] + sorted(
        k for k in ALL_EXPERTS_FUNCTIONS.keys() if k not in known)


def strategy_names() -> list[str]:
    return [LOOP, "grouped_mm", "dense_all", *(f"hf_{impl}" for impl in hf_experts_implementations()), "vllm_fused"]


def family(strategy: str) -> str:
    """Whose router / dense MLP / combine a strategy's row times: "hf" for HF's experts, else "reference"."""
    return "hf" if strategy.startswith("hf_") else "reference"


STRATEGIES = {
    LOOP: "reference Experts.forward: pairs sorted by expert, one mm pair per used expert",
    "grouped_mm": "pairs sorted by expert, torch grouped matmul with per-expert offsets",
    "dense_all": "every token through all experts, masked by the dispatch weights (naive baseline)",
    "vllm_fused": "vLLM's Triton fused_experts (CUDA only)",
}
HF_STRATEGIES = {
    "eager": "HF Gemma4TextExperts.forward: one_hot mask, per used expert linear + index_add_ (in the dtype)",
    "grouped_mm": "HF grouped_mm_experts_forward: sort, histc offsets, torch grouped_mm over all experts",
    "batched_mm": "HF batched_mm_experts_forward: each (token, k) pair's expert weights gathered, bmm",
    "deepgemm": "HF DeepGEMM bf16 grouped GEMM (hub kernel; CUDA SM90/SM100)",
    "sonicmoe": "HF sonic-moe (hub kernel; CUDA SM90+)",
}


def describe(strategy: str) -> str:
    if strategy.startswith("hf_"):
        return HF_STRATEGIES.get(strategy[3:], f"HF experts_implementation={strategy[3:]!r}")
    return STRATEGIES.get(strategy, strategy)


@dataclass
class Group:
    """What every row of one (token count, dtype, routing kind) shares: per layer the input, the experts'
    normed input, the routing, the float64 expected output on the checked tokens."""

    tokens: int
    dtype: str
    routing: str
    x: torch.Tensor  # (N, H)
    normed: list[torch.Tensor]  # per layer (N, H): the experts' input
    routings: list[Routing]
    checked: torch.Tensor  # (C,) token indices the float64 check covers
    expected: list[torch.Tensor]  # per layer (C, H) float64
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # strategy -> experts outputs


def _vllm_python() -> str:
    from .runner import python_for

    return python_for("vllm")


def vllm_fused_fn(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, routing: Routing) -> Callable:
    """vLLM's fused_experts on this layer's weights (w13 = gate_up (E, 2I, H), w2 = down (E, H, I), both in
    vLLM's layout; gelu_tanh as vLLM's Gemma 4); raises StrategyUnsupported without CUDA or vLLM."""
    missing = []
    if x.device.type != "cuda" or not torch.cuda.is_available():
        missing.append(f"CUDA (device {x.device}, torch {torch.__version__}): fused_experts is a Triton GPU kernel")
    try:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception as exc:  # noqa: BLE001 - ImportError, or vLLM failing on import
        missing.append(f"vllm in this interpreter ({one_line(exc)}; it lives in {_vllm_python()})")
    if missing:
        raise StrategyUnsupported("needs " + " and ".join(missing))
    topk_ids, topk_weights = routing.experts.to(torch.int32), routing.weights.float()
    return lambda: fused_experts(x, gate_up, down, topk_weights, topk_ids, activation=MoEActivation.GELU_TANH)


def hf_fn(layer: Layer, impl: str, x: torch.Tensor, routing: Routing, opts: Options) -> tuple[Callable, str]:
    if layer.hf is None:
        raise StrategyUnsupported(f"HF's Gemma 4 modules are not available ({layer.hf_error})")
    _hf_loadable(impl)
    if impl == "batched_mm":
        gathered = gathered_bytes(layer, x.shape[0], x.element_size())
        if gathered > opts.max_gather_gib * GIB:
            raise StrategyUnsupported(
                f"skipped: batched_mm copies each (token, expert) pair's weights: {gathered / GIB:.1f} GiB per "
                f"layer call > --max-gather-gib {opts.max_gather_gib:g}")
    experts, config = layer.hf.experts, layer.hf.config

    def call() -> torch.Tensor:
        # Every forward reads the config's choice, and the strategies of a group share one config and run
        # interleaved: each call sets its own (a property write, microseconds against >= 1 ms of experts).
        config._experts_implementation = impl
        return experts(x, routing.experts, routing.weights)

    return call, f"transformers experts_implementation={impl}"


def _hf_loadable(impl: str) -> None:
    """HF's hub-kernel implementations say themselves whether they can load (no download is tried)."""
    checks = {"deepgemm": ("transformers.integrations.deepgemm", "is_deepgemm_loadable"),
              "sonicmoe": ("transformers.integrations.sonicmoe", "is_sonicmoe_loadable")}
    if impl not in checks:
        return
    import importlib

    module, name = checks[impl]
    try:
        getattr(importlib.import_module(module), name)(raise_error=True)
    except Exception as exc:  # noqa: BLE001 - ImportError with the reason, or the check itself missing
        raise StrategyUnsupported(one_line(exc)) from None


def gathered_bytes(layer: Layer, tokens: int, dtype_bytes: int) -> int:
    """Bytes HF's batched_mm copies for one layer: every (token, k) pair's gate_up and down weights."""
    return tokens * layer.moe_spec.top_k * expert_params(layer.spec.hidden_size, layer.moe_spec) * dtype_bytes


def dense_all_fn(layer: Layer, x: torch.Tensor, routing: Routing, opts: Options, machine: dict | None,
                 dtype: str) -> Callable:
    flops = 2 * x.shape[0] * layer.moe_spec.num_experts * expert_params(layer.spec.hidden_size, layer.moe_spec)
    peak = (machine or {}).get("matmul_tflops", {}).get(dtype)
    if peak:
        predicted = flops / (peak * 1e12)
        if predicted > opts.max_call_s:
            raise StrategyUnsupported(
                f"skipped: every token through all {layer.moe_spec.num_experts} experts is {flops / 1e9:,.0f} GFLOP "
                f"per layer call, ~{predicted:.0f} s at the measured {peak * 1e3:.0f} GFLOP/s matmul peak "
                f"> --max-call-s {opts.max_call_s:g}")
    dispatch = torch.zeros(x.shape[0], layer.moe_spec.num_experts, dtype=torch.float32, device=x.device)
    dispatch = dispatch.scatter(-1, routing.experts, routing.weights)  # (N, E)
    ex = layer.moe.experts
    return lambda: dense_all_experts(ex.gate_up, ex.down, x, dispatch, ex.activation)


def experts_fn(strategy: str, layer: Layer, x: torch.Tensor, routing: Routing, opts: Options,
               machine: dict | None, dtype: str) -> tuple[Callable, str | None]:
    """(a call computing one layer's experts output (N, H) under ``strategy``, the kernel it runs);
    raises StrategyUnsupported where it cannot run."""
    ex = layer.moe.experts
    if strategy == LOOP:
        return (lambda: ex(x, routing.weights, routing.experts)), "reference Experts.forward"
    if strategy == "grouped_mm":
        name, kernel = grouped_kernel()
        return (lambda: grouped_experts(ex.gate_up, ex.down, x, routing.weights, routing.experts, ex.activation,
                                        kernel)), name
    if strategy == "dense_all":
        return dense_all_fn(layer, x, routing, opts, machine, dtype), "torch.mm per expert (all experts)"
    if strategy.startswith("hf_"):
        return hf_fn(layer, strategy[3:], x, routing, opts)
    if strategy == "vllm_fused":
        return vllm_fused_fn(ex.gate_up, ex.down, x, routing), "vllm fused_experts (Triton)"
    raise StrategyUnsupported(f"unknown strategy {strategy!r}")


# ---------------------------------------------------------------- float64 check


def experts_float64(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                    experts: torch.Tensor, activation: str) -> torch.Tensor:
    """sum_k w_k * down_e(gelu(gate_e x) * up_e x) in float64 for x (C, H) -> (C, H), one used expert's
    weights converted at a time."""
    xd, wd = x.double(), weights.double()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in experts.unique().tolist():
        token, slot = (experts == e).nonzero(as_tuple=True)
        gate, up = (xd[token] @ gate_up[e].double().T).chunk(2, dim=-1)
        y = (ops.gelu(gate, activation) * up) @ down[e].double().T
        out.index_add_(0, token, y * wd[token, slot, None])
    return out


def checked_tokens(n: int, limit: int = CHECKED_TOKENS) -> torch.Tensor:
    """Up to ``limit`` token indices spread over 0..n-1 (first and last included)."""
    return torch.linspace(0, n - 1, min(n, limit)).round().long().unique()


def check_outputs(outputs: list[torch.Tensor], group: Group, dtype: str, loop: list[torch.Tensor] | None) -> dict:
    """An experts output (per layer (N, H)) against float64 on the checked tokens, and against the loop's."""
    err = peak = 0.0
    diff = None if loop is None else 0.0
    for layer_out, expected, loop_out in zip(outputs, group.expected, loop or [None] * len(outputs), strict=True):
        rows = layer_out[group.checked.to(layer_out.device)].double().cpu()
        err = max(err, (rows - expected).abs().max().item())
        peak = max(peak, expected.abs().max().item())
        if loop_out is not None:
            diff = max(diff, (layer_out.double() - loop_out.double()).abs().max().item())
    finite = all(bool(torch.isfinite(o).all()) for o in outputs)
    bound = TOLERANCE[dtype] * peak
    return {"max_abs_err": err, "max_abs_expected": peak, "bound": bound, "tolerance": TOLERANCE[dtype],
            "checked_tokens": int(group.checked.numel()), "ok": finite and err <= bound, "finite": finite,
            "max_abs_diff_vs_loop": diff}


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timed:
    """One timed entry (a part of one family, or one strategy's experts): its calls' times in ms, the
    warm-up call's output, or the error that stopped it."""

    fn: Callable
    samples: list[float] = field(default_factory=list)
    output: object = None
    error: str | None = None
    spent_s: float = 0.0

    def finished(self, policy: TimingPolicy) -> bool:
        n, spread = len(self.samples), cv(self.samples)
        if self.error is not None or n >= policy.max_reps:
            return True
        return n >= policy.min_reps and ((spread is not None and spread <= policy.target_cv)
                                         or self.spent_s >= policy.max_time_s)

    def timing(self, policy: TimingPolicy) -> dict:
        spread = cv(self.samples)
        return {**stats(self.samples), "cv": spread, "stable": spread is not None and spread <= policy.target_cv,
                "samples": [round(v, 6) for v in self.samples]}


def warm(entries: dict[str, Timed], device: str, policy: TimingPolicy) -> None:
    """The untimed warm-up calls of entries not yet warm; the last one's output is kept (checked later)."""
    for entry in entries.values():
        if entry.output is not None or entry.error is not None:
            continue
        try:
            for _ in range(max(1, policy.warmup)):
                entry.output = entry.fn()
                sync(device)
        except Exception as exc:  # noqa: BLE001 - this entry's error, not the run's
            entry.error = one_line(exc)


def rounds(entries: dict[str, Timed], device: str, policy: TimingPolicy) -> None:
    """Timed calls in rounds, one call of each unfinished entry per round, until each has finished
    (:meth:`Timed.finished`): on a machine whose load changes during the run every entry sees the change,
    so their ratios hold where back-to-back timing would not."""
    while active := [e for e in entries.values() if not e.finished(policy)]:
        for entry in active:
            try:
                t0 = time.perf_counter()
                entry.fn()
                sync(device)
            except Exception as exc:  # noqa: BLE001 - this entry's error, not the run's
                entry.error = one_line(exc)
                continue
            seconds = time.perf_counter() - t0
            entry.samples.append(seconds * 1e3)
            entry.spent_s += seconds


def time_calls(fn: Callable, device: str, policy: TimingPolicy) -> tuple[dict, object]:
    """One call timed on its own: (its timing in ms with the samples, the warm-up call's output)."""
    entry = {"fn": Timed(fn)}
    warm(entry, device, policy)
    rounds(entry, device, policy)
    if entry["fn"].error:
        raise RuntimeError(entry["fn"].error)
    return entry["fn"].timing(policy), entry["fn"].output


def total_timing(parts: dict[str, dict]) -> dict:
    """The layer's time as the sum of its separately timed parts (means, medians; std in quadrature)."""
    return {"mean": sum(p["mean"] for p in parts.values()), "median": sum(p["median"] for p in parts.values()),
            "std": math.sqrt(sum(p["std"] ** 2 for p in parts.values())), "of": list(parts)}


# ---------------------------------------------------------------- roofline


def expert_params(hidden: int, moe: MoESpec) -> int:
    """One expert's gate_up (2I x H) and down (H x I) parameters."""
    return 3 * moe.intermediate_size * hidden


def roofline(layers: list[Layer], group: Group, total_ms: float | None, machine: dict | None, dtype_bytes: int) -> dict:
    """Bytes the layers must read for N tokens (router, dense MLP, the distinct experts used), FLOPs of the
    routed work, and what the measured time makes of them against the machine's ceilings."""
    layer = layers[0]
    h, moe, n = layer.spec.hidden_size, layer.moe_spec, group.tokens
    expert = expert_params(h, moe) * dtype_bytes
    router = (moe.num_experts * h + h + moe.num_experts) * dtype_bytes  # proj, scale, per-expert scale
    dense = 3 * layer.mlp.gate.weight.shape[0] * h * dtype_bytes
    expected = moe.num_experts * cost.expert_share(layer.spec, n)  # 1 - (1 - k/E)^N of the E experts
    distinct = sum(routing_stats(r.experts, moe.num_experts)["distinct"] for r in group.routings)
    count = len(layers)
    bytes_read = count * (router + dense) + distinct * expert
    flops = 2.0 * n * count * (moe.top_k * expert + router + dense) / dtype_bytes
    out = {"dtype_bytes": dtype_bytes, "expert_bytes": expert, "router_bytes": router, "dense_mlp_bytes": dense,
           "active_bytes_per_token": count * (moe.top_k * expert + router + dense), "expected_distinct": expected,
           "distinct": distinct, "bytes_read": bytes_read,
           "bytes_read_expected": count * (router + dense + expected * expert), "flops": flops,
           "achieved_gb_s": None, "bandwidth_gb_s": None, "bw_pct": None, "achieved_gflop_s": None,
           "matmul_tflops": None, "flop_pct": None}
    if total_ms:
        seconds = total_ms / 1e3
        out.update(achieved_gb_s=bytes_read / seconds / 1e9, achieved_gflop_s=flops / seconds / 1e9)
    if total_ms and machine:
        peak = machine.get("matmul_tflops", {}).get(group.dtype)
        out.update(bandwidth_gb_s=machine["bandwidth_gb_s"], matmul_tflops=peak,
                   bw_pct=100 * out["achieved_gb_s"] / machine["bandwidth_gb_s"],
                   flop_pct=100 * out["achieved_gflop_s"] / (peak * 1e3) if peak else None)
    return out


# ---------------------------------------------------------------- records


def cell_params(opts: Options, strategy: str, tokens: int, dtype: str, routing: str, spec: ModelSpec) -> dict:
    moe = next(layer.moe for layer in spec.layers if layer.moe is not None)
    return {"strategy": strategy, "family": family(strategy), "model": opts.model, "layers": opts.layers,
            "tokens": tokens, "dtype": dtype, "routing": routing, "device": opts.device, "threads": opts.threads,
            "seed": opts.seed, "num_experts": moe.num_experts, "top_k": moe.top_k, "hidden": spec.hidden_size,
            "expert_intermediate": moe.intermediate_size, "dense_intermediate": spec.layers[0].intermediate_size}


def cell_id(cell: dict) -> str:
    canonical = json.dumps(cell, sort_keys=True, separators=(",", ":"), default=str)
    return ID_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def label(cell: dict) -> str:
    return (f"{cell['strategy']} {cell['model']} L={cell['layers']} N={cell['tokens']} {cell['dtype']} "
            f"{cell['routing']} {cell['device']}")


def read_records(path: str | os.PathLike) -> list[dict]:
    """The MoE records of a file (none if it does not exist; a partial last line, a write cut by a kill,
    skipped)."""
    return list(records.iter_records(path, SCHEMA, "cell_id")) if Path(path).exists() else []


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunContext:
    opts: Options
    spec: ModelSpec
    hf_config: dict
    machine: dict | None
    environment: dict
    path: Path
    done: set[str]
    written: list[dict] = field(default_factory=list)
    progress: Callable[[str], None] = lambda line: None  # noqa: E731 - a line before each group's timing


def base_record(ctx: RunContext, cell: dict, dtype: str) -> dict:
    context = {**ctx.environment, "threads": torch.get_num_threads(), "seed": ctx.opts.seed, "dtype": dtype,
               "timing_policy": asdict(ctx.opts.timing), "machine_probe": ctx.machine,
               "hf_experts_implementations": hf_experts_implementations(), "grouped_mm_kernel": grouped_kernel()[0],
               "zipf_exponent": ZIPF_EXPONENT,
               "load_1m_at_group": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"schema": SCHEMA, "kind": KIND, "cell_id": cell_id(cell), "cell": cell, "label": label(cell),
            "status": None, "reason": None, "timings": None, "check": None, "routing": None, "roofline": None,
            "kernel": None, "context": context, "started_at": _now(), "duration_s": None}


# ---------------------------------------------------------------- the run


def part_calls(layers: list[Layer], group: Group, fam: str) -> dict[str, Callable]:
    """The router and dense-MLP calls of a family, over all layers."""
    x = group.x
    if fam == "hf":
        return {"router": lambda: [ly.hf.router(x) for ly in layers],
                "dense_mlp": lambda: [ly.hf.mlp(ly.hf.mlp_norm(x)) for ly in layers]}
    return {"router": lambda: [ly.moe.router(x, r.forced) for ly, r in zip(layers, group.routings, strict=True)],
            "dense_mlp": lambda: [ly.mlp(ly.mlp_norm(x)) for ly in layers]}


def combine_call(layers: list[Layer], group: Group, fam: str, mlp_out: list, experts_out: list) -> Callable:
    """The experts' pre-norm and the mix (two post-norms, the sum), over all layers."""
    x = group.x
    if fam == "hf":
        return lambda: [(ly.hf.input_norm(x), ly.hf.mlp_out_norm(m) + ly.hf.out_norm(e))
                        for ly, m, e in zip(layers, mlp_out, experts_out, strict=True)]
    return lambda: [(ly.moe.input_norm(x), ly.moe.mix(m, e)) for ly, m, e in zip(layers, mlp_out, experts_out, strict=True)]


def prepare(ctx: RunContext, layers: list[Layer], group: Group, strategy: str, record: dict):
    """The strategy's experts call over all layers and its kernel, or None with ``record`` marked
    unsupported (or error) and the reason."""
    try:
        made = [experts_fn(strategy, ly, n, r, ctx.opts, ctx.machine, group.dtype)
                for ly, n, r in zip(layers, group.normed, group.routings, strict=True)]
    except StrategyUnsupported as exc:
        record.update(status="unsupported", reason=str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - one strategy's crash is its row's error, not the run's
        record.update(status="error", reason=one_line(exc))
        return None
    calls = [call for call, _ in made]
    return (lambda: [call() for call in calls]), made[0][1]


def time_group(ctx: RunContext, layers: list[Layer], group: Group, experts: dict[str, Callable]) -> dict[str, Timed]:
    """Every entry of one group, interleaved (:func:`rounds`): ``experts:<strategy>`` for each strategy and
    ``router:<family>``, ``dense_mlp:<family>``, ``combine:<family>`` for each family in use. The combine
    runs on the dense MLP's and the family's first working strategy's warm-up outputs."""
    opts = ctx.opts
    entries = {f"experts:{s}": Timed(fn) for s, fn in experts.items()}
    families = list(dict.fromkeys(family(s) for s in experts))
    for fam in families:
        entries.update({f"{part}:{fam}": Timed(fn) for part, fn in part_calls(layers, group, fam).items()})
    warm(entries, opts.device, opts.timing)
    for fam in families:
        outputs = [entries[f"experts:{s}"].output for s in experts if family(s) == fam]
        experts_out = next((o for o in outputs if o is not None), None)
        mlp_out = entries[f"dense_mlp:{fam}"].output
        if experts_out is not None and mlp_out is not None:
            entries[f"combine:{fam}"] = Timed(combine_call(layers, group, fam, mlp_out, experts_out))
    warm(entries, opts.device, opts.timing)
    rounds(entries, opts.device, opts.timing)
    return entries


def finish_row(ctx: RunContext, layers: list[Layer], group: Group, strategy: str, entries: dict[str, Timed],
               record: dict) -> None:
    """Fill an ok (or error) record from the group's timings and the experts output's check."""
    fam, policy = family(strategy), ctx.opts.timing
    keys = {"router": f"router:{fam}", "experts": f"experts:{strategy}", "dense_mlp": f"dense_mlp:{fam}",
            "combine": f"combine:{fam}"}
    missing = [part for part, key in keys.items() if key not in entries]
    failed = [f"{part}: {entries[key].error}" for part, key in keys.items() if key in entries and entries[key].error]
    if failed or missing:
        record.update(status="error", reason="; ".join(failed) or f"not timed: {', '.join(missing)}")
        return
    parts = {part: entries[key].timing(policy) for part, key in keys.items()}
    outputs = entries[keys["experts"]].output
    group.outputs[strategy] = outputs
    loop = group.outputs.get(LOOP) if strategy != LOOP else None
    check = check_outputs(outputs, group, group.dtype, loop)
    total = total_timing(parts)
    record.update(timings={**parts, "total": total, "shared_parts": ["router", "dense_mlp", "combine"]}, check=check,
                  roofline=roofline(layers, group, total["median"], ctx.machine, group.x.element_size()))
    if check["ok"]:
        record["status"] = "ok"
    else:
        record.update(status="error", reason=(
            f"experts output differs from float64: max |error| {check['max_abs_err']:.3g} > bound {check['bound']:.3g}"
            f" ({check['tolerance']:g} x max |expected| {check['max_abs_expected']:.3g}, {group.dtype})"
            + ("" if check["finite"] else "; non-finite values")))


def make_group(layers: list[Layer], tokens: int, dtype: str, routing: str, opts: Options) -> Group:
    """The shared inputs of one (N, dtype, routing) group: x, the routing and the float64 expectation."""
    h = layers[0].spec.hidden_size
    g = _generator(opts.seed + 104729 + tokens)
    x = torch.randn(tokens, h, generator=g).to(DTYPES[dtype]).to(opts.device)  # (N, H)
    checked = checked_tokens(tokens)
    normed, routings, expected = [], [], []
    for ly in layers:
        r = route(ly, x, routing, opts.seed + 31 * ly.index + tokens)
        n = ly.moe.input_norm(x)  # (N, H)
        ex = ly.moe.experts
        c = checked.to(opts.device)
        expected.append(experts_float64(ex.gate_up, ex.down, n[c], r.weights[c], r.experts[c], ex.activation).cpu())
        normed.append(n)
        routings.append(r)
    return Group(tokens, dtype, routing, x, normed, routings, checked, expected)


def run_group(ctx: RunContext, layers: list[Layer], tokens: int, dtype: str, routing: str, strategies: list[str],
              on_record: Callable[[dict], None]) -> None:
    """The rows of one (N, dtype, routing) not yet recorded: their strategies timed together, then one
    record each appended."""
    cells = [cell_params(ctx.opts, s, tokens, dtype, routing, ctx.spec) for s in strategies]
    todo = [c for c in cells if cell_id(c) not in ctx.done]
    if not todo:
        return
    t0 = time.perf_counter()
    ctx.progress(f"timing N={tokens} {dtype} {routing}: {len(todo)} row(s)")
    group = make_group(layers, tokens, dtype, routing, ctx.opts)
    rows, experts = {}, {}
    for cell in todo:
        record = rows[cell["strategy"]] = base_record(ctx, cell, dtype)
        record["routing"] = [{"layer": ly.index, **routing_stats(r.experts, ly.moe_spec.num_experts)}
                             for ly, r in zip(layers, group.routings, strict=True)]
        record["roofline"] = roofline(layers, group, None, ctx.machine, group.x.element_size())
        prepared = prepare(ctx, layers, group, cell["strategy"], record)
        if prepared is not None:
            experts[cell["strategy"]], record["kernel"] = prepared
    entries = time_group(ctx, layers, group, experts) if experts else {}
    seconds = round(time.perf_counter() - t0, 3)
    for strategy, record in rows.items():
        if strategy in experts:
            try:
                finish_row(ctx, layers, group, strategy, entries, record)
            except Exception as exc:  # noqa: BLE001 - one row's failure (e.g. its check) is its error
                record.update(status="error", reason=one_line(exc))
        record["duration_s"] = seconds  # the group's: its rows are timed together
        records.append_record(ctx.path, record)
        ctx.written.append(record)
        ctx.done.add(record["cell_id"])
        on_record(record)


def machine_facts(out: Path, device: str, dtypes: Sequence[str]) -> dict:
    """The machine's ceilings at this run's thread count: measured once per run directory and stored in
    OUT/machine.json ({device: facts}); a resumed run with the same threads and dtypes reuses them."""
    from .machine import probe

    path = out / MACHINE_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    have = known.get(device)
    if have and have.get("threads") == torch.get_num_threads() and all(d in have["matmul_tflops"] for d in dtypes):
        return have
    known[device] = probe(device, tuple(dtypes))
    write_atomic(path, json.dumps(known, indent=1))
    return known[device]


def build_layers(ctx: RunContext, dtype: str) -> list[Layer]:
    moe_layers = [i for i, layer in enumerate(ctx.spec.layers) if layer.moe is not None][: ctx.opts.layers]
    return [build_layer(ctx.spec, i, DTYPES[dtype], ctx.opts.device, ctx.opts.seed, ctx.hf_config) for i in moe_layers]


def start(opts: Options) -> RunContext:
    from .context import environment

    path = records.records_path(opts.out)
    done = {r["cell_id"] for r in read_records(path)}
    if done and not opts.resume:
        raise RunError(f"{opts.out} already holds {len(done)} records: --resume to continue that run, or another --out")
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    hf_config = model_config(opts.model, opts.num_experts)
    spec = ModelSpec.from_hf_config(hf_config)
    if len([ly for ly in spec.layers if ly.moe is not None]) < opts.layers:
        raise RunError(f"{opts.model} has fewer than {opts.layers} MoE layers")
    machine = machine_facts(opts.out, opts.device, opts.dtypes)
    return RunContext(opts, spec, hf_config, machine, environment(opts.device), path, done)


def run(opts: Options, on_record: Callable[[dict], None] | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every (dtype, routing, token count, strategy) row not yet recorded in ``opts.out``; the records
    written by this call, each appended as its group finishes."""
    ctx = start(opts)
    if progress:
        ctx.progress = progress
    strategies = list(opts.strategies or strategy_names())
    on_record = on_record or (lambda r: None)
    with torch.inference_mode():
        for dtype in opts.dtypes:
            cells = [cell_params(opts, s, n, dtype, r, ctx.spec) for s in strategies for n in opts.tokens
                     for r in opts.routings]
            if all(cell_id(c) in ctx.done for c in cells):
                continue
            layers = build_layers(ctx, dtype)
            for routing in opts.routings:
                for tokens in opts.tokens:
                    run_group(ctx, layers, tokens, dtype, routing, strategies, on_record)
            del layers
    return ctx.written


def summary_line(record: dict) -> str:
    """One line per finished row for the terminal."""
    status = record["status"]
    if status != "ok":
        return f"{status.upper():<11} {record['label']}: {record['reason']}"
    t, roof = record["timings"], record["roofline"]
    parts = ", ".join(f"{p} {t[p]['median']:.3g}" for p in PARTS)
    balance = max(r["balance"] for r in record["routing"])
    bw = f"{roof['achieved_gb_s']:.3g} GB/s" + (f" ({roof['bw_pct']:.0f}%)" if roof["bw_pct"] is not None else "")
    return (f"{'ok':<11} {record['label']}: {parts}, total {t['total']['median']:.3g} ms (medians); {bw}, "
            f"balance {balance:.2f}")


# ---------------------------------------------------------------- the report


def _ms(record: dict, part: str) -> float | None:
    """A part's median time (ms), or the total's (the sum of the parts' medians)."""
    timings = record.get("timings") or {}
    return (timings.get(part) or {}).get("median")


def _best(record: dict | None, part: str) -> float | None:
    """A part's fastest timed call (ms): on a loaded machine noise only ever slows a call down."""
    samples = ((record or {}).get("timings") or {}).get(part, {}).get("samples")
    return min(samples) if samples else None


def _group_key(cell: dict) -> tuple:
    return (cell["model"], cell["layers"], cell["tokens"], cell["dtype"], cell["routing"], cell["device"],
            cell["threads"], cell["num_experts"])


def rows_frame(recs: Sequence[dict]):
    """One row per record: its parts in ms, the ratio to the per-expert loop of the same group (experts part
    and total), GB/s and % of bandwidth, the routing's balance."""
    import pandas as pd

    loops = {_group_key(r["cell"]): r for r in recs if r["cell"]["strategy"] == LOOP and r["status"] == "ok"}
    order = {name: i for i, name in enumerate(strategy_names())}
    rows = []
    for r in recs:
        cell, roof, loop = r["cell"], r.get("roofline") or {}, loops.get(_group_key(r["cell"]))
        experts, total = _ms(r, "experts"), _ms(r, "total")
        routing = r.get("routing") or []
        rows.append({
            "strategy": cell["strategy"], "tokens": cell["tokens"], "dtype": cell["dtype"], "routing": cell["routing"],
            "status": r["status"], "router ms": _ms(r, "router"), "experts ms": experts,
            "experts best ms": _best(r, "experts"), "dense MLP ms": _ms(r, "dense_mlp"),
            "combine ms": _ms(r, "combine"), "total ms": total,
            "experts x loop": experts / _ms(loop, "experts") if loop and experts else None,
            "best x loop": _best(r, "experts") / _best(loop, "experts") if loop and experts else None,
            "total x loop": total / _ms(loop, "total") if loop and total else None,
            "GB/s": roof.get("achieved_gb_s"), "% bw": roof.get("bw_pct"),
            "balance": max((x["balance"] for x in routing), default=None),
            "distinct": sum(x["distinct"] for x in routing) if routing else None,
            "_order": order.get(cell["strategy"], len(order)), "reason": r.get("reason"),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["dtype", "routing", "tokens", "_order"], kind="stable").reset_index(drop=True)


def main_table(frame):
    return frame.drop(columns=["_order", "reason"])


def reasons_table(frame):
    """Non-ok rows: one line per (strategy, status, reason), with the token counts and dtypes it covers."""
    import pandas as pd

    bad = frame[frame["status"] != "ok"]
    if bad.empty:
        return pd.DataFrame(columns=["strategy", "status", "tokens", "dtypes", "reason"])
    grouped = bad.groupby(["strategy", "status", "reason"], sort=False)
    return pd.DataFrame([{"strategy": s, "status": st, "tokens": ",".join(str(t) for t in sorted(set(g["tokens"]))),
                          "dtypes": ",".join(sorted(set(g["dtype"]))), "reason": reason}
                         for (s, st, reason), g in grouped])


def routing_table(recs: Sequence[dict]):
    """Routing statistics per (layer, token count, dtype, routing kind): one per group (the same routing
    goes to every strategy of the group)."""
    import pandas as pd

    seen, rows = set(), []
    for r in recs:
        cell = r["cell"]
        for stats_ in r.get("routing") or []:
            key = (stats_["layer"], cell["tokens"], cell["dtype"], cell["routing"])
            if key in seen:
                continue
            seen.add(key)
            hist = sorted(stats_["histogram"], reverse=True)
            rows.append({"layer": stats_["layer"], "tokens": cell["tokens"], "dtype": cell["dtype"],
                         "routing": cell["routing"], "pairs": stats_["pairs"], "distinct": stats_["distinct"],
                         "expected distinct (uniform)": stats_["expected_distinct"], "max load": stats_["max_load"],
                         "mean load": stats_["mean_load"], "balance": stats_["balance"],
                         "top-5 loads": " ".join(str(c) for c in hist[:5])})
    frame = pd.DataFrame(rows)
    return frame if frame.empty else frame.sort_values(["routing", "dtype", "tokens", "layer"]).reset_index(drop=True)


def strategies_table(recs: Sequence[dict]):
    """Each strategy of the records once: whose other parts its rows time, what it is, the kernel it ran."""
    import pandas as pd

    kernels: dict[str, str | None] = {}
    for r in recs:
        if kernels.get(r["cell"]["strategy"]) is None:
            kernels[r["cell"]["strategy"]] = r.get("kernel")
    order = {name: i for i, name in enumerate(strategy_names())}
    names = sorted(kernels, key=lambda s: order.get(s, len(order)))
    return pd.DataFrame([{"strategy": s, "router / MLP / combine": family(s), "what": describe(s),
                          "kernel": kernels[s] or "-"} for s in names])


def plot_png(frame) -> bytes:
    """Experts time vs token count per strategy, log-log, one panel per (routing, dtype): each row's best
    timed call (on a loaded machine the least disturbed estimate; the tables give medians too), the dense
    MLP's median (reference) as a dashed line for scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = frame[frame["status"] == "ok"]
    panels = sorted({(r, d) for r, d in zip(frame["routing"], frame["dtype"], strict=True)})
    columns = max(1, len({d for _, d in panels}))
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(5.2 * columns, 3.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (routing, dtype) in zip(axes, panels, strict=False):
        sub = ok[(ok["routing"] == routing) & (ok["dtype"] == dtype)]
        for strategy, lines in sub.groupby("strategy", sort=False):
            points = lines.groupby("tokens")["experts best ms"].min().sort_index()
            axis.plot(points.index, points.values, marker="o", label=strategy)
        mlp = sub[sub["strategy"] == LOOP].groupby("tokens")["dense MLP ms"].mean().sort_index()
        if not mlp.empty:
            axis.plot(mlp.index, mlp.values, linestyle="--", color="gray", label="dense MLP (ref)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"experts part (best call): {routing} routing, {dtype}", fontsize=9)
        axis.set_xlabel("tokens (N)")
        axis.set_ylabel("ms per call")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()



def load_note(recs: Sequence[dict]) -> str | None:
    """The machine's 1-minute load average over the run's groups, against its core count."""
    loads = [r["context"].get("load_1m_at_group") for r in recs]
    loads = [v for v in loads if v is not None]
    if not loads:
        return None
    cores = (recs[0]["context"].get("device") or {}).get("logical_cores")
    return (f"Load average during the groups: {min(loads):.1f}-{max(loads):.1f} on {cores} logical cores "
            f"(context.load_1m_at_group of each record). A loaded machine slows single calls by up to several "
            f"times: see each part's cv and samples in the records, and the experts' best call beside its median.")


def environment_lines(recs: Sequence[dict]) -> list[str]:
    """Where the numbers come from: each distinct environment once."""
    seen, lines = set(), []
    for r in recs:
        c = r["context"]
        device, machine = c.get("device") or {}, c.get("machine_probe") or {}
        peaks = ", ".join(f"{d} {t * 1e3:.0f} GFLOP/s" for d, t in (machine.get("matmul_tflops") or {}).items())
        load = device.get("load_1m")
        line = (f"{device.get('name') or device.get('torch_name') or device.get('type')} ({c.get('threads')} "
                f"thread(s), {device.get('logical_cores')} logical cores, load {'-' if load is None else f'{load:.1f}'}"
                f" at the start); torch "
                f"{c.get('torch')}, transformers {c.get('transformers')}, vllm {c.get('vllm')}; git {c.get('git')}; "
                f"seed {c.get('seed')}; measured bandwidth {machine.get('bandwidth_gb_s', float('nan')):.1f} GB/s, "
                f"matmul {peaks} (at {machine.get('threads')} thread(s)); grouped kernel {c.get('grouped_mm_kernel')}; "
                f"HF experts implementations {', '.join(c.get('hf_experts_implementations') or [])}")
        key = line.split("; git")[0] + str(c.get("git"))
        if key not in seen:
            seen.add(key)
            lines.append(line)
    return lines


NOTES = [
    "Random weights: the router's logits are small and unstructured, so `uniform` routing is near-uniform "
    "(balance near 1 at large N); a trained router is not. `zipf` forces each token's k experts with "
    "P(expert) ~ 1/rank (a seeded permutation of ranks), so the cost of imbalance shows.",
    "Parts are timed separately: router (norm, projection, softmax, top-k, renormalise, per-expert scale), "
    "experts (the row's strategy), dense MLP (pre-norm + GeGLU MLP), combine (the experts' pre-norm, the two "
    "post-norms and the sum of MoE.mix). Router, dense MLP and combine are the same code for every strategy "
    "of a family: timed once per group (tokens, dtype, routing) and shared by the family's rows. Every entry of "
    "a group is timed in interleaved rounds (one call each per round) so the machine's changing load hits all "
    "alike. Times are medians of the timed calls; total = the sum of the parts' medians.",
    "x loop: this row's time / the per-expert loop's in the same run, same tokens, dtype and routing "
    "(experts part and total, medians); best: the fastest timed call of the experts part, and its ratio.",
    "GB/s: the bytes the layer must read (router + dense MLP + the distinct experts this routing uses, each "
    "read once) / the total time; % bw of the machine's measured read bandwidth at the same thread count. "
    "Meaningful for decode-sized N; large N is compute-bound (the records also carry GFLOP/s and % of the "
    "matmul peak).",
    "Every experts output was checked against float64 on up to 64 tokens (fp32: 2e-5, bf16: 2e-2 of the "
    "largest expected value); a row that fails is an error.",
]


def markdown(recs: Sequence[dict], title: str = "MoE routing cost") -> str:
    from .regress import markdown_table

    frame = rows_frame(recs)
    if frame.empty:
        return f"# {title}\n\nNo records.\n"
    cell = recs[0]["cell"]
    out = [f"# {title}", "",
           f"{cell['model']}: {cell['layers']} MoE layer(s), hidden {cell['hidden']}, {cell['num_experts']} experts, "
           f"top-{cell['top_k']}, expert width {cell['expert_intermediate']}, dense MLP {cell['dense_intermediate']}; "
           f"random weights (seed {cell['seed']}); device {cell['device']}.", "", "## Environment", ""]
    out += [f"* {line}" for line in environment_lines(recs)]
    load = load_note(recs)
    if load:
        out += [f"* {load}"]
    out += ["", "## Notes", "", *[f"* {n}" for n in NOTES], "", "## Strategies", "",
            markdown_table(strategies_table(recs)), "", "## Timings (ms per call, median)", "",
            markdown_table(main_table(frame)), ""]
    reasons = reasons_table(frame)
    if not reasons.empty:
        out += ["## Unsupported, skipped and failed rows", "", markdown_table(reasons), ""]
    out += ["## Routing statistics", "", markdown_table(routing_table(recs)), "",
            f"![experts time vs tokens]({PLOT_FILE})", ""]
    return "\n".join(out)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f0f0f0}"
        "td:first-child{text-align:left}")


def html(recs: Sequence[dict], png: bytes, title: str = "MoE routing cost") -> str:
    frame = rows_frame(recs)
    esc = html_lib.escape
    tables = [("Strategies", strategies_table(recs)), ("Timings (ms per call, median)", main_table(frame)),
              ("Unsupported, skipped and failed rows", reasons_table(frame)), ("Routing statistics", routing_table(recs))]
    body = [f"<h1>{esc(title)}</h1>", "<h2>Environment</h2><ul>",
            *[f"<li>{esc(line)}</li>" for line in [*environment_lines(recs), load_note(recs)] if line],
            "</ul><h2>Notes</h2><ul>",
            *[f"<li>{esc(n)}</li>" for n in NOTES], "</ul>",
            f'<img alt="experts time vs tokens" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">']
    for heading, table in tables:
        if not table.empty:
            body.append(f"<h2>{esc(heading)}</h2>" + table.to_html(index=False, na_rep="-", float_format=_fmt))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _fmt(value: float) -> str:
    from .regress import fmt

    return fmt(float(value))


def write_report(out: str | os.PathLike) -> list[Path]:
    """report.md, moe-cost.png and report.html in ``out`` from its records."""
    out = Path(out)
    recs = read_records(records.records_path(out))
    if not recs:
        raise RunError(f"{out}: no MoE cost records to report")
    png = plot_png(rows_frame(recs))
    paths = [out / "report.md", out / PLOT_FILE, out / "report.html"]
    write_atomic(paths[0], markdown(recs))
    write_atomic(paths[1], png)
    write_atomic(paths[2], html(recs, png))
    return paths


# ---------------------------------------------------------------- command line


def _csv(kind: Callable, allowed: Sequence | None = None):
    def parse(text: str) -> tuple:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list"
                                             + (f" of {', '.join(map(str, allowed))}" if allowed else ""))
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-harness moe-cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (records.jsonl, machine.json, report)")
    p.add_argument("--tokens", type=_csv(int), default=TOKENS, help="token counts N (default 1,8,64,512,4096)")
    p.add_argument("--dtype", type=_csv(str, list(DTYPES)), default=("bfloat16", "float32"))
    p.add_argument("--routing", type=_csv(str, ROUTINGS), default=ROUTINGS)
    p.add_argument("--strategies", type=_csv(str), default=None, help="default: all of " + ",".join(strategy_names()))
    p.add_argument("--layers", type=int, default=1, help="MoE layers (each its own weights and routing)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--experts", type=int, default=None, help="cut the expert count (quick runs)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max-call-s", type=float, default=5.0, help="dense_all: skip above this predicted s per call")
    p.add_argument("--max-gather-gib", type=float, default=2.0, help="hf_batched_mm: skip above this weight copy")
    p.add_argument("--target-cv", type=float, default=TimingPolicy.target_cv)
    p.add_argument("--max-time-s", type=float, default=TimingPolicy.max_time_s, help="timed seconds per part")
    p.add_argument("--resume", action="store_true", help="skip rows already in OUT/records.jsonl")
    p.add_argument("--report-only", action="store_true", help="render the report from the records, run nothing")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def options(args: argparse.Namespace) -> Options:
    unknown = [s for s in args.strategies or () if s not in strategy_names()]
    if unknown:
        raise RunError(f"unknown strategies {', '.join(unknown)} (known: {', '.join(strategy_names())})")
    return Options(out=args.out, model=args.model, tokens=args.tokens, dtypes=args.dtype, routings=args.routing,
                   strategies=args.strategies, layers=args.layers, threads=args.threads or None, device=args.device,
                   seed=args.seed, num_experts=args.experts, max_call_s=args.max_call_s,
                   max_gather_gib=args.max_gather_gib, resume=args.resume, quiet=args.quiet,
                   timing=TimingPolicy(target_cv=args.target_cv, max_time_s=args.max_time_s))


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or with --report-only just render) and write the report; 1 if any row of the run errored."""
    args = parser().parse_args(argv)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if not args.report_only:
            run(options(args), on_record=lambda r: say(summary_line(r)), progress=say)
        paths = write_report(args.out)
    except (RunError, records.RecordsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say("wrote " + ", ".join(str(p) for p in paths))
    errored = [r for r in read_records(records.records_path(args.out)) if r["status"] == "error"]
    return 1 if errored else 0


if __name__ == "__main__":
    sys.exit(main())
