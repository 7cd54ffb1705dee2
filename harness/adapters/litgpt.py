"""litgpt's own Gemma 1, 2 and 3 implementation (``litgpt.model.GPT``) as a candidate of the gate.

The HF config is translated field by field into a ``litgpt.Config`` (:func:`litgpt_config`), and the
HF state dict into litgpt's parameter names by litgpt's own converters
(``litgpt.scripts.convert_hf_checkpoint.copy_weights_*``, chosen as litgpt's ``convert_hf_checkpoint``
chooses them), then loaded strictly: no litgpt parameter left unset, no HF tensor dropped. In
bfloat16 the model is cast with ``module.to(dtype)`` after loading, as litgpt's Fabric ``bf16-true``
precision does (RoPE tables included).

What litgpt lacks, and how that is reported:

* ``GPT.forward(idx, input_pos=None, ...)`` takes no attention mask and no position ids: every row
  is attended causally from its first token at positions ``arange(T)``. The adapter declares
  ``padding`` and ``position_ids`` unsupported (the gate then runs each row alone, unpadded), and
  ``run()`` raises :class:`Unsupported` on a padded batch or on positions other than ``arange(T)``.
* A config litgpt's ``Config`` cannot express (RoPE scaling other than linear, a scaled RoPE on
  sliding layers, attention biases, bidirectional attention, another activation, ...) raises
  :class:`AdapterError` from :meth:`LitGPTAdapter.load`, one line naming the field.
* :meth:`LitGPTAdapter.decode` drives litgpt's KV cache as litgpt's ``generate`` does
  (``set_kv_cache``, ``input_pos``, ``input_pos_maxp1``). A schedule litgpt refuses (its
  sliding-window ring buffer rejects a chunk longer than the window; ``GPT.forward`` rejects
  sequences longer than ``max_seq_length``) raises ``NotImplementedError`` with litgpt's message.
  Schedules litgpt accepts are run as they are, even where its answer is wrong: that is for the
  harness to find, not for the adapter to hide.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version

import torch

from ..synthetic import Batch
from .base import Adapter, AdapterError, Unsupported, feed_in_chunks

FAMILIES = ("gemma", "gemma2", "gemma3_text")
# HF model type -> litgpt config name prefix. The name matters: litgpt's RMSNorm adds the Gemma +1
# offset to its weight only when "Gemma" is in the config name (litgpt/config.py, Config.norm_class).
_NAME = {"gemma": "Gemma", "gemma2": "Gemma-2", "gemma3_text": "Gemma-3"}
# HF hidden activation -> litgpt's GemmaMLP ``gelu_approximate``
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
_LAYER_TYPES = ("sliding_attention", "full_attention")

PADDING_REASON = ("litgpt's GPT.forward(idx, input_pos) takes no attention mask: each row is attended "
                  "causally from its first token, so a left-padded row would attend its pads")
POSITIONS_REASON = ("litgpt's GPT.forward takes no position ids: RoPE positions are arange(T) "
                    "(input_pos is the KV-cache slot as well, usable only with a cache)")


def litgpt_version() -> str:
    return version("litgpt")


# ----------------------------------------------------------------------------- config mapping


def litgpt_config(hf_config: Mapping):
    """The ``litgpt.Config`` that describes exactly this HF Gemma 1/2/3 config; AdapterError for
    a field litgpt cannot represent."""
    from litgpt import Config

    hf = dict(hf_config)
    _check_representable(hf)
    fields = {**_core_fields(hf), **_attention_fields(hf), **_rope_fields(hf)}
    try:
        return Config(**fields)
    except (AssertionError, ValueError) as exc:
        raise AdapterError(f"litgpt.Config rejects the mapped config: {type(exc).__name__}: {exc}") from exc


def _check_representable(hf: dict) -> None:
    """Fail early, in one line, on what litgpt's Gemma path has no field for."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise AdapterError(f"litgpt: model_type {model_type!r} is not a Gemma 1/2/3 text model {FAMILIES}")
    if _activation(hf) not in _GELU:
        raise AdapterError(f"litgpt: hidden activation {_activation(hf)!r} (GemmaMLP has only GELU, tanh or exact)")
    if hf.get("attention_bias"):
        raise AdapterError("litgpt: attention_bias=True (litgpt's Gemma converters carry no q/k/v/o biases)")
    if hf.get("use_bidirectional_attention"):
        raise AdapterError("litgpt: use_bidirectional_attention=True (litgpt's attention is always causal)")
    unknown = set(hf.get("layer_types") or ()) - set(_LAYER_TYPES)
    if unknown:
        raise AdapterError(f"litgpt: layer types {sorted(unknown)} (only sliding or full attention)")


def _activation(hf: dict) -> str | None:
    return hf.get("hidden_activation") or hf.get("hidden_act")


