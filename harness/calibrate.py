"""Measure what the tolerance policy rests on: the spread between *correct* implementations, and the
size of known bugs, probe kind by probe kind.

Correct pairs, judged exactly as the gate judges a candidate (each probe on the candidate's own
values, so a sublayer's figure is its own rounding, not the drift of everything before it; a MoE
expert choice flipped on a near-tie reroutes the reference as the candidate):

* ``dtype-vs-float64``: the reference in the gate dtype vs the reference in float64 — the rounding a
  port in that dtype cannot avoid;
* ``eager-vs-sdpa``: the reference (bit-identical to HF eager) vs HF with torch SDPA attention (Gemma
  2 has no SDPA path in HF, so it is skipped there) — a legitimate kernel difference a port may have.

Over every tiny twin, several seeds, and configs drawn by the property suites' strategies; weights
conditioned as the gate conditions them (:func:`harness.synthetic.conditioning_for`). Bugs: the
mutation suites' mutants (``--mutants MODULE``), each run through the gate, with the metrics at the
probe it must be caught at.

:func:`margins` sets the figures against :mod:`harness.tolerance`: every limit must be at least 3x
the worst correct spread, and every bug that is meant to be caught in a dtype must exceed its limit
at least 3x on some gated metric. ``gemma-harness calibrate --json reports/calibration.json`` writes
what ``tests/test_tolerance.py`` checks.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Iterable, Sequence

import torch

import configs
from reference_impl.spec import ModelSpec

from .adapters.hf import hf_adapter
from .adapters.reference import ReferenceAdapter
from .gate import compare_implementations, conform
from .probes import locate
from .synthetic import conditioning_for, make_batch, random_state_dict
from .tolerance import Tolerance, tolerance_for

GATED = ("max_rel", "rel_rms", "kl_max", "probs_max_abs", "flip_max_margin")  # the last two: routers
MARGIN = 3.0  # limit >= 3x the worst correct spread; a caught bug >= 3x its limit


class _Reference64(ReferenceAdapter):
    name = "reference-float64"

    def load(self, hf_config, state_dict, dtype):
        super().load(hf_config, state_dict, torch.float64)


def _unbounded(dtype: str, family: str | None = None) -> Tolerance:
    """No limits, but the policy's near-tie rule for MoE routing, so flips are judged as the gate does."""
    inf = float("inf")
    return Tolerance("calibration", {"max_rel": inf, "rel_rms": inf, "kl_max": inf},
                     router_margin=tolerance_for(dtype, family).router_margin, router_probs=inf)


def _pairs(spec: ModelSpec):
    yield "dtype-vs-float64", _Reference64()
    # HF has no SDPA path for Gemma 2, nor for Gemma 4's audio tower (a model holding one refuses sdpa)
    if spec.family != "gemma2" and getattr(spec.multimodal, "audio", None) is None:
        yield "eager-vs-sdpa", hf_adapter(attn="sdpa")


def group(family: str) -> str:
    """The tolerance policy's model groups."""
    return "gemma4" if family == "gemma4_text" else "gemma1-3"


def drawn_configs(n: int) -> list[dict]:
    """``n`` configs drawn by the property suites' strategies (every generation), the same on every run."""
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings

    from suites import strategies

    out: list[dict] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategies.any_config())
    def collect(cfg):
        out.append(cfg)

    collect()
    return out[:n]


def _sources(models: Sequence[str] | None, drawn: int) -> list[tuple[str, dict]]:
    named = [(m, configs.hf_config(m)) for m in (models if models is not None else configs.names(tiny=True))]
    return named + [(f"drawn-{i}", cfg) for i, cfg in enumerate(drawn_configs(drawn))]


