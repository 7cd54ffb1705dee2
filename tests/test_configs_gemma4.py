"""Tests for the Gemma 4 text configs (configs/gemma-4-*.json): released variants and their tiny twins.

The released dicts are the ``text_config`` of the released checkpoints (values from
/work/shared/notes/hf-gemma-4-numerics.md section 3.1). Expected values below are written out
independently of the JSON files, from the notes and from the HF Transformers 5.23 source.

Parameter counts (``published_params``): ``total`` / ``embedding`` / ``non_embedding`` /
``per_layer_embedding`` are the text decoder alone, counted by HF on the meta device with the tied
embedding counted once. Derived figures are compared with the published (rounded) ones, with a
tolerance of half a unit of the last printed digit ("5.1B" -> +-0.05B, "8B" -> +-0.5B):

* E2B / E4B: effective = total - PLE table; the published total includes the vision and audio towers
  (``towers``, meta-device counts with the released tower configs, checked below).
* 26B-A4B: active = total - layers x (experts - top_k) x (3 x moe_intermediate x hidden).
* 26B-A4B / 31B: the published totals match the text decoder alone (the vision tower is not added).
* E4B's printed 4.5B effective is 0.14B below our figure: recorded in ``known_discrepancy`` and
  expected to fail (strict xfail), not hidden by a widened tolerance.
"""

from __future__ import annotations

import functools

import pytest

import configs

RELEASED = ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b"]
TINY = [f"{n}-tiny" for n in RELEASED]
SLIDING, FULL = "sliding_attention", "full_attention"
ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
# global_head_dim / num_global_key_value_heads are popped by Gemma4TextConfig into per_layer_config.
POPPED = {"global_head_dim", "num_global_key_value_heads"}

# Sliding:full pattern period of each released variant (full layer where (i + 1) % period == 0).
PERIOD = {"gemma-4-e2b": 5, "gemma-4-e4b": 6, "gemma-4-26b-a4b": 6, "gemma-4-31b": 6}

# Independent spot checks of the released configs against notes section 3.1 / 1.6 / 1.8:
# layers, hidden, heads, (KV sliding, KV full), (head_dim sliding, full), K=V, window, intermediate,
# double-wide, PLE dim, shared layers, (sliding donor, full donor), MoE (E, k, I), max positions.
RELEASED_FACTS = {
    "gemma-4-e2b": (35, 1536, 8, (1, 1), (256, 512), False, 512, 6144, True, 256, 20, (13, 14), None, 131072),
    "gemma-4-e4b": (42, 2560, 8, (2, 2), (256, 512), False, 512, 10240, False, 256, 18, (22, 23), None, 131072),
    "gemma-4-26b-a4b": (30, 2816, 16, (8, 2), (256, 512), True, 1024, 2112, False, 0, 0, None, (128, 8, 704), 262144),
    "gemma-4-31b": (60, 5376, 32, (16, 4), (256, 512), True, 1024, 21504, False, 0, 0, None, None, 262144),
}

# Released vision / audio towers (notes section 3.1; audio = Gemma4AudioConfig class defaults), used to
# check the tower sizes recorded in published_params.towers.
VISION_SMALL = {"use_clipped_linears": True, "standardize": False}  # class defaults otherwise
VISION_LARGE = {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                "head_dim": 72, "intermediate_size": 4304, "use_clipped_linears": False, "standardize": True}
TOWERS = {
    "gemma-4-e2b": (VISION_SMALL, True),
    "gemma-4-e4b": (VISION_SMALL, True),
    "gemma-4-26b-a4b": (VISION_LARGE, False),
    "gemma-4-31b": (VISION_LARGE, False),
}

# Fields a tiny twin may shrink; every other hf_config field must equal the parent's.
SIZE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_global_key_value_heads", "head_dim", "global_head_dim",
    "max_position_embeddings", "sliding_window", "layer_types", "hidden_size_per_layer_input",
    "vocab_size_per_layer_input", "num_kv_shared_layers", "num_experts", "top_k_experts", "moe_intermediate_size",
}


