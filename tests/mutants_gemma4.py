"""Known Gemma 4 porting bugs, each as an HF-compatible ``Gemma4ForCausalLM`` candidate (mutants).

Same contract as :mod:`tests.mutants` (Gemma 1-3): every mutant subclasses HF's ``Gemma4ForCausalLM``
and breaks *its own instance* in ``__init__`` -- a private copy of the config, a submodule's
``forward`` swapped for a bound method, or a "ported" attention / decoder layer / router (below)
with one knob turned. Nothing in transformers is patched, so the unmutated class keeps working in
the same process. Submodule and parameter names stay as HF has them, so the HF state dict loads
strictly and the gate's hooks (``layers[i]``, ``.self_attn``, ``.mlp``, ``.router``, ``.experts``,
``.per_layer_projection``) sit where they sit in HF.

Each mutant carries ``MODEL`` (the tiny config whose structure exposes the bug), ``EXPECTED`` (the
first probe that must diverge, derived from the probe semantics below), ``BUG``, ``SOURCE``
(``numerics §n #k`` = /work/shared/notes/hf-gemma-4-numerics.md; ``catalogue #n`` = Part B of
/work/shared/notes/peers-and-porting-bugs.md) and ``BF16`` (caught at the same probe in bfloat16
too, with margin). Probe order per layer: ``attn`` (o_proj output, before post_attention_layernorm),
``mlp`` (dense MLP output, before its post-norm), on MoE layers ``router`` (dispatch weights after
renormalisation and per_expert_scale) and ``moe`` (experts output, before post_feedforward_layernorm_2),
on PLE models ``ple`` (per_layer_projection output, before post_per_layer_input_norm), then ``out``
(the residual stream after layer_scalar).

Tiny geometry that the expectations rely on (configs/gemma-4-*-tiny.json): 31B and 26B-A4B have 12
layers, full attention on layers 5 and 11 (K=V there, head_dim 32, 2 KV heads), sliding elsewhere
(head_dim 16); E2B has 10 layers, full on 4 and 9, layers 5-9 KV-shared (sliding ones read layer 3,
full ones layer 4), double-wide MLP on the shared layers; E4B has 12 layers, full on 5 and 11,
layers 6-11 KV-shared (sliding read 4, full read 5).
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Gemma4ForCausalLM

from harness.adapters.base import Adapter
from harness.adapters.hf import HFCausalLMAdapter
from tests.mutant_tools import bind as _bind
from tests.mutant_tools import exact_gelu as _exact_gelu
from tests.mutant_tools import private_config as _private_config
from tests.mutant_tools import rotate_half as _rotate_half
from tests.mutant_tools import unscaled_embedding as _unscaled_embedding

# --------------------------------------------------------------------------------------------------
# Building blocks a porter writes




def _rmsnorm_one_plus_w(self, x):
    """The Gemma 1-3 habit: scale by (1 + w). Gemma 4 checkpoints store the gain itself (x * w)."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
    return (y * (1.0 + self.weight.float())).type_as(x)



def _ported_ple_projection(hidden_scale: bool = True, pair_scale: bool = True):
    """``project_per_layer_inputs`` as a port writes it: (norm(W x_emb * H^-1/2) + tok) * 2^-1/2, with the
    chosen constants left out."""

    def project(self, inputs_embeds, per_layer_inputs=None):
        proj = self.per_layer_model_projection(inputs_embeds)
        if hidden_scale:
            proj = proj * self.per_layer_model_projection_scale
        proj = proj.reshape(*inputs_embeds.shape[:-1], self.config.num_hidden_layers, self.hidden_size_per_layer_input)
        proj = self.per_layer_projection_norm(proj)
        if per_layer_inputs is None:
            return proj
        out = proj + per_layer_inputs
        return out * self.per_layer_input_scale if pair_scale else out

    return project



