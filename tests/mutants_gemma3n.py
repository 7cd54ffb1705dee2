"""Known Gemma 3n porting bugs, each as an HF-compatible ``Gemma3nForCausalLM`` candidate (mutants).

Same contract as :mod:`tests.mutants` and :mod:`tests.mutants_gemma4`: every mutant subclasses HF's
``Gemma3nForCausalLM`` and breaks *its own instance* in ``__init__`` -- a private copy of the config, an
attribute of one submodule, or a method / ``forward`` swapped for a bound "ported" one (the decoder layer,
the text model, the AltUp router, the attention of the KV-shared layers) with one knob turned. Nothing in
transformers is patched, so the unmutated class keeps working in the same process. Submodule and parameter
names stay as HF has them, so the HF state dict loads strictly and the gate's hooks and method wrappers
(:func:`harness.gemma3n_probes.hf_targets`, :func:`~harness.gemma3n_probes.hf_method_probes`) sit where
they sit in HF.

Each mutant carries ``MODEL`` (the tiny twin), ``EXPECTED`` (the first probe that must diverge, from the
probe semantics in :mod:`harness.gemma3n_probes`), ``BUG``, ``SOURCE`` (where the right behaviour is:
``modeling_gemma3n.py`` line numbers of transformers 5.23, as cited in :mod:`reference_impl.gemma3n`) and
``BF16`` (caught at the same probe in bfloat16 too, with margin).

Tiny geometry (configs/gemma-3n-e2b-tiny.json): 10 layers, full attention on 4 and 9, sliding elsewhere
(window 8); layers 5-9 KV-shared (sliding ones read layer 3's K/V, full ones layer 4's); activation
sparsity 0.95 on layers 0-2; 4 AltUp streams, stream 0 active; correct_output_scale on.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from transformers import Gemma3nForCausalLM
from transformers.cache_utils import DynamicCache, KVSharingDict
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.gemma3n.modeling_gemma3n import apply_rotary_pos_emb, eager_attention_forward

from tests.mutant_tools import bind as _bind
from tests.mutant_tools import private_config as _private_config

MODEL = "gemma-3n-e2b-tiny"

# --------------------------------------------------------------------------------------------------
# Building blocks a porter writes


@dataclass(frozen=True)
class LayerPort:
    """The decoder layer as a port writes it (HF ``Gemma3nTextDecoderLayer.forward``, 1285-1331), with knobs."""

    laurel_inv_sqrt2: bool = True  # (active + attn + laurel) / sqrt(2)
    ple_to: str = "rest"  # the PLE branch goes to streams [1:] ("rest") or to every stream ("all")
    scale_stream: bool = False  # correct_output_scale applied to corrected[a] itself, not to a copy


def _ported_layer(port: LayerPort):
    def forward(self, hidden_states, position_embeddings=None, per_layer_input=None, shared_kv_states=None,
                attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        a = self.config.altup_active_idx
        predictions = self.altup.predict(hidden_states)
        active = predictions[a]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, shared_kv_states=shared_kv_states,
                                 position_ids=position_ids, position_embeddings=position_embeddings,
                                 past_key_values=past_key_values, **kwargs)
        x = active + self.post_attention_layernorm(attn) + laurel
        if port.laurel_inv_sqrt2:
            x = x / math.sqrt(2)
        y = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, y)
        if port.scale_stream and self.config.altup_correct_scale:
            corrected[a] = self.altup.scale_corrected_output(corrected[a])
            first = corrected[a].clone()
        else:
            first = corrected[a].clone()
            if self.config.altup_correct_scale:
                first = self.altup.scale_corrected_output(first)
        first = torch.multiply(self.act_fn(self.per_layer_input_gate(first)), per_layer_input)
        ple = self.post_per_layer_input_norm(self.per_layer_projection(first))
        if port.ple_to == "all":
            corrected += ple
        else:
            corrected[1:] += ple
        return corrected

    return forward


@dataclass(frozen=True)
class ModelPort:
    """The text model's forward as a port writes it (HF ``Gemma3nTextModel.forward``, 1640-1741), with knobs."""

    rescale_streams: bool = True  # streams 1.. rescaled to the embedding's RMS at the start
    rescale_unembedded: bool = True  # unembedded streams rescaled to stream 0's RMS before the mean


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))


