"""``ModelSpec.from_hf_config``: per-layer behaviour derived from HF configs, and config errors.

Expected values follow HF Transformers' config classes (see
/work/shared/notes/hf-gemma-1-3-numerics.md §1.1-1.3), written out independently here.
"""

from __future__ import annotations

import json
import math

import pytest

import configs
from reference_impl.spec import (
    GEMMA2_ATTENTION_PATTERN,
    GEMMA3_ATTENTION_PATTERN,
    GEMMA4_ATTENTION_PATTERN,
    GLOBAL,
    SLIDING,
    AttentionType,
    ConfigError,
    ModelSpec,
    make_attention_layers_types,
)


def spec_of(name: str, **overrides) -> ModelSpec:
    cfg = configs.hf_config(name)
    for key, value in overrides.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return ModelSpec.from_hf_config(cfg)


_DELETE = object()


GEMMA_1_TO_3 = [n for n in configs.names() if configs.load(n)["generation"] <= 3]  # Gemma 4: its own section below


@pytest.mark.parametrize("name", GEMMA_1_TO_3)
def test_every_shipped_config_derives(name):
    cfg = configs.hf_config(name)
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.family == cfg["model_type"]
    assert spec.num_layers == cfg["num_hidden_layers"]
    assert spec.hidden_size == cfg["hidden_size"] and spec.vocab_size == cfg["vocab_size"]
    assert spec.norm_offset == 1.0
    assert spec.embed_scale == pytest.approx(math.sqrt(cfg["hidden_size"]))
    for i, layer in enumerate(spec.layers):
        assert layer.index == i
        assert layer.num_heads == cfg["num_attention_heads"]
        assert layer.num_kv_heads == cfg["num_key_value_heads"]
        assert layer.kv_groups * layer.num_kv_heads == layer.num_heads
        assert layer.head_dim == cfg["head_dim"]
        assert layer.intermediate_size == cfg["intermediate_size"]
        assert layer.qk_norm == (cfg["model_type"] == "gemma3_text")
        assert layer.sandwich_norms == (cfg["model_type"] != "gemma")


# --- attention types and layer patterns ---------------------------------------------------------


def test_attention_type_is_a_str():
    assert (SLIDING, GLOBAL) == (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
    assert AttentionType.GLOBAL == "global" and AttentionType.LOCAL_SLIDING == "sliding"
    assert AttentionType("sliding") is SLIDING
    # Usable wherever the plain strings were: dict keys, messages, JSON.
    assert {"global": 1}[GLOBAL] == 1 and {GLOBAL: 1}["global"] == 1
    assert f"{SLIDING}" == str(SLIDING) == "sliding" and f"{GLOBAL:>7}" == " global"
    assert json.dumps([GLOBAL, SLIDING]) == '["global", "sliding"]'


@pytest.mark.parametrize("name", configs.names())
def test_layers_carry_attention_type_members(name):
    spec = spec_of(name)
    assert all(type(layer.attention) is AttentionType for layer in spec.layers)


def test_make_attention_layers_types_repeats_pattern():
    s, g = SLIDING, GLOBAL
    assert make_attention_layers_types(GEMMA2_ATTENTION_PATTERN, 5) == (s, g, s, g, s)
    assert make_attention_layers_types(GEMMA3_ATTENTION_PATTERN, 14) == (s,) * 5 + (g,) + (s,) * 5 + (g,) + (s, s)
    assert make_attention_layers_types(GEMMA3_ATTENTION_PATTERN, 3) == (s, s, s)
    assert make_attention_layers_types((g,), 3) == (g, g, g)
    assert make_attention_layers_types(GEMMA2_ATTENTION_PATTERN, 0) == ()
    with pytest.raises(ValueError):
        make_attention_layers_types((), 4)


def test_default_patterns():
    assert GEMMA2_ATTENTION_PATTERN == (SLIDING, GLOBAL)
    assert GEMMA3_ATTENTION_PATTERN == (SLIDING,) * 5 + (GLOBAL,)
    assert GEMMA4_ATTENTION_PATTERN == GEMMA3_ATTENTION_PATTERN


@pytest.mark.parametrize("drop_layer_types", [False, True])
@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-2-9b", "gemma-2-27b"])
def test_gemma2_even_layers_slide(name, drop_layer_types):
    spec = spec_of(name, **({"layer_types": _DELETE} if drop_layer_types else {}))
    for i, layer in enumerate(spec.layers):
        if i % 2 == 0:
            assert layer.attention == SLIDING and layer.window == 4096
        else:
            assert layer.attention == GLOBAL and layer.window is None
    assert spec.max_window == 4096


@pytest.mark.parametrize("drop_layer_types", [False, True])
@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"])
def test_gemma3_global_every_sixth_layer(name, drop_layer_types):
    spec = spec_of(name, **({"layer_types": _DELETE} if drop_layer_types else {}))
    window = configs.hf_config(name)["sliding_window"]
    globals_ = [layer.index for layer in spec.layers if layer.attention == GLOBAL]
    assert globals_ == list(range(5, spec.num_layers, 6))
    assert globals_[:2] == [5, 11]
    for layer in spec.layers:
        assert layer.window == (None if layer.attention == GLOBAL else window)


def test_gemma3_sliding_window_pattern_field():
    spec = spec_of("gemma-3-1b", layer_types=_DELETE, sliding_window_pattern=3)
    assert [layer.index for layer in spec.layers if layer.attention == GLOBAL] == list(range(2, 26, 3))


def test_explicit_layer_types_win():
    cfg = configs.hf_config("gemma-2-2b-tiny")
    cfg["layer_types"] = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    spec = ModelSpec.from_hf_config(cfg)
    assert [layer.attention for layer in spec.layers] == [GLOBAL, GLOBAL, SLIDING, SLIDING]
    assert [layer.window for layer in spec.layers] == [None, None, 8, 8]


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b"])
def test_gemma1_all_global(name):
    spec = spec_of(name)
    assert all(layer.attention == GLOBAL and layer.window is None for layer in spec.layers)
    assert spec.max_window is None
    assert all(layer.rope.theta == 10000.0 and layer.rope.linear_factor == 1.0 for layer in spec.layers)


# --- RoPE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, global_factor",
    [("gemma-3-270m", 1.0), ("gemma-3-1b", 1.0), ("gemma-3-4b", 8.0), ("gemma-3-12b", 8.0), ("gemma-3-27b", 8.0)],
)
def test_gemma3_rope_per_layer_type(name, global_factor):
    spec = spec_of(name)
    for layer in spec.layers:
        if layer.attention == SLIDING:
            assert (layer.rope.theta, layer.rope.linear_factor) == (10_000.0, 1.0)
        else:
            assert (layer.rope.theta, layer.rope.linear_factor) == (1_000_000.0, global_factor)


