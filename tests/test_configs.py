"""Tests for the shipped model configs (configs/*.json) and their loader.

Parameter-count tolerances come from the data (``published_params.tolerance``) and are justified by how
precisely each figure is published:

* Gemma 1 / Gemma 2 papers print exact integers -> tolerance 0 (after the exact, documented removal of
  the 128 padding rows of the original 256,128-row embedding table, which HF checkpoints drop).
* Gemma 3 technical report prints millions -> +-0.5M per printed figure, +-1M for a sum of two.
* Gemma 3 270M is published as 270M = 170M + 100M, rounded to 10M -> +-5M.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest

import configs

RELEASED = [
    "gemma-2b",
    "gemma-7b",
    "gemma-2-2b",
    "gemma-2-9b",
    "gemma-2-27b",
    "gemma-3-270m",
    "gemma-3-1b",
    "gemma-3-4b",
    "gemma-3-12b",
    "gemma-3-27b",
]
TINY = [f"{n}-tiny" for n in RELEASED]
SLIDING, FULL = "sliding_attention", "full_attention"

# Fields a tiny twin may shrink; every other hf_config field must equal the parent's.
SIZE_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
}

# Independent spot checks of the released configs against the notes (§3 of hf-gemma-1-3-numerics.md
# and the DeepMind JAX config table): (query_pre_attn_scalar, sliding_window, #global layers, max_pos).
RELEASED_FACTS = {
    "gemma-2b": (None, None, 18, 8192),
    "gemma-7b": (None, None, 28, 8192),
    "gemma-2-2b": (256, 4096, 13, 8192),
    "gemma-2-9b": (256, 4096, 21, 8192),
    "gemma-2-27b": (144, 4096, 23, 8192),
    "gemma-3-270m": (256, 512, 3, 32768),
    "gemma-3-1b": (256, 512, 4, 32768),
    "gemma-3-4b": (256, 1024, 5, 131072),
    "gemma-3-12b": (256, 1024, 8, 131072),
    "gemma-3-27b": (168, 1024, 10, 131072),
}


# ----------------------------------------------------------------------------------------------------
# helpers


def parent(tiny_name: str) -> dict:
    return configs.hf_config(configs.load(tiny_name)["tiny_of"])


def kv_class(hf: dict) -> str:
    n_h, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    if n_kv == 1:
        return "MQA"
    if n_kv == n_h:
        return "MHA"
    assert n_h % n_kv == 0 and n_h // n_kv > 1, hf
    return "GQA"


def layer_types(hf: dict) -> list[str]:
    # Gemma 1 has no layer_types: every layer is global.
    return hf.get("layer_types", [FULL] * hf["num_hidden_layers"])


def expected_layer_types(hf: dict) -> list[str]:
    n = hf["num_hidden_layers"]
    if hf["model_type"] == "gemma":
        return [FULL] * n
    if hf["model_type"] == "gemma2":  # alternate, starting with sliding: global at odd indices
        return [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    return [SLIDING if (i + 1) % 6 else FULL for i in range(n)]  # Gemma 3: 5 sliding then 1 global


def sign(x: int) -> int:
    return (x > 0) - (x < 0)


def q_width_vs_hidden(hf: dict) -> int:
    """-1 / 0 / +1: num_attention_heads * head_dim smaller than / equal to / larger than hidden_size."""
    return sign(hf["num_attention_heads"] * hf["head_dim"] - hf["hidden_size"])


def transformers_or_skip():
    return pytest.importorskip("transformers")


@functools.cache
def hf_meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of the HF model built on the meta device (tied embedding counted once)."""
    torch = pytest.importorskip("torch")
    transformers = transformers_or_skip()
    cfg = transformers.AutoConfig.for_model(**configs.hf_config(name))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed, f"{name}: lm_head is not tied to the embedding"
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    return {"total": total, "embedding": embed.numel(), "non_embedding": total - embed.numel()}


