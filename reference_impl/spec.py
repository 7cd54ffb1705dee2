"""A Gemma model described as data.

Every per-layer behaviour the decoder needs (attention type and window, head geometry, query
scale, softcaps, QK-norm, norm placement, RoPE base and scaling) is derived here, once, from an
HF ``config.json`` dict. The decoder in :mod:`reference_impl.model` reads only this spec, so a new
generation is a new ``_derive_*`` function, not a new model.

Each generation is written as a small diff on the previous one, like HF's ``modular_*.py``:

* Gemma 1: every layer global, scale ``head_dim**-0.5``, two norms per block.
* Gemma 2: + alternating sliding/global layers, ``query_pre_attn_scalar``, attention and final
  logit softcaps, "sandwich" norms (post-attention and post-MLP norms).
* Gemma 3: + QK-norm, 5:1 sliding/global pattern, a RoPE base (and linear scaling) per layer
  type, no attention softcap (HF ignores the config field; so do we).
* Gemma 4: RMSNorm is ``x * w`` (not ``1 + w``) via ``pow(ms + eps, -0.5)``; attention scale 1.0 with
  a scale-free V norm; the last layer always global; global layers get their own head dim, KV heads
  and proportional RoPE, and K=V where configured; optional MoE beside the dense MLP, per-layer
  embeddings (PLE), KV-shared tail layers (double-wide MLP there where configured), a per-layer
  ``layer_scalar``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A model config that cannot describe a Gemma model; the message names the field."""


class AttentionType(str, Enum):
    """A layer's attention: over every earlier position, or over a sliding window of them.

    A ``str``: ``AttentionType.GLOBAL == "global"``, and it formats as its value in messages.
    """

    GLOBAL = "global"
    LOCAL_SLIDING = "sliding"

    def __str__(self) -> str:
        return self.value


SLIDING = AttentionType.LOCAL_SLIDING
GLOBAL = AttentionType.GLOBAL
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": GLOBAL}

# Each generation's default layer pattern, repeated over the layers by make_attention_layers_types; an explicit
# HF layer_types list wins over it.
GEMMA2_ATTENTION_PATTERN = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
GEMMA3_ATTENTION_PATTERN = (AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,)  # length: sliding_window_pattern
GEMMA4_ATTENTION_PATTERN = GEMMA3_ATTENTION_PATTERN  # and the last layer is global wherever the pattern ends


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    # HF rope_type "linear": inverse frequencies divided by this factor.
    linear_factor: float = 1.0
    # HF rope_type "proportional" (Gemma 4 global layers): only the first int(f * D / 2) frequencies of a
    # full-D RoPE rotate; the rest are 0 (identity). With rotate_half those are dims [0, fD/2) and
    # [D/2, D/2 + fD/2) — not "the first f*D dims".
    rotary_fraction: float = 1.0


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int


@dataclass(frozen=True)
class PLESpec:
    """Per-layer embeddings: a packed (vocab, layers * dim) table plus a projection of the embedding."""

    dim: int
    vocab_size: int


