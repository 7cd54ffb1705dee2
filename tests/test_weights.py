"""HF name mapping, strict loading, safetensors round trip and parameter counts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import configs
from harness.synthetic import make_batch, random_state_dict
from reference_impl.model import Gemma
from reference_impl.spec import ModelSpec
from reference_impl.weights import (
    WeightError,
    build,
    check_state_dict,
    count_parameters,
    expected_shapes,
    load_state_dict,
    name_map,
    read_safetensors,
)

ONE_PER_GENERATION = ["gemma-2b-tiny", "gemma-2-2b-tiny", "gemma-3-1b-tiny"]


def spec_of(name: str, **overrides) -> ModelSpec:
    cfg = configs.hf_config(name)
    cfg.update(overrides)
    return ModelSpec.from_hf_config(cfg)


def _hf_names(spec: ModelSpec) -> set[str]:
    """Independent list of the tensors an HF Gemma checkpoint carries."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tie_embeddings:
        names.add("lm_head.weight")
    per_layer = [
        "input_layernorm", "post_attention_layernorm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    if spec.family in ("gemma2", "gemma3_text"):
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if spec.family == "gemma3_text":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    for i in range(spec.num_layers):
        names |= {f"model.layers.{i}.{p}.weight" for p in per_layer}
    return names


# --- name_map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in configs.names(tiny=True) if configs.load(n)["generation"] <= 3])
def test_name_map_covers_checkpoint_and_model(name):
    spec = spec_of(name)
    mapping = name_map(spec)
    assert set(mapping) == _hf_names(spec) == set(expected_shapes(spec))
    # A bijection onto the model's parameters.
    params = dict(Gemma(spec).named_parameters())
    assert sorted(mapping.values()) == sorted(params)
    shapes = expected_shapes(spec)
    for hf, ref in mapping.items():
        assert tuple(params[ref].shape) == shapes[hf], hf


@pytest.mark.parametrize("name", [n for n in configs.names() if configs.load(n)["generation"] == 4])
def test_gemma4_names_and_shapes_equal_hf_checkpoint(name):
    """Gemma 4 (every released shape and its twin): our expected tensors are exactly HF's state dict —
    no K/V on KV-shared layers, no v_proj on K=V layers, layer_scalar, router/experts, PLE tensors."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**configs.hf_config(name))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    spec = spec_of(name)
    assert expected_shapes(spec) == hf_shapes
    model = Gemma(spec, device="meta")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())  # layer_scalar is a buffer, as in HF
    assert sorted(name_map(spec).values()) == sorted(tensors)


def test_name_map_untied_has_lm_head():
    spec = spec_of("gemma-2-2b-tiny", tie_word_embeddings=False)
    assert name_map(spec)["lm_head.weight"] == "lm_head.weight"
    assert "lm_head.weight" not in name_map(spec_of("gemma-2-2b-tiny"))


def test_gemma1_post_attention_layernorm_is_pre_mlp_norm():
    mapping = name_map(spec_of("gemma-2b-tiny"))
    for i in range(4):
        assert mapping[f"model.layers.{i}.post_attention_layernorm.weight"] == f"layers.{i}.mlp_norm.weight"
        assert mapping[f"model.layers.{i}.input_layernorm.weight"] == f"layers.{i}.attn_norm.weight"
    assert not any("pre_feedforward" in n or "post_feedforward" in n for n in mapping)


@pytest.mark.parametrize("name", ["gemma-2-2b-tiny", "gemma-3-1b-tiny"])
def test_gemma2_3_post_attention_layernorm_is_attn_post_norm(name):
    spec = spec_of(name)
    mapping = name_map(spec)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        assert mapping[p + "post_attention_layernorm.weight"] == f"layers.{i}.attn_post_norm.weight"
        assert mapping[p + "pre_feedforward_layernorm.weight"] == f"layers.{i}.mlp_norm.weight"
        assert mapping[p + "post_feedforward_layernorm.weight"] == f"layers.{i}.mlp_post_norm.weight"
        assert mapping[p + "self_attn.q_proj.weight"] == f"layers.{i}.attn.q.weight"
        assert mapping[p + "mlp.down_proj.weight"] == f"layers.{i}.mlp.down.weight"
    if spec.family == "gemma3_text":
        assert mapping["model.layers.0.self_attn.q_norm.weight"] == "layers.0.attn.q_norm.weight"
        assert mapping["model.layers.0.self_attn.k_norm.weight"] == "layers.0.attn.k_norm.weight"


def test_gemma1_norm_mapping_changes_the_output():
    # Functional check: scaling HF's post_attention_layernorm in Gemma 1 must change the MLP input
    # (it is the pre-MLP norm), hence layers.0.mlp, but not layers.0.attn.
    spec = spec_of("gemma-2b-tiny")
    state = random_state_dict(spec, seed=0)
    ids = make_batch(spec, length=6).input_ids[:1]
    base, changed = {}, {}
    with torch.no_grad():
        build(spec, state)(ids, capture=base)
        state["model.layers.0.post_attention_layernorm.weight"] = state["model.layers.0.post_attention_layernorm.weight"] + 1.0
        build(spec, state)(ids, capture=changed)
    assert torch.equal(base["layers.0.attn"], changed["layers.0.attn"])
    assert not torch.allclose(base["layers.0.mlp"], changed["layers.0.mlp"])


# --- strict loading ------------------------------------------------------------------------------


def _loaders(spec):
    return [
        lambda sd: check_state_dict(spec, sd),
        lambda sd: load_state_dict(Gemma(spec), sd),
        lambda sd: build(spec, sd),
    ]


@pytest.mark.parametrize("name", ONE_PER_GENERATION)
def test_missing_tensor_named(name):
    spec = spec_of(name)
    state = random_state_dict(spec)
    victim = "model.layers.1.mlp.up_proj.weight"
    del state[victim]
    for load in _loaders(spec):
        with pytest.raises(WeightError, match=f"missing tensor '{victim}'"):
            load(state)


@pytest.mark.parametrize("name", ONE_PER_GENERATION)
def test_unexpected_tensor_named(name):
    spec = spec_of(name)
    state = random_state_dict(spec)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    for load in _loaders(spec):
        with pytest.raises(WeightError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary_emb\.inv_freq'"):
            load(state)


@pytest.mark.parametrize("name", ONE_PER_GENERATION)
def test_misshaped_tensor_named(name):
    spec = spec_of(name)
    state = random_state_dict(spec)
    victim = "model.layers.2.self_attn.k_proj.weight"
    state[victim] = state[victim].T.contiguous()
    for load in _loaders(spec):
        with pytest.raises(WeightError, match=rf"tensor '{victim}' has shape"):
            load(state)


def test_gemma1_checkpoint_rejected_by_gemma2_spec():
    # A Gemma 2 spec with Gemma 1 tensors: the sandwich norms are missing.
    spec2 = spec_of("gemma-2-2b-tiny")
    state = random_state_dict(spec2)
    for key in [k for k in state if "feedforward_layernorm" in k]:
        del state[key]
    with pytest.raises(WeightError, match="pre_feedforward_layernorm|post_feedforward_layernorm"):
        check_state_dict(spec2, state)


def test_tied_lm_head_in_checkpoint():
    spec = spec_of("gemma-2-2b-tiny")
    state = random_state_dict(spec)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    check_state_dict(spec, state)  # an identical copy of a tied head is accepted
    state["lm_head.weight"][0, 0] += 1.0
    with pytest.raises(WeightError, match="lm_head.weight"):
        check_state_dict(spec, state)


def test_untied_lm_head_required_and_used():
    spec = spec_of("gemma-2-2b-tiny", tie_word_embeddings=False)
    state = random_state_dict(spec)
    assert "lm_head.weight" in state
    model = build(spec, state)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    del state["lm_head.weight"]
    with pytest.raises(WeightError, match="missing tensor 'lm_head.weight'"):
        check_state_dict(spec, state)


def test_load_copies_values_and_casts():
    spec = spec_of("gemma-3-1b-tiny")
    state = random_state_dict(spec)
    model = build(spec, state, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    for hf, ref in name_map(spec).items():
        assert params[ref].dtype == torch.bfloat16
        assert torch.equal(params[ref], state[hf].bfloat16()), hf


# --- safetensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ONE_PER_GENERATION)
def test_safetensors_round_trip(name, tmp_path):
    spec = spec_of(name)
    state = random_state_dict(spec, seed=4)
    single = tmp_path / "model.safetensors"
    save_file(state, str(single))

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, str(shard_dir / "model-00002-of-00002.safetensors"))
    (shard_dir / "config.json").write_text("{}")  # non-safetensors files are ignored

    batch = make_batch(spec, seed=4, length=12)
    with torch.no_grad():
        reference = build(spec, state)(batch.input_ids, batch.attention_mask)
        for path in (single, shard_dir, str(single)):
            loaded = read_safetensors(path)
            assert set(loaded) == set(state)
            assert all(torch.equal(loaded[k], state[k]) for k in state)
            logits = build(spec, loaded)(batch.input_ids, batch.attention_mask)
            assert torch.equal(logits, reference)


def test_read_safetensors_empty_directory(tmp_path):
    with pytest.raises(WeightError, match="no .safetensors files"):
        read_safetensors(tmp_path)


# --- parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", configs.names(tiny=True))
@pytest.mark.parametrize("tie", [True, False])
def test_count_parameters_matches_built_model(name, tie):
    spec = spec_of(name, tie_word_embeddings=tie)
    counts = count_parameters(spec)
    model = Gemma(spec)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    embedding = spec.vocab_size * spec.hidden_size * (1 if tie else 2)
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding


def test_count_parameters_by_hand_gemma2b_tiny():
    # V=512 H=64 L=4 N=4 K=1 D=16 F=512, tied, 2 norms per layer:
    # per layer q 64*64 + k 64*16 + v 64*16 + o 64*64 + 3*64*512 + 2*64 = 108672.
    cfg = configs.hf_config("gemma-2b-tiny")
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (512, 64, 4, 4, 1, 16, 512)
    counts = count_parameters(ModelSpec.from_hf_config(cfg))
    assert counts == {"total": 4 * 108672 + 512 * 64 + 64, "embedding": 32768, "non_embedding": 4 * 108672 + 64}


def test_count_parameters_gemma3_has_qk_norms_and_sandwich():
    spec = spec_of("gemma-3-1b-tiny")
    h, d, n, k, f, v, L = 72, 16, 4, 1, 432, 512, 7
    per_layer = h * n * d * 2 + h * k * d * 2 + 3 * h * f + 4 * h + 2 * d
    assert count_parameters(spec)["total"] == L * per_layer + v * h + h
    assert count_parameters(spec)["non_embedding"] == L * per_layer + h