def _core_fields(hf: dict) -> dict:
    """Sizes, norms, MLP, embedding scale and the Gemma 2/3 sandwich norms and QK norm."""
    generation = hf["model_type"]
    return dict(
        name=f"{_NAME[generation]}-harness-twin",
        block_size=hf.get("max_position_embeddings", 8192),
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],  # no padded logit columns
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        n_query_groups=hf["num_key_value_heads"],
        head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm_class_name="RMSNorm",
        norm_eps=hf["rms_norm_eps"],
        mlp_class_name="GemmaMLP",
        gelu_approximate=_GELU[_activation(hf)],
        scale_embeddings=True,
        parallel_residual=False,
        bias=False,
        attn_bias=False,
        lm_head_bias=False,
        post_attention_norm=generation != "gemma",
        post_mlp_norm=generation != "gemma",
        norm_qk=generation == "gemma3_text",
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )


def _attention_fields(hf: dict) -> dict:
    """Query scale, attention softcap, and which layers slide over how many tokens."""
    fields = dict(
        attention_scores_scalar=hf.get("query_pre_attn_scalar"),  # None: head_size, as Gemma 1
        attention_logit_softcapping=hf.get("attn_logit_softcapping"),
    )
    layer_types = hf.get("layer_types")
    if hf.get("sliding_window") and layer_types is None:
        raise AdapterError("litgpt: sliding_window without layer_types (which layers slide must be explicit)")
    if layer_types and "sliding_attention" in layer_types:
        fields["sliding_window_size"] = hf["sliding_window"]
        fields["sliding_window_indices"] = [int(kind == "sliding_attention") for kind in layer_types]
    return fields


def _rope_fields(hf: dict) -> dict:
    """RoPE base and linear scaling; Gemma 3's per-layer-type RoPE as litgpt's local base frequency
    (sliding layers, always unscaled in litgpt) and ``rope_indices`` (1 = local)."""
    params = hf.get("rope_parameters")
    if not params:
        raise AdapterError("litgpt: the config has no rope_parameters")
    per_type = any(kind in params for kind in _LAYER_TYPES)
    full = params.get("full_attention", params.get("sliding_attention")) if per_type else params
    fields = dict(rotary_percentage=_rotary_fraction(full), rope_base=full["rope_theta"],
                  rope_adjustments=_rope_scaling(full, "full-attention"))
    if per_type and "sliding_attention" in params:
        sliding = params["sliding_attention"]
        if _rope_scaling(sliding, "sliding-attention") is not None:
            raise AdapterError("litgpt: scaled RoPE on sliding layers (litgpt's local RoPE, "
                               "rope_local_base_freq, is always unscaled)")
        if _rotary_fraction(sliding) != fields["rotary_percentage"]:
            raise AdapterError("litgpt: different partial rotary factors per layer type")
        fields["rope_local_base_freq"] = sliding["rope_theta"]
        layer_types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
        fields["rope_indices"] = [int(kind == "sliding_attention") for kind in layer_types]
    return fields


def _rope_scaling(params: Mapping, where: str) -> dict | None:
    """litgpt's ``rope_adjustments`` for one HF RoPE parameter set: None or linear scaling."""
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    if kind == "linear":
        return {"factor": params["factor"]}
    raise AdapterError(f"litgpt: {where} RoPE type {kind!r} (the Gemma path takes default or linear here)")


def _rotary_fraction(params: Mapping) -> float:
    return float(params.get("partial_rotary_factor", 1.0))


# ----------------------------------------------------------------------------- weights


