"""Gemma 4's image path: the vision tower (patch embedder, encoder, pooler) and ``embed_vision``, the
projector that turns pooled patches into the soft tokens merged into the text sequence.

Probes (``capture``), each shaped (images, tokens, features)::

    pixel_values (I, P, 3p²) in [0, 1], position_ids (I, P, 2) = (x=column, y=row), (-1, -1) = padding
      ── Linear(2·(pix − 0.5)) + table[0][x] + table[1][y] (0 on padding) ──▶ vision.embed          (I, P, C)
      ── encoder layer 0 … L-1 (sandwich norms, 2-D RoPE, padding-masked) ──▶ vision.layers.{i}.out (I, P, C)
      ── zero padding ── k×k average by position (fp32) ── × √C (fp32)
         ── [26B/31B: (h − std_bias) · std_scale (fp32)] ── cast ─────────▶ vision.pool          (I, N, C)
      ── RMSNorm without scale ── Linear C → H_text ──────────────────────▶ vision.proj          (I, N, H)

P = max_patches = budget · k² (the processor pads every image to it), N = P / k² (HF's ``output_length``,
again from the *padded* count). Image i has n_i <= N soft tokens: the first n_i rows of its ``vision.pool``
and ``vision.proj``; the rows after them (padding, which HF strips) are 0 in the probes.
:meth:`Gemma4VisionTower.forward` returns what HF merges: a tuple of (n_i, H) tensors, one per image
(``Gemma4Model.get_image_features(...).pooler_output``); their concatenation fills the placeholders in order.

Each encoder layer (``Gemma4VisionEncoderLayer``)::

    x ─┬─ norm ─ attention ─ post_norm ─(+)─┬─ norm ─ down(gelu_tanh(gate(·)) · up(·)) ─ post_norm ─(+)─▶
       └─────────────────────────────────────┘└────────────────────────────────────────────────────────┘

Numerics, with HF file:line (``m4`` = ``transformers/models/gemma4/modeling_gemma4.py``, ``ip4`` =
``models/gemma4/image_processing_pil_gemma4.py``, ``it`` = ``image_transforms.py``, transformers 5.23):

- Patch embedder: ``2 * (pixel_values - 0.5)`` in the pixels' own dtype, then cast to the weight dtype
  and a bias-free linear (m4:621-624); position = ``table[0][clamp(x, 0)] + table[1][clamp(y, 0)]``,
  ``where(padding, 0.0, ·)`` (m4:607-614). Padding is ``(pos == -1).all(-1)`` (m4:2095).
- RMSNorm (every norm here): fp32, ``x * pow(mean(x²) + eps, -0.5)``, times ``w`` (no ``1 + w``), one cast
  back (m4:213-222); ``v_norm`` and the projector's norm have no scale (m4:922, m4:2146).
- ``Gemma4ClippableLinear`` (E2B/E4B towers): ``clamp(x, input_min, input_max)`` → linear →
  ``clamp(·, output_min, output_max)`` with 0-d checkpoint buffers (m4:192-201), on q/k/v/o and the MLP.
- 2-D RoPE: ``inv_freq = 1 / θ^(arange(0, D/2, 2) / (D/2))`` in fp32 (m4:748), θ = 100;
  angles ``pos.float() · inv_freq`` per axis (m4:753), cos/sin in fp32 then cast to the model dtype
  (m4:759), laid out ``[x, x, y, y]`` (m4:767-768): the first D/2 channels of each head are rotated
  (rotate_half within that half) by the column x, the last D/2 by the row y (m4:876-899). Q: q_proj →
  q_norm → RoPE; K likewise; V: v_proj → v_norm, no RoPE (m4:938-952).
- Attention: scale 1.0 (m4:912); eager: scores in the model dtype, padding keys masked (additive
  ``finfo.min``, m4:1036 → masking_utils), softmax in fp32, cast back (m4:834-843). Padding queries are
  computed (they attend to the valid keys) and carried to the pooler, which zeroes them.
- Pooler (m4:656-693): padding rows zeroed in the model dtype (m4:682); one-hot weights ``1/k²`` from
  ``floor(pos / k)`` with the pooled row index ``kx + (max_x // k) · ky`` (max_x over the clamped
  positions, padding included, m4:660-664); ``weights.T @ h.float()`` in fp32, cast to the model dtype
  (m4:665-667); then ``.float() * sqrt(C)`` (m4:692). A pooled row is valid when any patch fed it
  (m4:666); HF strips the others (m4:2112). ``standardize``: ``(h - std_bias.float()) * std_scale.float()``
  in fp32 (m4:2116-2117), then cast to the model dtype (m4:2118).
- Projector ``embed_vision`` (m4:2123-2147): scale-free RMSNorm with the *vision* eps, bias-free linear
  C → H_text, on the stripped (n, C) rows of all images at once; no sqrt(H_text) scaling. Soft-token
  count per image = valid patches // k² (m4:2274-2278).

Preprocessing (:func:`soft_token_layout`, :func:`image_to_patches`) follows the PIL image processor
(``Gemma4ImageProcessorPil``, the one HF picks when torchvision is absent): the largest size with
``H·W <= budget·k²·p²`` and both sides multiples of ``k·p`` keeping the aspect ratio (ip4:36-87), resized
only when it differs, with PIL bicubic on uint8 (it:316-384), rescale ``float64 · (1/255)`` → float32
(it:121-125), no normalisation (ip4:142-145), patches ``(ph, pw, c)`` inside, row-major (ip4:91-102),
positions (x=col, y=row) (ip4:258-259), padded with zero pixels and (-1, -1) (ip4:106-117). The
torchvision processor (``image_processing_gemma4.py``) resizes with antialiased torch bicubic instead:
not bit-equal to this.

Everything runs in the tower's dtype (all checkpoint tensors cast to it, as ``from_pretrained(dtype=)``
does) except the RoPE frequencies, which stay fp32 (a non-persistent HF buffer: ``model.to(bf16)`` would
round it; ``from_pretrained``/``_from_config(dtype=)`` do not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import put as _put

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)  # ip4:33

TOWER, PROJECTOR = "model.vision_tower.", "model.embed_vision."


class VisionWeightError(ValueError):
    """A checkpoint that does not fit the vision config; the message names the tensor."""


# ----------------------------------------------------------------------------------------------------
# config

_DEFAULTS = {  # Gemma4VisionConfig's class defaults (configuration_gemma4.py 300-317): a released
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,  # config.json may omit them
    "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "pooling_kernel_size": 3,
    "patch_size": 16, "position_embedding_size": 10 * 1024, "use_clipped_linears": False, "standardize": False,
}
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str  # ops.gelu kind
    eps: float
    pool: int  # pooling_kernel_size k
    patch_size: int
    position_size: int
    clipped: bool
    standardize: bool
    rope_theta: float

    @classmethod
    def from_config(cls, vision_config: Mapping | None) -> VisionSettings:
        c = {**_DEFAULTS, **{k: v for k, v in dict(vision_config or {}).items() if v is not None}}
        rope = dict(c.get("rope_parameters") or {})
        if rope.get("rope_type", "default") not in ("default", "axial"):  # "default" -> "axial": modeling_rope_utils.py:833
            raise ValueError(f"vision rope_type {rope['rope_type']!r}: Gemma 4's tower supports only axial RoPE")
        if c["hidden_activation"] not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_activation {c['hidden_activation']!r} not supported")
        if c["head_dim"] % 4:
            raise ValueError(f"vision head_dim {c['head_dim']} must be a multiple of 4 (two axes, rotate_half each)")
        if c["pooling_kernel_size"] < 2:
            # k = 1 skips the pooling (m4:684-687) and HF then uses the *padding* mask as the validity mask
            # (m4:2112): it keeps the padding rows and drops the image. No released config does this.
            raise ValueError(f"vision pooling_kernel_size {c['pooling_kernel_size']} < 2 is not supported")
        return cls(
            hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
            activation=_ACTIVATIONS[c["hidden_activation"]], eps=c["rms_norm_eps"], pool=c["pooling_kernel_size"],
            patch_size=c["patch_size"], position_size=c["position_embedding_size"],
            clipped=bool(c["use_clipped_linears"]), standardize=bool(c["standardize"]),
            rope_theta=float(rope.get("rope_theta", 100.0)),
        )


def _split_config(hf_config: Mapping) -> tuple[Mapping, int]:
    """(vision config, text hidden size) of a full Gemma4Config dict."""
    if "vision_config" not in hf_config or hf_config["vision_config"] is None:
        raise ValueError("the config has no vision_config: this Gemma 4 checkpoint has no vision tower")
    text = hf_config.get("text_config") or {}
    if "hidden_size" not in text:
        raise ValueError("text_config.hidden_size is missing: the projector's output width is unknown")
    return hf_config["vision_config"], int(text["hidden_size"])


# ----------------------------------------------------------------------------------------------------
# building blocks


class ClippedLinear(nn.Module):
    """Bias-free linear; with ``clipped``, input and output clamped to 0-d checkpoint buffers (m4:192-201)."""

    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_out, n_in), requires_grad=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = ops.linear(x, self.weight)
        return torch.clamp(y, self.output_min, self.output_max) if self.clipped else y


class Norm(nn.Module):
    """Gemma 4 RMSNorm (fp32, ``pow(·, -0.5)``, ``x * w``); ``with_scale=False``: no weight."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False) if with_scale else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, offset=0.0, use_pow=True)


