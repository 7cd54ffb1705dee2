"""harness.seed_audit: the claims file quotes its seeds faithfully, each field function reads the config
right (checked against the config JSON read directly), and verdicts go the right way."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import configs
from harness import seed_audit

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
if not SEEDS.is_dir():
    SEEDS = Path("/work/shared/seeds")
CLAIMS = seed_audit.load_claims()


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _raw(model: str) -> dict:
    return json.loads((configs.CONFIG_DIR / f"{model}.json").read_text())["hf_config"]


def test_claims_cover_all_generations_and_ids_are_unique():
    ids = [c["id"] for c in CLAIMS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    models = {m for c in CLAIMS for m in c.get("models") or []}
    assert {"gemma-7b", "gemma-2-9b", "gemma-3-27b", "gemma-4-31b"} <= models


@pytest.mark.skipif(not SEEDS.is_dir(), reason="seed documents not present")
@pytest.mark.parametrize("claim", CLAIMS, ids=[c["id"] for c in CLAIMS])
def test_quote_is_verbatim_near_its_line(claim):
    path = SEEDS / claim["source"]
    assert path.is_file(), path
    lines = path.read_text().split("\n")
    line = claim["line"]
    window = lines[max(0, line - 4) : line + 3]  # lines line-3 .. line+3 (1-based)
    assert any(_norm(claim["quote"]) in _norm(text) for text in window), (claim["id"], line)


def test_claims_name_known_fields_and_models():
    names = set(configs.names(tiny=False))
    for claim in CLAIMS:
        if claim.get("checkable", True) is False:
            assert claim.get("reason")
            continue
        assert claim["field"] in seed_audit.FIELDS, claim["id"]
        assert set(claim["models"]) <= names, claim["id"]


# Each field function against a value read by hand from the config JSON (not through the function).
def _layer_types(model):
    return _raw(model)["layer_types"]


HAND = {
    ("num_layers", "gemma-3-27b"): lambda: _raw("gemma-3-27b")["num_hidden_layers"],  # 62
    ("num_heads", "gemma-2-9b"): lambda: _raw("gemma-2-9b")["num_attention_heads"],
    ("num_kv_heads", "gemma-2b"): lambda: _raw("gemma-2b")["num_key_value_heads"],  # 1: MQA
    ("num_kv_heads_local", "gemma-4-31b"): lambda: _raw("gemma-4-31b")["num_key_value_heads"],
    ("num_kv_heads_global", "gemma-4-31b"): lambda: _raw("gemma-4-31b")["num_global_key_value_heads"],
    ("global_fewer_kv_heads", "gemma-4-31b"): lambda: True,  # 4 < 16
    ("head_dim", "gemma-2-27b"): lambda: _raw("gemma-2-27b")["head_dim"],
    ("head_dim_local", "gemma-4-e2b"): lambda: _raw("gemma-4-e2b")["head_dim"],
    ("head_dim_global", "gemma-4-e2b"): lambda: _raw("gemma-4-e2b")["global_head_dim"],
    ("global_head_dim_ratio", "gemma-4-26b-a4b"): lambda: 512 / 256,
    ("q_per_kv_local", "gemma-4-26b-a4b"): lambda: 16 // _raw("gemma-4-26b-a4b")["num_key_value_heads"],
    ("q_per_kv_global", "gemma-4-26b-a4b"): lambda: (
        16 // _raw("gemma-4-26b-a4b")["num_global_key_value_heads"]
    ),
    ("window", "gemma-3-1b"): lambda: _raw("gemma-3-1b")["sliding_window"],
    ("pattern", "gemma-4-e2b"): lambda: "4:1",  # layer_types: 4 sliding then 1 full, repeated
    ("last_layer_type", "gemma-3-4b"): lambda: (
        "sliding" if _layer_types("gemma-3-4b")[-1] == "sliding_attention" else "global"
    ),
    ("sliding_parity", "gemma-2-2b"): lambda: (
        "even" if _layer_types("gemma-2-2b")[0] == "sliding_attention" else "odd"
    ),
    ("attn_softcap", "gemma-2-9b"): lambda: _raw("gemma-2-9b")["attn_logit_softcapping"],
    ("final_softcap", "gemma-2-9b"): lambda: _raw("gemma-2-9b")["final_logit_softcapping"],
    ("qk_norm", "gemma-3-12b"): lambda: True,
    ("rope_theta_local", "gemma-4-31b"): lambda: _raw("gemma-4-31b")["rope_parameters"]["sliding_attention"][
        "rope_theta"
    ],
    ("rope_theta_global", "gemma-3-27b"): lambda: _raw("gemma-3-27b")["rope_parameters"]["full_attention"][
        "rope_theta"
    ],
    ("rope_fraction_global", "gemma-4-e4b"): lambda: _raw("gemma-4-e4b")["rope_parameters"]["full_attention"][
        "partial_rotary_factor"
    ],
    ("k_eq_v", "gemma-4-31b"): lambda: "global" if _raw("gemma-4-31b")["attention_k_eq_v"] else "none",
    ("vocab_size", "gemma-3-4b"): lambda: _raw("gemma-3-4b")["vocab_size"],
    ("context", "gemma-4-26b-a4b"): lambda: _raw("gemma-4-26b-a4b")["max_position_embeddings"],
    ("hidden_size", "gemma-4-e4b"): lambda: _raw("gemma-4-e4b")["hidden_size"],
    ("intermediate_size", "gemma-2-27b"): lambda: _raw("gemma-2-27b")["intermediate_size"],
    ("kv_shared_layers", "gemma-4-e2b"): lambda: _raw("gemma-4-e2b")["num_kv_shared_layers"],
    ("shared_mlp_ratio", "gemma-4-e2b"): lambda: 2.0,  # use_double_wide_mlp
    ("ple_dim", "gemma-4-e4b"): lambda: _raw("gemma-4-e4b")["hidden_size_per_layer_input"],
    ("ple_table_shape", "gemma-4-e2b"): lambda: "262144x35x256",
    ("num_experts", "gemma-4-26b-a4b"): lambda: _raw("gemma-4-26b-a4b")["num_experts"],
    ("top_k", "gemma-4-26b-a4b"): lambda: _raw("gemma-4-26b-a4b")["top_k_experts"],
    ("idle_experts", "gemma-4-26b-a4b"): lambda: 128 - 8,
    ("shared_expert_ratio", "gemma-4-26b-a4b"): lambda: 2112 / 704,
    ("params_embedding", "gemma-3-1b"): lambda: (
        _raw("gemma-3-1b")["vocab_size"] * _raw("gemma-3-1b")["hidden_size"]
    ),
}
PUBLISHED = {  # params fields against the exact published counts in the config metadata blocks
    ("params_total", "gemma-2-9b"): ("total", 0),
    ("params_total_multimodal", "gemma-4-e2b"): (None, 0),
    ("params_non_embedding", "gemma-2b"): ("non_embedding", 0),
    ("params_effective", "gemma-4-e2b"): ("effective", 0),
    ("params_active", "gemma-4-26b-a4b"): ("active", 0),
}


def _pub(model):
    return json.loads((configs.CONFIG_DIR / f"{model}.json").read_text())["published_params"]


def test_every_field_has_a_hand_check():
    checked = {field for field, _ in HAND} | {field for field, _ in PUBLISHED} | {"fits_inside"}
    assert checked == set(seed_audit.FIELDS)


@pytest.mark.parametrize(("field", "model"), sorted(HAND))
def test_field_function_matches_config(field, model):
    actual = seed_audit.FIELDS[field](model, seed_audit.spec_of(model))
    assert actual == HAND[(field, model)]()


@pytest.mark.parametrize(("field", "model"), sorted(PUBLISHED))
def test_params_fields_match_published_metadata(field, model):
    pub = _pub(model)
    key, _ = PUBLISHED[(field, model)]
    expected = (
        pub["total"] + sum(pub["towers"][t] for t in pub["published_total_includes_towers"])
        if key is None
        else pub[key]
    )
    assert seed_audit.FIELDS[field](model, seed_audit.spec_of(model)) == expected


def test_fits_inside_contradicted_when_parent_is_shallower():
    claim = {
        "id": "x",
        "source": "s",
        "line": 1,
        "quote": "q",
        "field": "fits_inside",
        "claimed": "gemma-4-26b-a4b",
        "models": ["gemma-4-e4b"],
    }
    assert seed_audit.check(claim, "gemma-4-e4b")["verdict"] == seed_audit.CONTRADICTED  # 42 layers > 30


def _claim(**kw):
    return {"id": "synthetic", "source": "none.txt", "line": 1, "quote": "q", **kw}


def test_wrong_claim_is_contradicted_with_actual():
    row = seed_audit.check(_claim(field="num_layers", claimed=46, models=["gemma-3-27b"]), "gemma-3-27b")
    assert row["verdict"] == seed_audit.CONTRADICTED and row["actual"] == 62


def test_right_claim_holds_and_tolerance_applies():
    row = seed_audit.check(_claim(field="num_layers", claimed=62), "gemma-3-27b")
    assert row["verdict"] == seed_audit.HOLDS
    near = _claim(field="params_total", claimed=27_000_000_000, tolerance=500_000_000)
    assert seed_audit.check(near, "gemma-3-27b")["verdict"] == seed_audit.HOLDS
    tight = _claim(field="params_total", claimed=27_500_000_000, tolerance=1_000)
    assert seed_audit.check(tight, "gemma-3-27b")["verdict"] == seed_audit.CONTRADICTED


def test_unknown_field_and_inapplicable_field_are_not_checkable():
    row = seed_audit.check(_claim(field="number_of_unicorns", claimed=3), "gemma-3-27b")
    assert row["verdict"] == seed_audit.NOT_CHECKABLE and "number_of_unicorns" in row["reason"]
    dense = seed_audit.check(_claim(field="num_experts", claimed=128), "gemma-4-31b")
    assert dense["verdict"] == seed_audit.NOT_CHECKABLE
    marked = seed_audit.check(
        _claim(field="num_layers", claimed=1, checkable=False, reason="3n"), "gemma-3-27b"
    )
    assert marked["verdict"] == seed_audit.NOT_CHECKABLE and marked["reason"] == "3n"


def test_main_writes_reports(tmp_path):
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    assert seed_audit.main(["--md", str(md), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert sum(data["summary"].values()) == len(data["rows"]) > 40
    assert "| source:line | quote | model | field | claimed | actual | verdict |" in md.read_text()