@dataclass(frozen=True)
class SiglipSpec:
    """Gemma 3's vision tower (HF ``SiglipVisionModel``, no MAP head): a patch convolution plus a learned
    position table, pre-LayerNorm encoder layers with biases, a final LayerNorm."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    activation: str

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class MultimodalSpec:
    """What an image-text model adds to its text decoder: a vision tower, a projector that pools its
    output to ``tokens_per_image`` soft tokens, and the token ids that place them in the prompt. The
    tokens of one image (one contiguous run of ``image_token_id``) attend to each other in both
    directions; text stays causal."""

    vision: SiglipSpec
    tokens_per_image: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    projector_eps: float  # the soft-embedding RMSNorm's eps (HF: vision_config.layer_norm_eps)

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        """The side of the average-pooling window over the patch grid (64 patches / 16 tokens = 4)."""
        return self.vision.patches_per_side // self.tokens_per_side

    # what every image-text spec says (Gemma 3 and Gemma 4 alike)
    bidirectional = "all"  # image blocks see themselves both ways on every layer
    audio = None

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)

    @property
    def block_ids(self) -> tuple[int, ...]:
        """Token ids whose contiguous runs are bidirectional blocks."""
        return (self.image_token_id,)


@dataclass(frozen=True)
class Gemma4MediaSpec:
    """What a Gemma 4 image(-audio)-text model adds to its text decoder. The towers read their HF
    sub-configs (``reference_impl.gemma4_vision``, ``reference_impl.audio``); placeholders look up the
    pad embedding (and the pad row of the per-layer table) before the soft tokens replace them; with
    ``use_bidirectional_attention: "vision"`` (26B/31B) the tokens of one image see each other both ways
    on sliding layers only, global layers stay causal (HF ``create_masks_for_vision_model``,
    ``models/gemma4/modeling_gemma4.py`` 2150-2209); audio stays causal."""

    vision_config: Mapping[str, Any] | None = field(compare=False)
    audio_config: Mapping[str, Any] | None = field(compare=False)
    image_token_id: int
    audio_token_id: int
    video_token_id: int
    boi_token_id: int
    eoi_token_id: int
    boa_token_id: int
    eoa_token_id: int
    bidirectional: str  # "sliding" (image blocks, sliding layers only) or "none"
    tower_config: Mapping[str, Any] = field(compare=False, repr=False, default_factory=dict)  # the whole HF config

    @property
    def vision(self) -> Mapping[str, Any] | None:
        return self.vision_config

    @property
    def audio(self) -> Mapping[str, Any] | None:
        return self.audio_config

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id, self.audio_token_id)

    @property
    def block_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)


@dataclass(frozen=True)
class Gemma3nMediaSpec:
    """What Gemma 3n's image-audio-text model (HF ``Gemma3nForConditionalGeneration``) adds to its text
    decoder: a MobileNet-V5 vision tower (timm's, ``reference_impl.mobilenet_v5``) whose 2048-wide map of
    ``vision_tokens`` cells goes through ``embed_vision``, and the USM audio tower with ``embed_audio``
    (``reference_impl.audio``). Token ids in ``[vision_offset, audio_offset)`` and ``[audio_offset, ...)``
    are *hard* media tokens: they embed through the embedders' own tables, not the text table; the
    placeholders among them are then replaced by the soft tokens. Every clip fills ``audio_tokens``
    placeholders (the tail padded with the last audio token's embedding). Attention stays causal
    (``models/gemma3n/modeling_gemma3n.py`` 1922-2128)."""

    vision_config: Mapping[str, Any] = field(compare=False)
    audio_config: Mapping[str, Any] = field(compare=False)
    image_token_id: int
    audio_token_id: int
    boi_token_id: int
    eoi_token_id: int
    boa_token_id: int
    eoa_token_id: int
    vision_tokens: int  # vision_soft_tokens_per_image: the tower's output cells (side x side)
    audio_tokens: int  # audio_soft_tokens_per_image: placeholders per clip
    vision_offset: int  # vision_config.vocab_offset: the first hard vision token id
    vision_vocab: int
    audio_offset: int
    audio_vocab: int
    tower_config: Mapping[str, Any] = field(compare=False, repr=False, default_factory=dict)  # the whole HF config

    bidirectional = "none"  # Gemma 3n masks media tokens causally, like text
    block_ids: tuple[int, ...] = ()  # no bidirectional blocks

    @property
    def vision(self) -> Mapping[str, Any]:
        return self.vision_config

    @property
    def audio(self) -> Mapping[str, Any]:
        return self.audio_config

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.audio_token_id)


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attention: AttentionType
    window: int | None  # keys visible to a query, itself included; None = unlimited
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_scale: float  # multiplies q·k
    attn_softcap: float | None
    qk_norm: bool
    rope: RopeSpec
    intermediate_size: int
    sandwich_norms: bool  # post-attention and post-MLP norms on the sublayer outputs (Gemma 2+)
    v_norm: bool = False  # Gemma 4: scale-free RMSNorm on V
    k_eq_v: bool = False  # Gemma 4 global layers: no V projection; V is the raw key projection
    kv_donor: int | None = None  # Gemma 4 KV-shared layer: attends to this layer's K/V, has none of its own
    moe: MoESpec | None = None  # Gemma 4 26B-A4B: experts in parallel with the dense MLP

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def has_kv(self) -> bool:
        return self.kv_donor is None


@dataclass(frozen=True)
class ModelSpec:
    family: str  # HF model_type: gemma, gemma2, gemma3_text, gemma4_text
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float
    norm_offset: float  # RMSNorm multiplies by (norm_offset + w): 1.0 for Gemma 1-3
    activation: str  # "gelu_tanh" or "gelu" (exact erf)
    final_softcap: float | None
    tie_embeddings: bool
    max_position_embeddings: int
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    norm_pow: bool = False  # Gemma 4: x * pow(mean(x^2) + eps, -0.5) (bitwise unlike rsqrt)
    layer_scalar: bool = False  # Gemma 4: the residual stream is multiplied by a per-layer checkpoint scalar
    ple: PLESpec | None = None  # Gemma 4 E2B/E4B
    multimodal: MultimodalSpec | Gemma4MediaSpec | Gemma3nMediaSpec | None = None  # the towers of an image-text model
    gemma3n: Gemma3nSpec | None = None  # Gemma 3n: AltUp, LAuReL, activation sparsity (reference_impl.gemma3n)
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_scale(self) -> float:
        """sqrt(hidden_size); the decoder rounds it to the model dtype before multiplying."""
        return math.sqrt(self.hidden_size)

    @property
    def max_window(self) -> int | None:
        windows = [layer.window for layer in self.layers if layer.window is not None]
        return max(windows) if windows else None

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        model_type = config.get("model_type")
        derive = _DERIVE.get(model_type)
        if derive is None:
            raise ConfigError(
                f"config field 'model_type' is {model_type!r}; supported: {', '.join(sorted(_DERIVE))}"
            )
        spec = derive(_Fields(config))
        return replace(spec, hf_config=dict(config))


class _Fields:
    """Typed, checked access to an HF config dict: a bad field is a one-line error naming it."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def without(self, *keys: str) -> _Fields:
        """These fields with ``keys`` absent: what a generation hides from the one it extends because it reads
        them differently or not at all (like ``del`` in HF's modular files), so the parent takes its defaults."""
        return _Fields({key: value for key, value in self.config.items() if key not in keys})

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.config.get(key, default)
        if value is None:
            raise ConfigError(f"config field {key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"config field {key!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def float(self, key: str, default: float | None = None) -> float | None:
        value = self.config.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config field {key!r} must be a finite number, got {value!r}")
        return float(value)

    def positive(self, key: str, default: float | None = None) -> float:
        value = self.float(key, default)
        if value is None or value <= 0:
            raise ConfigError(f"config field {key!r} must be a positive number, got {self.config.get(key)!r}")
        return value


def _activation(name: Any, key: str) -> str:
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise ConfigError(f"config field {key!r} is {name!r}; Gemma uses 'gelu_pytorch_tanh'")


def _rope(params: Any, key: str) -> RopeSpec:
    if not isinstance(params, Mapping):
        raise ConfigError(f"config field {key!r} must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config field {key}.rope_theta must be a positive number, got {theta!r}")
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    if rope_type == "proportional":
        fraction = params.get("partial_rotary_factor", 1.0)
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"config field {key}.partial_rotary_factor must be in (0, 1], got {fraction!r}")
        return RopeSpec(theta=float(theta), linear_factor=float(params.get("factor", 1.0)), rotary_fraction=float(fraction))
    if rope_type == "linear":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"config field {key}.factor must be a positive number, got {factor!r}")
        return RopeSpec(theta=float(theta), linear_factor=float(factor))
    raise ConfigError(f"config field {key}.rope_type {rope_type!r} is not supported (default, linear, proportional)")


def make_attention_layers_types(pattern: tuple[AttentionType, ...], num_layers: int) -> tuple[AttentionType, ...]:
    """``pattern`` repeated over ``num_layers`` layers (cut short at the end), as in the JAX ``gemma`` library."""
    if not pattern:
        raise ValueError("an attention pattern needs at least one layer type")
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def _layer_types(f: _Fields, default: tuple[AttentionType, ...]) -> tuple[AttentionType, ...]:
    """HF's explicit ``layer_types`` list, checked, if the config has one; else the generation's ``default``."""
    types = f.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, (list, tuple)) or len(types) != len(default):
        raise ConfigError(f"config field 'layer_types' must list {len(default)} entries, got {types!r}")
    for i, t in enumerate(types):
        if t not in _HF_LAYER_TYPES:
            raise ConfigError(f"config field layer_types[{i}] is {t!r}; expected one of {sorted(_HF_LAYER_TYPES)}")
    return tuple(_HF_LAYER_TYPES[t] for t in types)


def _with_layers(spec: ModelSpec, **changes: Any) -> ModelSpec:
    """``spec`` with every layer ``replace``d; each change is a value, or a function of the layer as it was."""
    return replace(spec, layers=tuple(
        replace(layer, **{name: change(layer) if callable(change) else change for name, change in changes.items()})
        for layer in spec.layers
    ))


def _with_attention(spec: ModelSpec, types: tuple[AttentionType, ...], window: int) -> ModelSpec:
    """Layer ``i`` gets attention ``types[i]``: sliding layers see ``window`` keys, global layers all of them."""
    return _with_layers(
        spec,
        attention=lambda layer: types[layer.index],
        window=lambda layer: window if types[layer.index] == SLIDING else None,
    )


def _derive_gemma(f: _Fields) -> ModelSpec:
    """Gemma 1: every layer global, scale ``head_dim**-0.5``, two norms per block."""
    n_heads = f.int("num_attention_heads")
    n_kv = f.int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"config field 'num_attention_heads' ({n_heads}) is not a multiple of 'num_key_value_heads' ({n_kv})")
    hidden = f.int("hidden_size")
    if f.get("attention_bias"):
        raise ConfigError("config field 'attention_bias' is true; Gemma attention has no biases")
    n_layers = f.int("num_hidden_layers")
    head_dim = f.int("head_dim", 256)  # HF's default for Gemma 1-3 (not hidden // heads)
    intermediate = f.int("intermediate_size")
    activation = _activation(f.get("hidden_act", "gelu_pytorch_tanh"), "hidden_act")
    if activation == "gelu":  # HF rewrites the legacy hidden_act="gelu" of the official Gemma 1 configs to tanh
        activation = "gelu_tanh"
    rope_params = f.get("rope_parameters") or {"rope_type": "default", "rope_theta": f.get("rope_theta", 10000.0)}
    rope = _rope(rope_params, "rope_parameters")
    return ModelSpec(
        family=f.get("model_type"),
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        rms_norm_eps=f.positive("rms_norm_eps", 1e-6),
        norm_offset=1.0,
        activation=activation,
        final_softcap=None,
        tie_embeddings=bool(f.get("tie_word_embeddings", True)),
        max_position_embeddings=f.int("max_position_embeddings", 8192),
        pad_token_id=f.get("pad_token_id", 0),
        bos_token_id=f.get("bos_token_id", 2),
        eos_token_id=f.get("eos_token_id", 1),
        layers=tuple(
            LayerSpec(
                index=i, attention=GLOBAL, window=None,
                num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
                query_scale=head_dim**-0.5, attn_softcap=None, qk_norm=False, rope=rope,
                intermediate_size=intermediate, sandwich_norms=False,
            )
            for i in range(n_layers)
        ),
    )