def rope_2d_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(D/4,) fp32: one table for both axes, built over D/2 channels (m4:746-748)."""
    spatial = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))


def rope_2d_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (I, P, 2) -> cos, sin (I, P, D) laid out [x, x, y, y] (m4:753-768), fp32 then cast."""
    freqs = positions[..., None].float() * inv_freq  # (I, P, 2, D/4)
    lay = lambda f: torch.cat([f[:, :, 0], f[:, :, 0], f[:, :, 1], f[:, :, 1]], dim=-1)  # noqa: E731
    return lay(freqs.cos()).to(dtype), lay(freqs.sin()).to(dtype)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (I, P, heads, D): channels [0, D/2) rotated by the x angles, [D/2, D) by the y angles, each half
    with its own rotate_half (m4:846-899)."""
    half = x.shape[-1] // 2
    parts = []
    for xp, c, s in zip(x.split(half, -1), cos.split(half, -1), sin.split(half, -1), strict=True):
        q = xp.shape[-1] // 2
        rotated = torch.cat((-xp[..., q:], xp[..., :q]), dim=-1)
        parts.append(xp * c[:, :, None] + rotated * s[:, :, None])
    return torch.cat(parts, dim=-1)


class Attention(nn.Module):
    def __init__(self, s: VisionSettings):
        super().__init__()
        h, n, k, d = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        self.q, self.k = ClippedLinear(h, n * d, s.clipped), ClippedLinear(h, k * d, s.clipped)
        self.v, self.o = ClippedLinear(h, k * d, s.clipped), ClippedLinear(n * d, h, s.clipped)
        self.q_norm, self.k_norm, self.v_norm = Norm(d, s.eps), Norm(d, s.eps), Norm(d, s.eps, with_scale=False)
        self.head_dim = d

    def forward(self, x, cos, sin, allowed):
        i, p, _ = x.shape
        heads = lambda t: t.view(i, p, -1, self.head_dim)  # noqa: E731  (I, P, heads, D)
        q = apply_rope_2d(self.q_norm(heads(self.q(x))), cos, sin).transpose(1, 2)  # (I, N, P, D)
        k = apply_rope_2d(self.k_norm(heads(self.k(x))), cos, sin).transpose(1, 2)  # (I, K, P, D)
        v = self.v_norm(heads(self.v(x))).transpose(1, 2)
        out = ops.attention(q, k, v, allowed, scale=1.0, cap=None)  # (I, N, P, D)
        return self.o(out.transpose(1, 2).reshape(i, p, -1))


class MLP(nn.Module):
    def __init__(self, s: VisionSettings):
        super().__init__()
        h, f = s.hidden_size, s.intermediate_size
        self.gate, self.up, self.down = ClippedLinear(h, f, s.clipped), ClippedLinear(h, f, s.clipped), ClippedLinear(f, h, s.clipped)
        self.activation = s.activation

    def forward(self, x):
        return self.down(ops.gelu(self.gate(x), self.activation) * self.up(x))


class EncoderLayer(nn.Module):
    def __init__(self, s: VisionSettings):
        super().__init__()
        norm = lambda: Norm(s.hidden_size, s.eps)  # noqa: E731
        self.attn_norm, self.attn, self.attn_post_norm = norm(), Attention(s), norm()
        self.mlp_norm, self.mlp, self.mlp_post_norm = norm(), MLP(s), norm()

    def forward(self, x, cos, sin, allowed):
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, allowed))
        return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------------------------------
# the tower


class Gemma4VisionTower(nn.Module):
    """HF ``Gemma4VisionModel`` + ``Gemma4MultimodalEmbedder`` (``embed_vision``): patches -> soft tokens."""

    def __init__(self, vision_config: Mapping | None, text_hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        s = self.settings = VisionSettings.from_config(vision_config)
        c = s.hidden_size
        self.patch_proj = nn.Parameter(torch.zeros(c, 3 * s.patch_size**2), requires_grad=False)
        self.position_table = nn.Parameter(torch.zeros(2, s.position_size, c), requires_grad=False)  # [x, y]
        self.layers = nn.ModuleList(EncoderLayer(s) for _ in range(s.num_layers))
        if s.standardize:
            self.register_buffer("std_bias", torch.zeros(c))
            self.register_buffer("std_scale", torch.ones(c))
        self.proj_norm = Norm(c, s.eps, with_scale=False)
        self.proj = nn.Parameter(torch.zeros(text_hidden_size, c), requires_grad=False)
        self.to(dtype)
        self.register_buffer("inv_freq", rope_2d_inv_freq(s.head_dim, s.rope_theta), persistent=False)  # fp32

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_proj.dtype

    # --- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Gemma4VisionTower:
        """Build from a full ``Gemma4Config`` dict and a ``Gemma4ForConditionalGeneration`` state dict
        (text tensors are ignored); strict: a missing, unexpected (under the vision prefixes) or misshaped
        tensor raises :class:`VisionWeightError` naming it."""
        vision, text_hidden = _split_config(hf_config)
        tower = cls(vision, text_hidden, dtype)
        entries = _entries(tower.settings, text_hidden)
        for hf, _, shape in entries:
            if hf not in state_dict:
                raise VisionWeightError(f"missing tensor {hf!r} (expected shape {shape})")
            if tuple(state_dict[hf].shape) != shape:
                raise VisionWeightError(f"tensor {hf!r} has shape {tuple(state_dict[hf].shape)}, expected {shape}")
        known = {hf for hf, _, _ in entries}
        for name in state_dict:
            if name.startswith((TOWER, PROJECTOR)) and name not in known and not name.endswith("inv_freq"):
                raise VisionWeightError(f"unexpected tensor {name!r} (shape {tuple(state_dict[name].shape)}) for this vision config")
        with torch.no_grad():
            for hf, ref, _ in entries:
                owner, _, leaf = ref.rpartition(".")
                target = getattr(tower.get_submodule(owner) if owner else tower, leaf)
                target.copy_(state_dict[hf].to(target.dtype))
        return tower.eval()

    # --- forward ------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, capture: dict | None = None,
                placeholders: int | Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """pixel_values (I, P, 3p²), position_ids (I, P, 2) exactly as the processor gives them ->
        per image its soft tokens (n_i, H_text), padding stripped. ``placeholders`` (one count per image,
        or one for all): the placeholder tokens the prompt holds for each image; a different count raises
        a one-line ``ValueError`` before any compute."""
        counts = self.soft_token_counts(position_ids, pixel_values)
        if placeholders is not None:
            check_placeholders(counts, placeholders)
        x = _put(capture, "vision.embed", self.embed(pixel_values, position_ids))
        cos, sin, allowed = self._context(position_ids)
        for i, layer in enumerate(self.layers):
            x = _put(capture, f"vision.layers.{i}.out", layer(x, cos, sin, allowed))
        pooled = _put(capture, "vision.pool", self.pool_from(x, position_ids))
        rows = self._project_rows(pooled, position_ids)  # (n_0 + n_1 + ..., H_text)
        if capture is not None:
            capture["vision.proj"] = self._scatter(rows, position_ids, pooled.shape[1])
        return tuple(torch.split(rows, counts))

    def embed(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(I, P, 3p²), (I, P, 2) -> (I, P, C): the ``vision.embed`` probe."""
        self._check_inputs(pixel_values, position_ids)
        padding = (position_ids == -1).all(dim=-1)
        pixels = 2 * (pixel_values - 0.5)  # in the pixels' dtype (m4:621)
        if pixels.dtype != self.dtype:
            pixels = pixels.to(self.dtype)
        x = ops.linear(pixels, self.patch_proj)
        pos = position_ids.clamp(min=0)
        table = F.embedding(pos[..., 0], self.position_table[0]) + F.embedding(pos[..., 1], self.position_table[1])
        return x + torch.where(padding[..., None], 0.0, table)

    @torch.no_grad()
    def layer(self, i: int, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Encoder layer ``i`` alone on x (I, P, C) (e.g. a candidate's ``vision.layers.{i-1}.out``)."""
        cos, sin, allowed = self._context(position_ids)
        return self.layers[i](x.to(self.dtype), cos, sin, allowed)

    @torch.no_grad()
    def pool_from(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The last layer's output (I, P, C) -> the ``vision.pool`` probe (I, N, C): pooled, × sqrt(C),
        standardised where configured, in the model dtype; rows HF strips are 0."""
        x = x.to(self.dtype)
        k = self.settings.pool
        length = x.shape[1] // k**2  # from the padded patch count (m4:2093)
        x = x.masked_fill((position_ids == -1).all(dim=-1)[..., None], 0.0)
        weights, valid = _pool_weights(position_ids, length, k)
        pooled = (weights.transpose(1, 2) @ x.float()).to(x.dtype)  # (I, N, C)
        h = pooled.float() * self.settings.hidden_size**0.5
        if self.settings.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(self.dtype).masked_fill(~valid[..., None], 0.0)

    @torch.no_grad()
    def project_from(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``vision.pool``-shaped x (I, N, C) -> the ``vision.proj`` probe (I, N, H_text); rows HF strips are 0."""
        return self._scatter(self._project_rows(x.to(self.dtype), position_ids), position_ids, x.shape[1])

    @torch.no_grad()
    def stream(self, probe: str, value, position_ids: torch.Tensor) -> torch.Tensor | None:
        """Probe ``probe`` computed from the probe before it (``value(name)`` gives that one, e.g. a
        candidate's): each step of the image path judged alone. None for other probes."""
        n = len(self.layers)
        if probe.startswith("vision.layers."):
            i = int(probe.split(".")[2])
            return self.layer(i, value("vision.embed" if i == 0 else f"vision.layers.{i - 1}.out"), position_ids)
        if probe == "vision.pool":
            return self.pool_from(value("vision.embed" if n == 0 else f"vision.layers.{n - 1}.out"), position_ids)
        if probe == "vision.proj":
            return self.project_from(value("vision.pool"), position_ids)
        return None

    def token_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(I, N) bool: the pooled rows HF keeps (m4:666, m4:2112)."""
        return _pool_weights(position_ids, position_ids.shape[1] // self.settings.pool**2, self.settings.pool)[1]

    def soft_token_counts(self, position_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> list[int]:
        """Soft tokens per image: valid patches // k² (m4:2277); checks the inputs on the way."""
        if pixel_values is not None:
            self._check_inputs(pixel_values, position_ids)
        k2 = self.settings.pool**2
        counts = ((position_ids != -1).all(dim=-1).sum(dim=-1) // k2).tolist()
        kept = self.token_mask(position_ids).sum(dim=-1).tolist()
        for i, (n, m) in enumerate(zip(counts, kept, strict=True)):
            if n != m:
                raise ValueError(f"image {i}: its patch positions pool to {m} tokens but hold {n}·{k2} valid patches")
        return counts

    # --- helpers ------------------------------------------------------------------------------------

    def _context(self, position_ids: torch.Tensor):
        """RoPE tables and the (I, 1, P, P) mask every layer reads: any query, valid keys only."""
        cos, sin = rope_2d_cos_sin(position_ids, self.inv_freq, self.dtype)
        valid = ~(position_ids == -1).all(dim=-1)
        p = valid.shape[1]
        return cos, sin, valid[:, None, None, :].expand(-1, 1, p, p)

    def _project_rows(self, pooled: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(I, N, C) -> (rows kept, H_text): HF projects the stripped rows of all images in one go."""
        rows = pooled[self.token_mask(position_ids)]
        return ops.linear(self.proj_norm(rows), self.proj)

    def _scatter(self, rows: torch.Tensor, position_ids: torch.Tensor, length: int) -> torch.Tensor:
        mask = self.token_mask(position_ids)
        out = rows.new_zeros(mask.shape[0], length, rows.shape[-1])
        out[mask] = rows
        return out

    def _check_inputs(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> None:
        """One-line errors for what would otherwise fail deep inside (or silently differ)."""
        s = self.settings
        width, k2 = 3 * s.patch_size**2, s.pool**2
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != width:
            raise ValueError(f"pixel_values must be (images, patches, {width}), got shape {tuple(pixel_values.shape)}")
        if tuple(position_ids.shape) != (*pixel_values.shape[:2], 2):
            raise ValueError(f"position_ids must be {(*pixel_values.shape[:2], 2)}, got shape {tuple(position_ids.shape)}")
        if pixel_values.shape[1] % k2:
            raise ValueError(f"{pixel_values.shape[1]} patches per image is not a multiple of {k2} (pooling {s.pool}x{s.pool})")
        padding = (position_ids == -1).all(dim=-1)
        if ((position_ids < 0).any(dim=-1) & ~padding).any():
            raise ValueError("position_ids: a patch has one negative coordinate; padding is (-1, -1)")
        if int(position_ids.max()) >= s.position_size:
            raise ValueError(f"position_ids: coordinate {int(position_ids.max())} >= position_embedding_size {s.position_size}")
        length = pixel_values.shape[1] // k2
        pos = position_ids.clamp(min=0)
        cols = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
        index = (pos[..., 0] // s.pool) + (cols // s.pool) * (pos[..., 1] // s.pool)
        if int(index.max()) >= length:
            raise ValueError(f"position_ids: the patch grid pools to more than {length} tokens (the padded patch count / {k2})")


def _pool_weights(position_ids: torch.Tensor, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, P, N) fp32 averaging weights and (I, N) validity, exactly as HF builds them (m4:660-666)."""
    pos = position_ids.clamp(min=0)
    max_x = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
    cell = torch.div(pos, k, rounding_mode="floor")
    index = cell[..., 0] + (max_x // k) * cell[..., 1]
    weights = F.one_hot(index.long(), length).float() / (k * k)
    return weights, torch.logical_not((weights == 0).all(dim=1))


def check_placeholders(counts: Sequence[int], placeholders: int | Sequence[int]) -> None:
    """Raise ``ValueError("image 0: 279 soft tokens for 280 placeholders")`` on any mismatch."""
    wanted = [placeholders] * len(counts) if isinstance(placeholders, int) else list(placeholders)
    if len(wanted) != len(counts):
        raise ValueError(f"{len(counts)} images for {len(wanted)} placeholder groups")
    for i, (n, m) in enumerate(zip(counts, wanted, strict=True)):
        if n != m:
            raise ValueError(f"image {i}: {n} soft tokens for {m} placeholders")


# ----------------------------------------------------------------------------------------------------
# checkpoint names


def _entries(s: VisionSettings, text_hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name as ``Gemma4ForConditionalGeneration.state_dict()`` gives it, reference name, shape)."""
    c, f, d = s.hidden_size, s.intermediate_size, s.head_dim
    nd, kd = s.num_heads * d, s.num_kv_heads * d
    out = [
        (f"{TOWER}patch_embedder.input_proj.weight", "patch_proj", (c, 3 * s.patch_size**2)),
        (f"{TOWER}patch_embedder.position_embedding_table", "position_table", (2, s.position_size, c)),
    ]
    linears = [("self_attn.q_proj", "attn.q", (nd, c)), ("self_attn.k_proj", "attn.k", (kd, c)),
               ("self_attn.v_proj", "attn.v", (kd, c)), ("self_attn.o_proj", "attn.o", (c, nd)),
               ("mlp.gate_proj", "mlp.gate", (f, c)), ("mlp.up_proj", "mlp.up", (f, c)), ("mlp.down_proj", "mlp.down", (c, f))]
    norms = [("input_layernorm", "attn_norm", c), ("post_attention_layernorm", "attn_post_norm", c),
             ("pre_feedforward_layernorm", "mlp_norm", c), ("post_feedforward_layernorm", "mlp_post_norm", c),
             ("self_attn.q_norm", "attn.q_norm", d), ("self_attn.k_norm", "attn.k_norm", d)]
    for i in range(s.num_layers):
        hf, ref = f"{TOWER}encoder.layers.{i}.", f"layers.{i}."
        for hf_sub, ref_sub, shape in linears:
            out.append((f"{hf}{hf_sub}.linear.weight", f"{ref}{ref_sub}.weight", shape))
            if s.clipped:
                out += [(f"{hf}{hf_sub}.{b}", f"{ref}{ref_sub}.{b}", ()) for b in ("input_min", "input_max", "output_min", "output_max")]
        out += [(f"{hf}{hf_sub}.weight", f"{ref}{ref_sub}.weight", (dim,)) for hf_sub, ref_sub, dim in norms]
    if s.standardize:
        out += [(f"{TOWER}std_bias", "std_bias", (c,)), (f"{TOWER}std_scale", "std_scale", (c,))]
    out.append((f"{PROJECTOR}embedding_projection.weight", "proj", (text_hidden, c)))
    return out


def expected_shapes(hf_config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every vision-tower and projector tensor the checkpoint carries (HF name -> shape)."""
    vision, text_hidden = _split_config(hf_config)
    return {hf: shape for hf, _, shape in _entries(VisionSettings.from_config(vision), text_hidden)}


# ----------------------------------------------------------------------------------------------------
# preprocessing (Gemma4ImageProcessorPil)


def _settings_of(vision_config) -> VisionSettings:
    return vision_config if isinstance(vision_config, VisionSettings) else VisionSettings.from_config(vision_config)


def _check_budget(budget: int) -> None:
    if budget not in SUPPORTED_BUDGETS:
        raise ValueError(f"soft-token budget {budget} is not one of {SUPPORTED_BUDGETS}")


def soft_token_layout(height: int, width: int, budget: int, vision_config=None) -> tuple[int, int, int, int, int]:
    """(resized_h, resized_w, patches_h, patches_w, soft_tokens) the processor picks for an image of
    height x width under ``budget`` (ip4:36-87): the largest aspect-preserving size with at most budget·k²
    patches and both sides multiples of k·p; a side that would round to 0 gets k·p and the other side
    ``floor(long / short)·k·p`` capped at (budget)·k·p."""
    _check_budget(budget)
    s = _settings_of(vision_config)
    p, k = s.patch_size, s.pool
    max_patches = budget * k**2
    target_px = max_patches * p**2
    factor = math.sqrt(target_px / (height * width))
    side = k * p
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"image {height}x{width} resizes to 0x0 under budget {budget}")
    longest = (max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > target_px:
        raise ValueError(f"image {height}x{width} resizes to {th}x{tw}, over {max_patches} patches of {p}x{p}")
    return th, tw, th // p, tw // p, (th // p) * (tw // p) // k**2


def _integral(x: torch.Tensor) -> bool:
    """numpy's ``np.allclose(image, image.astype(int))`` (it:139)."""
    xd = x.double()
    return bool(torch.allclose(xd, xd.trunc()))


def _resize_pil(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, height, width) uint8, PIL bicubic as ``image_transforms.resize`` (it:365-377)."""
    import numpy as np
    from PIL import Image

    arr = image.permute(1, 2, 0).contiguous().numpy()
    resized = Image.fromarray(arr).resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()


def _rescale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """``image.astype(float64) * scale`` then float32 (it:121-125)."""
    return (image.double() * scale).float()


def image_to_patches(image: torch.Tensor, budget: int = 280, vision_config=None,
                     pixel_range: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (3, H, W) -> (pixel_values (budget·k², 3p²), position_ids (budget·k², 2) int64), as
    ``Gemma4ImageProcessorPil`` gives them (resize with PIL when the size changes; see the module notes).

    ``pixel_range``: ``"byte"`` = values 0..255 (uint8 or integral floats), the processor's default input
    (rescaled by 1/255); ``"unit"`` = already in [0, 1] (the processor with ``do_rescale=False``). By
    default uint8 means byte, a float tensor unit. A unit image that must be resized goes to PIL as
    ``uint8(float32(x·255))`` (truncation) and comes back ``/255``, as HF's ``resize`` does (it:130-206,
    it:383) — except, as in HF, an image whose values are all integers (only 0s and 1s) is handed to PIL
    unscaled and comes back unscaled (it:139-141).
    """
    s = _settings_of(vision_config)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, height, width), got shape {tuple(image.shape)}")
    kind = pixel_range or ("byte" if image.dtype == torch.uint8 else "unit")
    if kind not in ("byte", "unit"):
        raise ValueError(f"pixel_range must be 'byte' or 'unit', got {pixel_range!r}")
    h, w = image.shape[1:]
    th, tw, ph, pw, _ = soft_token_layout(h, w, budget, s)
    resize = (th, tw) != (h, w)  # ip4:192
    if kind == "byte":
        if image.dtype != torch.uint8 and not (_integral(image) and image.min() >= 0 and image.max() <= 255):
            raise ValueError("a 'byte' image must hold integers in [0, 255]")
        pixels = _rescale(_resize_pil(image.to(torch.uint8), th, tw) if resize else image, 1 / 255)
    else:
        if not image.dtype.is_floating_point:
            raise ValueError(f"a 'unit' image must be floating point, got {image.dtype}")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"a 'unit' image must lie in [0, 1], got [{float(image.min())}, {float(image.max())}]")
        if not resize:
            pixels = image if image.dtype in (torch.float32, torch.float64) else image.float()
        elif _integral(image):  # HF: no rescale on the way to PIL, none back (it:139-141, it:383)
            pixels = _resize_pil(image.to(torch.uint8), th, tw).float()
        else:
            as_bytes = (image.double() * 255).float().to(torch.uint8)  # rescale(·, 255) then astype(uint8)
            pixels = _rescale(_resize_pil(as_bytes, th, tw), 1 / 255)
    p, k2 = s.patch_size, s.pool**2
    patches = pixels.reshape(3, ph, p, pw, p).permute(1, 3, 2, 4, 0).reshape(ph * pw, -1)  # ip4:91-102
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([xs, ys], dim=-1).reshape(-1, 2)  # (x=col, y=row), row-major
    total = budget * k2
    pixel_values = torch.zeros(total, patches.shape[1], dtype=patches.dtype)
    pixel_values[: ph * pw] = patches
    position_ids = torch.full((total, 2), -1, dtype=torch.long)
    position_ids[: ph * pw] = positions
    return pixel_values, position_ids


def images_to_batch(images: Sequence[torch.Tensor], budget: int = 280, vision_config=None,
                    pixel_range: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Several images -> (pixel_values (I, budget·k², 3p²), position_ids (I, budget·k², 2), soft tokens
    per image), as one processor call returns ``pixel_values``, ``image_position_ids``,
    ``num_soft_tokens_per_image``."""
    s = _settings_of(vision_config)
    pairs = [image_to_patches(im, budget, s, pixel_range) for im in images]
    dtype = torch.promote_types(torch.float32, pairs[0][0].dtype) if pairs else torch.float32
    pixel_values = torch.stack([pv.to(dtype) for pv, _ in pairs])
    position_ids = torch.stack([pos for _, pos in pairs])
    counts = [int((pos[:, 0] >= 0).sum()) // s.pool**2 for _, pos in pairs]
    return pixel_values, position_ids, counts
