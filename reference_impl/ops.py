"""Numerical building blocks, each following HF's eager recipe step by step (which dtype each op runs in).

Shapes: B batch, T query tokens, S key tokens, H hidden, N query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def put(capture: dict | None, name: str, value: torch.Tensor) -> torch.Tensor:
    """Record a probe in ``capture`` (when capturing) and pass the value on: every module's probes."""
    if capture is not None:
        capture[name] = value
    return value


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, use_pow: bool = False) -> torch.Tensor:
    """Gemma RMSNorm: normalise and scale in fp32, one cast back at the end: ``(x̂ * (offset + w)).to(x)``.

    Gemma 1-3: offset 1 and ``rsqrt``; Gemma 4: offset 0 and ``pow(·, -0.5)`` (not bitwise the same);
    ``weight=None`` is Gemma 4's scale-free norm (V norm, router input norm).
    """
    xf = x.float()
    mean_sq = xf.pow(2).mean(-1, keepdim=True) + eps
    y = xf * (torch.pow(mean_sq, -0.5) if use_pow else torch.rsqrt(mean_sq))
    if weight is not None:
        y = y * (offset + weight.float()) if offset else y * weight.float()
    return y.type_as(x)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T -> (..., out): the leading dims folded into one matrix, one ``mm``.

    HF's ``nn.Linear`` gets this fold inside ``torch.matmul`` because its weights require grad. The
    reference's weights do not, and then matmul folds only an x that views as (-1, in): a slice such as
    ``hidden[:, -1:]`` (strides (T*H, H, 1)) went to ``bmm`` with the weight expanded, which on CPU in
    bfloat16 first copies the whole transposed weight (the 262k x 1152 tied head: 600 MB, 1.3-1.5 s per
    call instead of 30 ms), and could round differently from HF's ``mm``. Measured in one process,
    gemma-3-1b cut to 4 layers, bf16, 2 cores, a 512-token prefill with last-position logits via
    ``head(hidden[:, -1:])``: 1758 ms before, 341 ms after, HF eager 344 ms (``x @ W.T`` 5.1x slower than
    HF, now 0.99x); a decode step (its x already views as (1, H)) 48.9 ms before and after, HF eager 47.3.
    An x that views as (-1, in), every x of the model's own forward, takes the same ``mm`` as before:
    bit-identical logits; a sliced x now gets HF's ``nn.Linear`` bits exactly.
    """
    return (x.reshape(-1, x.shape[-1]) @ weight.T).view(*x.shape[:-1], weight.shape[0])


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    # The torch tanh kernel, not the Python formula: they differ in bf16 (and slightly in fp32).
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``tanh(x / cap) * cap`` in the input dtype, as three separately rounded ops."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def rope_inv_freq(head_dim: int, theta: float, linear_factor: float = 1.0, rotary_fraction: float = 1.0) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies; linear scaling divides them by the factor.

    A rotary fraction f < 1 (proportional RoPE) keeps the first int(f * D / 2) frequencies of a full-D
    RoPE (the exponent's denominator stays D) and zeroes the rest.
    """
    angles = int(rotary_fraction * head_dim // 2)
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float) / head_dim))
    if angles < head_dim // 2:
        inv_freq = torch.cat((inv_freq, torch.zeros(head_dim // 2 - angles)))
    return inv_freq / linear_factor if linear_factor != 1.0 else inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, D) computed in fp32, then cast to the model dtype."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("NeoX") rotation of x (B, heads, T, D); cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K*groups, S, D); query head h reads kv head h // groups."""
    if groups == 1:
        return x
    b, k, s, d = x.shape
    return x[:, :, None].expand(b, k, groups, s, d).reshape(b, k * groups, s, d)


def attention(
    q: torch.Tensor,  # (B, N, T, D)
    k: torch.Tensor,  # (B, K, S, D)
    v: torch.Tensor,  # (B, K, S, D)
    allowed: torch.Tensor,  # (B, 1, T, S) bool
    scale: float,
    cap: float | None,
) -> torch.Tensor:
    """Eager attention: scores in the model dtype, softcap before the mask, softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = softcap(scores, cap)
    # HF adds an additive mask of finfo.min; where() gives the same values bit for bit.
    scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    # Softmax in fp32 (or wider, for a float64 run), cast back to the model dtype.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v)  # (B, N, T, D)


def attention_mask(
    query_slots: torch.Tensor,  # (T,) absolute slot index of each query token
    key_slots: torch.Tensor,  # (S,)
    key_valid: torch.Tensor,  # (B, S) bool: False for padding
    window: int | None,
    query_blocks: torch.Tensor | None = None,  # (B, T) image block id of each query token, -1 for text
    key_blocks: torch.Tensor | None = None,  # (B, S)
) -> torch.Tensor:
    """(B, 1, T, S): causal — or, between tokens of the same image block, both directions — then within
    the window (W keys including the query itself), not padding. On sliding layers the window still
    applies inside a block: ``AND(window, OR(causal, same block))`` (HF ``create_masks_for_vision_model``,
    ``models/gemma3/modeling_gemma3.py`` 697-754)."""
    q, k = query_slots[:, None], key_slots[None, :]
    allowed = (k <= q)[None]  # (1, T, S)
    if query_blocks is not None:
        same = (query_blocks[:, :, None] == key_blocks[:, None, :]) & (query_blocks[:, :, None] >= 0)
        allowed = allowed | same  # (B, T, S)
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[:, None] & key_valid[:, None, None, :]