def _derive_gemma2(f: _Fields) -> ModelSpec:
    """Gemma 2 = Gemma 1 + alternating sliding/global layers, ``query_pre_attn_scalar``, attention and final
    logit softcaps, sandwich norms."""
    # Gemma 2 reads its activation from hidden_activation (and keeps "gelu" exact): Gemma 1's hidden_act is not read.
    gemma1 = _derive_gemma(f.without("hidden_act"))
    types = _layer_types(f, make_attention_layers_types(GEMMA2_ATTENTION_PATTERN, gemma1.num_layers))
    spec = _with_attention(gemma1, types, window=f.int("sliding_window", 4096))
    spec = _with_layers(
        spec,
        query_scale=f.positive("query_pre_attn_scalar", 256) ** -0.5,
        attn_softcap=f.float("attn_logit_softcapping", 50.0),
        sandwich_norms=True,
    )
    return replace(
        spec,
        activation=_activation(f.get("hidden_activation", "gelu_pytorch_tanh"), "hidden_activation"),
        final_softcap=f.float("final_logit_softcapping", 30.0),
    )


def _ropes_per_type(f: _Fields) -> dict[AttentionType, RopeSpec]:
    params = f.get("rope_parameters")
    if isinstance(params, Mapping) and "sliding_attention" in params and "full_attention" in params:
        return {
            SLIDING: _rope(params["sliding_attention"], "rope_parameters.sliding_attention"),
            GLOBAL: _rope(params["full_attention"], "rope_parameters.full_attention"),
        }
    # Legacy fields: rope_theta (global), rope_local_base_freq (local), rope_scaling (global only).
    global_params = {"rope_type": "default", "rope_theta": f.get("rope_theta", 1_000_000.0)}
    if f.get("rope_scaling"):
        global_params = {**global_params, **f.get("rope_scaling")}
    return {
        SLIDING: _rope({"rope_type": "default", "rope_theta": f.get("rope_local_base_freq", 10_000.0)}, "rope_local_base_freq"),
        GLOBAL: _rope(global_params, "rope_theta"),
    }


