"""MobileNet-V5 (timm's ``mobilenetv5_300m_enc``): Gemma 3n's vision tower, from scratch, eval mode.

HF builds it through ``TimmWrapperModel`` as ``timm.create_model(vision_config.architecture,
pretrained=False, num_classes=0, **vision_config.model_args)`` (tw:59-78, tw:174) and calls
``forward_features`` (tw:259); ``Gemma3nModel.get_image_features`` then flattens the (B, 2048, 16, 16)
output into 256 soft tokens (m3n:1939-1957). Imports nothing from timm or transformers; float32 and
bfloat16 bit-exact against timm 1.0.31 in ``tests/test_mobilenet_v5.py``.

Citations (timm 1.0.31, transformers 5.x): ``mnv5:N`` = ``timm/models/mobilenetv5.py`` line N,
``eb:N`` = ``timm/models/_efficientnet_blocks.py``, ``ebld:N`` = ``timm/models/_efficientnet_builder.py``,
``a2d:N`` = ``timm/layers/attention2d.py``, ``fn:N`` = ``timm/layers/fast_norm.py``, ``na:N`` =
``timm/layers/norm_act.py``, ``pad:N`` = ``timm/layers/padding.py``, ``c2s:N`` =
``timm/layers/conv2d_same.py``, ``ls:N`` = ``timm/layers/layer_scale.py``, ``hlp:N`` =
``timm/layers/helpers.py``, ``tw:N`` = ``transformers/models/timm_wrapper/modeling_timm_wrapper.py``,
``m3n:N`` = ``transformers/models/gemma3n/modeling_gemma3n.py``.

Shapes: B images, C channels, H x W spatial, h heads, k key/value dim, L = H*W queries, P kv positions.

::

    pixels (B, 3, H, W) ── cast to the tower dtype (tw:246)
      ── conv_stem: conv3x3/2 (+bias) · RmsNorm · GELU ─────────────────▶ vision.embed      (B, 64, H/2, W/2)
      ── stage 0: 3 × er   (3x3 "fused" expansion conv, 1x1 projection)
      ── stage 1: 5 × uir  (dw-start, 1x1 expand, dw-mid, 1x1 project, layer scale)
      ── stage 2: 8 × uir, uir(e1), 14 × [mqa (kv stride 2), uir]
      ── stage 3: uir, 19 × [mqa, uir] ─── each block i ───────────────▶ vision.layers.{i}.out
      ── MSFA on the last outputs of stages 2 and 3 (H/16, H/32) ──────▶ vision.pool        (B, 2048, R, R)

    er:   x ─ conv_exp(k, s) · norm · GELU ─ conv_pwl(1x1) · norm ─(+x if s=1 and C_in=C_out)
    uir:  x ─ [dw_start(a) · norm] ─ pw_exp · norm · GELU ─ [dw_mid(k, s) · norm · GELU] ─ pw_proj · norm
            ─ × gamma ─(+x if s=1 and C_in=C_out)
    mqa:  x ─ norm ─ q = proj(x) (h·k); K, V = proj(norm(dwconv3x3/v(x))) (one head, k) ─ SDPA
            ─ out proj ─ × gamma ─(+x)
    MSFA: [t2, nearest-resize(t3 → size of t2)] ─ cat(C) ─ 1x1 expand (×2) · norm · GELU ─ 1x1 → 2048 · norm
            ─ to R×R (identity / avg-pool / bilinear) ─ RmsNorm

R = ``msfa_output_resolution`` (16: Gemma 3n's 256 soft tokens; HF's ``model_args`` may set it).

The block list is decoded from the same block strings as timm's arch_def (mnv5:789-881); channels are
``round_channels(c, multiplier)`` = ``make_divisible(c·m, 8)`` (ebld:62-66, hlp:55-75: round half up to
a multiple of 8, at least 8, bumped by 8 when that loses more than 10%); the stem stays 64 when the
multiplier is < 1 (``fix_stem``, mnv5:890-891, mnv5:491-492); expansion widths are
``make_divisible(C_in · e)`` (eb:288, eb:400, eb:717); head counts, key/value dims and the 2048 output
are not scaled. Only a stage's first block keeps its stride (ebld:469-470); output stride stays 32, so no
dilation (ebld:495-506).

Numerics facts (each checked against the source):

- Everything runs in the tower's dtype. HF casts ``pixel_values`` to the model dtype (tw:246) and a bf16
  model's timm weights are bf16, so the norms run *in bfloat16* too: no fp32 upcast anywhere.
- Norm (every ``bn``, ``norm``, the MSFA norm): ``RmsNorm2d``/``RmsNormAct2d`` with eps 1e-6 (na:628-659,
  ``layers/norm.py`` 294-344) → ``rms_norm2d`` (``_USE_FAST_NORM`` is False, fn:30): ``v = x.pow(2)``,
  ``mean(v, dim=1)`` over channels, ``x * rsqrt(v + eps)``, ``x * w.reshape(1, C, 1, 1)``, four ops in the
  input dtype (fn:173-185); then GELU-tanh where the layer has an act (``_GELU``, mnv5:45; the
  ``inplace`` kwarg is dropped, ``layers/create_act.py`` 139-143).
- Padding ``'same'`` (the encoder's ``pad_type``, mnv5:940): a conv is "static" when stride 1 and
  (k-1) even: symmetric padding (k-1)//2 inside ``F.conv2d`` (pad:32-36, pad:67-87, c2s:128-140); every
  stride-2 conv is ``Conv2dSame``: ``F.pad`` by total ``max((ceil(n/s)-1)·s + k - n, 0)``, split
  floor-left / ceil-right (pad:24-29, pad:53-64), then ``F.conv2d`` with padding 0 (c2s:18-28). On an
  even side this pads (0, 1): asymmetric, unlike PyTorch's padding=1.
- Layer scale: ``x * gamma.view(1, C, 1, 1)`` (ls:51-53) on uir and mqa blocks (ebld:420-423,
  ``layer_scale_init_value`` 1e-5 at init, mnv5:895); er blocks and the MSFA's ffn have none
  (eb:678-761, mnv5:88-98). Residual ``x + shortcut`` after it (eb:483-485, eb:605-607).
- MQA (``MultiQueryAttention2d``, a2d:94-317, built with ``use_multi_query=True``, ebld:423): no query
  stride (``query_strides`` default (1, 1), eb:508: ``v2`` in the block string is the *kv* stride,
  ebld:213-222); with kv stride 2 (stage 2) K and V each get their own depthwise 3x3/2 ``'same'`` conv and
  a plain RmsNorm before the 1x1 projection (a2d:170-211); stage 3 (kv stride 1) projects directly.
  All projections bias-free. q (B, h·k, H, W) → reshape (B, h, k, L) → transpose → contiguous (B, h, L, k)
  (a2d:253-260); K, V (B, k, P) → (B, 1, P, k) contiguous (a2d:244-251); ``F.scaled_dot_product_attention``
  with its default scale k^-0.5 (timm's ``fused_attn`` is on by default, a2d:146, ``config.py`` 35;
  ``TIMM_FUSED_ATTN=0`` would switch timm to an explicit ``q*scale @ k^T`` softmax path, a2d:304-311,
  not mirrored here), the single K/V head broadcast over the h query heads; output (B, h, L, k) →
  (B, L, h, k) → (B, H, W, h·k) → NCHW contiguous (a2d:262-268) → 1x1 output proj (a2d:314-316).
- MSFA (mnv5:102-133): taps = outputs of stages 2 and 3 (``msfa_indices`` (-2, -1) over the 5 features
  stem + 4 stages, mnv5:466, mnv5:524, mnv5:646-666: whole stages, not blocks); every tap smaller than the
  first is resized to its size with ``F.interpolate(mode='nearest')`` (mnv5:104-109); channel concat; a
  uir with no dw convs, expansion 2, no skip, no layer scale (mnv5:88-98); then if the size is not R×R:
  ``F.avg_pool2d`` with kernel = stride = size/R when R divides it (768 px, R=16: 48 → 3×3 pool), else
  ``F.interpolate(R×R, 'bilinear', align_corners=False)`` (mnv5:115-129; no antialias, also when it
  shrinks) — so *every* input size yields R×R (R=16: 256 px identity, < 256 px bilinear upsampling);
  finally RmsNorm (mnv5:131).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import put as _put

ARCHITECTURE = "mobilenetv5_300m_enc"

# timm's arch_def for the 300m variant (mnv5:789-881), stage by stage, written with repeats.
_ARCH_300M: tuple[tuple[str, ...], ...] = (
    ("er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"),
    ("uir_r1_a3_k5_s2_e6_c256", "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256",
     "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256"),
    ("uir_r1_a5_k5_s2_e6_c640", *["uir_r1_a5_k0_s1_e4_c640"] * 7, "uir_r1_a0_k0_s1_e1_c640",
     *["mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"] * 14),
    ("uir_r1_a5_k5_s2_e6_c1280", *["mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"] * 19),
)


class MobileNetV5WeightError(ValueError):
    """A checkpoint that does not fit the tower; the message names the tensor."""


class MobileNetV5ConfigError(ValueError):
    """A vision config this port does not support; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding (hlp:55-75)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class BlockDef:
    """One decoded block string (ebld:81-229, the er / uir / mqa cases)."""

    kind: str  # "er" | "uir" | "mqa"
    out: int  # unrounded output channels (c)
    stride: int  # s
    kernel: int = 0  # er: expansion conv k; uir: dw_mid k (0 = none); mqa: kv down-conv k
    start: int = 0  # uir: dw_start kernel (a; 0 = none)
    exp: float = 1.0  # e
    heads: int = 0  # mqa: h
    dim: int = 0  # mqa: key = value dim (d)
    kv_stride: int = 1  # mqa: v


