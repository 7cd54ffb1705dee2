"""One decoder for every Gemma generation, driven by :class:`reference_impl.spec.ModelSpec`.

Probe points (written to ``capture`` when a dict is passed):
``embed``, ``layers.{i}.attn`` (attention output before its post-norm), ``layers.{i}.mlp`` (MLP
output before its post-norm), ``layers.{i}.out`` (residual stream after layer i), ``final_norm``,
``logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .cache import KVCache
from .spec import LayerSpec, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        self.layer = layer
        h, n, k, d = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.q, self.k, self.v = _linear(h, n * d), _linear(h, k * d), _linear(h, k * d)
        self.o = _linear(n * d, h)
        if layer.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_offset)

    def forward(self, x, cos, sin, slots, valid, cache: KVCache | None):
        b, t, _ = x.shape
        d = self.layer.head_dim
        q = self.q(x).view(b, t, -1, d).transpose(1, 2)  # (B, N, T, D)
        k = self.k(x).view(b, t, -1, d).transpose(1, 2)  # (B, K, T, D)
        v = self.v(x).view(b, t, -1, d).transpose(1, 2)
        if self.layer.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)

        layer_cache = cache.layers[self.layer.index] if cache is not None else None
        key_slots, key_valid = slots, valid
        if layer_cache is not None:
            k, v, key_slots, key_valid = layer_cache.extend(k, v, slots, valid)
            layer_cache.store(k, v, key_slots, key_valid)
        allowed = ops.attention_mask(slots, key_slots, key_valid, self.layer.window)
        out = ops.attention(q, k, v, allowed, self.layer.query_scale, self.layer.attn_softcap)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """GeGLU: down(gelu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate, self.up, self.down = _linear(hidden, intermediate), _linear(hidden, intermediate), _linear(intermediate, hidden)
        self.activation = activation

    def forward(self, x):
        return self.down(ops.gelu(self.gate(x), self.activation) * self.up(x))


class Block(nn.Module):
    """Gemma 1: x + attn(norm(x)), then + mlp(norm(.)).
    Gemma 2+: each sublayer output is normed again before the residual add ("sandwich")."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)  # noqa: E731
        self.attn_norm, self.attn, self.mlp_norm = norm(), Attention(spec, layer), norm()
        self.mlp = MLP(spec.hidden_size, layer.intermediate_size, spec.activation)
        if layer.sandwich_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
        self.sandwich = layer.sandwich_norms

    def forward(self, x, cos, sin, slots, valid, cache, capture, prefix):
        a = self.attn(self.attn_norm(x), cos, sin, slots, valid, cache)
        _put(capture, f"{prefix}.attn", a)
        x = x + (self.attn_post_norm(a) if self.sandwich else a)
        m = self.mlp(self.mlp_norm(x))
        _put(capture, f"{prefix}.mlp", m)
        x = x + (self.mlp_post_norm(m) if self.sandwich else m)
        _put(capture, f"{prefix}.out", x)
        return x


def _put(capture: dict | None, name: str, value: torch.Tensor) -> None:
    if capture is not None:
        capture[name] = value


class Gemma(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.spec = spec
        with torch.device(device):
            self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
            self.layers = nn.ModuleList(Block(spec, layer) for layer in spec.layers)
            self.final_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
            self.lm_head = None if spec.tie_embeddings else _linear(spec.hidden_size, spec.vocab_size)
        self.to(dtype)
        # RoPE tables: fp32, one per distinct (head_dim, base, scaling); never rounded to the model dtype.
        self._inv_freq = {
            key: ops.rope_inv_freq(key[0], key[1].theta, key[1].linear_factor).to(device)
            for key in {(layer.head_dim, layer.rope) for layer in spec.layers}
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, past + T); 0 = padding
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        capture: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for the new tokens; a ``cache`` makes it incremental."""
        self._check_ids(input_ids)
        b, t = input_ids.shape
        past = cache.seen if cache is not None else 0
        valid = self._valid(attention_mask, b, t)
        positions = self._positions(position_ids, valid, cache)
        slots = torch.arange(past, past + t, device=input_ids.device)

        x = self.embed(input_ids) * torch.tensor(self.spec.embed_scale, dtype=self.dtype)
        _put(capture, "embed", x)
        tables = {key: ops.rope_cos_sin(positions, inv, self.dtype) for key, inv in self._inv_freq.items()}
        for i, block in enumerate(self.layers):
            layer = self.spec.layers[i]
            cos, sin = tables[(layer.head_dim, layer.rope)]
            x = block(x, cos, sin, slots, valid, cache, capture, f"layers.{i}")
        x = self.final_norm(x)
        _put(capture, "final_norm", x)
        logits = x @ self.embed.weight.T if self.lm_head is None else self.lm_head(x)
        logits = ops.softcap(logits, self.spec.final_softcap)
        _put(capture, "logits", logits)
        if cache is not None:
            cache.seen = past + t
        return logits

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.spec.vocab_size else int(ids.min())
            raise ValueError(f"token id {bad} out of range [0, {self.spec.vocab_size}) for this model's vocabulary")

    @staticmethod
    def _valid(mask: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        if mask is None:
            return torch.ones(b, t, dtype=torch.bool)
        if mask.shape[0] != b or mask.shape[1] < t:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not cover input of shape ({b}, {t})")
        return mask[:, -t:].bool()

    @staticmethod
    def _positions(position_ids, valid, cache: KVCache | None) -> torch.Tensor:
        """Explicit ids win; otherwise count real tokens (left padding gets position 0)."""
        start = cache.next_position[:, None] if cache is not None and cache.next_position is not None else 0
        counted = start + torch.cumsum(valid.long(), dim=1) - 1
        if cache is not None:
            cache.next_position = counted[:, -1] + 1
        if position_ids is not None:
            if cache is not None:
                cache.next_position = position_ids[:, -1] + 1
            return position_ids
        return counted.clamp(min=0)