def assert_matches_published(name: str, counts: dict[str, int], who: str) -> None:
    pub = configs.load(name)["published_params"]
    for key in ("total", "embedding", "non_embedding"):
        diff = counts[key] - pub[key]
        tol = pub["tolerance"][key]
        assert abs(diff) <= tol, (
            f"{name}: {who} {key} = {counts[key]:,} vs published {pub[key]:,} "
            f"(diff {diff:+,}, tolerance +-{tol:,})"
        )


# ----------------------------------------------------------------------------------------------------
# loader


def _gen123(names: list[str]) -> list[str]:
    # Gemma 4 (generation 4) configs are checked in tests/test_configs_gemma4.py.
    return [n for n in names if configs.load(n)["generation"] <= 3]


def test_names_lists_all_twenty():
    assert _gen123(configs.names()) == [n for r in RELEASED for n in (r, f"{r}-tiny")]
    assert _gen123(configs.names(tiny=False)) == RELEASED
    assert _gen123(configs.names(tiny=True)) == TINY


def test_load_unknown_name_raises_keyerror_naming_it():
    with pytest.raises(KeyError) as info:
        configs.load("gemma-2-9")
    msg = str(info.value)
    assert "gemma-2-9" in msg and "gemma-2-9b" in msg  # names it and suggests the close match
    with pytest.raises(KeyError, match="no-such-model"):
        configs.hf_config("no-such-model")


def test_hf_config_is_a_deep_copy():
    a = configs.hf_config("gemma-3-4b")
    a["rope_parameters"]["full_attention"]["factor"] = 1.0
    a["layer_types"].clear()
    b = configs.hf_config("gemma-3-4b")
    assert b["rope_parameters"]["full_attention"]["factor"] == 8.0
    assert len(b["layer_types"]) == 34