_OPTION = re.compile(r"([a-z]+)(\d.*)")


def decode_block(block: str) -> tuple[BlockDef, int]:
    """``'mqa_r1_k3_h12_v2_s1_d64_c640'`` -> (BlockDef, repeats), as ``_decode_block_str`` reads it."""
    kind, *ops = block.split("_")
    opts = {}
    for op in ops:
        m = _OPTION.fullmatch(op)
        if m is None:
            raise ValueError(f"unsupported block option {op!r} in {block!r}")
        opts[m[1]] = m[2]
    base = dict(kind=kind, out=int(opts["c"]), stride=int(opts["s"]))
    if kind == "er":
        bd = BlockDef(**base, kernel=int(opts["k"]), exp=float(opts["e"]))
    elif kind == "uir":
        if int(opts.get("p", 0)):
            raise ValueError(f"dw_end kernels are not supported: {block!r}")
        bd = BlockDef(**base, kernel=int(opts["k"]), start=int(opts.get("a", 0)), exp=float(opts["e"]))
    elif kind == "mqa":
        bd = BlockDef(**base, kernel=int(opts["k"]), heads=int(opts["h"]), dim=int(opts["d"]),
                      kv_stride=int(opts.get("v", 1)))
    else:
        raise ValueError(f"unsupported block type {kind!r} in {block!r}")
    return bd, int(opts["r"])


