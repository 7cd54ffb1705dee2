"""Accelerator memory to serve one released Gemma variant, and which GPUs that fits.

A plan adds four terms, each from the reference's spec or from a stated assumption:

* weights: the text decoder's parameters (``harness.bench.cost.model_facts``, counted on the meta device)
  at the weights dtype; int4 adds its group scales. With ``ple_offload`` (Gemma 4 E2B/E4B) the
  per-layer-embedding table ``ple.table.weight`` stays in host memory and is reported apart.
* KV cache: :func:`harness.kvcache.breakdown`'s minimal figure (K=V layers keep their one projection,
  KV-shared layers hold nothing, sliding layers their window); the stored figure (K and V both, as HF
  keeps them) is reported next to it.
* activations: a prefill chunk's working buffers plus one row of fp32 logits per sequence.
* runtime overhead: a fixed amount per card (CUDA context, library workspaces) plus a fraction of the rest.

Every assumption is a field of :class:`Assumptions`, returned with its value and reason in the plan's
``assumptions``. :func:`check_claims` turns the published hardware claims (``harness/data/claims.yaml``)
into verdicts derived from these figures.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import configs

GIB, MIB = 2**30, 2**20
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PLE_TABLE = "ple.table.weight"
COUNTED = ("text decoder only (the configs hold the text model): vision and audio towers and their "
           "projectors are not counted")


class PlanError(ValueError):
    """A plan that cannot be made (unknown model or dtype, context out of range, no PLE to offload):
    the message is one line."""


@dataclass(frozen=True)
class Assumptions:
    """The figures a plan assumes rather than derives; :data:`_WHY` gives each one's reason."""

    int4_group_size: int = 32
    int4_scale_bits: int = 16
    prefill_chunk: int = 2048
    activation_buffers: int = 4
    activation_bytes: int = 2
    logits_bytes: int = 4
    runtime_fixed_gib: float = 1.0
    runtime_fraction: float = 0.05

    def describe(self) -> dict[str, dict]:
        """Each field as ``{"value", "why"}``, then the fixed modelling choices (value as text)."""
        out = {f.name: {"value": getattr(self, f.name), "why": _WHY[f.name]} for f in fields(self)}
        out.update({name: {"value": value, "why": why} for name, (value, why) in _FIXED.items()})
        return out


_WHY = {
    "int4_group_size": "int4 weights carry one scale per group of this many weights (GPTQ/AWQ/Q4_0-style "
                       "group quantization; 32 as llama.cpp Q4_0, GPTQ/AWQ often use 128)",
    "int4_scale_bits": "bits of each int4 group's scale (fp16): 16/32 = +0.5 bit per weight, 4.5 bits in all; "
                       "no zero-point (symmetric)",
    "prefill_chunk": "prompt tokens a prefill step processes at once (chunked prefill, as vLLM and "
                     "llama.cpp do); a shorter context uses its own length",
    "activation_buffers": "live buffers of width max(hidden, MLP intermediate, top_k x expert intermediate) "
                          "per chunk token: residual, normed input, gate and up projections",
    "activation_bytes": "activations in 16-bit (bf16/fp16), whatever the weights' storage dtype",
    "logits_bytes": "one fp32 row of logits (vocab wide) per sequence: only the last token's logits are kept",
    "runtime_fixed_gib": "per card: CUDA context (0.3-0.6 GiB), cuBLAS/attention workspaces and allocator "
                         "pools; each card of a multi-GPU split pays it",
    "runtime_fraction": "allocator fragmentation and rounding on weights + KV + activations",
}
_FIXED = {
    "parameters_counted": ("text decoder only", COUNTED + "; harness.bench.cost.model_facts counts the "
                           "reference's module tree on the meta device"),
    "quantized_parameters": ("all", "every parameter at the weights dtype, embedding and LM head included "
                             "(real int4 checkpoints often keep them in 8 or 16 bit: more than this)"),
    "fp8_int8_scales": ("ignored", "one scale per output channel: under 0.1 % of the weights"),
    "kv_figure": ("minimal", "harness.kvcache.breakdown minimal_bytes: K=V layers keep their one projection, "
                  "KV-shared layers hold nothing, sliding layers their window; stored_bytes is reported too"),
    "kv_quant_scales": ("ignored", "fp8/int8/int4 KV counted at 1/1/0.5 byte per value, as harness.kvcache does"),
    "attention_scores": ("not materialized", "a fused (flash) attention kernel: no chunk x context score matrix"),
    "multi_gpu": ("even split", "cards needed: each card pays runtime_fixed_gib; everything else divides "
                  "evenly (tensor parallel), so the count is a lower bound"),
}


