"""One decoder for every Gemma generation, driven by :class:`reference_impl.spec.ModelSpec`.

Probe points (written to ``capture`` when a dict is passed):
``embed``, ``layers.{i}.attn`` (attention output before its post-norm), ``layers.{i}.mlp`` (dense
MLP output before its post-norm), ``layers.{i}.out`` (residual stream after layer i),
``final_norm``, ``logits``; on Gemma 4 also ``layers.{i}.moe`` (expert branch output before its
post-norm), ``layers.{i}.router`` (dispatch weights, (B, T, experts): the final weight of each chosen
expert, 0 elsewhere), ``layers.{i}.router_probs`` (the router's softmax over all experts), ``layers.{i}.router_input``
(what the router read) and ``layers.{i}.ple`` (per-layer-input branch before its post-norm).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .cache import KVCache
from .spec import LayerSpec, ModelSpec, MoESpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, spec: ModelSpec, with_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim)) if with_scale else None
        self.eps, self.offset, self.use_pow = spec.rms_norm_eps, spec.norm_offset, spec.norm_pow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset, self.use_pow)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        self.layer = layer
        h, n, k, d = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.q, self.o = _linear(h, n * d), _linear(n * d, h)
        if layer.has_kv:
            self.k = _linear(h, k * d)
            self.v = None if layer.k_eq_v else _linear(h, k * d)
        if layer.qk_norm:
            self.q_norm = RMSNorm(d, spec)
            if layer.has_kv:
                self.k_norm = RMSNorm(d, spec)
        self.v_norm = RMSNorm(d, spec, with_scale=False) if layer.v_norm and layer.has_kv else None

    def forward(self, x, cos, sin, slots, valid, cache: KVCache | None, shared: dict):
        b, t, _ = x.shape
        d = self.layer.head_dim
        q = self.q(x).view(b, t, -1, d).transpose(1, 2)  # (B, N, T, D)
        if self.layer.qk_norm:
            q = self.q_norm(q)
        q = ops.apply_rope(q, cos, sin)
        if self.layer.has_kv:
            k, v, key_slots, key_valid = self._own_kv(x, cos, sin, slots, valid, cache)
            shared[self.layer.index] = (k, v, key_slots, key_valid)
        else:  # KV-shared layer: the donor's keys and values, in the forward and the cache path alike
            k, v, key_slots, key_valid = shared[self.layer.kv_donor]
        allowed = ops.attention_mask(slots, key_slots, key_valid, self.layer.window)
        out = ops.attention(q, k, v, allowed, self.layer.query_scale, self.layer.attn_softcap)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def _own_kv(self, x, cos, sin, slots, valid, cache):
        b, t, _ = x.shape
        d = self.layer.head_dim
        raw_k = self.k(x).view(b, t, -1, d).transpose(1, 2)  # (B, K, T, D)
        v = raw_k if self.v is None else self.v(x).view(b, t, -1, d).transpose(1, 2)  # K=V: the raw projection
        k = self.k_norm(raw_k) if self.layer.qk_norm else raw_k
        k = ops.apply_rope(k, cos, sin)
        if self.v_norm is not None:
            v = self.v_norm(v)
        if cache is None:
            return k, v, slots, valid
        layer_cache = cache.layers[self.layer.index]
        k, v, key_slots, key_valid = layer_cache.extend(k, v, slots, valid)
        layer_cache.store(k, v, key_slots, key_valid)
        return k, v, key_slots, key_valid


class MLP(nn.Module):
    """GeGLU: down(gelu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate, self.up, self.down = _linear(hidden, intermediate), _linear(hidden, intermediate), _linear(intermediate, hidden)
        self.activation = activation

    def forward(self, x):
        return self.down(ops.gelu(self.gate(x), self.activation) * self.up(x))


class Router(nn.Module):
    """softmax(W · (norm(x) * scale / sqrt(H))) in fp32 -> top-k -> renormalise -> × per-expert scale."""

    def __init__(self, spec: ModelSpec, moe: MoESpec):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec, with_scale=False)
        self.proj = _linear(spec.hidden_size, moe.num_experts)
        self.scale = nn.Parameter(torch.ones(spec.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts))
        self.top_k, self.root = moe.top_k, spec.hidden_size**-0.5

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None):
        """x (N, H) -> probs (N, E) fp32, weights (N, K) fp32, experts (N, K); `forced` overrides the choice."""
        logits = self.proj(self.norm(x) * self.scale * self.root)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, experts = torch.topk(probs, k=self.top_k, dim=-1)
        if forced is not None:
            experts = forced
            weights = probs.gather(-1, forced)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    """Per-expert GeGLU; the (token, k) outputs are weighted and summed in fp32, then cast once
    (HF's default ``grouped_mm`` experts path)."""

    def __init__(self, spec: ModelSpec, moe: MoESpec):
        super().__init__()
        e, h, i = moe.num_experts, spec.hidden_size, moe.intermediate_size
        self.gate_up = nn.Parameter(torch.zeros(e, 2 * i, h))  # rows [0, I) gate, [I, 2I) up
        self.down = nn.Parameter(torch.zeros(e, h, i))
        self.activation = spec.activation

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        n, k = experts.shape
        flat = experts.reshape(-1)  # (N*K,) token-major
        order = torch.argsort(flat, stable=True)
        out = torch.empty(n * k, x.shape[-1], dtype=torch.promote_types(x.dtype, torch.float32))
        for e in flat[order].unique().tolist():
            rows = order[flat[order] == e]  # (token, k) pairs routed to expert e
            gate, up = torch.mm(x[rows // k], self.gate_up[e].T).chunk(2, dim=-1)
            y = torch.mm(ops.gelu(gate, self.activation) * up, self.down[e].T)
            out[rows] = y * weights.reshape(-1)[rows, None]  # dtype × fp32 weight -> fp32
        return out.view(n, k, -1).sum(dim=1).to(x.dtype)


class Block(nn.Module):
    """Gemma 1: x + attn(norm(x)), then + mlp(norm(.)).
    Gemma 2+: each sublayer output is normed again before the residual add ("sandwich").
    Gemma 4: + experts beside the dense MLP, + a per-layer-input branch, then × layer_scalar."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec)  # noqa: E731
        self.layer = layer
        self.attn_norm, self.attn, self.mlp_norm = norm(), Attention(spec, layer), norm()
        self.mlp = MLP(spec.hidden_size, layer.intermediate_size, spec.activation)
        if layer.sandwich_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
        if layer.moe is not None:
            self.router, self.experts = Router(spec, layer.moe), Experts(spec, layer.moe)
            self.mlp_branch_norm, self.moe_norm, self.moe_post_norm = norm(), norm(), norm()
        if spec.ple is not None:
            self.ple_gate, self.ple_proj = _linear(spec.hidden_size, spec.ple.dim), _linear(spec.ple.dim, spec.hidden_size)
            self.ple_post_norm = norm()
            self.activation = spec.activation
        if spec.layer_scalar:  # a checkpoint buffer in HF (not a parameter): loaded, not counted
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, slots, valid, cache, shared, capture, ple_input=None, forced=None):
        p = f"layers.{self.layer.index}"
        a = self.attn(self.attn_norm(x), cos, sin, slots, valid, cache, shared)
        _put(capture, f"{p}.attn", a)
        x = x + (self.attn_post_norm(a) if self.layer.sandwich_norms else a)
        m = self.mlp(self.mlp_norm(x))
        _put(capture, f"{p}.mlp", m)
        if self.layer.moe is not None:
            m = self.mlp_branch_norm(m) + self.moe_post_norm(self._moe(x, capture, p, forced))
        x = x + (self.mlp_post_norm(m) if self.layer.sandwich_norms else m)
        if ple_input is not None:
            g = self.ple_proj(ops.gelu(self.ple_gate(x), self.activation) * ple_input)
            _put(capture, f"{p}.ple", g)
            x = x + self.ple_post_norm(g)
        if hasattr(self, "layer_scalar"):
            x = x * self.layer_scalar  # the whole residual stream, not only this layer's update
        _put(capture, f"{p}.out", x)
        return x

    def _moe(self, x, capture, p, forced):
        """Expert branch on the post-attention residual x (B, T, H); the router reads x itself."""
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        probs, weights, experts = self.router(flat, None if forced is None else forced.reshape(b * t, -1))
        y = self.experts(self.moe_norm(flat), weights, experts).reshape(b, t, h)
        if capture is not None:
            dispatch = torch.zeros_like(probs).scatter(-1, experts, weights)
            capture[f"{p}.router"] = dispatch.reshape(b, t, -1)
            capture[f"{p}.router_probs"] = probs.reshape(b, t, -1)
            capture[f"{p}.router_input"] = x
            capture[f"{p}.moe"] = y
        return y


def _put(capture: dict | None, name: str, value: torch.Tensor) -> None:
    if capture is not None:
        capture[name] = value


class PerLayerEmbeddings(nn.Module):
    """Gemma 4 E-models: ple = (norm(W · x_emb / sqrt(H)) + E_ple[ids] * sqrt(P)) / sqrt(2), per layer (B, T, L, P)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        ple, n = spec.ple, spec.num_layers
        self.table = nn.Embedding(ple.vocab_size, n * ple.dim)
        self.proj = _linear(spec.hidden_size, n * ple.dim)
        self.norm = RMSNorm(ple.dim, spec)
        self.shape, self.hidden = (n, ple.dim), spec.hidden_size

    def forward(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        dtype = embedded.dtype
        tok = self.table(ids) * torch.tensor(self.shape[1] ** 0.5, dtype=dtype)
        ctx = self.proj(embedded) * self.hidden**-0.5
        ctx = self.norm(ctx.reshape(*ids.shape, *self.shape))
        return (ctx + tok.reshape(*ids.shape, *self.shape)) * 2.0**-0.5


class Gemma(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.spec = spec
        with torch.device(device):
            self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
            self.ple = PerLayerEmbeddings(spec) if spec.ple is not None else None
            self.layers = nn.ModuleList(Block(spec, layer) for layer in spec.layers)
            self.final_norm = RMSNorm(spec.hidden_size, spec)
            self.lm_head = None if spec.tie_embeddings else _linear(spec.hidden_size, spec.vocab_size)
        self.to(dtype)
        # RoPE tables: fp32, one per distinct (head_dim, rope); never rounded to the model dtype.
        self._inv_freq = {
            key: ops.rope_inv_freq(key[0], key[1].theta, key[1].linear_factor, key[1].rotary_fraction).to(device)
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
        forced_routing: dict[int, torch.Tensor] | None = None,  # layer -> (B, T, K) expert ids to use
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
        ple = self.ple(input_ids, x) if self.ple is not None else None  # (B, T, L, P)
        tables = {key: ops.rope_cos_sin(positions, inv, self.dtype) for key, inv in self._inv_freq.items()}
        shared: dict[int, tuple] = {}  # layer -> its (k, v, key slots, key validity), for KV-shared layers
        forced_routing = forced_routing or {}
        for i, block in enumerate(self.layers):
            layer = self.spec.layers[i]
            cos, sin = tables[(layer.head_dim, layer.rope)]
            x = block(x, cos, sin, slots, valid, cache, shared, capture,
                      None if ple is None else ple[:, :, i], forced_routing.get(i))
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