@dataclass(frozen=True)
class MobileNetV5Spec:
    architecture: str = ARCHITECTURE
    channel_multiplier: float = 1.0  # timm kwarg: round_channels(c, m) everywhere, stem fixed when < 1
    # timm's values for this architecture (only msfa_resolution is also a model_args key, see from_model_args):
    eps: float = 1e-6  # RmsNorm2d / RmsNormAct2d default (layers/norm.py 310, na:638)
    stem_size: int = 64  # mnv5:890
    num_features: int = 2048  # MSFA output channels (mnv5:522)
    msfa_resolution: int = 16  # R, msfa_output_resolution (mnv5:467)
    msfa_expansion: float = 2.0  # mnv5:67
    layer_scale: bool = True  # layer_scale_init_value=1e-5 -> LayerScale2d on uir / mqa (mnv5:895)

    def __post_init__(self):
        if self.architecture != ARCHITECTURE:
            raise MobileNetV5ConfigError(
                f"architecture {self.architecture!r} is not supported (only {ARCHITECTURE!r})")
        m = self.channel_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
            raise MobileNetV5ConfigError(f"channel_multiplier {m!r} must be a positive number")

    @classmethod
    def from_model_args(cls, architecture: str, model_args: dict | None) -> MobileNetV5Spec:
        """HF's ``Gemma3nVisionConfig.architecture`` + ``.model_args`` (the kwargs HF passes to
        ``timm.create_model``); ``channel_multiplier`` and ``msfa_output_resolution`` (the fused grid's side,
        a ``MobileNetV5Encoder`` argument) are accepted."""
        if architecture != ARCHITECTURE:
            raise MobileNetV5ConfigError(f"architecture {architecture!r} is not supported (only {ARCHITECTURE!r})")
        names = {"channel_multiplier": "channel_multiplier", "msfa_output_resolution": "msfa_resolution"}
        args = dict(model_args or {})
        for key in args:
            if key not in names:
                raise MobileNetV5ConfigError(f"model_args key {key!r} is not supported (only {', '.join(map(repr, names))})")
        resolution = args.get("msfa_output_resolution", 16)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise MobileNetV5ConfigError(f"model_args key 'msfa_output_resolution' is {resolution!r}; it must be a positive integer")
        return cls(architecture=architecture, **{names[k]: v for k, v in args.items()})

    def round(self, channels: int) -> int:
        """``round_channels(channels, multiplier)`` (ebld:62-66)."""
        return make_divisible(channels * self.channel_multiplier)

    @property
    def stem_channels(self) -> int:
        return self.stem_size if self.channel_multiplier < 1.0 else self.round(self.stem_size)  # mnv5:491-492

    @property
    def stages(self) -> tuple[tuple[BlockDef, ...], ...]:
        """Decoded blocks per stage, repeats expanded (depth multiplier 1: ebld:232-267 keeps them)."""
        return tuple(tuple(bd for s in stage for bd, r in [decode_block(s)] for _ in range(r)) for stage in _ARCH_300M)