def _rope_hf(x, cos, sin):
    """HF: x (B, T, heads, D), cos/sin (B, T, D) = cat(freqs, freqs); dims (i, i + D/2) pair up."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


def _rope_contiguous_quarter(x, positions, theta: float, fraction: float = 0.25):
    """NeoX "partial rotary" on the first fraction*D contiguous dims with rot-dim frequencies
    theta^(-2i/rot): what porters write for p-RoPE. HF rotates dims [0, D/8) u [D/2, D/2 + D/8)."""
    rot = int(x.shape[-1] * fraction)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype).unsqueeze(2), emb.sin().to(x.dtype).unsqueeze(2)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _hf_donor(config, i: int) -> int:
    """HF: a KV-shared layer reads the last non-shared layer of its own attention type."""
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    kind = config.layer_types[i]
    return max(j for j in range(first_shared) if config.layer_types[j] == kind)


def _first_same_type_donor(config, i: int) -> int:
    return config.layer_types.index(config.layer_types[i])


def _offset_donor(config, i: int) -> int:
    """"Consecutive layers share KV": layer i reads layer i - num_kv_shared_layers."""
    return i - config.num_kv_shared_layers


DONORS = {"hf": _hf_donor, "first_same_type": _first_same_type_donor, "offset": _offset_donor}


@dataclass(frozen=True)
class AttentionPort:
    """How a port's Gemma 4 attention differs from HF eager. The defaults reproduce HF eager bit for bit."""

    scale: str = "one"  # | "head_dim": head_dim ** -0.5 (the Gemma 1-3 / textbook habit)
    global_rope: str = "hf"  # | "contiguous_quarter": partial NeoX rotary on dims [0, D/4) of full layers
    k_eq_v: str = "raw"  # V from the raw k_proj output | "k_roped": the key after k_norm and RoPE
    v_norm: bool = True  # False: V is never RMS-normalised
    donor: str = "hf"  # which layer a KV-shared layer reads (see DONORS)


def _ported_attention(attn: nn.Module, port: AttentionPort, state: dict):
    """An eager Gemma 4 attention written from the notes, with the port's choices."""
    cfg = attn.config
    theta = cfg.rope_parameters["full_attention"]["rope_theta"]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, shared_kv_states=None,
                past_key_values=None, position_ids=None, **kwargs):
        b, t, _ = hidden_states.shape
        d = self.head_dim
        cos, sin = position_embeddings
        if self.is_sliding or port.global_rope == "hf":
            rope = lambda x: _rope_hf(x, cos, sin)  # noqa: E731
        else:
            rope = lambda x: _rope_contiguous_quarter(x, position_ids, theta)  # noqa: E731
        q = rope(self.q_norm(self.q_proj(hidden_states).view(b, t, -1, d))).transpose(1, 2)
        if self.is_kv_shared_layer:
            k, v = state[DONORS[port.donor](cfg, self.layer_idx)]
        else:
            raw_k = self.k_proj(hidden_states).view(b, t, -1, d)
            k = rope(self.k_norm(raw_k))
            if self.v_proj is not None:
                v = self.v_proj(hidden_states).view(b, t, -1, d)
            else:  # K=V (full layers of 26B/31B)
                v = raw_k if port.k_eq_v == "raw" else k
            if port.v_norm and not (self.v_proj is None and port.k_eq_v == "k_roped"):
                v = self.v_norm(v)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            state[self.layer_idx] = (k, v)

        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scaling = d**-0.5 if port.scale == "head_dim" else 1.0
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), probs

    return forward


@dataclass(frozen=True)
class LayerPort:
    """How a port's Gemma 4 decoder layer differs from HF. The defaults reproduce HF bit for bit."""

    layer_scalar: str = "stream"  # x * s on the whole stream | "ignored" | "update": x_in + s * (x - x_in)
    ple: str = "after_mlp"  # | "before_mlp": per-layer input injected after the attention residual
    router_input: str = "residual"  # | "pre_ffn_norm": the router reads pre_feedforward_layernorm(x)


