"""HF checkpoint names <-> reference parameter names, strict loading, parameter counts.

The mapping is an explicit table per layer. The one name that changes meaning across generations:
HF's ``post_attention_layernorm`` is the *pre-MLP* norm in Gemma 1 and the norm on the attention
output in Gemma 2 and 3 (where ``pre_feedforward_layernorm`` is the pre-MLP norm).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .model import Gemma
from .spec import LayerSpec, ModelSpec


class WeightError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor."""


def _layer_table(layer: LayerSpec) -> dict[str, str]:
    """HF suffix under ``model.layers.{i}.`` -> reference suffix under ``layers.{i}.``."""
    table = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn.q.weight",
        "self_attn.k_proj.weight": "attn.k.weight",
        "self_attn.v_proj.weight": "attn.v.weight",
        "self_attn.o_proj.weight": "attn.o.weight",
        "mlp.gate_proj.weight": "mlp.gate.weight",
        "mlp.up_proj.weight": "mlp.up.weight",
        "mlp.down_proj.weight": "mlp.down.weight",
    }
    if layer.sandwich_norms:
        table |= {
            "post_attention_layernorm.weight": "attn_post_norm.weight",
            "pre_feedforward_layernorm.weight": "mlp_norm.weight",
            "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
        }
    else:
        table["post_attention_layernorm.weight"] = "mlp_norm.weight"
    if layer.qk_norm:
        table |= {"self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight"}
    return table


def name_map(spec: ModelSpec) -> dict[str, str]:
    """Every HF tensor name the checkpoint must carry -> reference parameter name."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
    if not spec.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for layer in spec.layers:
        i = layer.index
        names |= {f"model.layers.{i}.{hf}": f"layers.{i}.{ref}" for hf, ref in _layer_table(layer).items()}
    return names


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, derived from the spec alone."""
    h, v = spec.hidden_size, spec.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in spec.layers:
        p, n, k, d, f = f"model.layers.{layer.index}.", layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate_size
        shapes |= {
            p + "self_attn.q_proj.weight": (n * d, h),
            p + "self_attn.k_proj.weight": (k * d, h),
            p + "self_attn.v_proj.weight": (k * d, h),
            p + "self_attn.o_proj.weight": (h, n * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
        norms = ["input_layernorm", "post_attention_layernorm"]
        if layer.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        shapes |= {f"{p}{norm}.weight": (h,) for norm in norms}
        if layer.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def count_parameters(spec: ModelSpec) -> dict[str, int]:
    """Parameters a checkpoint carries: a tied embedding counted once, as the papers count."""
    shapes = expected_shapes(spec)
    numel = {name: _prod(shape) for name, shape in shapes.items()}
    embedding = numel["model.embed_tokens.weight"] + numel.get("lm_head.weight", 0)
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
    if tied_head and not torch.equal(state_dict["lm_head.weight"], state_dict.get("model.embed_tokens.weight", state_dict["lm_head.weight"])):
        raise WeightError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the config ties them")
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


def load_state_dict(model: Gemma, state_dict: Mapping[str, torch.Tensor]) -> Gemma:
    """Strictly load an HF-named state dict into the reference model (cast to the model's dtype)."""
    check_state_dict(model.spec, state_dict)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, ref_name in name_map(model.spec).items():
            params[ref_name].copy_(state_dict[hf_name].to(params[ref_name].dtype))
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
    """A reference model of ``spec`` in ``dtype`` holding ``state_dict``."""
    return load_state_dict(Gemma(spec, dtype=dtype), state_dict).eval()