def litgpt_state_dict(config, model_type: str, hf_state: Mapping[str, torch.Tensor],
                      tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF-named tensors under litgpt's names, converted by the copy function litgpt's own
    ``convert_hf_checkpoint`` picks for this model (Gemma 1: the Llama one, by ``GemmaMLP``).
    Tensors pass through uncast, so an HF tensor the converter skips (litgpt's Gemma 3 converter
    drops names it does not know) is an error rather than a weight quietly left out."""
    from litgpt.scripts import convert_hf_checkpoint as convert

    hf_weights = dict(hf_state)
    if tie_embeddings:  # HF ignores a stored lm_head when tied; litgpt's converter then copies wte
        hf_weights.pop("lm_head.weight", None)
    qkv_pending: dict = {}
    litgpt_weights: dict[str, torch.Tensor] = {}
    try:
        if model_type == "gemma2":
            convert.copy_weights_gemma_2(qkv_pending, litgpt_weights, hf_weights)
        elif model_type == "gemma3_text":
            convert.copy_weights_gemma_3(qkv_pending, litgpt_weights, hf_weights, config=config)
        else:
            convert.copy_weights_hf_llama(config, qkv_pending, litgpt_weights, hf_weights)
    except KeyError as exc:
        raise AdapterError(f"litgpt's converter has no mapping for HF tensor {exc}") from exc
    _check_all_converted(hf_weights, litgpt_weights, qkv_pending)
    return litgpt_weights


_QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")  # fused into attn.qkv.weight


def _check_all_converted(hf_weights: dict, litgpt_weights: dict, qkv_pending: dict) -> None:
    kept = {id(tensor) for tensor in litgpt_weights.values()}
    dropped = [name for name, tensor in hf_weights.items() if id(tensor) not in kept and not name.endswith(_QKV)]
    if dropped:
        raise AdapterError(f"litgpt's converter dropped HF tensors {dropped[:3]}")
    unfused = sorted(layer for layer, parts in qkv_pending.items() if any(parts.values()))
    if unfused:
        raise AdapterError(f"litgpt's converter left q/k/v unfused in layers {unfused[:3]}")


def load_strictly(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AdapterError(f"litgpt: converted state dict does not fit GPT: {what}")


# ----------------------------------------------------------------------------- probes


def _save_input(captured: dict, probe: str):
    def hook(_module, args):
        captured[probe] = args[0].detach()

    return hook


def _save_output(captured: dict, probe: str):
    def hook(_module, _args, output):
        captured[probe] = output.detach()

    return hook


def register_probe_hooks(model, captured: dict) -> list:
    """Forward hooks filling ``captured`` with the canonical probes of one ``GPT.forward``. The
    embedding is scaled inside ``GPT.forward``, so ``embed`` is block 0's input."""
    blocks, final_norm = model.transformer.h, model.transformer.ln_f
    handles = [
        blocks[0].register_forward_pre_hook(_save_input(captured, "embed")),
        final_norm.register_forward_pre_hook(_save_input(captured, "final_norm_input")),
        final_norm.register_forward_hook(_save_output(captured, "final_norm")),
    ]
    for i, block in enumerate(blocks):
        prefix = f"layers.{i}"
        handles += [
            block.attn.register_forward_pre_hook(_save_input(captured, f"{prefix}.attn_input")),
            block.attn.register_forward_hook(_save_output(captured, f"{prefix}.attn")),
            block.mlp.register_forward_pre_hook(_save_input(captured, f"{prefix}.mlp_input")),
            block.mlp.register_forward_hook(_save_output(captured, f"{prefix}.mlp")),
            block.register_forward_hook(_save_output(captured, f"{prefix}.out")),
        ]
    return handles


# ----------------------------------------------------------------------------- the adapter


class LitGPTAdapter(Adapter):
    """litgpt's ``GPT`` on Gemma 1-3, loaded through litgpt's own HF converters."""

    families = FAMILIES
    unsupported = {"padding": PADDING_REASON, "position_ids": POSITIONS_REASON}

    def __init__(self):
        self.name = f"litgpt-{litgpt_version()}"
        self.environment = {"litgpt": litgpt_version()}
        self.model = None

    def load(self, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        from litgpt.model import GPT

        config = litgpt_config(hf_config)
        weights = litgpt_state_dict(config, hf_config["model_type"], state_dict,
                                    bool(hf_config.get("tie_word_embeddings", True)))
        model = GPT(config)
        load_strictly(model, weights)
        # cast after loading, all of it (RoPE tables too), as litgpt's Fabric bf16-true precision does
        self.model, self.dtype = model.to(dtype).eval(), dtype

    @torch.no_grad()
    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One ``GPT.forward(idx)`` without cache; every probe, (B, T, ...)."""
        check_unpadded(batch)
        return self._forward(batch.input_ids)

    @torch.no_grad()
    def decode(self, batch: Batch, chunks: list[int]) -> dict[str, torch.Tensor]:
        """The batch fed through litgpt's KV cache ``chunks`` tokens at a time, as litgpt's ``generate``
        feeds it: ``set_kv_cache``, then ``forward(ids, input_pos=arange(start, end),
        input_pos_maxp1=end)`` per chunk. NotImplementedError where litgpt refuses the schedule."""
        check_unpadded(batch)
        b, t = batch.input_ids.shape
        if sum(chunks) != t:
            raise ValueError(f"chunks {chunks} do not add up to the batch's {t} tokens")
        self.model.set_kv_cache(batch_size=b, max_seq_length=t, dtype=self.dtype)
        start = 0

        def step(ids, _mask, _positions):
            nonlocal start
            end = start + ids.shape[1]
            positions = torch.arange(start, end)
            start = end
            return self._forward(ids, input_pos=positions, input_pos_maxp1=end)

        try:
            return feed_in_chunks(batch, chunks, step)
        except ValueError as exc:  # litgpt's refusals (KVCache.forward, GPT.forward) are ValueErrors
            raise NotImplementedError(f"litgpt refuses chunks {chunks}: {exc}") from exc
        finally:
            self.model.clear_kv_cache()

    def _forward(self, ids: torch.Tensor, **cache_args) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = register_probe_hooks(self.model, captured)
        try:
            captured["logits"] = self.model(ids, **cache_args)
        finally:
            for handle in handles:
                handle.remove()
        return captured


def check_unpadded(batch: Batch) -> None:
    """Unsupported unless every row is unpadded and positions (if given) are arange(T)."""
    if not bool(batch.attention_mask.bool().all()):
        raise Unsupported("padding", PADDING_REASON)
    if batch.position_ids is not None:
        expected = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
        if not torch.equal(batch.position_ids.to(expected.dtype), expected):
            raise Unsupported("position_ids", POSITIONS_REASON)