def _ported_layer(port: LayerPort):
    """The Gemma 4 decoder layer as a porter writes it (HF order with the port's choices)."""

    def ple_branch(self, x, per_layer_input):
        g = self.per_layer_projection(self.act_fn(self.per_layer_input_gate(x)) * per_layer_input)
        return x + self.post_per_layer_input_norm(g)

    def forward(self, hidden_states, per_layer_input=None, shared_kv_states=None, position_embeddings=None,
                attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        x_in = hidden_states
        a, _ = self.self_attn(hidden_states=self.input_layernorm(x_in), position_embeddings=position_embeddings,
                              attention_mask=attention_mask, shared_kv_states=shared_kv_states,
                              position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        x = x_in + self.post_attention_layernorm(a)
        if self.hidden_size_per_layer_input and port.ple == "before_mlp":
            x = ple_branch(self, x, per_layer_input)
        residual = x
        m = self.mlp(self.pre_feedforward_layernorm(x))
        if self.enable_moe_block:
            m1 = self.post_feedforward_layernorm_1(m)
            flat = residual.reshape(-1, residual.shape[-1])
            routed = flat if port.router_input == "residual" else self.pre_feedforward_layernorm(flat)
            _, weights, experts = self.router(routed)
            m2 = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights).reshape(residual.shape)
            m = m1 + self.post_feedforward_layernorm_2(m2)
        x = residual + self.post_feedforward_layernorm(m)
        if self.hidden_size_per_layer_input and port.ple == "after_mlp":
            x = ple_branch(self, x, per_layer_input)
        if port.layer_scalar == "stream":
            x = x * self.layer_scalar
        elif port.layer_scalar == "update":
            x = x_in + (x - x_in) * self.layer_scalar
        return x

    return forward


@dataclass(frozen=True)
class RouterPort:
    """How a port's router differs from HF. The defaults reproduce HF bit for bit."""

    softmax: str = "all"  # softmax over all experts, top-k, renormalise | "top_k": softmax over the top-k logits
    renormalise: bool = True
    per_expert_scale: bool = True
    expert_shift: int = 0  # chosen expert ids off by this much (mod E): an index bug in a port's top-k


def _ported_router(port: RouterPort):
    def forward(self, hidden_states):
        z = self.norm(hidden_states) * self.scale * self.scalar_root_size
        logits = self.proj(z)
        probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32)
        k = self.config.top_k_experts
        if port.softmax == "top_k":
            top_logits, experts = torch.topk(logits, k=k, dim=-1)
            weights = nn.functional.softmax(top_logits, dim=-1, dtype=torch.float32)
        else:
            weights, experts = torch.topk(probs, k=k, dim=-1)
            if port.expert_shift:
                experts = (experts + port.expert_shift) % probs.shape[-1]
                weights = probs.gather(-1, experts)
            if port.renormalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if port.per_expert_scale:
            weights = weights * self.per_expert_scale[experts]
        return probs, weights, experts

    return forward


class _Candidate:
    """Mixin for every class here: keeps HF's default experts kernel (``grouped_mm``) for a subclass.

    HF decides whether a model class may use ``grouped_mm`` by grepping the source of the module that
    defines the class for ``@use_experts_implementation`` (``PreTrainedModel._can_set_experts_implementation``)
    and caches the answer on the class. A subclass defined outside transformers fails the grep, so it
    silently runs the *eager* experts loop (bf16 accumulation per expert) unless ``Gemma4ForCausalLM``
    itself happened to be built earlier in the process (its cached ``True`` is then inherited). In bf16
    that changes expert choices on near-ties and the expert sums, so results would depend on test order.
    The experts here are HF's own decorated module, so say so explicitly, on these classes only.
    """

    _can_set_experts_implementation_cached_value = True


class _Ported(_Candidate):
    """Mixin: installs the ported attention, decoder layer and router (the class's knobs) everywhere."""

    ATTENTION = AttentionPort()
    LAYER = LayerPort()
    ROUTER = RouterPort()

    def __init__(self, config):
        super().__init__(config)
        self._port_state = {}  # layer index -> (K, V) of the non-shared layers, for the KV-shared ones
        for layer in self.model.layers:
            _bind(layer.self_attn, _ported_attention(layer.self_attn, self.ATTENTION, self._port_state))
            _bind(layer, _ported_layer(self.LAYER))
            if getattr(layer, "router", None) is not None:
                _bind(layer.router, _ported_router(self.ROUTER))


# --------------------------------------------------------------------------------------------------
# Controls: the port with no bug (must pass, bit-exact with HF eager)