def _derive_gemma3(f: _Fields) -> ModelSpec:
    """Gemma 3 = Gemma 2 + QK-norm, a 5:1 sliding/global pattern, a RoPE per layer type, no attention softcap."""
    # Gemma 3 reads RoPE per layer type (below) and, like HF, ignores attn_logit_softcapping: hidden from Gemma 2.
    gemma2 = _derive_gemma2(f.without("rope_parameters", "rope_theta", "attn_logit_softcapping"))
    if f.get("use_bidirectional_attention"):
        raise ConfigError("config field 'use_bidirectional_attention' is true (EmbeddingGemma); not supported")
    period = f.int("sliding_window_pattern", len(GEMMA3_ATTENTION_PATTERN))
    pattern = (SLIDING,) * (period - 1) + (GLOBAL,)  # period 6: GEMMA3_ATTENTION_PATTERN
    types = _layer_types(f, make_attention_layers_types(pattern, gemma2.num_layers))
    ropes = _ropes_per_type(f)
    spec = _with_attention(gemma2, types, window=f.int("sliding_window", 4096))
    spec = _with_layers(spec, qk_norm=True, rope=lambda layer: ropes[layer.attention], attn_softcap=None)
    return replace(spec, final_softcap=f.float("final_logit_softcapping"))  # default None (Gemma 2: 30.0)


