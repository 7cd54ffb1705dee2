"""One decoder for every Gemma generation, driven by :class:`reference_impl.spec.ModelSpec`.

Probe points (written to ``capture`` when a dict is passed), in forward order: ``embed``; per layer
``layers.{i}.attn_input`` (the pre-attention norm's output) and ``layers.{i}.attn`` (attention output
before its post-norm), ``layers.{i}.mlp_input`` / ``layers.{i}.mlp`` (dense MLP input and output before
its post-norm); on MoE layers ``layers.{i}.router_input`` (the post-attention residual the router
reads), ``layers.{i}.router`` (dispatch weights, (B, T, experts): the final weight of each chosen
expert, 0 elsewhere), ``layers.{i}.router_probs`` (the router's softmax over all experts),
``layers.{i}.moe_input`` / ``layers.{i}.moe`` (experts input and output before its post-norm); on
per-layer-embedding models ``layers.{i}.ple_input`` / ``layers.{i}.ple`` (the per-layer projection's
input and output before its post-norm); ``layers.{i}.out`` (residual stream after layer i); then
``final_norm_input``, ``final_norm`` and ``logits``.

:meth:`Gemma.sublayer` reruns one sublayer on given inputs: the gate uses it to judge each sublayer
of a candidate on the candidate's own input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .ops import put as _put
from .siglip import Vision
from .spec import SLIDING, Gemma4MediaSpec, LayerSpec, ModelSpec, MoESpec, MultimodalSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, spec: ModelSpec, with_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim)) if with_scale else None
        self.eps, self.offset, self.use_pow = spec.rms_norm_eps, spec.norm_offset, spec.norm_pow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset, self.use_pow)


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` whose matmul always folds the leading dims, as HF's does (:func:`ops.linear`)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return Linear(n_in, n_out)


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

    def forward(self, x, cos, sin, slots, valid, cache: KVCache | None, shared: dict, blocks=None):
        """``blocks`` (B, T): image block ids of the new tokens (-1 for text), whose tokens see each other
        in both directions (earlier cached tokens count as text)."""
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
        key_blocks = None if blocks is None else F.pad(blocks, (key_slots.numel() - t, 0), value=-1)
        allowed = ops.attention_mask(slots, key_slots, key_valid, self.layer.window, blocks, key_blocks)
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


def dispatch_weights(probs: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(N, E): each token's final weight at its chosen experts, 0 elsewhere (the ``router`` probe)."""
    return torch.zeros_like(probs).scatter(-1, experts, weights)