# ----------------------------------------------------------------------------------------------------
# helpers


def parent_name(tiny_name: str) -> str:
    return configs.load(tiny_name)["tiny_of"]


def parent(tiny_name: str) -> dict:
    return configs.hf_config(parent_name(tiny_name))


def released_of(name: str) -> str:
    return configs.load(name)["tiny_of"] or name


def expected_layer_types(n: int, period: int) -> list[str]:
    return [SLIDING if (i + 1) % period else FULL for i in range(n)]


def head_dim(hf: dict, layer_type: str) -> int:
    return hf["global_head_dim"] if layer_type == FULL else hf["head_dim"]


def kv_heads(hf: dict, layer_type: str) -> int:
    """HF rule (configuration_gemma4.py __post_init__): the global KV count applies only with K=V."""
    if layer_type == FULL and hf["attention_k_eq_v"]:
        return hf["num_global_key_value_heads"]
    return hf["num_key_value_heads"]


def kv_class(hf: dict, layer_type: str) -> str:
    n_h, n_kv = hf["num_attention_heads"], kv_heads(hf, layer_type)
    if n_kv == 1:
        return "MQA"
    if n_kv == n_h:
        return "MHA"
    assert n_h % n_kv == 0 and n_h // n_kv > 1, hf
    return "GQA"


def sign(x: int) -> int:
    return (x > 0) - (x < 0)


def shared_block(hf: dict) -> range:
    n = hf["num_hidden_layers"]
    return range(n - hf["num_kv_shared_layers"], n)


def donors(hf: dict) -> dict[str, int | None]:
    """For each layer type used in the KV-shared tail: the last non-shared layer of that type (None if none)."""
    block = shared_block(hf)
    lt = hf["layer_types"]
    out = {}
    for t in sorted({lt[i] for i in block}):
        before = [i for i in range(block.start) if lt[i] == t]
        out[t] = before[-1] if before else None
    return out


def rotated_pairs(hf: dict) -> int:
    """Rotated frequency pairs on full layers (modeling_rope_utils proportional: int(p * D // 2))."""
    return int(hf["rope_parameters"][FULL]["partial_rotary_factor"] * hf["global_head_dim"] // 2)


def hf_config_object(name: str):
    transformers = pytest.importorskip("transformers")
    return transformers.Gemma4TextConfig(**configs.hf_config(name))


@functools.cache
def hf_meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of HF's Gemma4ForCausalLM built on the meta device (tied embedding counted once)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = configs.hf_config(name)
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**hf))
    embed = model.model.embed_tokens.weight
    # _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}: one tensor, counted once
    assert model.lm_head.weight is embed, f"{name}: lm_head is not tied to the embedding"
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    # the per-layer layer_scalar (a checkpoint tensor) is a buffer, so not in the counts (scope says so)
    scalars = [b for n, b in model.named_buffers() if n.endswith("layer_scalar")]
    assert len(scalars) == hf["num_hidden_layers"] and all(b.numel() == 1 for b in scalars)
    ple = model.model.embed_tokens_per_layer.weight.numel() if hf["hidden_size_per_layer_input"] else 0
    out = {"total": total, "embedding": embed.numel(), "non_embedding": total - embed.numel(),
           "per_layer_embedding": ple}
    if hf["enable_moe_block"]:
        experts = model.model.layers[0].experts
        out["params_per_expert"] = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
    return out


def printed_to_int(text: str) -> int:
    assert text.endswith("B"), text
    return round(float(text[:-1]) * 1e9)


def printed_tolerance(text: str) -> int:
    """Half a unit of the last printed digit, in parameters ("5.1B" -> 50M, "8B" -> 500M)."""
    decimals = len(text[:-1].partition(".")[2])
    return 5 * 10 ** (8 - decimals)


