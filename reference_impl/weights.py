"""HF checkpoint names <-> reference parameter names, strict loading, parameter counts.

The mapping is an explicit table per layer. The one name that changes meaning across generations:
HF's ``post_attention_layernorm`` is the *pre-MLP* norm in Gemma 1 and the norm on the attention
output in Gemma 2+ (where ``pre_feedforward_layernorm`` is the pre-MLP norm). Gemma 4 adds
``layer_scalar`` (a checkpoint buffer), the MoE router/experts and their three norms, the per-layer
embedding tensors, and drops K/V tensors on KV-shared layers (and ``v_proj`` on K=V layers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .model import Gemma
from .siglip import vision_entries
from .spec import Gemma4MediaSpec, LayerSpec, ModelSpec


class WeightError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor."""


def _model_entries(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, reference name, shape) for every tensor outside the layers."""
    h, v = spec.hidden_size, spec.vocab_size
    entries = [("model.embed_tokens.weight", "embed.weight", (v, h)), ("model.norm.weight", "final_norm.weight", (h,))]
    if not spec.tie_embeddings:
        entries.append(("lm_head.weight", "lm_head.weight", (v, h)))
    if spec.ple is not None:
        width = spec.num_layers * spec.ple.dim
        entries += [
            ("model.embed_tokens_per_layer.weight", "ple.table.weight", (spec.ple.vocab_size, width)),
            ("model.per_layer_model_projection.weight", "ple.proj.weight", (width, h)),
            ("model.per_layer_projection_norm.weight", "ple.norm.weight", (spec.ple.dim,)),
        ]
    return entries


def _layer_entries(spec: ModelSpec, layer: LayerSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF suffix under ``model.layers.{i}.``, reference suffix under ``layers.{i}.``, shape)."""
    h, n, k, d, f = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate_size
    entries = [
        ("input_layernorm.weight", "attn_norm.weight", (h,)),
        ("self_attn.q_proj.weight", "attn.q.weight", (n * d, h)),
        ("self_attn.o_proj.weight", "attn.o.weight", (h, n * d)),
        ("mlp.gate_proj.weight", "mlp.gate.weight", (f, h)),
        ("mlp.up_proj.weight", "mlp.up.weight", (f, h)),
        ("mlp.down_proj.weight", "mlp.down.weight", (h, f)),
    ]
    if layer.has_kv:  # KV-shared layers carry no K/V projections or norms
        entries.append(("self_attn.k_proj.weight", "attn.k.weight", (k * d, h)))
        if not layer.k_eq_v:
            entries.append(("self_attn.v_proj.weight", "attn.v.weight", (k * d, h)))
    if layer.sandwich_norms:
        entries += [
            ("post_attention_layernorm.weight", "attn_post_norm.weight", (h,)),
            ("pre_feedforward_layernorm.weight", "mlp_norm.weight", (h,)),
            ("post_feedforward_layernorm.weight", "mlp_post_norm.weight", (h,)),
        ]
    else:
        entries.append(("post_attention_layernorm.weight", "mlp_norm.weight", (h,)))
    if layer.qk_norm:
        entries.append(("self_attn.q_norm.weight", "attn.q_norm.weight", (d,)))
        if layer.has_kv:
            entries.append(("self_attn.k_norm.weight", "attn.k_norm.weight", (d,)))
    if layer.moe is not None:
        e, i = layer.moe.num_experts, layer.moe.intermediate_size
        entries += [
            ("router.proj.weight", "moe.router.proj.weight", (e, h)),
            ("router.scale", "moe.router.scale", (h,)),
            ("router.per_expert_scale", "moe.router.per_expert_scale", (e,)),
            ("experts.gate_up_proj", "moe.experts.gate_up", (e, 2 * i, h)),
            ("experts.down_proj", "moe.experts.down", (e, h, i)),
            ("post_feedforward_layernorm_1.weight", "moe.mlp_out_norm.weight", (h,)),
            ("pre_feedforward_layernorm_2.weight", "moe.input_norm.weight", (h,)),
            ("post_feedforward_layernorm_2.weight", "moe.out_norm.weight", (h,)),
        ]
    if spec.ple is not None:
        entries += [
            ("per_layer_input_gate.weight", "ple.gate.weight", (spec.ple.dim, h)),
            ("per_layer_projection.weight", "ple.proj.weight", (h, spec.ple.dim)),
            ("post_per_layer_input_norm.weight", "ple.post_norm.weight", (h,)),
        ]
    if spec.layer_scalar:
        entries.append(("layer_scalar", "layer_scalar.scalar", (1,)))
    return entries