def _gemma4_donors(types: tuple[AttentionType, ...], n_shared: int) -> list[int | None]:
    """The last ``n_shared`` layers reuse K/V of the last earlier layer of their own attention type."""
    first_shared = len(types) - n_shared
    donors: list[int | None] = [None] * len(types)
    for i in range(first_shared, len(types)):
        candidates = [j for j in range(first_shared) if types[j] == types[i]]
        if not candidates:
            raise ConfigError(
                f"config field 'num_kv_shared_layers' ({n_shared}) leaves layer {i} ({types[i]}) without an earlier "
                "layer of its type to share K/V with"
            )
        donors[i] = candidates[-1]
    return donors


def _derive_gemma4(f: _Fields) -> ModelSpec:
    """Gemma 4 = Gemma 3 + ``x * w`` RMSNorm via ``pow``, attention scale 1.0 with a V norm, its own head dim, KV
    heads and K=V on global layers, KV-shared tail layers, MoE, PLE, a per-layer scalar."""
    # Gemma 4 has no query_pre_attn_scalar (scale 1.0) or sliding_window_pattern, and its
    # use_bidirectional_attention is "vision" (image tokens only) or "all", not Gemma 3's bool.
    gemma3 = _derive_gemma3(f.without("query_pre_attn_scalar", "sliding_window_pattern", "use_bidirectional_attention"))
    if f.get("use_bidirectional_attention") == "all":
        raise ConfigError("config field 'use_bidirectional_attention' is 'all'; only causal text attention is supported")
    # Gemma 3's 5:1 pattern, but HF makes the last layer global wherever the pattern ends.
    types = _layer_types(f, make_attention_layers_types(GEMMA4_ATTENTION_PATTERN, gemma3.num_layers)[:-1] + (GLOBAL,))
    spec = _with_attention(gemma3, types, window=f.int("sliding_window", 512))  # Gemma 3's default: 4096
    ropes = _ropes_per_type(f)  # as Gemma 3, on Gemma 4's layer types
    k_eq_v = bool(f.get("attention_k_eq_v", False))
    global_kv = f.get("num_global_key_value_heads") if k_eq_v else None
    global_head_dim = f.int("global_head_dim", 512)
    donors = _gemma4_donors(types, f.int("num_kv_shared_layers", 0, minimum=0))
    double_wide = bool(f.get("use_double_wide_mlp", False))
    moe = None
    if f.get("enable_moe_block"):
        moe = MoESpec(f.int("num_experts"), f.int("top_k_experts"), f.int("moe_intermediate_size"))
        if moe.top_k > moe.num_experts:
            raise ConfigError(f"config field 'top_k_experts' ({moe.top_k}) exceeds 'num_experts' ({moe.num_experts})")
    spec = _with_layers(
        spec,
        num_kv_heads=lambda layer: (global_kv or layer.num_kv_heads) if layer.attention == GLOBAL
        else layer.num_kv_heads,
        head_dim=lambda layer: global_head_dim if layer.attention == GLOBAL else layer.head_dim,
        query_scale=1.0,
        rope=lambda layer: ropes[layer.attention],
        v_norm=True,
        k_eq_v=lambda layer: k_eq_v and layer.attention == GLOBAL,
        kv_donor=lambda layer: donors[layer.index],
        intermediate_size=lambda layer: layer.intermediate_size * (2 if double_wide and donors[layer.index] is not None else 1),
        moe=moe,
    )
    for layer in spec.layers:
        if layer.num_heads % layer.num_kv_heads:
            raise ConfigError(
                f"layer {layer.index} ({layer.attention}): {layer.num_heads} query heads are not a multiple of "
                f"{layer.num_kv_heads} KV heads"
            )
    ple_dim = f.int("hidden_size_per_layer_input", 0, minimum=0)
    ple = PLESpec(ple_dim, f.int("vocab_size_per_layer_input", spec.vocab_size)) if ple_dim else None
    return replace(spec, norm_offset=0.0, norm_pow=True, layer_scalar=True, ple=ple)