class PortedGemma4E2BControl(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"


class PortedGemma4E4BControl(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"


class PortedGemma4MoEControl(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"


class PortedGemma4DenseControl(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-31b-tiny"


CONTROLS = [PortedGemma4E2BControl, PortedGemma4E4BControl, PortedGemma4MoEControl, PortedGemma4DenseControl]


# --------------------------------------------------------------------------------------------------
# Dense (31B) and shared text-decoder bugs


class G4NormOnePlusW(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-31b-tiny"
    EXPECTED = "layers.0.attn_input"  # input_layernorm of layer 0 is the first norm: the attention's input
    BUG = "Gemma 1-3 RMSNorm x*(1+w) on every scaled norm instead of x*w"
    SOURCE = "numerics §0.1, §5.1 #1"
    BF16 = True

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if type(module).__name__ == "Gemma4RMSNorm" and module.with_scale:
                _bind(module, _rmsnorm_one_plus_w)


class G4ScaleByHeadDim(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = "layers.0.attn"
    BUG = "attention scores scaled by head_dim**-0.5 instead of 1.0"
    SOURCE = "numerics §0.2, §5.1 #2; catalogue #26 (mlc-llm review)"
    BF16 = True
    ATTENTION = AttentionPort(scale="head_dim")


class G4PRopeContiguous(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-31b-tiny"
    EXPECTED = "layers.5.attn"  # layers 0-4 are sliding; 5 is the first full (p-RoPE) layer
    BUG = "p-RoPE as NeoX partial rotary on the first D/4 contiguous dims with rot-dim frequencies"
    SOURCE = "numerics §1.5, §5.1 #11; catalogue #68, #69"
    BF16 = True
    ATTENTION = AttentionPort(global_rope="contiguous_quarter")


class G4FullRopeOnGlobal(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.5.attn"
    BUG = "partial_rotary_factor ignored: full layers rotate all D/2 pairs at theta 1e6"
    SOURCE = "numerics §5.1 #13"
    BF16 = True  # bf16: layers.5.attn rel_rms 0.098, 3.9x the 0.025 limit

    def __init__(self, config):
        rope = copy.deepcopy(config.rope_parameters)
        rope["full_attention"] = {"rope_type": "default", "rope_theta": rope["full_attention"]["rope_theta"]}
        super().__init__(_private_config(config, rope_parameters=rope))


class G4KEqVRoped(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-31b-tiny"
    EXPECTED = "layers.5.attn"  # K=V only on full layers; sliding layers keep v_proj
    BUG = "K=V layers take V = the key after k_norm and RoPE instead of v_norm(raw k_proj output)"
    SOURCE = "numerics §1.4, §5.1 #16; catalogue #78 (mlx-swift-lm)"
    BF16 = True
    ATTENTION = AttentionPort(k_eq_v="k_roped")


class G4NoVNorm(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"
    EXPECTED = "layers.0.attn"
    BUG = "v_norm (scale-free RMSNorm of V) left out"
    SOURCE = "numerics §1.3, §5.1 #10"
    BF16 = True  # bf16: layers.0.attn rel_rms 0.167, 6.7x the 0.025 limit
    ATTENTION = AttentionPort(v_norm=False)


class G4LayerScalarIgnored(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = "layers.0.out"  # the scalar acts after the attn / mlp / ple probes of the layer
    BUG = "layer_scalar loaded but never applied"
    SOURCE = "numerics §0.7, §5.1 #5"
    BF16 = True
    LAYER = LayerPort(layer_scalar="ignored")


class G4LayerScalarOnUpdate(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-31b-tiny"
    EXPECTED = "layers.0.out"
    BUG = "layer_scalar scales only the layer's update (x + s*delta) instead of the whole stream"
    SOURCE = "numerics §1.2, §5.1 #6"
    BF16 = True
    LAYER = LayerPort(layer_scalar="update")


class G4MlpExactGelu(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = "layers.0.mlp"  # the MLP computes wrongly on the right input
    BUG = "exact-erf GELU in the dense MLP instead of the tanh approximation"
    SOURCE = "numerics §5.1 #4 (Gemma 1-3); catalogue #19, #20 (the experts' twin of this bug)"
    BF16 = False  # below bf16 rounding, as on Gemma 1-3

    def __init__(self, config):
        super().__init__(config)
        _exact_gelu(self, "mlp")


# --------------------------------------------------------------------------------------------------
# MoE (26B-A4B)


class G4RouterNoRenorm(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.0.router"  # the dispatch weights themselves; the logits barely move (§5.3 #33)
    BUG = "top-k router weights not renormalised to sum 1"
    SOURCE = "numerics §1.8, §5.3 #33"
    BF16 = True
    ROUTER = RouterPort(renormalise=False)


class G4PerExpertScaleIgnored(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.0.router"
    BUG = "router.per_expert_scale loaded but not applied to the dispatch weights"
    SOURCE = "numerics §5.3 #35; catalogue #86 (the opposite: applied twice)"
    BF16 = True
    ROUTER = RouterPort(per_expert_scale=False)


class G4RouterWrongExperts(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.0.router"
    BUG = "top-k expert ids off by one (each token routed to experts (i + 1) mod E, weights from those)"
    SOURCE = "issue 9 (wrong experts must not pass when the reference is routed as the candidate)"
    BF16 = True
    ROUTER = RouterPort(expert_shift=1)


class WrongExpertsWithoutRouterInput(Adapter):
    """The same wrong-experts port behind an adapter that returns the router's dispatch but not its
    input, so the router cannot be judged alone: its expert sets must then be compared with the
    reference's own routing (the reference is rerun routed as the candidate for the later probes)."""

    name = "wrong-experts-without-router-input"
    MODEL, EXPECTED = G4RouterWrongExperts.MODEL, G4RouterWrongExperts.EXPECTED

    def load(self, hf_config, state_dict, dtype):
        self.inner = HFCausalLMAdapter(G4RouterWrongExperts)
        self.inner.load(hf_config, state_dict, dtype)

    def run(self, batch):
        return {k: v for k, v in self.inner.run(batch).items() if not k.endswith(".router_input")}


class G4RouterAfterPreFfnNorm(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.0.router_input"
    BUG = "router reads pre_feedforward_layernorm(x) instead of the raw post-attention residual"
    SOURCE = "numerics §1.8, §5.3 #37; catalogue #79 (shared-prenorm fusion)"
    BF16 = True  # the router's input is judged against the reference's post-attention residual
    LAYER = LayerPort(router_input="pre_ffn_norm")


class G4ExpertsExactGelu(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    EXPECTED = "layers.0.moe"  # the dense MLP keeps tanh GELU; the router is unaffected
    BUG = "exact-erf GELU in the experts only (dense MLP right)"
    SOURCE = "catalogue #19 (vllm#41574), #20 (mobius#546)"
    BF16 = False  # below bf16 rounding, as on Gemma 1-3

    def __init__(self, config):
        super().__init__(config)
        _exact_gelu(self, "experts")


# --------------------------------------------------------------------------------------------------
# Edge models (E2B / E4B): KV sharing, per-layer embeddings


class G4KVDonorOffset(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"
    EXPECTED = "layers.5.attn"  # layer 5 (first shared, sliding) reads layer 0 instead of 3
    BUG = "KV-shared layer i reads layer i - num_kv_shared_layers instead of the last non-shared same-type layer"
    SOURCE = "numerics §1.6 (third-party write-ups); catalogue #76"
    BF16 = True
    ATTENTION = AttentionPort(donor="offset")


class G4KVDonorFirstOfType(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = "layers.6.attn"  # layer 6 (first shared, sliding) reads layer 0 instead of 4
    BUG = "KV-shared layers read the first layer of their type instead of the last non-shared one"
    SOURCE = "numerics §5.2 #24"
    BF16 = True
    ATTENTION = AttentionPort(donor="first_same_type")


class G4PleTableUnscaled(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"
    EXPECTED = "layers.0.ple_input"  # the per-layer input the projection reads is wrong
    BUG = "per-layer token table looked up without * sqrt(P)"
    SOURCE = "numerics §1.7, §5.2 #28; catalogue #81"
    BF16 = True  # bf16: layers.0.ple_input rel_rms 0.177, 7x the 0.025 limit

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.embed_tokens_per_layer, _unscaled_embedding)


class G4PleNoInvSqrt2(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"
    EXPECTED = "layers.0.ple_input"  # x sqrt(2) on the branch input; post_per_layer_input_norm cancels it downstream
    BUG = "(context projection + token table) not scaled by 2**-0.5"
    SOURCE = "numerics §1.7, §5.2 #29 (0.006 at the logits: only a per-sublayer probe sees it); catalogue #81"
    BF16 = True

    def __init__(self, config):
        super().__init__(config)
        self.model.project_per_layer_inputs = types.MethodType(_ported_ple_projection(pair_scale=False), self.model)


class G4PleBeforeMlp(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = "layers.0.mlp_input"  # the MLP now reads a stream that already holds the PLE branch
    BUG = "per-layer input injected after the attention residual, before the MLP"
    SOURCE = "numerics §0.7, §1.7"
    BF16 = False  # bf16: layers.0.mlp_input rel_rms 0.042, 1.7x the 0.025 limit: caught, not with a 3x margin
    LAYER = LayerPort(ple="before_mlp")


MUTANTS = [
    G4NormOnePlusW, G4ScaleByHeadDim, G4PRopeContiguous, G4FullRopeOnGlobal, G4KEqVRoped, G4NoVNorm,
    G4LayerScalarIgnored, G4LayerScalarOnUpdate, G4MlpExactGelu,
    G4RouterNoRenorm, G4PerExpertScaleIgnored, G4RouterWrongExperts, G4RouterAfterPreFfnNorm, G4ExpertsExactGelu,
    G4KVDonorOffset, G4KVDonorFirstOfType, G4PleTableUnscaled, G4PleNoInvSqrt2, G4PleBeforeMlp,
]


# --------------------------------------------------------------------------------------------------
# Weight-loading bugs: the state dict does not fit, so the gate reports an error, not a divergence


class G4DoubleWideMlpIgnored(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-e2b-tiny"
    TENSOR = "model.layers.5.mlp.gate_proj.weight"  # first KV-shared layer: checkpoint 512 x 64, port 256 x 64
    BUG = "use_double_wide_mlp ignored: KV-shared layers built with intermediate_size, not 2x"
    SOURCE = "numerics §1.6, §5.2 (fails loudly); catalogue #79"

    def __init__(self, config):
        super().__init__(_private_config(config, use_double_wide_mlp=False))


WLOAD = [G4DoubleWideMlpIgnored]


# --------------------------------------------------------------------------------------------------
# Legitimate rewrites: different code, the same function (must pass)


class G4RouterSoftmaxOverTopK(_Ported, Gemma4ForCausalLM):
    MODEL = "gemma-4-26b-a4b-tiny"
    BUG = "softmax over the top-k logits instead of softmax over all experts -> top-k -> renormalise"
    SOURCE = "numerics §5.3 #34: mathematically identical (1.5e-5 at the logits)"
    ROUTER = RouterPort(softmax="top_k")


EQUIVALENT = [G4RouterSoftmaxOverTopK]


# --------------------------------------------------------------------------------------------------
# Below the noise floor (documented, not required to fail)


class G4PleProjectionNoInvSqrtH(_Candidate, Gemma4ForCausalLM):
    MODEL = "gemma-4-e4b-tiny"
    EXPECTED = None
    BUG = "per_layer_model_projection output not scaled by hidden_size**-0.5"
    SOURCE = "numerics §5.2 #30: per_layer_projection_norm follows and cancels it up to eps (0.0007 at the logits)"

    def __init__(self, config):
        super().__init__(config)
        self.model.project_per_layer_inputs = types.MethodType(_ported_ple_projection(hidden_scale=False), self.model)


BELOW_NOISE = [G4PleProjectionNoInvSqrtH]


class G4EagerExperts(_Candidate, Gemma4ForCausalLM):
    """Unmutated HF with the eager experts loop (bf16 accumulation per expert) instead of grouped_mm."""

    MODEL = "gemma-4-26b-a4b-tiny"

    def __init__(self, config):
        super().__init__(config)
        self.set_experts_implementation("eager")