def _entries(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    out = _model_entries(spec)
    for layer in spec.layers:
        i = layer.index
        out += [(f"model.layers.{i}.{hf}", f"layers.{i}.{ref}", shape) for hf, ref, shape in _layer_entries(spec, layer)]
    if spec.multimodal is not None:  # Gemma3ForConditionalGeneration: the decoder under model.language_model
        out = [(TEXT_PREFIX + hf.removeprefix("model.") if hf.startswith("model.") else hf, ref, shape)
               for hf, ref, shape in out]
        if isinstance(spec.multimodal, Gemma4MediaSpec):
            from .media import media_entries

            out += media_entries(spec.multimodal, spec.hidden_size)
        else:
            out += vision_entries(spec.multimodal, spec.hidden_size)
    return out


TEXT_PREFIX = "model.language_model."  # where an image-text checkpoint keeps its text decoder


def embedding_name(spec: ModelSpec) -> str:
    """The HF name of the token embedding (the tied LM head)."""
    return (TEXT_PREFIX if spec.multimodal is not None else "model.") + "embed_tokens.weight"


def name_map(spec: ModelSpec) -> dict[str, str]:
    """Every HF tensor name the checkpoint must carry -> reference parameter name."""
    return {hf: ref for hf, ref, _ in _entries(spec)}


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, derived from the spec alone."""
    if spec.gemma3n is not None:  # its own decoder class and name map
        from .gemma3n import expected_shapes_gemma3n

        return expected_shapes_gemma3n(spec)
    return {hf: shape for hf, _, shape in _entries(spec)}


# checkpoint tensors HF holds as buffers, not parameters: Gemma 4's layer scalar, its towers' clip bounds and
# the vision tower's standardisation vectors
_BUFFERS = ("layer_scalar", "input_min", "input_max", "output_min", "output_max", "std_bias", "std_scale")


def count_parameters(spec: ModelSpec) -> dict[str, int]:
    """Parameters a checkpoint carries: a tied embedding counted once, as the papers count (an image
    projector with the embedding, a vision tower with the rest). Gemma 4's
    ``layer_scalar`` is a buffer in HF (one value per layer), not a parameter, and is not counted."""
    shapes = {k: v for k, v in expected_shapes(spec).items() if not k.endswith(_BUFFERS)}
    numel = {name: _prod(shape) for name, shape in shapes.items()}
    # the image projector counts as embedding, as the Gemma 3 report's Table 1 counts it
    embedding = numel[embedding_name(spec)] + numel.get("lm_head.weight", 0) + sum(
        n for name, n in numel.items() if name.startswith("model.multi_modal_projector."))
    total = sum(numel.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def check_state_dict(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise WeightError naming the first missing, unexpected or misshaped tensor."""
    shapes = expected_shapes(spec)
    tied_head = spec.tie_embeddings and "lm_head.weight" in state_dict
    embed = embedding_name(spec)
    if tied_head and not torch.equal(state_dict["lm_head.weight"], state_dict.get(embed, state_dict["lm_head.weight"])):
        raise WeightError(f"tensor 'lm_head.weight' differs from {embed!r} but the config ties them")
    missing = [name for name in shapes if name not in state_dict]
    if missing:
        raise WeightError(f"missing tensor {missing[0]!r} (expected shape {shapes[missing[0]]})" + _more(missing))
    unexpected = [name for name in state_dict if name not in shapes and not (tied_head and name == "lm_head.weight")]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]!r} (shape {tuple(state_dict[unexpected[0]].shape)})" + _more(unexpected))
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise WeightError(f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}")


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def load_state_dict(model: Gemma, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> Gemma:
    """Strictly load an HF-named state dict into the reference model (cast to the model's dtype). With
    ``assign`` the model's tensors are replaced, not written: a tensor already in the model's dtype is
    then held as is, not copied (a model built on the meta device is filled this way)."""
    check_state_dict(model.spec, state_dict)
    with torch.no_grad():
        for hf_name, ref_name in name_map(model.spec).items():
            owner, _, leaf = ref_name.rpartition(".")
            module = model.get_submodule(owner)
            value = state_dict[hf_name].to(getattr(module, leaf).dtype)
            if not assign:
                getattr(module, leaf).copy_(value)
            elif leaf in module._buffers:
                module._buffers[leaf] = value
            else:
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightError(f"reference parameter {left[0]!r} has no tensor in the checkpoint's name map")
    return model


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one ``.safetensors`` file or every shard in a checkpoint directory."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
    )
    if not files:
        raise WeightError(f"no .safetensors files in {path!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def build(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Gemma:
    """A reference model of ``spec`` in ``dtype`` holding ``state_dict``.

    Built on the meta device and filled by assignment: a tensor already in ``dtype`` is used as is (not
    copied; the reference never writes to its weights), any other is cast once. A full-size model then
    costs one copy of its weights, not two. A Gemma 3n spec builds :class:`reference_impl.gemma3n.Gemma3n`."""
    if spec.gemma3n is not None:
        from .gemma3n import build_gemma3n

        return build_gemma3n(spec, state_dict, dtype)
    return load_state_dict(Gemma(spec, dtype=dtype, device="meta"), state_dict, assign=True).eval()