def measure(models: Sequence[str] | None = None, dtypes: Iterable[str] = ("float32", "bfloat16"),
            seeds: Iterable[int] = (0,), drawn: int = 0, progress=None) -> list[dict]:
    """One row per (source, seed, dtype, pair, probe kind, isolated): the worst of each gated metric over
    that kind's probes (and the drift of the stream before it, not gated), and the probe it was at.
    Single-threaded, so the figures are the same on every run (and machine of the same kind).
    ``progress``: a tqdm-like bar, told the number of pairs to run and advanced after each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(models, tuple(dtypes), tuple(seeds), drawn, progress)
    finally:
        torch.set_num_threads(threads)


def _measure(models, dtypes, seeds, drawn, progress) -> list[dict]:
    sources = [(source, hf_config, ModelSpec.from_hf_config(hf_config)) for source, hf_config in _sources(models, drawn)]
    if progress is not None:
        progress.total = len(seeds) * len(dtypes) * sum(len(list(_pairs(spec))) for *_, spec in sources)
        progress.refresh()
    rows = []
    for source, hf_config, spec in sources:
        for seed in seeds:
            batch = make_batch(spec, seed)
            for dtype in dtypes:
                state = random_state_dict(spec, seed, conditioning_for(dtype))
                for pair, candidate in _pairs(spec):
                    result = compare_implementations(source, hf_config, state, batch, candidate=candidate,
                                                     dtype=dtype, tol=_unbounded(dtype, spec.family), seed=seed)
                    if result.error:
                        raise RuntimeError(f"calibration pair {pair} on {source} [{dtype}]: {result.error}")
                    rows += _worst_per_kind(result, {"source": source, "group": group(spec.family), "seed": seed,
                                                     "dtype": dtype, "pair": pair})
                    if progress is not None:
                        progress.update()
    return rows


def _worst_per_kind(result, base: dict) -> list[dict]:
    worst: dict[tuple[str, bool], dict] = {}
    for p in result.probes:
        if "max_rel" not in p.metrics:
            continue
        row = worst.setdefault((p.sublayer, p.isolated), {**base, "kind": p.sublayer, "isolated": p.isolated})
        for key in (*GATED, "drift_max_rel", "drift_rel_rms"):
            if key in p.metrics and p.metrics[key] >= row.get(key, -1.0):
                row[key] = p.metrics[key]
                if key == "max_rel":
                    row["at"] = p.name
    return list(worst.values())


def mutants(module_names: Iterable[str], dtypes: Iterable[str] = ("float32", "bfloat16")) -> list[dict]:
    """Each mutant of the given modules (their ``MUTANTS`` and ``BF16_ONLY``) through the gate: the first
    divergence and the metrics at the probe it must be caught at (its ``EXPECTED``)."""
    if os.getcwd() not in sys.path:  # the mutation suites live in the checkout's tests/
        sys.path.insert(0, os.getcwd())
    rows = []
    for name in module_names:
        module = importlib.import_module(name)
        for cls in [*getattr(module, "MUTANTS", []), *getattr(module, "BF16_ONLY", [])]:
            only_bf16 = cls in getattr(module, "BF16_ONLY", [])
            for dtype in dtypes:
                if only_bf16 and dtype != "bfloat16":
                    continue
                result = conform(cls.MODEL, candidate=cls, dtype=dtype)
                expected = next((p for p in result.probes if p.name == cls.EXPECTED), None)
                first = result.first_divergence
                rows.append({
                    "mutant": f"{name}:{cls.__name__}", "model": cls.MODEL, "dtype": dtype,
                    "group": group(ModelSpec.from_hf_config(configs.hf_config(cls.MODEL)).family),
                    "expected": cls.EXPECTED, "meant_to_catch": dtype == "float32" or only_bf16 or bool(cls.BF16),
                    "first_divergence": first.name if first else None, "error": result.error,
                    "isolated": bool(expected and expected.isolated),
                    "metrics": {k: v for k, v in (expected.metrics if expected else {}).items() if k in GATED},
                })
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, str, str, bool], dict]:
    """(dtype, group, probe kind, isolated) -> worst value of each gated metric, with where."""
    out: dict[tuple, dict] = {}
    for row in rows:
        agg = out.setdefault((row["dtype"], row["group"], row["kind"], row["isolated"]), {})
        for key in GATED:
            if key in row and row[key] >= agg.get(key, (-1.0, ""))[0]:
                agg[key] = (row[key], f"{row['source']} seed {row['seed']} {row['pair']} {row.get('at', '')}".strip())
        # a probe judged against the stream carries the stream's drift: what a non-isolated limit must cover
        for key in ("max_rel", "rel_rms"):
            drift = row.get(f"drift_{key}")
            if drift is not None:
                stream = out.setdefault((row["dtype"], row["group"], row["kind"], False), {})
                if drift >= stream.get(key, (-1.0, ""))[0]:
                    stream[key] = (drift, f"{row['source']} seed {row['seed']} {row['pair']} (drift)")
    return out


def _policy(dtype: str, group_name: str) -> Tolerance:
    return tolerance_for(dtype, "gemma4_text" if group_name == "gemma4" else "gemma")


def _limit(tol: Tolerance, kind: str, isolated: bool, metric: str) -> float | None:
    if metric == "probs_max_abs":
        return tol.router_probs
    if metric == "flip_max_margin":
        return tol.router_margin
    probe = "logits" if kind == "logits" else (kind if kind in ("embed", "final_norm", "final_norm_input")
                                               else f"layers.0.{kind}")
    return tol.for_probe(probe, isolated).get(metric)


def _not_a_recipe(row: dict) -> bool:
    """The bf16 embedding is a lookup and one multiply by the normalizer rounded to bf16: there is one
    right answer, so the embed limit is a recipe check (it catches an unrounded normalizer), and a
    float64 embedding, which is no bf16 recipe at all, is not a correct spread it must cover. The same for an
    image-text model's ``merge`` (a scatter of the soft tokens into the embedded text)."""
    return row["kind"] in ("embed", "merge") and row["dtype"] == "bfloat16" and row["pair"] == "dtype-vs-float64"