# ---------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------


def _same_pad(n: int, k: int, s: int) -> int:
    """Total TF-'SAME' padding of one side of length n (pad:24-29)."""
    return max((math.ceil(n / s) - 1) * s + k - n, 0)


class Conv(nn.Module):
    """``create_conv2d(..., padding='same')``: ``nn.Conv2d`` with symmetric padding when static
    (stride 1, odd k), else ``Conv2dSame``'s ``F.pad`` (floor left, ceil right) then a padding-0 conv."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__()
        self.stride, self.groups, self.k = stride, groups, k
        self.static = stride == 1 and (k - 1) % 2 == 0  # pad:32-36
        self.weight = nn.Parameter(torch.empty(c_out, c_in // groups, k, k))
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        fan_out = k * k * c_out // groups  # timm's _init_weight_goog (ebld:557-563), a placeholder until load
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        if self.static:
            p = (self.k - 1) // 2
            return F.conv2d(x, self.weight, self.bias, (self.stride,) * 2, (p, p), (1, 1), self.groups)
        ph, pw = (_same_pad(n, self.k, self.stride) for n in x.shape[-2:])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0)  # pad:53-64
        return F.conv2d(x, self.weight, self.bias, (self.stride,) * 2, (0, 0), (1, 1), self.groups)


def rms_norm2d(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """timm's ``rms_norm2d`` (fn:173-185): over channels, every op in x's dtype (bf16 stays bf16)."""
    v = x.pow(2)
    v = torch.mean(v, dim=1, keepdim=True)  # (B, 1, H, W)
    x = x * torch.rsqrt(v + eps)
    return x * weight.reshape(1, -1, 1, 1)


class Norm(nn.Module):
    """``RmsNorm2d`` (act=False) / ``RmsNormAct2d`` with GELU-tanh (na:652-659)."""

    def __init__(self, channels: int, eps: float, act: bool = False):
        super().__init__()
        self.eps, self.act = eps, act
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm2d(x, self.weight, self.eps)
        return F.gelu(x, approximate="tanh") if self.act else x


class ConvNorm(nn.Module):
    """``ConvNormAct``: ``conv`` then ``bn`` (the norm keeps timm's BatchNorm-era name)."""

    def __init__(self, c_in: int, c_out: int, k: int, eps: float, stride: int = 1, groups: int = 1,
                 act: bool = True, bias: bool = False):
        super().__init__()
        self.conv = Conv(c_in, c_out, k, stride, groups, bias)
        self.bn = Norm(c_out, eps, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 1e-5))  # timm's init value (mnv5:895)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)  # ls:51-53


# ---------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------