def dtype_name(text: str, table: dict, what: str) -> str:
    """The canonical name of dtype ``text`` (``bf16`` -> ``bfloat16``) in ``table``, or PlanError."""
    name = ALIASES.get(str(text).lower(), str(text).lower())
    if name not in table:
        raise PlanError(f"unknown {what} dtype {text!r}; choose from {', '.join(_choices(table))}")
    return name


def _choices(table: dict) -> list[str]:
    short = {v: k for k, v in ALIASES.items()}
    return [short.get(name, name) for name in table]


def parse_context(text: str | int) -> int:
    """Tokens from ``131072``, ``128k`` or ``4K`` (k = 1024); PlanError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(text))
    if not match:
        raise PlanError(f"context {text!r}: give tokens as a number, or with k (= 1024), e.g. 4k or 128K")
    tokens = int(match.group(1)) * (1024 if match.group(2) else 1)
    if tokens < 1:
        raise PlanError(f"context {text!r}: must be at least 1 token")
    return tokens


def weight_bytes_per_param(dtype: str, a: Assumptions) -> float:
    """Bytes per parameter at ``dtype``; int4 adds ``scale_bits / group_size`` bits of scales."""
    size = WEIGHT_BYTES[dtype]
    if dtype == "int4":
        size += a.int4_scale_bits / a.int4_group_size / 8
    return size


def released(model: str) -> str:
    """``model`` if it names a released variant's config; PlanError for a tiny twin or an unknown name."""
    try:
        data = configs.load(model)
    except KeyError as exc:
        raise PlanError(exc.args[0]) from None
    except configs.ConfigError as exc:
        raise PlanError(f"malformed config {exc}") from None
    if data["tiny_of"] is not None:
        raise PlanError(f"{model} is a tiny test twin; plan a released variant (e.g. {data['tiny_of']})")
    return model


@functools.cache
def _spec(model: str):
    from reference_impl.spec import ModelSpec

    return ModelSpec.from_hf_config(configs.hf_config(model))


@functools.cache
def _counts(model: str) -> tuple[Any, int, int]:
    """The model's spec, its parameter count and its PLE table's (0 without one); built once per model."""
    from .bench.cost import _parameters, model_facts

    spec = _spec(model)
    shapes = _parameters(spec)
    ple = shapes[PLE_TABLE].numel() if PLE_TABLE in shapes else 0
    return spec, int(model_facts(spec)["params"]), int(ple)


def _published(model: str, counted: int) -> dict:
    """The config's published text-decoder total and whether the count is within its tolerance."""
    pub = configs.load(model)["published_params"]
    tolerance = pub["tolerance"].get("total", 0)
    return {"total": pub["total"], "tolerance": tolerance, "difference": counted - pub["total"],
            "matches": abs(counted - pub["total"]) <= tolerance, "scope": pub["scope"]}


def activation_bytes(spec, context: int, batch: int, a: Assumptions) -> float:
    """A prefill chunk's buffers (batch x chunk tokens x widest layer width x buffers) plus the logits row."""
    width = spec.hidden_size
    for layer in spec.layers:
        width = max(width, layer.intermediate_size)
        if layer.moe is not None:
            width = max(width, layer.moe.top_k * layer.moe.intermediate_size)
    chunk = min(context, a.prefill_chunk)
    return (batch * chunk * width * a.activation_buffers * a.activation_bytes
            + batch * spec.vocab_size * a.logits_bytes)


def _context_checked(spec, model: str, context: int) -> int:
    longest = spec.max_position_embeddings
    if not 1 <= context <= longest:
        raise PlanError(f"context {context:,}: {model} takes 1 to {longest:,} tokens")
    return context