def _siglip(f: _Fields) -> SiglipSpec:
    if f.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"config field 'vision_config.model_type' is {f.get('model_type')!r}; Gemma 3 uses 'siglip_vision_model'")
    if f.get("vision_use_head", False):
        raise ConfigError("config field 'vision_config.vision_use_head' is true; Gemma 3's tower has no MAP head")
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"config field 'vision_config.hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads})")
    spec = SiglipSpec(
        image_size=f.int("image_size"), patch_size=f.int("patch_size"), hidden_size=hidden,
        intermediate_size=f.int("intermediate_size"), num_layers=f.int("num_hidden_layers"), num_heads=heads,
        layer_norm_eps=f.positive("layer_norm_eps", 1e-6),
        activation=_activation(f.get("hidden_act", "gelu_pytorch_tanh"), "vision_config.hidden_act"),
    )
    if spec.image_size % spec.patch_size:
        raise ConfigError(f"config field 'vision_config.image_size' ({spec.image_size}) is not a multiple of 'patch_size' ({spec.patch_size})")
    return spec


def _sub_config(f: _Fields, key: str) -> _Fields:
    value = f.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field {key!r} must be a mapping, got {value!r}")
    return _Fields(value)


def _derive_gemma3_multimodal(f: _Fields) -> ModelSpec:
    """Gemma 3 image-text = the Gemma 3 text decoder of ``text_config`` + a SigLIP tower, a projector
    (average pooling, soft-embedding RMSNorm, linear) and bidirectional attention inside each image."""
    text = _sub_config(f, "text_config")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ConfigError(f"config field 'text_config.model_type' is {text.get('model_type')!r}, expected 'gemma3_text'")
    decoder = _derive_gemma3(_Fields({"model_type": "gemma3_text", **text.config}))
    vision = _siglip(_sub_config(f, "vision_config"))
    tokens = f.int("mm_tokens_per_image", 256)
    side = math.isqrt(tokens)
    if side * side != tokens or vision.patches_per_side % side:
        raise ConfigError(f"config field 'mm_tokens_per_image' ({tokens}) must be a square whose side divides the "
                          f"{vision.patches_per_side} patches per side")
    mm = MultimodalSpec(
        vision=vision, tokens_per_image=tokens,
        image_token_id=f.int("image_token_index", 262144, minimum=0),
        boi_token_id=f.int("boi_token_index", 255999, minimum=0),
        eoi_token_id=f.int("eoi_token_index", 256000, minimum=0),
        projector_eps=vision.layer_norm_eps,
    )
    # HF's Gemma3ForConditionalGeneration applies no final logit softcap (only Gemma3ForCausalLM does,
    # models/gemma3/modeling_gemma3.py 632-635); the released configs have none. Ignored, as HF does.
    return replace(decoder, multimodal=mm, final_softcap=None)


def _derive_gemma4_multimodal(f: _Fields) -> ModelSpec:
    """Gemma 4 image(-audio)-text = the Gemma 4 text decoder of ``text_config`` + a vision tower (and, on
    E2B/E4B, an audio tower), each with its projector; ``use_bidirectional_attention: "vision"`` makes
    each image a bidirectional block on the sliding layers."""
    text = _sub_config(f, "text_config")
    if text.get("model_type", "gemma4_text") != "gemma4_text":
        raise ConfigError(f"config field 'text_config.model_type' is {text.get('model_type')!r}, expected 'gemma4_text'")
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision"):
        raise ConfigError(f"config field 'text_config.use_bidirectional_attention' is {bidirectional!r}; "
                          "image-text Gemma 4 uses null or 'vision'")
    decoder = _derive_gemma4(_Fields({"model_type": "gemma4_text", **text.config}))
    towers = {key: f.get(key) for key in ("vision_config", "audio_config")}
    for key, value in towers.items():
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"config field {key!r} must be a mapping or null, got {value!r}")
    if towers["vision_config"] is None:
        raise ConfigError("config field 'vision_config' is missing: every image-text Gemma 4 has a vision tower")
    ids = {field_name: f.int(key, default, minimum=0) for field_name, key, default in (
        ("image_token_id", "image_token_id", 258880), ("audio_token_id", "audio_token_id", 258881),
        ("video_token_id", "video_token_id", 258884), ("boi_token_id", "boi_token_id", 255999),
        ("eoi_token_id", "eoi_token_id", 258882), ("boa_token_id", "boa_token_id", 256000),
        ("eoa_token_id", "eoa_token_index", 258883))}  # HF spells the last one *_index
    media = Gemma4MediaSpec(vision_config=dict(towers["vision_config"]),
                            audio_config=None if towers["audio_config"] is None else dict(towers["audio_config"]),
                            bidirectional="sliding" if bidirectional == "vision" else "none",
                            tower_config=dict(f.config), **ids)
    return replace(decoder, multimodal=media)