class EdgeResidual(nn.Module):
    """er (eb:678-761): conv_exp k×k/s · norm · GELU → conv_pwl 1x1 · norm (+ x)."""

    def __init__(self, c_in: int, c_out: int, bd: BlockDef, stride: int, eps: float):
        super().__init__()
        mid = make_divisible(c_in * bd.exp)
        self.has_skip = c_in == c_out and stride == 1
        self.conv_exp = Conv(c_in, mid, bd.kernel, stride)
        self.bn1 = Norm(mid, eps, act=True)
        self.conv_pwl = Conv(mid, c_out, 1)
        self.bn2 = Norm(c_out, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return y + x if self.has_skip else y


class UniversalInvertedResidual(nn.Module):
    """uir (eb:342-486): [dw_start] → pw_exp → [dw_mid] → pw_proj → [× gamma] (+ x)."""

    def __init__(self, c_in: int, c_out: int, start: int, mid_k: int, exp: float, stride: int, eps: float,
                 layer_scale: bool, noskip: bool = False):
        super().__init__()
        self.has_skip = c_in == c_out and stride == 1 and not noskip
        mid = make_divisible(c_in * exp)
        # dw_start: no act; it takes the stride only when there is no mid conv (eb:380-381)
        self.dw_start = ConvNorm(c_in, c_in, start, eps, 1 if mid_k else stride, groups=c_in, act=False) if start else None
        self.pw_exp = ConvNorm(c_in, mid, 1, eps)
        self.dw_mid = ConvNorm(mid, mid, mid_k, eps, stride, groups=mid) if mid_k else None
        self.pw_proj = ConvNorm(mid, c_out, 1, eps, act=False)
        self.layer_scale = LayerScale(c_out) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw_start(x) if self.dw_start is not None else x
        y = self.pw_exp(y)
        y = self.dw_mid(y) if self.dw_mid is not None else y
        y = self.pw_proj(y)
        y = self.layer_scale(y) if self.layer_scale is not None else y
        return y + x if self.has_skip else y


class MultiQueryAttention2d(nn.Module):
    """a2d:94-317 without query stride: h query heads, one shared K/V head, optional kv down-sampling."""

    def __init__(self, dim: int, heads: int, key_dim: int, kv_stride: int, kernel: int, eps: float):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.query = nn.Sequential(OrderedDict(proj=Conv(dim, heads * key_dim, 1)))
        self.key = self._kv(dim, key_dim, kv_stride, kernel, eps)
        self.value = self._kv(dim, key_dim, kv_stride, kernel, eps)
        self.output = nn.Sequential(OrderedDict(proj=Conv(heads * key_dim, dim, 1)))

    @staticmethod
    def _kv(dim: int, out: int, stride: int, kernel: int, eps: float) -> nn.Sequential:
        layers = OrderedDict()
        if stride > 1:  # a2d:171-182: depthwise 'same' conv, plain RmsNorm
            layers["down_conv"] = Conv(dim, dim, kernel, stride, groups=dim)
            layers["norm"] = Norm(dim, eps)
        layers["proj"] = Conv(dim, out, 1)
        return nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, _, h, w = x.shape
        q = self.query(x).reshape(b, self.heads, self.key_dim, -1).transpose(-1, -2).contiguous()  # (B, h, L, k)
        k = self._tokens(self.key(x))  # (B, 1, P, k)
        v = self._tokens(self.value(x))  # (B, 1, P, k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0)  # (B, h, L, k)
        o = o.transpose(1, 2).reshape(b, h, w, self.heads * o.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return self.output(o)

    @staticmethod
    def _tokens(t: torch.Tensor) -> torch.Tensor:
        """(B, k, H', W') -> (B, 1, P, k) contiguous (a2d:244-251)."""
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2).unsqueeze(1).contiguous()


class MobileAttention(nn.Module):
    """mqa (eb:489-609): x + gamma · attn(norm(x))."""

    def __init__(self, c_in: int, c_out: int, bd: BlockDef, stride: int, eps: float, layer_scale: bool):
        super().__init__()
        if c_in != c_out or stride != 1:
            raise ValueError("mqa blocks here keep channels and resolution")
        self.norm = Norm(c_in, eps)
        self.attn = MultiQueryAttention2d(c_in, bd.heads, bd.dim, bd.kv_stride, bd.kernel, eps)
        self.layer_scale = LayerScale(c_out) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm(x))
        y = self.layer_scale(y) if self.layer_scale is not None else y
        return y + x


def _make_block(bd: BlockDef, c_in: int, c_out: int, stride: int, spec: MobileNetV5Spec) -> nn.Module:
    if bd.kind == "er":
        return EdgeResidual(c_in, c_out, bd, stride, spec.eps)
    if bd.kind == "uir":
        return UniversalInvertedResidual(c_in, c_out, bd.start, bd.kernel, bd.exp, stride, spec.eps, spec.layer_scale)
    return MobileAttention(c_in, c_out, bd, stride, spec.eps, spec.layer_scale)