def plan(model: str, weights: str = "bf16", kv: str = "bf16", context: int | str = 4096, batch: int = 1,
         ple_offload: bool = False, assumptions: Assumptions | None = None) -> dict:
    """Bytes to serve ``model`` with ``weights``-dtype parameters and a ``kv``-dtype cache holding
    ``context`` tokens for each of ``batch`` sequences: ``breakdown`` (every term), ``total_bytes`` (on
    the accelerator, minimal KV), ``total_stored_kv_bytes`` (the same with stored KV), the parameter
    counts against the published ones, and the ``assumptions``."""
    from .kvcache import DTYPE_BYTES, breakdown

    a = assumptions or Assumptions()
    weights, kv = dtype_name(weights, WEIGHT_BYTES, "weights"), dtype_name(kv, DTYPE_BYTES, "KV")
    spec = _spec(released(model))
    if ple_offload and spec.ple is None:
        raise PlanError(f"--ple-offload: {model} has no per-layer-embedding table (only Gemma 4 E2B/E4B do)")
    if batch < 1:
        raise PlanError(f"batch {batch}: must be at least 1")
    context = _context_checked(spec, model, parse_context(context))
    spec, params, ple = _counts(model)
    per_param = weight_bytes_per_param(weights, a)
    host = ple if ple_offload else 0
    cache = breakdown(spec, context, batch, kv)
    terms = {"weights_bytes": (params - host) * per_param, "ple_host_bytes": host * per_param,
             "kv_minimal_bytes": cache["minimal_bytes"], "kv_stored_bytes": cache["stored_bytes"],
             "activation_bytes": activation_bytes(spec, context, batch, a)}
    fixed, rest = a.runtime_fixed_gib * GIB, terms["weights_bytes"] + terms["activation_bytes"]

    def total(kv_bytes: float) -> float:  # weights + KV + activations, plus the overhead on them
        return (rest + kv_bytes) * (1 + a.runtime_fraction) + fixed

    terms["overhead_bytes"] = (rest + cache["minimal_bytes"]) * a.runtime_fraction + fixed
    return {"model": model, "weights": weights, "kv": kv, "context": context, "batch": batch,
            "ple_offload": ple_offload, "bytes_per_param": per_param,
            "params": {"total": params, "on_accelerator": params - host, "on_host": host,
                       "ple_table": ple, "counted": COUNTED, "published": _published(model, params)},
            "breakdown": terms, "total_bytes": total(cache["minimal_bytes"]),
            "total_stored_kv_bytes": total(cache["stored_bytes"]), "fixed_overhead_bytes": fixed,
            "kv_by_layer_type": cache["by_layer_type"], "assumptions": a.describe()}


# --- GPUs -------------------------------------------------------------------------------------------


@functools.cache
def load_gpus(path: str | None = None) -> dict[str, dict]:
    """The cards of ``harness/data/gpus.yaml`` (or ``path``) by key, each with ``usable_bytes``
    (memory.total as nvidia-smi reports it, in MiB, x 2^20)."""
    text = Path(path).read_text() if path else resources.files("harness").joinpath("data/gpus.yaml").read_text()
    cards = yaml.safe_load(text)["gpus"]
    return {key: {**card, "key": key, "usable_bytes": card["mib"] * MIB} for key, card in cards.items()}


def gpu(key: str, gpus: dict[str, dict] | None = None) -> dict:
    """The card ``key`` (case-insensitive), or PlanError naming the choices."""
    gpus = gpus or load_gpus()
    card = gpus.get(str(key).lower())
    if card is None:
        raise PlanError(f"unknown device {key!r}; choose from {', '.join(gpus)}")
    return card


def cards_needed(total: float, fixed: float, usable: float) -> int | float:
    """Fewest cards of ``usable`` bytes that hold ``total``: each pays ``fixed``, the rest splits evenly
    (``math.inf`` when a card cannot even hold ``fixed``)."""
    if usable <= fixed:
        return math.inf
    return max(1, math.ceil((total - fixed) / (usable - fixed)))


def verdict(result: dict, card: dict, count: int = 1, kv: str = "minimal") -> dict:
    """Whether the plan ``result`` fits ``count`` of ``card`` (KV ``minimal`` or ``stored``): the
    headroom on one card (negative: short by), and how many such cards it needs."""
    total = result["total_bytes" if kv == "minimal" else "total_stored_kv_bytes"]
    fixed, usable = result["fixed_overhead_bytes"], card["usable_bytes"]
    needed = cards_needed(total, fixed, usable)
    return {"gpu": card["key"], "name": card["name"], "usable_bytes": usable, "count": count,
            "fits": needed <= count, "headroom_bytes": usable - total,
            "cards_needed": None if needed == math.inf else needed}