def test_malformed_file_error_names_file_and_key(tmp_path, monkeypatch):
    good = configs.load("gemma-2-9b")
    broken = copy.deepcopy(good)
    broken["name"] = "broken-variant"
    del broken["hf_config"]["head_dim"]
    (tmp_path / "broken-variant.json").write_text(json.dumps(broken))
    no_pub = copy.deepcopy(good)
    no_pub["name"] = "nopub-variant"
    del no_pub["published_params"]["source"]
    (tmp_path / "nopub-variant.json").write_text(json.dumps(no_pub))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._read.cache_clear()
    try:
        with pytest.raises(configs.ConfigError, match=r"^broken-variant\.json: .*'hf_config\.head_dim'"):
            configs.load("broken-variant")
        with pytest.raises(configs.ConfigError, match=r"nopub-variant\.json: .*'published_params\.source'"):
            configs.load("nopub-variant")
    finally:
        configs._read.cache_clear()


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_file_shape(name):
    data = configs.load(name)
    assert data["name"] == name
    hf = data["hf_config"]
    gen = data["generation"]
    assert hf["model_type"] == {1: "gemma", 2: "gemma2", 3: "gemma3_text"}[gen]
    assert hf["architectures"] == [
        {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}[gen]
    ]
    act_key = "hidden_act" if gen == 1 else "hidden_activation"
    assert hf[act_key] == "gelu_pytorch_tanh"
    assert (hf["pad_token_id"], hf["eos_token_id"], hf["bos_token_id"]) == (0, 1, 2)
    assert hf["tie_word_embeddings"] is True and hf["attention_bias"] is False
    assert hf["rms_norm_eps"] == 1e-6
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
    qpas, window, n_global, max_pos = RELEASED_FACTS[name]
    assert hf.get("query_pre_attn_scalar") == qpas
    assert hf.get("sliding_window") == window
    assert layer_types(hf).count(FULL) == n_global
    assert layer_types(hf) == expected_layer_types(hf)
    assert hf["max_position_embeddings"] == max_pos
    if hf["model_type"] == "gemma2":
        assert (hf["attn_logit_softcapping"], hf["final_logit_softcapping"]) == (50.0, 30.0)
        assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    if hf["model_type"] == "gemma3_text":
        assert hf["final_logit_softcapping"] is None and hf["attn_logit_softcapping"] is None
        assert hf["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
        multimodal = hf["vocab_size"] == 262208
        assert multimodal == (name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"))
        full = {"rope_type": "linear", "factor": 8.0} if multimodal else {"rope_type": "default"}
        assert hf["rope_parameters"]["full_attention"] == {**full, "rope_theta": 1000000.0}


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_hf_config_round_trips(name):
    """The HF config class accepts the dict and keeps every value (rope_parameters, layer_types, window...)."""
    transformers = transformers_or_skip()
    d = configs.hf_config(name)
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(d))
    assert cfg.model_type == d["model_type"]
    out = cfg.to_dict()
    changed = {k: (v, out.get(k, "<missing>")) for k, v in d.items() if out.get(k, "<missing>") != v}
    assert not changed, f"{name}: HF changed these fields (ours, HF's): {changed}"
    # Attributes as the model reads them.
    if "layer_types" in d:
        assert list(cfg.layer_types) == d["layer_types"]
        assert cfg.sliding_window == d["sliding_window"]


@pytest.mark.parametrize("name", RELEASED)
def test_published_params_are_consistent(name):
    """total = embedding + non_embedding, and the derivation from the printed figures is the documented one."""
    pub = configs.load(name)["published_params"]
    hf = configs.hf_config(name)
    assert pub["total"] == pub["embedding"] + pub["non_embedding"]
    assert pub["source"] and pub["scope"]
    assert all(isinstance(t, int) and t >= 0 for t in pub["tolerance"].values())
    printed = pub["as_published"]
    assert pub["embedding"] == printed["embedding"] + pub["embedding_adjustment"]
    assert pub["non_embedding"] == printed["non_embedding"]
    if "total" in printed:
        assert pub["total"] == printed["total"]
    H = hf["hidden_size"]
    if hf["model_type"] in ("gemma", "gemma2"):
        # exact figures; the paper's embedding table has 256,128 rows, HF's has vocab_size rows
        rows = printed["embedding_vocab_rows"]
        assert printed["embedding"] == rows * H
        assert pub["embedding_adjustment"] == -(rows - hf["vocab_size"]) * H
        assert pub["tolerance"] == {"total": 0, "embedding": 0, "non_embedding": 0}
    elif "vision_encoder" in printed and printed["vision_encoder"]:
        # multimodal: the printed embedding column also holds the projector (norm 1152 + 1152 x H matrix)
        assert pub["embedding_adjustment"] == -(1152 * H + 1152)
        assert "vision" in pub["scope"] and "excluded" in pub["scope"]
    else:
        assert pub["embedding_adjustment"] == 0


@pytest.mark.parametrize("name", RELEASED)
def test_hf_meta_param_count_matches_published(name):
    assert_matches_published(name, hf_meta_counts(name), "HF meta-device model")


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_reference_impl_param_count(name):
    """reference_impl's own count equals HF's exactly, and (released) the published figure within tolerance."""
    from reference_impl.spec import ModelSpec
    from reference_impl.weights import count_parameters

    counts = count_parameters(ModelSpec.from_hf_config(configs.hf_config(name)))
    assert {k: counts[k] for k in ("total", "embedding", "non_embedding")} == hf_meta_counts(name)
    if name in RELEASED:
        assert_matches_published(name, counts, "reference_impl")


# ----------------------------------------------------------------------------------------------------
# tiny twins: size limits


@pytest.mark.parametrize("name", TINY)
def test_tiny_size_limits(name):
    hf = configs.hf_config(name)
    assert hf["hidden_size"] <= 256
    assert hf["num_hidden_layers"] <= 8
    assert hf["vocab_size"] <= 1024
    assert (hf["pad_token_id"], hf["eos_token_id"], hf["bos_token_id"]) == (0, 1, 2)
    assert hf["max_position_embeddings"] >= 512
    if "sliding_window" in hf:
        assert 8 <= hf["sliding_window"] <= 16
    assert 2 * hf["hidden_size"] <= hf["intermediate_size"] <= 8 * hf["hidden_size"]
    assert hf["hidden_size"] % hf["num_attention_heads"] == 0  # HF's validate_architecture (G2/G3)


# ----------------------------------------------------------------------------------------------------
# tiny twins: structure mirrors the parent


@pytest.mark.parametrize("name", TINY)
def test_tiny_same_fields_and_non_size_values(name):
    tiny, par = configs.hf_config(name), parent(name)
    assert tiny.keys() == par.keys()
    differ = {k: (par[k], tiny[k]) for k in tiny if k not in SIZE_FIELDS and tiny[k] != par[k]}
    assert not differ, f"{name}: non-size fields differ from the parent (parent, tiny): {differ}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_kv_head_class(name):
    assert kv_class(configs.hf_config(name)) == kv_class(parent(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_kv_group_size(name):
    """GQA / MHA twins keep the parent's query-heads-per-KV-head; MQA twins keep exactly one KV head."""
    tiny, par = configs.hf_config(name), parent(name)
    if kv_class(par) == "MQA":
        assert tiny["num_key_value_heads"] == 1 < tiny["num_attention_heads"]
    else:
        group = tiny["num_attention_heads"] // tiny["num_key_value_heads"]
        assert group == par["num_attention_heads"] // par["num_key_value_heads"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_layer_pattern_rule(name):
    tiny = configs.hf_config(name)
    assert layer_types(tiny) == expected_layer_types(tiny)
    assert layer_types(parent(name)) == expected_layer_types(parent(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_has_global_layer(name):
    assert FULL in layer_types(configs.hf_config(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_has_sliding_layer_iff_parent_has(name):
    assert (SLIDING in layer_types(configs.hf_config(name))) == (SLIDING in layer_types(parent(name)))


@pytest.mark.parametrize("name", TINY)
def test_tiny_has_sliding_layer_after_a_global_layer_iff_parent_has(name):
    def slides_after_global(hf):
        lt = layer_types(hf)
        return FULL in lt and SLIDING in lt[lt.index(FULL) :]

    assert slides_after_global(configs.hf_config(name)) == slides_after_global(parent(name))


@pytest.mark.parametrize("name", TINY)
def test_tiny_query_scale_rule(name):
    tiny, par = configs.hf_config(name), parent(name)
    if "query_pre_attn_scalar" not in par:  # Gemma 1: scale is head_dim**-0.5 by construction
        assert "query_pre_attn_scalar" not in tiny
        return
    assert (tiny["query_pre_attn_scalar"] == tiny["head_dim"]) == (
        par["query_pre_attn_scalar"] == par["head_dim"]
    )

    # the 27B rule: qpas = hidden / heads, wherever the parent uses it; and the same qpas/head_dim ratio
    def by_hidden(hf):
        return hf["query_pre_attn_scalar"] * hf["num_attention_heads"] == hf["hidden_size"]

    assert by_hidden(tiny) == by_hidden(par)
    assert tiny["query_pre_attn_scalar"] / tiny["head_dim"] == par["query_pre_attn_scalar"] / par["head_dim"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_softcaps_equal(name):
    tiny, par = configs.hf_config(name), parent(name)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        assert tiny.get(key, "absent") == par.get(key, "absent"), key


@pytest.mark.parametrize("name", TINY)
def test_tiny_rope_thetas_and_scaling_equal(name):
    assert configs.hf_config(name)["rope_parameters"] == parent(name)["rope_parameters"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_query_width_vs_hidden(name):
    """num_heads*head_dim vs hidden_size: equal, larger or smaller exactly as in the parent."""
    assert q_width_vs_hidden(configs.hf_config(name)) == q_width_vs_hidden(parent(name))


# ----------------------------------------------------------------------------------------------------
# tiny twins: build and run in HF


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_in_hf(name):
    torch = pytest.importorskip("torch")
    transformers = transformers_or_skip()
    hf = configs.hf_config(name)
    cfg = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    window = hf.get("sliding_window") or 8
    ids = torch.randint(3, hf["vocab_size"], (2, window + 4))  # longer than the window
    ids[:, 0] = hf["bos_token_id"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, ids.shape[1], hf["vocab_size"])
    assert torch.isfinite(logits).all()
    cap = hf.get("final_logit_softcapping")
    if cap is not None:
        assert logits.abs().max() <= cap
