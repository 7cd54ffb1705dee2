"""Audit the architecture claims of the seed documents against configs/.

Each claim of ``harness/data/seed_claims.yaml`` (a quote from one of the published write-ups in
``shared/seeds/``) names a field and a claimed value; one small function per field reads the actual
value from the model's config / :class:`ModelSpec`, and each (claim, model) pair gets a verdict:
``holds``, ``contradicted`` (with the actual value) or ``not checkable`` (with why). The report is an
audit of documents, not a gate: ``main`` exits 0 whatever the verdicts.

    python -m harness.seed_audit --md reports/seed-claims.md --json reports/seed-claims.json
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import configs
from harness.atomic import write_atomic
from reference_impl.spec import GLOBAL, SLIDING, ModelSpec

HOLDS, CONTRADICTED, NOT_CHECKABLE = "holds", "contradicted", "not checkable"


class NotCheckable(Exception):
    """A field that does not apply to this model (e.g. num_experts of a dense model)."""


@functools.cache
def spec_of(model: str) -> ModelSpec:
    return ModelSpec.from_hf_config(configs.hf_config(model))


@functools.cache
def raw_of(model: str) -> dict:
    return json.loads((configs.CONFIG_DIR / f"{model}.json").read_text())


@functools.cache
def _params(model: str) -> dict:
    from harness.bench.cost import model_facts  # torch: imported only when a parameter count is asked for

    return model_facts(spec_of(model))


def _uniform(values: list, what: str) -> Any:
    distinct = sorted(set(values), key=str)
    if len(distinct) != 1:
        raise NotCheckable(f"{what} differs across layers: {distinct}")
    return distinct[0]


def _of_type(spec: ModelSpec, kind) -> list:
    layers = [layer for layer in spec.layers if layer.attention == kind]
    if not layers:
        raise NotCheckable(f"no {kind} layers")
    return layers


def _per_type(spec: ModelSpec, attr: str) -> Any:
    """One value if every layer agrees, else 'sliding X / global Y' (which a scalar claim contradicts)."""
    values = {layer.attention.value: getattr(layer, attr) for layer in spec.layers}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return " / ".join(f"{kind} {values[kind]}" for kind in ("sliding", "global") if kind in values)


def _pattern(spec: ModelSpec) -> str:
    """'N:1' when every run of sliding layers closed by a global layer has length N (a trailing partial
    run is allowed); '0:1' for all-global models."""
    runs, run = [], 0
    for layer in spec.layers:
        if layer.attention == GLOBAL:
            runs.append(run)
            run = 0
        else:
            run += 1
    if not runs:
        return "no global layers"
    distinct = sorted(set(runs))
    return f"{distinct[0]}:1" if len(distinct) == 1 else "irregular " + ",".join(map(str, runs))


def _sliding_parity(spec: ModelSpec) -> str:
    parities = {layer.index % 2 for layer in _of_type(spec, SLIDING)}
    return {0: "even", 1: "odd"}[parities.pop()] if len(parities) == 1 else "both"


def _k_eq_v(spec: ModelSpec) -> str:
    kinds = {layer.attention.value for layer in spec.layers if layer.k_eq_v}
    if not kinds:
        return "none"
    return "all" if len(kinds) == 2 else kinds.pop()


def _moe(spec: ModelSpec):
    moe = next((layer.moe for layer in spec.layers if layer.moe is not None), None)
    if moe is None:
        raise NotCheckable("dense model: no MoE block")
    return moe


def _ple(spec: ModelSpec):
    if spec.ple is None:
        raise NotCheckable("no per-layer embeddings")
    return spec.ple


def _ple_numel(spec: ModelSpec) -> int:
    return 0 if spec.ple is None else spec.ple.vocab_size * spec.ple.dim * spec.num_layers


def _embedding(spec: ModelSpec) -> int:
    return spec.vocab_size * spec.hidden_size


def _towers(model: str) -> int:
    published = raw_of(model).get("published_params") or {}
    towers = published.get("towers") or {}
    return sum(towers[name] for name in published.get("published_total_includes_towers", []))


def _shared_mlp_ratio(spec: ModelSpec) -> float:
    shared = [layer.intermediate_size for layer in spec.layers if not layer.has_kv]
    own = [layer.intermediate_size for layer in spec.layers if layer.has_kv]
    if not shared:
        raise NotCheckable("no KV-shared layers")
    return _uniform(shared, "shared-layer MLP") / _uniform(own, "MLP")


def _fits_inside(model: str, spec: ModelSpec) -> str:
    """The name of the claimed parent is not known here; returns the shape the check compares."""
    return f"{spec.num_layers} layers x {spec.hidden_size}"


# field -> function(model, spec) -> actual value. Each reads one thing; NotCheckable where it does not apply.
FIELDS: dict[str, Callable[[str, ModelSpec], Any]] = {
    "num_layers": lambda m, s: s.num_layers,
    "num_heads": lambda m, s: _uniform([layer.num_heads for layer in s.layers], "num_heads"),
    "num_kv_heads": lambda m, s: _per_type(s, "num_kv_heads"),
    "num_kv_heads_local": lambda m, s: _uniform([la.num_kv_heads for la in _of_type(s, SLIDING)], "kv heads"),
    "num_kv_heads_global": lambda m, s: _uniform([la.num_kv_heads for la in _of_type(s, GLOBAL)], "kv heads"),
    "global_fewer_kv_heads": lambda m, s: (
        FIELDS["num_kv_heads_global"](m, s) < FIELDS["num_kv_heads_local"](m, s)
    ),
    "head_dim": lambda m, s: _per_type(s, "head_dim"),
    "head_dim_local": lambda m, s: _uniform([la.head_dim for la in _of_type(s, SLIDING)], "head_dim"),
    "head_dim_global": lambda m, s: _uniform([la.head_dim for la in _of_type(s, GLOBAL)], "head_dim"),
    "global_head_dim_ratio": lambda m, s: FIELDS["head_dim_global"](m, s) / FIELDS["head_dim_local"](m, s),
    "q_per_kv_local": lambda m, s: _uniform([la.kv_groups for la in _of_type(s, SLIDING)], "q per kv"),
    "q_per_kv_global": lambda m, s: _uniform([la.kv_groups for la in _of_type(s, GLOBAL)], "q per kv"),
    "window": lambda m, s: _uniform([la.window for la in _of_type(s, SLIDING)], "window"),
    "pattern": lambda m, s: _pattern(s),
    "last_layer_type": lambda m, s: s.layers[-1].attention.value,
    "sliding_parity": lambda m, s: _sliding_parity(s),
    "attn_softcap": lambda m, s: _uniform([layer.attn_softcap for layer in s.layers], "attn_softcap"),
    "final_softcap": lambda m, s: s.final_softcap,
    "qk_norm": lambda m, s: _uniform([layer.qk_norm for layer in s.layers], "qk_norm"),
    "rope_theta_local": lambda m, s: _uniform([la.rope.theta for la in _of_type(s, SLIDING)], "rope theta"),
    "rope_theta_global": lambda m, s: _uniform([la.rope.theta for la in _of_type(s, GLOBAL)], "rope theta"),
    "rope_fraction_global": lambda m, s: _uniform(
        [la.rope.rotary_fraction for la in _of_type(s, GLOBAL)], "p"
    ),
    "k_eq_v": lambda m, s: _k_eq_v(s),
    "vocab_size": lambda m, s: s.vocab_size,
    "context": lambda m, s: s.max_position_embeddings,
    "hidden_size": lambda m, s: s.hidden_size,
    "intermediate_size": lambda m, s: _uniform([la.intermediate_size for la in s.layers if la.has_kv], "MLP"),
    "kv_shared_layers": lambda m, s: sum(not layer.has_kv for layer in s.layers),
    "shared_mlp_ratio": lambda m, s: _shared_mlp_ratio(s),
    "ple_dim": lambda m, s: _ple(s).dim,
    "ple_table_shape": lambda m, s: f"{_ple(s).vocab_size}x{s.num_layers}x{_ple(s).dim}",
    "num_experts": lambda m, s: _moe(s).num_experts,
    "top_k": lambda m, s: _moe(s).top_k,
    "idle_experts": lambda m, s: _moe(s).num_experts - _moe(s).top_k,
    "shared_expert_ratio": lambda m, s: (
        _uniform([la.intermediate_size for la in s.layers], "MLP") / _moe(s).intermediate_size
    ),
    "params_total": lambda m, s: _params(m)["params"],
    "params_total_multimodal": lambda m, s: _params(m)["params"] + _towers(m),
    "params_embedding": lambda m, s: _embedding(s),
    "params_non_embedding": lambda m, s: _params(m)["params"] - _embedding(s),
    "params_effective": lambda m, s: _params(m)["params"] - _ple_numel(s) if _ple(s) else None,
    "params_active": lambda m, s: round(
        _params(m)["params"] - _params(m)["expert_params"] * (1 - _moe(s).top_k / _moe(s).num_experts)
    ),
    "fits_inside": _fits_inside,
}


def _per_model(value: Any, model: str) -> Any:
    return value[model] if isinstance(value, dict) else value


def _compare(claimed: Any, actual: Any, tolerance: float, op: str) -> bool:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (claimed, actual))
    if not numeric:
        return op == "eq" and claimed == actual
    if op == "le":
        return actual <= claimed + tolerance
    if op == "lt":  # the claim: the model's value is below `claimed` (e.g. "the 31B is wider")
        return actual < claimed
    return abs(actual - claimed) <= tolerance


def check(claim: dict, model: str) -> dict:
    """The verdict of one claim for one model: a row of the report."""
    row = {
        "id": claim["id"],
        "source": claim["source"],
        "line": claim["line"],
        "quote": claim["quote"],
        "model": model,
        "field": claim["field"],
        "claimed": _per_model(claim.get("claimed"), model) if model else claim.get("claimed"),
        "actual": None,
        "tolerance": _per_model(claim.get("tolerance", 0), model) if model else claim.get("tolerance", 0),
        "verdict": NOT_CHECKABLE,
        "reason": None,
        "note": claim.get("note"),
    }
    if claim.get("checkable", True) is False:
        row["reason"] = claim.get("reason", "marked not checkable")
        return row
    func = FIELDS.get(claim["field"])
    if func is None:
        row["reason"] = f"unknown field {claim['field']!r}"
        return row
    if model not in configs.names(tiny=False):
        row["reason"] = f"no config for {model!r}"
        return row
    try:
        spec = spec_of(model)
        actual = func(model, spec)
        if claim["field"] == "fits_inside":
            parent = spec_of(row["claimed"])
            ok = spec.num_layers <= parent.num_layers and spec.hidden_size <= parent.hidden_size
            actual = f"{actual}; {row['claimed']}: {parent.num_layers} layers x {parent.hidden_size}"
            row.update(actual=actual, verdict=HOLDS if ok else CONTRADICTED)
            return row
    except NotCheckable as e:
        row["reason"] = str(e)
        return row
    row["actual"] = actual
    holds = _compare(row["claimed"], actual, row["tolerance"] or 0, claim.get("op", "eq"))
    row["verdict"] = HOLDS if holds else CONTRADICTED
    return row


def load_claims(path: str | Path | None = None) -> list[dict]:
    if path:
        text = Path(path).read_text()
    else:
        text = resources.files("harness").joinpath("data/seed_claims.yaml").read_text()
    return yaml.safe_load(text)["claims"]


def audit(claims: list[dict]) -> list[dict]:
    rows = []
    for claim in claims:
        for model in claim.get("models") or [None]:
            rows.append(check(claim, model))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and abs(value) >= 10_000_000:
        return f"{value / 1e9:.3f}B" if abs(value) >= 1e9 else f"{value / 1e6:.1f}M"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_md(rows: list[dict]) -> str:
    counts = Counter(row["verdict"] for row in rows)
    claims = len({row["id"] for row in rows})
    out = [
        "# Seed-document architecture claims vs configs/",
        "",
        "Generated by `python -m harness.seed_audit` from `harness/data/seed_claims.yaml`: each architecture claim of",
        "the published write-ups in `shared/seeds/` set against the released configs in `configs/` (the configs win).",
        "An audit of documents, not a gate.",
        "",
        f"{claims} claims, {len(rows)} claim x model checks: **{counts[HOLDS]} hold**, "
        f"**{counts[CONTRADICTED]} contradicted**, {counts[NOT_CHECKABLE]} not checkable.",
        "",
        "## Contradicted",
        "",
    ]
    table = [
        "| source:line | quote | model | field | claimed | actual | verdict |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(row: dict) -> str:
        verdict = row["verdict"] + (f" ({row['reason']})" if row["reason"] else "")
        tol = f" ±{_fmt(row['tolerance'])}" if row["tolerance"] else ""
        return (
            f"| {row['source'][:3]}:{row['line']} | {_cell(row['quote'])} | {row['model'] or '—'} | {row['field']} "
            f"| {_cell(_fmt(row['claimed']))}{tol} | {_cell(_fmt(row['actual']))} | {_cell(verdict)} |"
        )

    bad = [row for row in rows if row["verdict"] == CONTRADICTED]
    out += table + [line(row) for row in bad] if bad else ["None."]
    out += ["", "Notes on contradicted claims:", ""]
    out += [f"- `{row['id']}` ({row['model']}): {row['note']}" for row in bad if row["note"]]
    out += ["", "## All checks", "", *table, *(line(row) for row in rows), ""]
    out += [
        "Source files: "
        + ", ".join(sorted({row["source"] for row in rows}))
        + " (column shows the 3-digit prefix).",
        "",
    ]
    return "\n".join(out)


def render_json(rows: list[dict]) -> str:
    counts = Counter(row["verdict"] for row in rows)
    summary = {verdict: counts[verdict] for verdict in (HOLDS, CONTRADICTED, NOT_CHECKABLE)}
    return json.dumps({"summary": summary, "rows": rows}, indent=2, default=str) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.seed_audit", description=__doc__.splitlines()[0])
    parser.add_argument("--claims", help="claims YAML (default: harness/data/seed_claims.yaml)")
    parser.add_argument("--md", help="write the Markdown report here")
    parser.add_argument("--json", help="write the JSON report here")
    args = parser.parse_args(argv)
    rows = audit(load_claims(args.claims))
    if args.md:
        write_atomic(args.md, render_md(rows))
    if args.json:
        write_atomic(args.json, render_json(rows))
    counts = Counter(row["verdict"] for row in rows)
    print(f"{counts[HOLDS]} hold, {counts[CONTRADICTED]} contradicted, {counts[NOT_CHECKABLE]} not checkable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