def compared_figure(name: str, key: str) -> int:
    """Our figure in the published figure's scope."""
    pub = configs.load(name)["published_params"]
    if key == "total":
        return pub["total"] + sum(pub["towers"][t] for t in pub["published_total_includes_towers"])
    return pub[key]


def published_cases():
    for name in RELEASED:
        pub = configs.load(name)["published_params"]
        for key in pub["as_published"]:
            reason = pub.get("known_discrepancy", {}).get(key)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, key, marks=marks, id=f"{name}-{key}")


# ----------------------------------------------------------------------------------------------------
# loader and file shape


def test_names_put_gemma4_after_gemma3_in_size_order():
    names = configs.names()
    earlier = [n for n in names if configs.load(n)["generation"] < 4]
    assert names == earlier + [n for r in RELEASED for n in (r, f"{r}-tiny")]
    assert earlier[-1] == "gemma-3-27b-tiny"
    assert configs.names(tiny=False)[-4:] == RELEASED
    assert configs.names(tiny=True)[-4:] == TINY


def test_missing_gemma4_field_is_a_config_error(tmp_path, monkeypatch):
    import json

    broken = configs.load("gemma-4-31b")
    broken["name"] = "broken-g4"
    del broken["hf_config"]["global_head_dim"]  # HF would silently default it to 512
    (tmp_path / "broken-g4.json").write_text(json.dumps(broken))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._read.cache_clear()
    try:
        with pytest.raises(configs.ConfigError, match=r"^broken-g4\.json: .*'hf_config\.global_head_dim'"):
            configs.load("broken-g4")
    finally:
        configs._read.cache_clear()


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_file_shape(name):
    data = configs.load(name)
    hf = data["hf_config"]
    assert data["name"] == name and data["generation"] == 4
    assert hf["model_type"] == "gemma4_text" and hf["architectures"] == ["Gemma4ForCausalLM"]
    assert hf["hidden_activation"] == "gelu_pytorch_tanh" and hf["rms_norm_eps"] == 1e-6
    assert (hf["pad_token_id"], hf["eos_token_id"], hf["bos_token_id"]) == (0, 1, 2)
    assert hf["tie_word_embeddings"] is True and hf["attention_bias"] is False
    assert hf["final_logit_softcapping"] == 30.0
    assert hf["rope_parameters"] == ROPE
    assert len(hf["layer_types"]) == hf["num_hidden_layers"]
    assert "query_pre_attn_scalar" not in hf and "attn_logit_softcapping" not in hf  # not Gemma 4 fields
    assert data["description"] and "\n" not in data["description"]
    if name.endswith("-tiny"):
        assert data["tiny_of"] == name[: -len("-tiny")] and data["published_params"] is None
    else:
        assert data["tiny_of"] is None


# ----------------------------------------------------------------------------------------------------
# released variants