class MultiScaleFusionAdapter(nn.Module):
    """MSFA (mnv5:49-133): resize taps to the first's size, concat, ffn, to R×R, RmsNorm."""

    def __init__(self, c_in: int, spec: MobileNetV5Spec):
        super().__init__()
        self.resolution = (spec.msfa_resolution,) * 2
        self.ffn = UniversalInvertedResidual(c_in, spec.num_features, 0, 0, spec.msfa_expansion, 1, spec.eps,
                                             layer_scale=False, noskip=True)
        self.norm = Norm(spec.num_features, spec.eps)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:  # [(B, C_i, H_i, W_i)] -> (B, 2048, R, R)
        high = tuple(taps[0].shape[-2:])
        resized = [F.interpolate(t, size=high, mode="nearest") if t.shape[-2] < high[0] or t.shape[-1] < high[1]
                   else t for t in taps]  # mnv5:104-110
        x = self.ffn(torch.cat(resized, dim=1))
        if high != self.resolution:  # mnv5:115-129
            if high[0] % self.resolution[0] or high[1] % self.resolution[1]:
                x = F.interpolate(x, size=self.resolution, mode="bilinear")
            else:
                kernel = (high[0] // self.resolution[0], high[1] // self.resolution[1])
                x = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------
# the tower
# ---------------------------------------------------------------------------------------------------


class MobileNetV5(nn.Module):
    """timm's ``MobileNetV5Encoder`` (mnv5:455-672) with its state-dict names; see the module docstring."""

    def __init__(self, spec: MobileNetV5Spec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        c = spec.stem_channels
        self.conv_stem = ConvNorm(3, c, 3, spec.eps, stride=2, bias=True)  # mnv5:493-503
        stages, stage_out = [], []
        for defs in spec.stages:
            blocks = []
            for j, bd in enumerate(defs):
                out = spec.round(bd.out)
                blocks.append(_make_block(bd, c, out, bd.stride if j == 0 else 1, spec))
                c = out
            stages.append(nn.ModuleList(blocks))
            stage_out.append(c)
        self.blocks = nn.ModuleList(stages)
        self._flat = [blk for stage in self.blocks for blk in stage]  # plain list: no second registration
        self.n_blocks = len(self._flat)
        ends = [sum(len(s) for s in self.blocks[: i + 1]) - 1 for i in range(len(self.blocks))]
        self.msfa_taps = (ends[-2], ends[-1])  # features (-2, -1) of [stem, stage 0..3] = stages 2, 3
        self.msfa = MultiScaleFusionAdapter(stage_out[-2] + stage_out[-1], spec)
        self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_stem.conv.weight.dtype

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: MobileNetV5Spec, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
             dtype: torch.dtype = torch.float32) -> MobileNetV5:
        """Strict: every own tensor must be at ``prefix + name`` with our shape, and no other key under
        ``prefix`` may exist (:class:`MobileNetV5WeightError` naming it); other keys are ignored.
        HF's prefix is ``"model.vision_tower.timm_model."``."""
        with torch.device("meta"):
            tower = cls(spec, dtype)
        mine = {prefix + name: tuple(t.shape) for name, t in tower.state_dict(keep_vars=True).items()}
        for name, shape in mine.items():
            if name not in state_dict:
                raise MobileNetV5WeightError(f"missing tensor {name!r} (expected shape {shape})")
            if tuple(state_dict[name].shape) != shape:
                raise MobileNetV5WeightError(
                    f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}")
        for name in state_dict:
            if name.startswith(prefix) and name not in mine:
                raise MobileNetV5WeightError(f"unexpected tensor {name!r} (shape {tuple(state_dict[name].shape)})")
        own = {name[len(prefix):]: state_dict[name].detach().to("cpu", dtype) for name in mine}
        tower.load_state_dict(own, strict=True, assign=True)
        return tower.requires_grad_(False).eval()

    # -- forward -----------------------------------------------------------------------------------
    @torch.no_grad()
    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), cast to the tower dtype as HF does (tw:246) -> (B, 64, H/2, W/2)."""
        return self.conv_stem(pixels.to(self.dtype))

    @torch.no_grad()
    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Flat block i (stage-major over ``blocks.{s}.{j}``) alone."""
        return self._flat[i](x.to(self.dtype))

    @torch.no_grad()
    def fuse(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The MSFA alone: outputs of blocks ``msfa_taps`` -> (B, 2048, R, R)."""
        return self.msfa([t.to(self.dtype) for t in taps])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2048, R, R), timm's ``forward_features`` (mnv5:646-666)."""
        x = _put(capture, "vision.embed", self.stem(pixels))
        taps = []
        for i, blk in enumerate(self._flat):
            x = _put(capture, f"vision.layers.{i}.out", blk(x))
            if i in self.msfa_taps:
                taps.append(x)
        return _put(capture, "vision.pool", self.msfa(taps))