_DERIVE = {
    "gemma": _derive_gemma,
    "gemma2": _derive_gemma2,
    "gemma3_text": _derive_gemma3,
    "gemma4_text": _derive_gemma4,
    "gemma3": _derive_gemma3_multimodal,
    "gemma4": _derive_gemma4_multimodal,
}


@dataclass(frozen=True)
class Gemma3nSpec:
    """What Gemma 3n adds to the decoder (HF ``Gemma3nTextConfig``, ``configuration_gemma3n.py`` 121-127)."""

    altup_num_inputs: int  # parallel residual streams; stream 0 is the scaled embedding
    altup_active_idx: int  # the stream that goes through attention and the MLP
    altup_coef_clip: float | None  # HF clamps the AltUp coefficients in training only: no effect at inference
    altup_correct_scale: bool  # scale the corrected active stream by correct_output_scale (PLE gate input only)
    laurel_rank: int  # LAuReL low-rank residual beside attention
    activation_sparsity: tuple[float, ...]  # per layer: target sparsity of the MLP gate (0 = dense)


# Gemma3nTextConfig's defaults (configuration_gemma3n.py 96-127) where they differ from what Gemma 4's derive
# assumes for an absent field; the structural sizes stay required, as for every generation.
_GEMMA3N_DEFAULTS = {
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262_144,
    "num_kv_shared_layers": 15,
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "laurel_rank": 64,
}
# Gemma 4 fields Gemma 3n does not have (HF ignores them): hidden from Gemma 4's derive, which then takes its
# 3n-compatible defaults (no K=V, no MoE, no double-wide MLP, causal text).
_GEMMA4_ONLY = ("global_head_dim", "attention_k_eq_v", "num_global_key_value_heads", "use_double_wide_mlp",
                "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
                "use_bidirectional_attention")


def _per_layer(f: _Fields, key: str, n: int, check) -> tuple:
    """A per-layer config list of ``n`` entries, each passing ``check`` (a scalar is repeated, as HF does for
    ``intermediate_size``); a bad entry is a ConfigError naming ``key[i]``."""
    value = f.get(key)
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != n:
        raise ConfigError(f"config field {key!r} must list {n} per-layer values, got {value!r}")
    for i, v in enumerate(values):
        if not check(v):
            raise ConfigError(f"config field {key}[{i}] is {v!r}")
    return tuple(values)


def _derive_gemma3n(f: _Fields) -> ModelSpec:
    """Gemma 3n = Gemma 4's ``x * w`` RMSNorm via ``pow``, scale-1 attention with QK- and V-norms, PLE and
    KV-shared tail layers, minus Gemma 4's global head dim, K=V, MoE, double-wide MLP and layer scalar; plus
    AltUp streams, LAuReL, activation sparsity and a per-layer MLP width. Its default layer pattern is 4:1
    (global where ``(i + 1) % 5 == 0``, ``configuration_gemma3n.py`` 141-144), with no forced last global layer."""
    f = _Fields({**_GEMMA3N_DEFAULTS, **f.config})
    n = f.int("num_hidden_layers")
    size = f.get("intermediate_size")
    if size is None:
        raise ConfigError("config field 'intermediate_size' is missing")
    widths = _per_layer(
        _Fields({"intermediate_size": [size] * n if not isinstance(size, (list, tuple)) else size}),
        "intermediate_size", n, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    )
    sparsity = f.get("activation_sparsity_pattern")
    if sparsity is None:  # configuration_gemma3n.py 146-150
        sparsity = [0.95] * (10 if n > 10 else 0) + [0.0] * (n - (10 if n > 10 else 0))
    sparsity = _per_layer(
        _Fields({"activation_sparsity_pattern": sparsity}), "activation_sparsity_pattern", n,
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
    )
    default_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
    gemma4 = _derive_gemma4(_Fields({
        **f.without(*_GEMMA4_ONLY).config,
        "intermediate_size": widths[0],  # each layer's own width is set below
        "layer_types": f.get("layer_types", default_types),
        "global_head_dim": f.int("head_dim", 256),  # one head dim on every layer
    }))
    if f.int("hidden_size") % f.int("num_attention_heads"):  # HF's validate_architecture refuses it
        raise ConfigError(f"config field 'hidden_size' ({f.int('hidden_size')}) is not a multiple of "
                          f"'num_attention_heads' ({f.int('num_attention_heads')})")
    f.int("hidden_size_per_layer_input")  # Gemma 3n always has PLE: >= 1
    inputs = f.int("altup_num_inputs")
    active = f.int("altup_active_idx", minimum=0)
    if active >= inputs:
        raise ConfigError(f"config field 'altup_active_idx' ({active}) must be below 'altup_num_inputs' ({inputs})")
    if not isinstance(f.get("altup_correct_scale"), bool):
        raise ConfigError(f"config field 'altup_correct_scale' must be true or false, got {f.get('altup_correct_scale')!r}")
    clip = f.float("altup_coef_clip")
    if clip is not None and clip <= 0:
        raise ConfigError(f"config field 'altup_coef_clip' must be a positive number, got {clip!r}")
    extra = Gemma3nSpec(
        altup_num_inputs=inputs, altup_active_idx=active, altup_coef_clip=clip,
        altup_correct_scale=f.get("altup_correct_scale"), laurel_rank=f.int("laurel_rank"),
        activation_sparsity=tuple(float(s) for s in sparsity),
    )
    spec = _with_layers(gemma4, intermediate_size=lambda layer: widths[layer.index])
    return replace(spec, layer_scalar=False, gemma3n=extra)