@pytest.mark.parametrize("name", RELEASED)
def test_released_spot_facts(name):
    hf = configs.hf_config(name)
    (n_layers, hidden, heads, kv, dims, k_eq_v, window, inter, double, ple, shared, donor, moe,
     max_pos) = RELEASED_FACTS[name]
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]) == (n_layers, hidden, heads)
    assert (kv_heads(hf, SLIDING), kv_heads(hf, FULL)) == kv
    assert (hf["head_dim"], hf["global_head_dim"]) == dims
    assert hf["attention_k_eq_v"] is k_eq_v
    assert hf["sliding_window"] == window and hf["intermediate_size"] == inter
    assert hf["use_double_wide_mlp"] is double
    assert hf["hidden_size_per_layer_input"] == ple and hf["num_kv_shared_layers"] == shared
    assert hf["vocab_size"] == hf["vocab_size_per_layer_input"] == 262144
    assert hf["layer_types"] == expected_layer_types(n_layers, PERIOD[name])
    assert hf["layer_types"][-1] == FULL
    if donor is not None:
        assert donors(hf) == {SLIDING: donor[0], FULL: donor[1]}
    if moe is None:
        assert hf["enable_moe_block"] is False
        assert (hf["num_experts"], hf["top_k_experts"], hf["moe_intermediate_size"]) == (None, None, None)
    else:
        assert hf["enable_moe_block"] is True
        assert (hf["num_experts"], hf["top_k_experts"], hf["moe_intermediate_size"]) == moe
    assert hf["max_position_embeddings"] == max_pos
    assert hf["use_bidirectional_attention"] == ("vision" if k_eq_v else None)


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_hf_config_round_trips(name):
    """Gemma4TextConfig keeps every value; the two popped fields show up in the per-layer geometry."""
    d = configs.hf_config(name)
    cfg = hf_config_object(name)
    out = cfg.to_dict()
    changed = {k: (v, out.get(k, "<missing>")) for k, v in d.items()
               if k not in POPPED and out.get(k, "<missing>") != v}
    assert not changed, f"{name}: HF changed these fields (ours, HF's): {changed}"
    assert list(cfg.layer_types) == d["layer_types"] and cfg.sliding_window == d["sliding_window"]
    for i, layer_type in enumerate(d["layer_types"]):
        layer = cfg.per_layer_config[i]
        assert layer.head_dim == head_dim(d, layer_type), (name, i)
        assert layer.num_key_value_heads == kv_heads(d, layer_type), (name, i)


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_hf_kv_sharing_modes_match_the_donor_rule(name):
    d = configs.hf_config(name)
    expected = [None] * d["num_hidden_layers"]
    if d["num_kv_shared_layers"]:
        for i in shared_block(d):
            expected[i] = "reuse"
        for donor in donors(d).values():
            expected[donor] = "store"
    assert hf_config_object(name).kv_sharing_modes == expected


@pytest.mark.parametrize("name", RELEASED)
def test_published_params_are_consistent(name):
    """The recorded counts follow their stated definitions, and tolerances follow the printed precision."""
    pub = configs.load(name)["published_params"]
    hf = configs.hf_config(name)
    assert pub["source"] and pub["scope"]
    assert pub["total"] == pub["embedding"] + pub["non_embedding"]
    assert pub["embedding"] == hf["vocab_size"] * hf["hidden_size"]
    L, H, P = hf["num_hidden_layers"], hf["hidden_size"], hf["hidden_size_per_layer_input"]
    assert pub["per_layer_embedding"] == hf["vocab_size_per_layer_input"] * L * P
    assert ("effective" in pub) == (P > 0)
    if P:
        assert pub["effective"] == pub["total"] - pub["per_layer_embedding"]
    assert ("active" in pub) == hf["enable_moe_block"]
    if hf["enable_moe_block"]:
        E, K, width = hf["num_experts"], hf["top_k_experts"], hf["moe_intermediate_size"]
        moe = pub["moe"]
        assert (moe["layers"], moe["num_experts"], moe["top_k"]) == (L, E, K)
        assert moe["params_per_expert"] == 2 * width * H + H * width  # gate_up_proj [2I, H] + down_proj [H, I]
        assert moe["inactive_params"] == L * (E - K) * moe["params_per_expert"]
        assert pub["active"] == pub["total"] - moe["inactive_params"]
    assert set(pub["as_published"]) == set(pub["as_printed"]) == set(pub["tolerance"])
    for key, text in pub["as_printed"].items():
        assert pub["as_published"][key] == printed_to_int(text), key
        assert pub["tolerance"][key] == printed_tolerance(text), key
    assert set(pub["published_total_includes_towers"]) <= set(pub["towers"])
    assert set(pub.get("known_discrepancy", {})) <= set(pub["as_published"])


@pytest.mark.parametrize("name", RELEASED)
def test_hf_meta_param_count_matches_recorded(name):
    pub = configs.load(name)["published_params"]
    counts = hf_meta_counts(name)
    assert {k: pub[k] for k in ("total", "embedding", "non_embedding", "per_layer_embedding")} == {
        k: counts[k] for k in ("total", "embedding", "non_embedding", "per_layer_embedding")
    }
    if "moe" in pub:
        assert counts["params_per_expert"] == pub["moe"]["params_per_expert"]