def verdicts(result: dict, gpus: dict[str, dict] | None = None) -> list[dict]:
    """One :func:`verdict` per card, largest card first."""
    cards = sorted((gpus or load_gpus()).values(), key=lambda c: -c["usable_bytes"])
    return [verdict(result, card) for card in cards]


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def describe(result: dict) -> list[str]:
    """The plan as printable lines: each term, the total, then the assumptions."""
    r, b = result, result["breakdown"]
    per = f"{r['bytes_per_param']:g} B/param"
    lines = [f"{r['model']}: weights {r['weights']}, KV {r['kv']}, context {r['context']:,} tokens, batch {r['batch']}"
             + (", PLE table offloaded to the host" if r["ple_offload"] else ""),
             f"  weights on the accelerator {gib(b['weights_bytes']):>14}  "
             f"({r['params']['on_accelerator']:,} params x {per}; text decoder only)"]
    if r["ple_offload"]:
        lines.append(f"  PLE table in host memory   {gib(b['ple_host_bytes']):>14}  "
                     f"({r['params']['on_host']:,} params of {PLE_TABLE}; not in the total)")
    lines += [f"  KV cache, minimal          {gib(b['kv_minimal_bytes']):>14}  "
              f"(stored, K and V both as HF keeps them: {gib(b['kv_stored_bytes'])})",
              f"  activations                {gib(b['activation_bytes']):>14}",
              f"  runtime overhead           {gib(b['overhead_bytes']):>14}",
              f"  total on the accelerator   {gib(r['total_bytes']):>14}  "
              f"(with stored KV: {gib(r['total_stored_kv_bytes'])})",
              "assumptions:"]
    lines += [f"  {name} = {item['value']}: {item['why']}" for name, item in r["assumptions"].items()]
    return lines


def verdict_lines(rows: list[dict]) -> list[str]:
    """Verdict rows as a table: card, usable memory, fits, headroom, cards needed."""
    out = [f"  {'card':<26} {'usable':>11}  {'verdict':<12} {'headroom':>12}  cards needed"]
    for v in rows:
        word = "fits" if v["fits"] else "does not fit"
        out.append(f"  {v['name']:<26} {gib(v['usable_bytes']):>11}  {word:<12} "
                   f"{gib(v['headroom_bytes']):>12}  {v['cards_needed'] or '-'}")
    return out


# --- published claims ---------------------------------------------------------------------------------


@functools.cache
def load_claims(path: str | None = None) -> tuple[dict, ...]:
    """The claims of ``harness/data/claims.yaml`` (or ``path``), in file order."""
    text = Path(path).read_text() if path else resources.files("harness").joinpath("data/claims.yaml").read_text()
    return tuple(yaml.safe_load(text)["claims"])


# The overhead a verdict is re-derived under, to show which verdicts hang on the overhead assumption.
SENSITIVITY = {"low": {"runtime_fixed_gib": 0.5, "runtime_fraction": 0.0},
               "high": {"runtime_fixed_gib": 1.5, "runtime_fraction": 0.10}}


def _budget(claim: dict, gpus: dict[str, dict]) -> tuple[float, int, str]:
    """The claim's memory: (bytes of one card or the stated budget, card count, label)."""
    hw = claim["hardware"]
    if "gpu" in hw:
        card = gpu(hw["gpu"], gpus)
        count = hw.get("count", 1)
        return card["usable_bytes"], count, (f"{count}x " if count > 1 else "") + card["name"]
    return hw["budget_gb"] * 1e9, 1, f"{hw['budget_gb']:g} GB ({hw.get('kind', 'memory')})"


def _fits(result: dict, usable: float, count: int, kv: str = "minimal") -> bool:
    total = result["total_bytes" if kv == "minimal" else "total_stored_kv_bytes"]
    return cards_needed(total, result["fixed_overhead_bytes"], usable) <= count


def _plan_claim(claim: dict, a: Assumptions, ple_offload: bool = False) -> dict:
    return plan(claim["model"], claim["weights"], claim["kv"], claim["context"], claim.get("batch", 1),
                ple_offload=ple_offload, assumptions=a)


def _judge(result: dict, offloaded: dict | None, usable: float, count: int) -> str:
    """The verdict, from the figures: holds (overstated when fewer cards do) / holds only with minimal KV /
    holds only with PLE offload / does not hold."""
    if _fits(result, usable, count):
        needed = cards_needed(result["total_bytes"], result["fixed_overhead_bytes"], usable)
        if needed < count:
            return f"holds, overstated ({needed} card{'s suffice' if needed > 1 else ' suffices'})"
        return "holds" if _fits(result, usable, count, "stored") else "holds only with minimal KV"
    if offloaded is not None and _fits(offloaded, usable, count):
        return "holds only with PLE offload"
    return "does not hold"