def margins(rows: list[dict], mutant_rows: list[dict]) -> list[dict]:
    """Every (limit, measured spread) and (caught bug, limit) pair with its ratio; ``ok`` when the ratio is
    at least :data:`MARGIN`. The embed probe's bf16 limit is a recipe check, not a noise bound: it is
    held to correct bf16 recipes only (see :func:`_not_a_recipe`)."""
    checks = []
    for (dtype, group_name, kind, isolated), agg in sorted(summarise([r for r in rows if not _not_a_recipe(r)]).items()):
        tol = _policy(dtype, group_name)
        for metric, (spread, where) in agg.items():
            limit = _limit(tol, kind, isolated, metric)
            if limit is None or math.isinf(limit):
                continue
            ratio = limit / spread if spread > 0 else math.inf
            checks.append({"check": "noise", "dtype": dtype, "group": group_name, "kind": kind, "isolated": isolated,
                           "metric": metric, "limit": limit, "value": spread, "ratio": ratio, "at": where,
                           "ok": ratio >= MARGIN})
    for row in mutant_rows:
        if not row["meant_to_catch"]:
            continue
        tol = _policy(row["dtype"], row["group"])
        kind = locate(row["expected"])[1]
        ratios = {m: v / lim for m, v in row["metrics"].items()
                  if (lim := _limit(tol, kind, row["isolated"], m)) and not math.isinf(lim)}
        metric = max(ratios, key=ratios.get, default=None)
        checks.append({"check": "bug", "dtype": row["dtype"], "group": row["group"], "kind": kind,
                       "isolated": row["isolated"], "metric": metric, "mutant": row["mutant"],
                       "limit": _limit(tol, kind, row["isolated"], metric) if metric else None,
                       "value": row["metrics"].get(metric), "ratio": ratios.get(metric, 0.0),
                       "ok": ratios.get(metric, 0.0) >= MARGIN and row["first_divergence"] == row["expected"]})
    return checks


def settings(seeds, drawn: int, models, mutant_modules) -> dict:
    """What a calibration ran over, and the weight conditioning of each dtype."""
    from dataclasses import asdict

    from .synthetic import BITE, TRAINED

    return {"seeds": list(seeds), "drawn": drawn, "models": list(models) if models else "every tiny twin",
            "mutants": list(mutant_modules), "conditioning": {"float32": asdict(BITE), "bfloat16": asdict(TRAINED)}}


def describe(check: dict) -> str:
    """One margin check in a line."""
    what = check.get("mutant") or f"correct spread at {check.get('at', '')}"
    return (f"{check['check']} {check['dtype']} {check['group']} {check['kind']} "
            f"({'alone' if check['isolated'] else 'vs stream'}) {check['metric']}: limit {check['limit']}, measured "
            f"{check['value']}, ratio {check['ratio']:.3g} ({what})")


def markdown(rows: list[dict], mutant_rows: list[dict], environment: dict) -> str:
    """The calibration as a report: the worst spread per probe kind, and every margin check."""
    out = ["# Tolerance calibration", "",
           "Generated by `gemma-harness calibrate`; the basis of `harness/tolerance.py` (checked by "
           "`tests/test_tolerance.py`).", "",
           "Environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()), "",
           f"A limit must be at least {MARGIN:g}x the worst spread between correct implementations; a bug meant to "
           f"be caught must exceed its limit at least {MARGIN:g}x on some gated metric.", "",
           "| check | dtype | models | probe kind | judged | metric | limit | measured | ratio | where |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in margins(rows, mutant_rows):
        where = c.get("mutant") or c.get("at", "")
        judged = "alone" if c["isolated"] else "vs stream"
        mark = "" if c["ok"] else " **below**"
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        limit = "-" if c["limit"] is None else f"{c['limit']:.3g}"
        out.append(f"| {c['check']} | {c['dtype']} | {c['group']} | {c['kind']} | {judged} | {c['metric']} | "
                   f"{limit} | {value} | {c['ratio']:.3g}{mark} | {where} |")
    return "\n".join(out) + "\n"