def test_gemma3_legacy_rope_fields():
    # Older config.json files: rope_theta (global), rope_local_base_freq (local), rope_scaling (global).
    spec = spec_of(
        "gemma-3-4b", rope_parameters=_DELETE, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    assert spec.layers[0].rope.theta == 1e4 and spec.layers[0].rope.linear_factor == 1.0
    assert spec.layers[5].rope.theta == 1e6 and spec.layers[5].rope.linear_factor == 8.0


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-2-9b"])
def test_legacy_rope_theta_gemma1_2(name):
    spec = spec_of(name, rope_parameters=_DELETE, rope_theta=5e5)
    assert {layer.rope.theta for layer in spec.layers} == {5e5}


# --- query scale, softcaps, activation ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, qpas",
    [("gemma-2b", 256), ("gemma-7b", 256), ("gemma-2-2b", 256), ("gemma-2-9b", 256), ("gemma-2-27b", 144),
     ("gemma-3-1b", 256), ("gemma-3-27b", 168)],
)
def test_query_scale(name, qpas):
    spec = spec_of(name)
    assert all(layer.query_scale == pytest.approx(qpas**-0.5, rel=1e-15) for layer in spec.layers)


def test_query_scale_is_not_head_dim_for_27b():
    # The 27B models have head_dim 128; the scale comes from query_pre_attn_scalar (144 / 168).
    for name, qpas in (("gemma-2-27b", 144), ("gemma-3-27b", 168)):
        layer = spec_of(name).layers[0]
        assert layer.head_dim == 128
        assert layer.query_scale == pytest.approx(1 / math.sqrt(qpas))
        assert abs(layer.query_scale - 128**-0.5) > 1e-3


def test_gemma1_scale_ignores_query_pre_attn_scalar():
    spec = spec_of("gemma-7b-tiny", query_pre_attn_scalar=1000)
    assert spec.layers[0].query_scale == pytest.approx(16**-0.5)


def test_gemma1_gelu_is_rewritten_to_tanh():
    assert spec_of("gemma-7b", hidden_act="gelu").activation == "gelu_tanh"
    assert spec_of("gemma-7b").activation == "gelu_tanh"


@pytest.mark.parametrize("name", ["gemma-2-9b", "gemma-3-1b"])
def test_gemma2_3_gelu_stays_exact(name):
    assert spec_of(name, hidden_activation="gelu").activation == "gelu"
    assert spec_of(name).activation == "gelu_tanh"