def _ported_model(port: ModelPort):
    def forward(self, input_ids=None, per_layer_inputs=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states", "return_dict")}
        inputs_embeds = self.embed_tokens(input_ids)
        per_layer_inputs = self.project_per_layer_inputs(inputs_embeds, self.get_per_layer_inputs(input_ids))
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1]) + seen).unsqueeze(0)
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       "past_key_values": past_key_values, "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**mask_kwargs),
                 "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        x0 = inputs_embeds
        target = torch.mean(x0**2, dim=-1, keepdim=True) ** 0.5
        streams = [x0]
        for proj in self.altup_projections:
            s = proj(x0)
            streams.append(s * target / _magnitude(s) if port.rescale_streams else s)
        hidden = torch.stack(streams, dim=0)
        rope = {t: self.rotary_emb(hidden, position_ids, t) for t in set(self.config.layer_types)}
        shared = KVSharingDict()
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            kind = self.config.layer_types[i]
            hidden = layer(hidden, rope[kind], per_layer_inputs[:, :, i, :], shared_kv_states=shared,
                           attention_mask=masks[kind], position_ids=position_ids, past_key_values=past_key_values,
                           **kwargs)
        target = torch.mean(hidden[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [hidden[0]]
        for j, proj in enumerate(self.altup_unembed_projections, 1):
            s = proj(hidden[j])
            outs.append(s * target / _magnitude(s) if port.rescale_unembedded else s)
        hidden = self.norm(torch.mean(torch.stack(outs), dim=0))
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)

    return forward


def _correct_without_innovation(self, predictions, activated):
    """AltUp's correction left out: the active stream becomes the layer's output, the others keep their
    predictions (a port that treats the streams as a plain residual updated only where the layer ran)."""
    corrected = predictions.clone()
    corrected[self.config.altup_active_idx] = activated
    return corrected


def _router_without_inv_h(self, x):
    """compute_router_modalities (1009-1012) with the 1/hidden_size ``router_input_scale`` left out."""
    routed = self.modality_router(self.router_norm(x))
    return torch.tanh(routed.float()).type_as(x)


def _own_kv_attention(donor):
    """A KV-shared layer's attention that computes K/V itself, from its own input, with the donor layer's
    projections and norms (weight sharing taken for KV sharing), instead of reusing the donor's K/V."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                shared_kv_states=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.config.head_dim)
        cos, sin = position_embeddings
        q = apply_rotary_pos_emb(self.q_norm(self.q_proj(hidden_states).view(shape)), cos, sin, unsqueeze_dim=2)
        k = apply_rotary_pos_emb(donor.k_norm(donor.k_proj(hidden_states).view(shape)), cos, sin, unsqueeze_dim=2)
        v = donor.v_norm(donor.v_proj(hidden_states).view(shape))
        out, weights = eager_attention_forward(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attention_mask, dropout=0.0, scaling=self.scaling,
                                               sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    return forward


class _Ported:
    """Mixin: the ported decoder layer and text model (the class's knobs) on this instance."""

    LAYER = LayerPort()
    TEXT = ModelPort()

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            _bind(layer, _ported_layer(self.LAYER))
        _bind(self.model, _ported_model(self.TEXT))


# --------------------------------------------------------------------------------------------------
# Control: the port with no bug (must pass, bit-exact with HF eager)


class PortedGemma3nControl(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL


CONTROLS = [PortedGemma3nControl]


# --------------------------------------------------------------------------------------------------
# The bugs


class N3AltUpNoCorrection(Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.altup_correct"
    BUG = "AltUp correction skipped: the active stream takes the layer output, the other streams stay their predictions"
    SOURCE = "modeling_gemma3n.py 1042-1071 (correct), 1317"
    BF16 = True

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.altup.correct = types.MethodType(_correct_without_innovation, layer.altup)


class N3LaurelNoInvSqrt2(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL
    # the pre-MLP norm undoes the missing scale, so mlp_input cannot show it: the layer's output (what the
    # correction reads) is the first value it reaches
    EXPECTED = "layers.0.altup_correct"
    BUG = "attention residual + LAuReL summed without the division by sqrt(2)"
    SOURCE = "modeling_gemma3n.py 1306-1309"
    BF16 = True
    LAYER = LayerPort(laurel_inv_sqrt2=False)


class N3SparsityDropped(Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.mlp"  # layers 0-2 have sparsity 0.95
    BUG = "activation sparsity (Gaussian top-k on the MLP gate) dropped on the sparse layers"
    SOURCE = "modeling_gemma3n.py 961-984"
    BF16 = True

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.activation_sparsity = 0.0


class N3PleOnEveryStream(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.out"
    BUG = "PLE branch added to every stream, stream 0 included, instead of streams [1:]"
    SOURCE = "modeling_gemma3n.py 1329"
    # bf16: the PLE branch (post-norm at TRAINED's half gain) on stream 0 is diluted over the 4 streams of the
    # probe: layers.0.out rel_rms ~0.021 < 0.025, so it first fails at the logits (rel_rms 0.21, max_rel 1.06)
    BF16 = False
    LAYER = LayerPort(ple_to="all")


class N3CorrectScaleOnStream(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.out"  # the PLE gate reads the scaled copy either way; the stream itself changes
    BUG = "correct_output_scale applied to the active corrected stream itself, not only to the copy for the PLE gate"
    SOURCE = "modeling_gemma3n.py 1073-1083, 1317-1319"
    BF16 = True
    LAYER = LayerPort(scale_stream=True)


class N3FinalMeanNoRescale(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "final_norm_input"
    BUG = "final streams unembedded and averaged without the rescale to stream 0's RMS"
    SOURCE = "modeling_gemma3n.py 1728-1741"
    BF16 = True
    TEXT = ModelPort(rescale_unembedded=False)


class N3StreamsNotRescaled(_Ported, Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "altup_streams"
    BUG = "initial AltUp streams 1.. used as projected, without the rescale to the embedding's RMS"
    SOURCE = "modeling_gemma3n.py 1692-1705"
    BF16 = True
    TEXT = ModelPort(rescale_streams=False)


class N3RouterNoInvH(Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.altup_predict"
    BUG = "AltUp modality router without the 1/hidden_size input scale"
    SOURCE = "modeling_gemma3n.py 1007-1012, 1369"
    # bf16: caught at layers.0.altup_predict, but at rel_rms 0.052 (2.1x the 0.025 limit), under the 3x margin
    # the calibration asks of a bug meant to be caught (TRAINED's AltUp coefficients are small)
    BF16 = False

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.altup.compute_router_modalities = types.MethodType(_router_without_inv_h, layer.altup)


class N3PleGateUnscaled(Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.0.ple_input"
    BUG = "altup_correct_scale ignored: the PLE gate reads the corrected active stream without correct_output_scale"
    SOURCE = "modeling_gemma3n.py 1073-1083, 1317-1319"
    BF16 = True

    def __init__(self, config):
        super().__init__(_private_config(config, altup_correct_scale=False))


class N3KVSharedOwnKV(Gemma3nForCausalLM):
    MODEL = MODEL
    EXPECTED = "layers.5.attn"  # the first KV-shared layer (sliding; its donor is layer 3)
    BUG = "KV-shared layers compute their own K/V from their own input (with the donor's projections) instead of reusing the donor's"
    SOURCE = "modeling_gemma3n.py 1215-1229; configuration_gemma3n.py 206-232"
    BF16 = True

    def __init__(self, config):
        super().__init__(config)
        layers, types_ = self.model.layers, self.config.layer_types
        first_shared = len(layers) - self.config.num_kv_shared_layers
        for i in range(first_shared, len(layers)):
            donor = max(j for j in range(first_shared) if types_[j] == types_[i])
            _bind(layers[i].self_attn, _own_kv_attention(layers[donor].self_attn))


MUTANTS = [
    N3AltUpNoCorrection, N3LaurelNoInvSqrt2, N3SparsityDropped, N3PleOnEveryStream, N3CorrectScaleOnStream,
    N3FinalMeanNoRescale, N3StreamsNotRescaled, N3RouterNoInvH, N3PleGateUnscaled, N3KVSharedOwnKV,
]