def _assess(claim: dict, a: Assumptions, usable: float, count: int) -> tuple[dict, dict | None, str]:
    """The claim's plan, its plan with the PLE table offloaded (PLE models only), and the verdict."""
    result = _plan_claim(claim, a)
    offloaded = _plan_claim(claim, a, ple_offload=True) if _spec(claim["model"]).ple is not None else None
    return result, offloaded, _judge(result, offloaded, usable, count)


def _why(result: dict, offloaded: dict | None, usable: float, count: int, label: str) -> str:
    """One line of figures behind a verdict: the terms, the total and the memory it is set against."""
    b = result["breakdown"]
    line = (f"weights {gib(b['weights_bytes'])} + KV {gib(b['kv_minimal_bytes'])} (minimal; stored "
            f"{gib(b['kv_stored_bytes'])}) + activations {gib(b['activation_bytes'])} + overhead "
            f"{gib(b['overhead_bytes'])} = {gib(result['total_bytes'])} vs {label}: "
            f"{gib(usable)}" + (f" each, {gib(usable * count)} in all" if count > 1 else ""))
    needed = cards_needed(result["total_bytes"], result["fixed_overhead_bytes"], usable)
    if needed == 1:
        line += f"; {gib(usable - result['total_bytes'])} spare" + (" on one card" if count > 1 else "")
    elif needed != math.inf:
        line += f"; needs {needed} such cards"
    if offloaded is not None:
        line += (f"; with the PLE table on the host ({gib(offloaded['breakdown']['ple_host_bytes'])}): "
                 f"{gib(offloaded['total_bytes'])}")
    return line


def check_claim(claim: dict, gpus: dict[str, dict] | None = None, a: Assumptions | None = None) -> dict:
    """One claim judged: the computed total, the memory it names, the verdict, a line of why, and the
    verdicts at low and high overhead (:data:`SENSITIVITY`; the claim's own overrides win)."""
    out = {k: claim.get(k) for k in ("id", "source", "line", "quote", "model", "weights", "kv", "context",
                                      "assumed", "claimed", "table", "overrides")}
    if not claim.get("checkable", True):
        return {**out, "verdict": f"not checkable: {claim['why_not']}", "checkable": False}
    a, gpus, overrides = a or Assumptions(), gpus or load_gpus(), claim.get("overrides") or {}
    usable, count, label = _budget(claim, gpus)
    result, offloaded, word = _assess(claim, replace(a, **overrides), usable, count)
    spread = {name: _assess(claim, replace(a, **{**change, **overrides}), usable, count)[2]
              for name, change in SENSITIVITY.items()}
    out.update({"checkable": True, "hardware": label, "usable_bytes": usable, "count": count,
                "total_bytes": result["total_bytes"], "total_stored_kv_bytes": result["total_stored_kv_bytes"],
                "ple_offload_total_bytes": offloaded["total_bytes"] if offloaded else None,
                "breakdown": result["breakdown"], "verdict": word, "overhead_sensitivity": spread,
                "robust": set(spread.values()) == {word}, "why": _why(result, offloaded, usable, count, label)})
    also = claim["hardware"].get("also_check")
    if also:
        card = gpu(also, gpus)
        out["also"] = {"hardware": card["name"], "usable_bytes": card["usable_bytes"],
                       "verdict": _judge(result, offloaded, card["usable_bytes"], 1)}
    return out


def environment() -> dict:
    """What produced a claims report: harness version (package + source hash) and git commit."""
    from . import __version__, version_string
    from .bench.context import git_revision

    return {"harness_version": __version__, "harness": version_string(),
            "git_commit": git_revision() or "unknown (no git)"}


def check_claims(claims: tuple[dict, ...] | list[dict] | None = None, gpus: dict[str, dict] | None = None,
                 a: Assumptions | None = None) -> dict:
    """Every claim judged (:func:`check_claim`), with the environment, the assumptions and the cards used."""
    a = a or Assumptions()
    rows = [check_claim(c, gpus, a) for c in (load_claims() if claims is None else claims)]
    return {"environment": environment(), "assumptions": a.describe(), "assumption_values": asdict(a),
            "claims": rows}


def _sensitive(row: dict) -> str:
    """'' for a verdict that stands at low and high overhead; else which overhead changes it, and to what."""
    if row["robust"]:
        return ""
    return " (" + "; ".join(f"{name} overhead: {word}" for name, word in row["overhead_sensitivity"].items()
                            if word != row["verdict"]) + ")"