def test_gemma2_softcaps():
    spec = spec_of("gemma-2-9b")
    assert {layer.attn_softcap for layer in spec.layers} == {50.0}
    assert spec.final_softcap == 30.0
    # Absent fields take HF's defaults (50 / 30); explicit nulls switch them off.
    spec = spec_of("gemma-2-9b", attn_logit_softcapping=_DELETE, final_logit_softcapping=_DELETE)
    assert spec.layers[0].attn_softcap == 50.0 and spec.final_softcap == 30.0
    spec = spec_of("gemma-2-9b", attn_logit_softcapping=None, final_logit_softcapping=None)
    assert spec.layers[0].attn_softcap is None and spec.final_softcap is None


def test_gemma3_ignores_attn_softcap():
    spec = spec_of("gemma-3-4b", attn_logit_softcapping=5.0)
    assert all(layer.attn_softcap is None for layer in spec.layers)
    assert spec.final_softcap is None
    assert spec_of("gemma-3-4b", final_logit_softcapping=30.0).final_softcap == 30.0


def test_gemma1_has_no_softcaps():
    spec = spec_of("gemma-2b", attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert all(layer.attn_softcap is None for layer in spec.layers) and spec.final_softcap is None


def test_spec_defaults():
    spec = spec_of("gemma-2b-tiny")
    assert spec.rms_norm_eps == 1e-6 and spec.tie_embeddings
    assert (spec.pad_token_id, spec.eos_token_id, spec.bos_token_id) == (0, 1, 2)
    assert spec.hf_config["hidden_size"] == 64


# --- malformed configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides, field",
    [
        ("gemma-2b-tiny", {"hidden_size": _DELETE}, "hidden_size"),
        ("gemma-2-2b-tiny", {"hidden_size": _DELETE}, "hidden_size"),
        ("gemma-3-1b-tiny", {"vocab_size": _DELETE}, "vocab_size"),
        ("gemma-3-1b-tiny", {"num_hidden_layers": 0}, "num_hidden_layers"),
        ("gemma-3-1b-tiny", {"hidden_size": 64.0}, "hidden_size"),
        ("gemma-3-1b-tiny", {"hidden_size": True}, "hidden_size"),
        ("gemma-2-2b-tiny", {"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ("gemma-2-2b-tiny", {"num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads"),
        ("gemma-2-2b-tiny", {"model_type": "llama"}, "model_type"),
        ("gemma-2-2b-tiny", {"model_type": _DELETE}, "model_type"),
        ("gemma-2-2b-tiny", {"layer_types": ["sliding_attention"] * 3}, "layer_types"),
        ("gemma-3-1b-tiny", {"layer_types": ["sliding_attention"] * 8}, "layer_types"),
        ("gemma-2-2b-tiny", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
        ("gemma-2b-tiny", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        ("gemma-2-2b-tiny", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_type"),
        ("gemma-2-2b-tiny", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
        ("gemma-2-2b-tiny", {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
        (
            "gemma-3-1b-tiny",
            {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                 "full_attention": {"rope_type": "longrope", "rope_theta": 1e6}}},
            "full_attention",
        ),
        ("gemma-2-2b-tiny", {"hidden_activation": "relu"}, "hidden_activation"),
        ("gemma-2b-tiny", {"hidden_act": "silu"}, "hidden_act"),
        ("gemma-2-2b-tiny", {"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ("gemma-2-2b-tiny", {"query_pre_attn_scalar": -1}, "query_pre_attn_scalar"),
        ("gemma-2-2b-tiny", {"sliding_window": 0}, "sliding_window"),
        ("gemma-2-2b-tiny", {"attention_bias": True}, "attention_bias"),
        ("gemma-3-1b-tiny", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma-2-2b-tiny", {"final_logit_softcapping": float("nan")}, "final_logit_softcapping"),
    ],
)
def test_malformed_config_raises_naming_field(name, overrides, field):
    with pytest.raises(ConfigError, match=field):
        spec_of(name, **overrides)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        ModelSpec.from_hf_config({"model_type": "gemma"})


@pytest.mark.parametrize("name", ["gemma-7b", "gemma-2-9b", "gemma-3-1b"])
def test_missing_head_dim_defaults_like_hf(name):
    # HF GemmaConfig / Gemma2Config / Gemma3TextConfig all declare head_dim=256 as the default, so a
    # config dict without head_dim builds 256-wide heads in HF (gemma-7b: 3072 / 16 = 192 otherwise).
    cfg = configs.hf_config(name)
    cfg["hidden_size"], cfg["num_attention_heads"] = 3072, 16
    del cfg["head_dim"]
    assert ModelSpec.from_hf_config(cfg).layers[0].head_dim == 256


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gemma-2-2b-tiny", {"hidden_act": "silu"}),  # Gemma 2+ read hidden_activation
        ("gemma-3-1b-tiny", {"attn_logit_softcapping": "x"}),  # HF Gemma 3 ignores it
        ("gemma-3-1b-tiny", {"rope_theta": -1.0}),  # per-type rope_parameters win over the legacy field
        ("gemma-4-31b-tiny", {"query_pre_attn_scalar": -1}),  # Gemma 4's scale is 1.0
        ("gemma-4-31b-tiny", {"sliding_window_pattern": 0}),
        ("gemma-4-31b-tiny", {"use_bidirectional_attention": "vision"}),  # image tokens only
    ],
)
def test_fields_a_generation_does_not_read_are_ignored(name, overrides):
    assert spec_of(name, **overrides) == spec_of(name)


# --- Gemma 4 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers, globals_", [(6, [5]), (8, [5, 7]), (10, [5, 9]), (12, [5, 11]), (13, [5, 11, 12])])
def test_gemma4_default_pattern_ends_global(n_layers, globals_):
    spec = spec_of("gemma-4-31b-tiny", layer_types=_DELETE, num_hidden_layers=n_layers)
    assert [layer.index for layer in spec.layers if layer.attention == GLOBAL] == globals_
    for layer in spec.layers:
        assert layer.window == (None if layer.attention == GLOBAL else 16)
        assert layer.head_dim == (32 if layer.attention == GLOBAL else 16)
        assert layer.num_kv_heads == (2 if layer.attention == GLOBAL else 8)
        assert layer.k_eq_v == (layer.attention == GLOBAL)
        assert layer.rope.rotary_fraction == (0.25 if layer.attention == GLOBAL else 1.0)


def test_gemma4_explicit_layer_types_win():
    types = ["sliding_attention"] * 6 + ["full_attention"] * 6
    spec = spec_of("gemma-4-31b-tiny", layer_types=types)
    assert [layer.attention for layer in spec.layers] == [SLIDING] * 6 + [GLOBAL] * 6


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("gemma-4-31b-tiny", {"use_bidirectional_attention": "all"}, r"'use_bidirectional_attention' is 'all'"),
        # 16 query heads: 3 global KV heads (K=V layers) or 3 sliding KV heads do not divide them.
        ("gemma-4-31b-tiny", {"num_global_key_value_heads": 3},
         r"^layer 5 \(global\): 16 query heads are not a multiple of 3 KV heads$"),
        ("gemma-4-31b-tiny", {"num_attention_heads": 12, "num_key_value_heads": 4, "num_global_key_value_heads": 8},
         r"^layer 5 \(global\): 12 query heads are not a multiple of 8 KV heads$"),
        ("gemma-4-26b-a4b-tiny", {"top_k_experts": 9}, r"'top_k_experts' \(9\) exceeds 'num_experts' \(8\)"),
        ("gemma-4-26b-a4b-tiny", {"num_experts": _DELETE}, r"'num_experts' is missing"),
        # e2b-tiny: full_attention at layers 4 and 9; sharing 6 layers leaves layer 4 without an earlier global one.
        ("gemma-4-e2b-tiny", {"num_kv_shared_layers": 6},
         r"^config field 'num_kv_shared_layers' \(6\) leaves layer 4 \(global\) without an earlier layer"),
        ("gemma-4-e2b-tiny", {"num_kv_shared_layers": 10}, r"'num_kv_shared_layers' \(10\) leaves layer 0 \(sliding\)"),
        ("gemma-4-e2b-tiny", {"num_kv_shared_layers": -1}, r"'num_kv_shared_layers' must be an integer >= 0"),
        ("gemma-4-31b-tiny", {"layer_types": ["sliding_attention"] * 11}, r"'layer_types' must list 12 entries"),
        ("gemma-4-31b-tiny", {"layer_types": "full_attention"}, r"'layer_types' must list 12 entries"),
        ("gemma-4-31b-tiny", {"layer_types": ["sliding_attention"] * 11 + ["chunked_attention"]},
         r"layer_types\[11\] is 'chunked_attention'"),
        ("gemma-4-31b-tiny", {"global_head_dim": 0}, r"'global_head_dim'"),
        ("gemma-4-e2b-tiny", {"hidden_size_per_layer_input": -1}, r"'hidden_size_per_layer_input'"),
    ],
)
def test_gemma4_malformed_config_raises(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        spec_of(name, **overrides)