_DERIVE["gemma3n_text"] = _derive_gemma3n


def _derive_gemma3n_multimodal(f: _Fields) -> ModelSpec:
    """Gemma 3n image-audio-text = the Gemma 3n text decoder of ``text_config`` + the MobileNet-V5 vision tower
    and the audio tower, each with its embedder (soft tokens, and hard tokens for ids past the text table's
    own part); causal attention throughout; the final softcap as the text model applies it."""
    text = _sub_config(f, "text_config")
    if text.get("model_type", "gemma3n_text") != "gemma3n_text":
        raise ConfigError(f"config field 'text_config.model_type' is {text.get('model_type')!r}, expected 'gemma3n_text'")
    decoder = _derive_gemma3n(_Fields({"model_type": "gemma3n_text", **text.config}))
    vision, audio = _sub_config(f, "vision_config"), _sub_config(f, "audio_config")
    if vision.get("model_type", "gemma3n_vision") != "gemma3n_vision":
        raise ConfigError(f"config field 'vision_config.model_type' is {vision.get('model_type')!r}, expected 'gemma3n_vision'")
    tokens = f.int("vision_soft_tokens_per_image", 256)
    if math.isqrt(tokens) ** 2 != tokens:
        raise ConfigError(f"config field 'vision_soft_tokens_per_image' ({tokens}) must be a square: the tower's map is side x side")
    ids = {name: f.int(name, default, minimum=0) for name, default in (
        ("image_token_id", 262_145), ("audio_token_id", 262_273), ("boi_token_id", 255_999),
        ("eoi_token_id", 262_144), ("boa_token_id", 256_000), ("eoa_token_id", 262_272))}
    media = Gemma3nMediaSpec(
        vision_config=dict(vision.config), audio_config=dict(audio.config), tower_config=dict(f.config),
        vision_tokens=tokens, audio_tokens=f.int("audio_soft_tokens_per_image", 188),
        vision_offset=vision.int("vocab_offset", 262_144, minimum=0), vision_vocab=vision.int("vocab_size", 128),
        audio_offset=audio.int("vocab_offset", 262_272, minimum=0), audio_vocab=audio.int("vocab_size", 128), **ids)
    if not media.vision_offset + media.vision_vocab <= media.audio_offset <= decoder.vocab_size - media.audio_vocab:
        raise ConfigError(f"config fields 'vision_config.vocab_offset' ({media.vision_offset}) + 'vocab_size' "
                          f"({media.vision_vocab}), 'audio_config.vocab_offset' ({media.audio_offset}) + 'vocab_size' "
                          f"({media.audio_vocab}) must lie in order inside the text vocabulary ({decoder.vocab_size})")
    for name in ("image_token_id", "audio_token_id"):
        if not media.vision_offset <= ids[name] < decoder.vocab_size:
            raise ConfigError(f"config field {name!r} ({ids[name]}) must be a hard media token id in "
                              f"[{media.vision_offset}, {decoder.vocab_size})")
    return replace(decoder, multimodal=media)


_DERIVE["gemma3n"] = _derive_gemma3n_multimodal