def _cell(row: dict) -> str:
    if not row["checkable"]:
        return f"{row['claimed']} — {row['verdict']}"
    memory = row["usable_bytes"] * row["count"]
    return (f"{row['claimed']} — computed {row['total_bytes'] / GIB:.1f} of {memory / GIB:.1f} GiB — "
            f"{row['verdict']}{_sensitive(row)}")


def seed_table(rows: list[dict]) -> list[str]:
    """The claims that sit in a seed's table, laid out as it is (rows = configuration, columns = models)."""
    cells = [r for r in rows if r.get("table")]
    configs_, models = [], []
    for r in cells:
        configs_ += [r["table"]["row"]] if r["table"]["row"] not in configs_ else []
        models += [r["table"]["column"]] if r["table"]["column"] not in models else []
    at = {(r["table"]["row"], r["table"]["column"]): _cell(r) for r in cells}
    out = ["| Configuration | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    out += [f"| {c} | " + " | ".join(at.get((c, m), "") for m in models) + " |" for c in configs_]
    return out


def claims_markdown(report: dict) -> str:
    """The claims report as Markdown: the seed's table regenerated, one line per claim, assumptions."""
    env, rows = report["environment"], report["claims"]
    out = ["# What hardware do the published Gemma claims need? (regenerated)", "",
           f"Generated by `gemma-harness plan --claims`; harness {env['harness']} "
           f"(package {env['harness_version']}), git commit {env['git_commit']}.", "",
           "Each published claim (transcribed in `harness/data/claims.yaml` from `shared/seeds/`) is set "
           "against the memory `harness.planner` computes: weights + KV cache (**minimal** figure: K=V layers "
           "keep one projection, KV-shared layers nothing) + activations + runtime overhead, batch 1. "
           "Card memory is what nvidia-smi reports (`harness/data/gpus.yaml`). Verdicts are derived from "
           "these figures, not written by hand.", "",
           "## The seed's hardware table (003_a24b8ff7db1969b8.txt), regenerated", ""]
    out += seed_table(rows)
    counts: dict[str, int] = {}
    for r in rows:
        word = r["verdict"].split(" (")[0] if r["checkable"] else "not checkable"
        counts[word] = counts.get(word, 0) + 1
    shaky = [r["id"] for r in rows if r["checkable"] and not r["robust"]]
    out += ["", f"{len(rows)} claims: " + "; ".join(f"{n} {word}" for word, n in counts.items()) + ". "
            f"Verdicts that change when the runtime overhead is taken low or high ({_ranges()}): "
            + (", ".join(shaky) if shaky else "none") + ".",
            "", "## Every claim", "",
            "| source | model | weights / KV / context | claimed | memory | computed | verdict | why |",
            "|---|---|---|---|---|---|---|---|"]
    out += [_claim_row(r) for r in rows]
    out += ["", "## Assumptions", ""]
    out += [f"- `{name}` = {item['value']}: {item['why']}" for name, item in report["assumptions"].items()]
    out += [f"- overhead sensitivity: each verdict is re-derived at {_ranges()}; a verdict that changes is "
            "marked in the tables", "- claim-specific readings (context, precision, card) are listed with "
            "each claim as *assumed*; `overrides` change a planner assumption for one claim"]
    return "\n".join(out) + "\n"


def _ranges() -> str:
    return " and ".join(f"{name}: {c['runtime_fixed_gib']:g} GiB + {c['runtime_fraction']:.0%}"
                        for name, c in SENSITIVITY.items())


def _claim_row(r: dict) -> str:
    where = f"{r['source']}:{r['line']}"
    if not r["checkable"]:
        return f"| {where} | {r['model'] or '—'} | — | {r['claimed']} | — | — | {r['verdict']} | — |"
    setting = f"{r['weights']} / {r['kv']} / {r['context']:,}"
    assumed = f" (assumed: {'; '.join(r['assumed'])})" if r.get("assumed") else ""
    also = f"; on {r['also']['hardware']}: {r['also']['verdict']}" if r.get("also") else ""
    memory = gib(r["usable_bytes"]) + (f" x {r['count']}" if r["count"] > 1 else "")
    return (f"| {where} | {r['model']} | {setting}{assumed} | {r['claimed']} | {memory} | {gib(r['total_bytes'])} | "
            f"**{r['verdict']}**{_sensitive(r)}{also} | {r['why']} |")