def routing_of(dispatch: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`dispatch_weights`: (weights (N, K), experts (N, K)) of a (N, E) dispatch."""
    experts = torch.topk(dispatch.float(), k=top_k, dim=-1).indices
    return dispatch.float().gather(-1, experts), experts


class MoE(nn.Module):
    """Gemma 4 26B-A4B: experts beside the dense MLP, both normed and summed. The router reads the raw
    post-attention residual x; the experts read their own pre-norm of x::

        mlp_out ── mlp_out_norm ──────────────────────────────(+)──▶
        x ── router ── (weights, experts) ─┐                    │
        x ── input_norm ── experts ────────┴── out_norm ────────┘
    """

    def __init__(self, spec: ModelSpec, moe: MoESpec):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec)  # noqa: E731
        self.router, self.experts = Router(spec, moe), Experts(spec, moe)
        self.mlp_out_norm, self.input_norm, self.out_norm = norm(), norm(), norm()

    def forward(self, x, mlp_out, capture, p, forced=None):
        b, t, h = x.shape
        flat = _put(capture, f"{p}.router_input", x).reshape(-1, h)
        probs, weights, experts = self.router(flat, None if forced is None else forced.reshape(b * t, -1))
        if capture is not None:
            capture[f"{p}.router"] = dispatch_weights(probs, weights, experts).reshape(b, t, -1)
            capture[f"{p}.router_probs"] = probs.reshape(b, t, -1)
        normed = _put(capture, f"{p}.moe_input", self.input_norm(x)).reshape(-1, h)
        y = _put(capture, f"{p}.moe", self.experts(normed, weights, experts).reshape(b, t, h))
        return self.mix(mlp_out, y)

    def mix(self, mlp_out: torch.Tensor, experts_out: torch.Tensor) -> torch.Tensor:
        return self.mlp_out_norm(mlp_out) + self.out_norm(experts_out)


class DenseOnly(nn.Module):
    """No experts: the dense MLP's output passes through (the MoE slot of a dense layer)."""

    def forward(self, x, mlp_out, capture, p, forced=None):
        return mlp_out

    def mix(self, mlp_out: torch.Tensor, experts_out=None) -> torch.Tensor:
        return mlp_out


class PerLayerInput(nn.Module):
    """Gemma 4 E-models: x + post_norm(proj(gelu(gate(x)) * per-layer input))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate, self.proj = _linear(spec.hidden_size, spec.ple.dim), _linear(spec.ple.dim, spec.hidden_size)
        self.post_norm = RMSNorm(spec.hidden_size, spec)
        self.activation = spec.activation

    def forward(self, x, ple_input, capture, p):
        gated = _put(capture, f"{p}.ple_input", self.gated(x, ple_input))
        return self.add(x, _put(capture, f"{p}.ple", self.proj(gated)))

    def gated(self, x: torch.Tensor, ple_input: torch.Tensor) -> torch.Tensor:
        return ops.gelu(self.gate(x), self.activation) * ple_input

    def add(self, x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        return x + self.post_norm(projected)


class NoPerLayerInput(nn.Module):
    def forward(self, x, ple_input, capture, p):
        return x


class LayerScalar(nn.Module):
    """Gemma 4: the whole residual stream (not only this layer's update) times a checkpoint scalar, a
    buffer in HF (loaded, not counted as a parameter)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scalar", torch.ones(1))

    def forward(self, x):
        return x * self.scalar


class Block(nn.Module):
    """One decoder layer, the same forward for every generation; what a generation lacks is an identity
    module (litgpt's habit), so the forward has no branches::

        x ─┬─ attn_norm ─ attn ─ attn_post_norm ─(+)─┬─ mlp_norm ─ mlp ─ moe ─ mlp_post_norm ─(+)─ ple ─ layer_scalar ─▶
           └─────────────────────────────────────────┘└─────────────────────────────────────────┘

    Gemma 1: no post norms (identity), no experts, no per-layer input, no scalar. Gemma 2/3: the
    "sandwich" post norms. Gemma 4: + experts beside the dense MLP (:class:`MoE`), + the per-layer
    input branch, × layer_scalar. Probes: ``{p}.attn_input``/``{p}.attn``, ``{p}.mlp_input``/``{p}.mlp``,
    the MoE and PLE ones (see those modules) and ``{p}.out``.
    """

    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec)  # noqa: E731
        post_norm = norm if layer.sandwich_norms else nn.Identity
        self.layer = layer
        self.attn_norm, self.attn, self.attn_post_norm = norm(), Attention(spec, layer), post_norm()
        self.mlp_norm, self.mlp = norm(), MLP(spec.hidden_size, layer.intermediate_size, spec.activation)
        self.moe = MoE(spec, layer.moe) if layer.moe is not None else DenseOnly()
        self.mlp_post_norm = post_norm()
        self.ple = PerLayerInput(spec) if spec.ple is not None else NoPerLayerInput()
        self.layer_scalar = LayerScalar() if spec.layer_scalar else nn.Identity()

    def forward(self, x, cos, sin, slots, valid, cache, shared, capture, ple_input=None, forced=None, blocks=None):
        p = f"layers.{self.layer.index}"
        h = _put(capture, f"{p}.attn_input", self.attn_norm(x))
        a = _put(capture, f"{p}.attn", self.attn(h, cos, sin, slots, valid, cache, shared, blocks))
        x = self.after_attention(x, a)
        m = _put(capture, f"{p}.mlp", self.mlp(_put(capture, f"{p}.mlp_input", self.mlp_norm(x))))
        x = self.after_mlp(x, self.moe(x, m, capture, p, forced))
        x = self.ple(x, ple_input, capture, p)
        return _put(capture, f"{p}.out", self.layer_scalar(x))

    def after_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention half: x + post_norm(attention output)."""
        return x + self.attn_post_norm(attn_out)

    def after_mlp(self, x: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after the MLP half (``mlp_out``: the MLP, or its mix with the experts)."""
        return x + self.mlp_post_norm(mlp_out)


_LAYER_PROBE = re.compile(r"^layers\.(\d+)\.(\w+)$")


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) int: each maximal run of image tokens numbered 0, 1, … per row; text -1
    (HF ``get_block_sequence_ids_for_mask``)."""
    previous = F.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.int(), dim=1) - 1, -1)


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


def rope_tables(spec: ModelSpec, device) -> dict:
    """(head_dim, rope) -> fp32 inverse frequencies, one per distinct pair among the layers."""
    return {key: ops.rope_inv_freq(key[0], key[1].theta, key[1].linear_factor, key[1].rotary_fraction).to(device)
            for key in {(layer.head_dim, layer.rope) for layer in spec.layers}}


class Gemma(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if spec.gemma3n is not None and type(self) is Gemma:
            raise ValueError("a Gemma 3n spec builds reference_impl.gemma3n.Gemma3n (weights.build does), not Gemma")
        self.spec = spec
        with torch.device(device):
            self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
            self.ple = PerLayerEmbeddings(spec) if spec.ple is not None else None
            mm = spec.multimodal
            self.vision = Vision(mm, spec.hidden_size) if isinstance(mm, MultimodalSpec) else None
            self.media = None
            if isinstance(mm, Gemma4MediaSpec):
                from .media import Gemma4Media

                self.media = Gemma4Media(mm, spec.hidden_size, dtype)
            self.layers = nn.ModuleList(Block(spec, layer) for layer in spec.layers)
            self.final_norm = RMSNorm(spec.hidden_size, spec)
            self.lm_head = None if spec.tie_embeddings else _linear(spec.hidden_size, spec.vocab_size)
        self.to(dtype)
        # RoPE tables: fp32, one per distinct (head_dim, rope); never rounded to the model dtype. A model
        # built on the meta device (to be filled by assignment) keeps its tables on the CPU.
        table_device = "cpu" if torch.device(device).type == "meta" else device
        if self.media is not None:
            self.media.keep_fp32_tables(table_device)
        self._inv_freq = rope_tables(spec, table_device)

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
        with_logits: bool = True,
        pixel_values: torch.Tensor | None = None,  # (images, 3, S, S): the images of the placeholder runs, in order
        **media: torch.Tensor | None,  # Gemma 4: image_position_ids, audio_features, audio_mask (reference_impl.media)
    ) -> torch.Tensor:
        """Logits (B, T, V) for the new tokens (or, ``with_logits=False``, the final norm's output (B, T, H),
        for a caller that applies :meth:`head` a slice at a time); a ``cache`` makes it incremental.

        An image-text model replaces each image's run of placeholder tokens by its soft tokens (the
        ``merge`` probe), filled in (row, position) order, and lets the tokens of one run attend to each
        other in both directions."""
        self._check_ids(input_ids)
        b, t = input_ids.shape
        past = cache.seen if cache is not None else 0
        valid = self._valid(attention_mask, b, t)
        positions = self._positions(position_ids, valid, cache)
        slots = torch.arange(past, past + t, device=input_ids.device)

        lookup = self._lookup_ids(input_ids)
        x = _put(capture, "embed", self.embed(lookup) * torch.tensor(self.spec.embed_scale, dtype=self.dtype))
        if self.vision is not None:
            soft = None if pixel_values is None else self.vision(pixel_values, capture)  # (I, N, H)
            x = _put(capture, "merge", self.merge(input_ids, x, soft))
        elif self.media is not None:
            rows = self.media(capture, pixel_values=pixel_values, **media)
            x = _put(capture, "merge", self.merge_rows(input_ids, x, rows))
        blocks = self._blocks(input_ids)
        ple = self.ple(lookup, x) if self.ple is not None else None  # (B, T, L, P): placeholders read the pad row
        tables = self._rope_tables(positions)
        shared: dict[int, tuple] = {}  # layer -> its (k, v, key slots, key validity), for KV-shared layers
        forced_routing = forced_routing or {}
        for i, block in enumerate(self.layers):
            layer = self.spec.layers[i]
            cos, sin = tables[(layer.head_dim, layer.rope)]
            x = block(x, cos, sin, slots, valid, cache, shared, capture,
                      None if ple is None else ple[:, :, i], forced_routing.get(i), self._layer_blocks(blocks, layer))
        x = _put(capture, "final_norm", self.final_norm(_put(capture, "final_norm_input", x)))
        if cache is not None:
            cache.seen = past + t
        return _put(capture, "logits", self.head(x)) if with_logits else x

    def merge(self, input_ids: torch.Tensor, embedded: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """The text embedding (B, T, H) with the image placeholders replaced by the soft tokens (I, N, H), in
        (row, position) order, unscaled (HF ``masked_scatter``). A count mismatch is a one-line error."""
        placeholders = input_ids == self.spec.multimodal.image_token_id  # (B, T)
        n = int(placeholders.sum())
        given = 0 if soft is None else soft.shape[0] * soft.shape[1]
        if n != given:
            per = self.spec.multimodal.tokens_per_image
            images = 0 if soft is None else soft.shape[0]
            raise ValueError(f"{n} image placeholder tokens for {images} images x {per} soft tokens = {given}")
        if soft is None:
            return embedded
        return embedded.masked_scatter(placeholders[..., None], soft.to(embedded.dtype))

    def merge_rows(self, input_ids: torch.Tensor, embedded: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gemma 4: the image placeholders replaced by the images' soft tokens (n, H), the audio ones by the
        clips' (HF ``masked_scatter``, unscaled). A count mismatch is a one-line error."""
        mm = self.spec.multimodal
        for kind, token in (("image", mm.image_token_id), ("audio", mm.audio_token_id)):
            placeholders = input_ids == token
            n, given = int(placeholders.sum()), (rows[kind].shape[0] if kind in rows else 0)
            if n != given:
                raise ValueError(f"{n} {kind} placeholder tokens for {given} {kind} soft tokens")
            if given:
                embedded = embedded.masked_scatter(placeholders[..., None], rows[kind].to(embedded.dtype))
        return embedded

    def _blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) image block ids (-1 elsewhere) where images attend bidirectionally, else None."""
        mm = self.spec.multimodal
        if mm is None or mm.bidirectional == "none":
            return None
        return image_blocks(torch.isin(input_ids, torch.tensor(mm.block_ids)))

    def _layer_blocks(self, blocks: torch.Tensor | None, layer) -> torch.Tensor | None:
        """The blocks a layer honours: every layer (Gemma 3), or the sliding ones only (Gemma 4)."""
        if blocks is None or (self.spec.multimodal.bidirectional == "sliding" and layer.attention != SLIDING):
            return None
        return blocks

    def _lookup_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids for the embedding lookup: Gemma 3's image placeholder id outside the vocabulary looks up row 0;
        Gemma 4's placeholders (image, video, audio) all look up the pad token (HF)."""
        mm = self.spec.multimodal
        if isinstance(mm, Gemma4MediaSpec):
            pad = self.spec.pad_token_id or 0
            return input_ids.masked_fill(torch.isin(input_ids, torch.tensor(mm.placeholder_ids)), pad)
        if mm is None or mm.image_token_id < self.spec.vocab_size:
            return input_ids
        return input_ids.masked_fill(input_ids == mm.image_token_id, 0)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of final-norm outputs x (..., H): the LM head (the tied embedding) and the final softcap."""
        # ops.linear, not x @ weight.T: the latter copied the whole 262k x H embedding per call on a sliced
        # bf16 x such as hidden[:, -1:] (see ops.linear for the measurement).
        logits = ops.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return ops.softcap(logits, self.spec.final_softcap)

    def _rope_tables(self, positions: torch.Tensor) -> dict:
        """(head_dim, rope) -> (cos, sin), each (B, T, D) in the model dtype."""
        return {key: ops.rope_cos_sin(positions, inv, self.dtype) for key, inv in self._inv_freq.items()}

    @torch.no_grad()
    def sublayer(self, probe: str, inputs: Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, routing: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """This model's output of one sublayer probe (``layers.{i}.attn``, ``.mlp``, ``.moe``, ``.ple``, or
        ``final_norm``) computed on given inputs rather than on its own stream: ``inputs[probe + "_input"]``,
        shaped (B, T, ...) like the probe's input. A KV-shared layer's attention takes its keys and values
        from its donor's input, ``inputs[f"layers.{donor}.attn_input"]``; ``moe`` uses the expert choice
        ``routing`` ((B, T, experts) dispatch weights). An image-text model's attention needs ``input_ids``
        (where the images are). None for any other probe."""
        x = inputs[probe + "_input"].to(self.dtype)
        if probe == "final_norm":
            return self.final_norm(x)
        match = _LAYER_PROBE.match(probe)
        if match is None:
            return None
        i, kind = int(match.group(1)), match.group(2)
        block, layer = self.layers[i], self.spec.layers[i]
        b, t = x.shape[:2]
        if kind == "mlp":
            return block.mlp(x)
        if kind == "ple" and isinstance(block.ple, PerLayerInput):
            return block.ple.proj(x)
        if kind == "moe" and isinstance(block.moe, MoE) and routing is not None:
            weights, experts = routing_of(routing.reshape(b * t, -1), layer.moe.top_k)
            return block.moe.experts(x.reshape(b * t, -1), weights, experts).reshape(b, t, -1)
        if kind == "attn":
            valid = self._valid(attention_mask, b, t)
            cos, sin = self._rope_tables(self._positions(position_ids, valid, None))[(layer.head_dim, layer.rope)]
            slots, shared = torch.arange(t), {}
            if layer.kv_donor is not None:
                donor = inputs[f"layers.{layer.kv_donor}.attn_input"].to(self.dtype)
                shared[layer.kv_donor] = self.layers[layer.kv_donor].attn._own_kv(donor, cos, sin, slots, valid, None)
            blocks = None
            if self.spec.multimodal is not None:
                if input_ids is None:
                    raise ValueError(f"{probe}: an image-text model's attention needs input_ids (where the images are)")
                blocks = self._layer_blocks(self._blocks(input_ids), layer)
            return block.attn(x, cos, sin, slots, valid, None, shared, blocks)
        return None

    @torch.no_grad()
    def stream(self, probe: str, values: Mapping[str, torch.Tensor], input_ids: torch.Tensor,
               **media: torch.Tensor | None) -> torch.Tensor | None:
        """This model's value of a stream probe computed from given upstream probe values instead of its
        own stream: the operations *between* two probes, alone. With prev = ``layers.{i-1}.out`` (or
        ``embed``), mid = prev + post-attention norm(``attn``), after = mid + post-MLP norm(``mlp``, mixed
        with ``moe`` on MoE layers)::

            attn_input = pre-attention norm(prev)      mlp_input = pre-MLP norm(mid)
            router_input = mid                         moe_input = experts' pre-norm(mid)
            ple_input = gelu(gate(after)) * per-layer input (from ``input_ids`` and ``embed``)
            out = layer scalar(after + post-PLE norm(``ple``))     final_norm_input = last ``out``

        On an image-text model each vision probe is computed from the one before it (see
        :meth:`Vision.stream`), ``merge`` from ``embed`` and ``vision.proj``, and layer 0 reads ``merge``.

        None for any other probe."""
        value = lambda name: values[name].to(self.dtype)  # noqa: E731
        if self.media is not None and probe.startswith(("vision.", "audio.")):
            return self.media.stream(probe, value, **media)
        if probe.startswith("vision."):
            return self.vision.stream(probe, value) if self.vision is not None else None
        if probe == "merge" and self.media is not None:
            rows = {kind: self.media.kept_rows(kind, value(f"{path}.proj"), **media)
                    for kind, path in (("image", "vision"), ("audio", "audio")) if f"{path}.proj" in values}
            return self.merge_rows(input_ids, value("embed"), rows)
        if probe == "merge":
            return self.merge(input_ids, value("embed"), value("vision.proj") if "vision.proj" in values else None)
        if probe == "final_norm_input":
            return values[f"layers.{self.spec.num_layers - 1}.out"].to(self.dtype)
        match = _LAYER_PROBE.match(probe)
        if match is None:
            return None
        i, kind = int(match.group(1)), match.group(2)
        block = self.layers[i]
        prev = value(f"layers.{i - 1}.out" if i else "merge" if self.spec.multimodal is not None else "embed")
        if kind == "attn_input":
            return block.attn_norm(prev)
        if kind not in ("mlp_input", "router_input", "moe_input", "ple_input", "out"):
            return None
        mid = block.after_attention(prev, value(f"layers.{i}.attn"))
        if kind == "mlp_input":
            return block.mlp_norm(mid)
        if kind == "router_input":
            return mid
        if kind == "moe_input":
            return block.moe.input_norm(mid)
        experts_out = value(f"layers.{i}.moe") if isinstance(block.moe, MoE) else None
        after = block.after_mlp(mid, block.moe.mix(value(f"layers.{i}.mlp"), experts_out))
        if kind == "ple_input":
            context = value("merge") if self.media is not None else value("embed")
            return block.ple.gated(after, self.ple(self._lookup_ids(input_ids), context)[:, :, i])
        if isinstance(block.ple, PerLayerInput):
            after = block.ple.add(after, value(f"layers.{i}.ple"))
        return block.layer_scalar(after)

    @torch.no_grad()
    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s router on x (B, T, H): dispatch weights and probabilities, (B, T, experts)."""
        b, t, h = x.shape
        probs, weights, experts = self.layers[layer].moe.router(x.reshape(-1, h).to(self.dtype))
        return dispatch_weights(probs, weights, experts).reshape(b, t, -1), probs.reshape(b, t, -1)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        if self.spec.multimodal is not None:
            ids = self._lookup_ids(ids)
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