@pytest.mark.parametrize("name", RELEASED)
def test_recorded_tower_sizes_match_hf(name):
    """towers.* = the HF vision / audio tower plus its embedding projector, on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vision, audio = TOWERS[name]
    cfg = transformers.Gemma4Config(
        text_config=configs.hf_config(name),
        vision_config=transformers.Gemma4VisionConfig(**vision),
        audio_config=transformers.Gemma4AudioConfig() if audio else None,
    )
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    groups: dict[str, int] = {}
    for pname, p in model.named_parameters():
        part = pname.split(".")[1]  # model.<part>.…; lm_head is tied to the text embedding
        groups[part] = groups.get(part, 0) + p.numel()
    assert groups["language_model"] == configs.load(name)["published_params"]["total"]
    towers = {"vision": groups["vision_tower"] + groups["embed_vision"]}
    if audio:
        towers["audio"] = groups["audio_tower"] + groups["embed_audio"]
    assert configs.load(name)["published_params"]["towers"] == towers


@pytest.mark.parametrize(("name", "key"), list(published_cases()))
def test_matches_published_within_printed_precision(name, key):
    pub = configs.load(name)["published_params"]
    ours, printed, tol = compared_figure(name, key), pub["as_published"][key], pub["tolerance"][key]
    assert abs(ours - printed) <= tol, (
        f"{name}: {key} = {ours:,} vs published {pub['as_printed'][key]} (diff {ours - printed:+,}, "
        f"tolerance +-{tol:,})"
    )


def test_large_models_published_totals_exclude_the_vision_tower():
    """Adding the vision tower would miss the printed 25.2B / 30.7B: the published totals are text-only."""
    for name in ("gemma-4-26b-a4b", "gemma-4-31b"):
        pub = configs.load(name)["published_params"]
        assert pub["published_total_includes_towers"] == []
        with_tower = pub["total"] + pub["towers"]["vision"]
        assert abs(with_tower - pub["as_published"]["total"]) > pub["tolerance"]["total"]


# ----------------------------------------------------------------------------------------------------
# tiny twins: size limits


@pytest.mark.parametrize("name", TINY)
def test_tiny_size_limits(name):
    hf = configs.hf_config(name)
    period = PERIOD[parent_name(name)]
    assert hf["hidden_size"] <= 256
    # Exactly two pattern periods: the fewest layers with a full layer that is not the (always full) last
    # one, needed for a sliding layer after a full layer (as in every parent) and for the full KV donor
    # before a KV-shared tail. That is 10 layers for the 4:1 E2B pattern and 12 (> 10) for the 5:1 ones.
    assert hf["num_hidden_layers"] == 2 * period <= 12
    assert hf["layer_types"].count(FULL) == 2
    assert hf["vocab_size"] == hf["vocab_size_per_layer_input"] == 512
    assert (hf["pad_token_id"], hf["eos_token_id"], hf["bos_token_id"]) == (0, 1, 2)
    assert 8 <= hf["sliding_window"] <= 16
    assert hf["max_position_embeddings"] >= 512
    assert hf["global_head_dim"] <= 64 and hf["head_dim"] <= 32
    if hf["enable_moe_block"]:
        assert hf["num_experts"] <= 8 and hf["moe_intermediate_size"] <= 32


# ----------------------------------------------------------------------------------------------------
# tiny twins: structure mirrors the parent (one feature per test)


@pytest.mark.parametrize("name", TINY)
def test_tiny_same_fields_and_non_size_values(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert tiny.keys() == par.keys()
    differ = {k: (par[k], tiny[k]) for k in tiny if k not in SIZE_FIELDS and tiny[k] != par[k]}
    assert not differ, f"{name}: non-size fields differ from the parent (parent, tiny): {differ}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_layer_pattern_rule(name):
    period = PERIOD[parent_name(name)]
    tiny, par = configs.hf_config(name), parent(name)
    assert tiny["layer_types"] == expected_layer_types(tiny["num_hidden_layers"], period)
    assert par["layer_types"] == expected_layer_types(par["num_hidden_layers"], period)


@pytest.mark.parametrize("name", TINY)
def test_tiny_last_layer_global(name):
    assert configs.hf_config(name)["layer_types"][-1] == FULL == parent(name)["layer_types"][-1]


@pytest.mark.parametrize("name", TINY)
def test_tiny_has_sliding_layers_after_a_full_layer_iff_parent(name):
    def slides_after_full(hf):
        lt = hf["layer_types"]
        return SLIDING in lt[lt.index(FULL) :]

    assert slides_after_full(configs.hf_config(name)) == slides_after_full(parent(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_k_eq_v(name):
    assert configs.hf_config(name)["attention_k_eq_v"] is parent(name)["attention_k_eq_v"]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_tiny_kv_head_class_and_group_per_type(name, layer_type):
    tiny, par = configs.hf_config(name), parent(name)
    assert kv_class(tiny, layer_type) == kv_class(par, layer_type)
    if kv_class(par, layer_type) != "MQA":
        group = tiny["num_attention_heads"] // kv_heads(tiny, layer_type)
        assert group == par["num_attention_heads"] // kv_heads(par, layer_type)


@pytest.mark.parametrize("name", TINY)
def test_tiny_kv_heads_sliding_vs_full_relation(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert sign(kv_heads(tiny, SLIDING) - kv_heads(tiny, FULL)) == sign(kv_heads(par, SLIDING) - kv_heads(par, FULL))


@pytest.mark.parametrize("name", TINY)
def test_tiny_head_dims_differ_per_type(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert tiny["global_head_dim"] != tiny["head_dim"]
    assert tiny["global_head_dim"] / tiny["head_dim"] == par["global_head_dim"] / par["head_dim"]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_tiny_query_width_vs_hidden_per_type(name, layer_type):
    """heads x head_dim smaller than / equal to / larger than hidden, per layer type, as in the parent."""

    def rel(hf):
        return sign(hf["num_attention_heads"] * head_dim(hf, layer_type) - hf["hidden_size"])

    assert rel(configs.hf_config(name)) == rel(parent(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_partial_rope_rotates_at_least_two_pairs(name):
    tiny = configs.hf_config(name)
    assert tiny["rope_parameters"] == parent(name)["rope_parameters"] == ROPE
    assert rotated_pairs(tiny) >= 2
    assert rotated_pairs(tiny) < tiny["global_head_dim"] // 2  # some pairs stay unrotated, as in the parent


@pytest.mark.parametrize("name", TINY)
def test_tiny_final_softcap(name):
    assert configs.hf_config(name)["final_logit_softcapping"] == parent(name)["final_logit_softcapping"] == 30.0


@pytest.mark.parametrize("name", TINY)
def test_tiny_per_layer_embeddings_iff_parent(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert (tiny["hidden_size_per_layer_input"] > 0) == (par["hidden_size_per_layer_input"] > 0)
    if tiny["hidden_size_per_layer_input"]:
        assert tiny["hidden_size_per_layer_input"] < tiny["hidden_size"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_moe_iff_parent_with_parallel_dense_mlp(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert tiny["enable_moe_block"] is par["enable_moe_block"]
    if not par["enable_moe_block"]:
        assert (tiny["num_experts"], tiny["top_k_experts"], tiny["moe_intermediate_size"]) == (None, None, None)
        return
    assert 1 < tiny["top_k_experts"] < tiny["num_experts"]
    assert tiny["intermediate_size"] > 0  # the dense ("shared expert") MLP runs in parallel
    # dense width = 3 x expert width, as 2112 = 3 x 704
    dense_per_expert = tiny["intermediate_size"] / tiny["moe_intermediate_size"]
    assert dense_per_expert == par["intermediate_size"] / par["moe_intermediate_size"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_kv_shared_layers_iff_parent(name):
    assert (configs.hf_config(name)["num_kv_shared_layers"] > 0) == (parent(name)["num_kv_shared_layers"] > 0)


@pytest.mark.parametrize("name", [n for n in TINY if parent(n)["num_kv_shared_layers"]])
def test_tiny_kv_donors_exist_for_each_shared_type(name):
    tiny, par = configs.hf_config(name), parent(name)
    tiny_donors, par_donors = donors(tiny), donors(par)
    assert set(tiny_donors) == set(par_donors) == {SLIDING, FULL}  # the shared tail holds both types
    assert None not in tiny_donors.values()
    # as in the parent, the donors are the two layers right before the shared tail, the full one last
    start = shared_block(tiny).start
    assert (tiny_donors[SLIDING], tiny_donors[FULL]) == (start - 2, start - 1)
    assert (par_donors[SLIDING], par_donors[FULL]) == (shared_block(par).start - 2, shared_block(par).start - 1)


@pytest.mark.parametrize("name", TINY)
def test_tiny_double_wide_mlp_iff_parent(name):
    assert configs.hf_config(name)["use_double_wide_mlp"] is parent(name)["use_double_wide_mlp"]


# ----------------------------------------------------------------------------------------------------
# tiny twins: build and run in HF


@functools.cache
def tiny_model(name: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(**configs.hf_config(name))
    return transformers.Gemma4ForCausalLM._from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", TINY)
def test_tiny_hf_modules_reflect_the_structure(name):
    hf = configs.hf_config(name)
    model = tiny_model(name)
    shared = set(shared_block(hf)) if hf["num_kv_shared_layers"] else set()
    for i, layer in enumerate(model.model.layers):
        attn, full = layer.self_attn, hf["layer_types"][i] == FULL
        assert attn.head_dim == head_dim(hf, hf["layer_types"][i])
        assert attn.q_proj.out_features == hf["num_attention_heads"] * attn.head_dim
        if i in shared:
            assert not hasattr(attn, "k_proj"), f"layer {i} is KV-shared and must have no k_proj"
        else:
            assert attn.k_proj.out_features == kv_heads(hf, hf["layer_types"][i]) * attn.head_dim
            assert (attn.v_proj is None) == (full and hf["attention_k_eq_v"])
        wide = 2 if (hf["use_double_wide_mlp"] and i in shared) else 1
        assert layer.mlp.gate_proj.out_features == wide * hf["intermediate_size"]
        assert hasattr(layer, "per_layer_input_gate") == (hf["hidden_size_per_layer_input"] > 0)
        assert hasattr(layer, "experts") == hf["enable_moe_block"]
    if hf["enable_moe_block"]:
        assert model.model.layers[0].experts.gate_up_proj.shape == (
            hf["num_experts"], 2 * hf["moe_intermediate_size"], hf["hidden_size"])


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_in_hf(name):
    torch = pytest.importorskip("torch")
    hf = configs.hf_config(name)
    model = tiny_model(name)
    torch.manual_seed(1)
    ids = torch.randint(3, hf["vocab_size"], (2, hf["sliding_window"] + 4))  # longer than the window
    ids[:, 0] = hf["bos_token_id"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, ids.shape[1], hf["vocab_size"])
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= hf["final_logit_softcapping"]


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_reference_impl_count_equals_hf(name):
    """reference_impl counts Gemma 4 from its own spec exactly as HF does (layer_scalar is a buffer)."""
    from reference_impl.spec import ModelSpec
    from reference_impl.weights import count_parameters

    counts = count_parameters(ModelSpec.from_hf_config(configs.hf_config(name)))
    hf = hf_meta_counts(name)
    assert {k: counts[k] for k in ("total", "embedding", "non_embedding")} == {
        k: hf[k] for k in ("total", "embedding", "non_embedding")}
