"""Gemma 3n text decoder (HF ``Gemma3nForCausalLM``), driven by a ``gemma3n_text`` :class:`ModelSpec`.

Gemma 3n keeps Gemma 4's ``x * w`` RMSNorm via ``pow``, scale-1 attention with QK- and V-norms, per-layer
embeddings (PLE) and KV-shared tail layers, and adds three things Gemma 4 dropped:

* **AltUp**: the residual stream is ``n = altup_num_inputs`` parallel streams (n, B, T, H). Stream 0 is the
  scaled embedding, streams 1.. are projections of it rescaled to its RMS. Each layer *predicts* every stream
  from all of them, runs only the active one through attention and the MLP, then *corrects* every stream
  with the active stream's innovation. At the end streams 1.. are unprojected, rescaled to stream 0's RMS and
  the n streams averaged.
* **LAuReL**: a low-rank residual beside attention, ``x + norm(R · L · x)`` on the normed active stream; the
  attention residual and it are summed and divided by sqrt(2).
* **Activation sparsity** on the early layers: the MLP gate keeps only what lies above
  ``mean + std * Φ⁻¹(s)`` (a Gaussian top-k), before the GELU.

One layer (``a`` = ``altup_active_idx``; every RMSNorm is ``x * w``; ``/√2`` is a division by ``math.sqrt(2)``)::

    streams ── predict ── pred ─┬─ pred[a] ─┬───────────────────────────────────────────┐
    (n,B,T,H)                   │           └─ attn_norm ─┬─ attn ── attn_post_norm ──(+)─(+)─ /√2 ─┬─ mlp_norm ─ mlp ─ mlp_post_norm ─(+)─ y
                                │                         └─ laurel ───────────────────────┘        └──────────────────────────────────┘
                                └─ correct(pred, y) ─ corrected ─┬─ [0] ───────────────────────▶ out[0]
                                                                 └─ [1:] ─(+) ple ─────────────▶ out[1:]

    ple     = ple_post_norm(ple_proj(gelu(ple_gate(scale(corrected[a]))) * per-layer input))   (scale: optional)

    predict:  coefs = prediction_coefs(tanh(router(router_norm(x[a]) / H)))  (B,T,n,n)
              pred  = x + (x^T · coefs^T)^T     (each stream a per-token mix of all streams)
    correct:  out_j = pred_j + (y − pred[a]) * (correction_coefs(tanh(router(router_norm(y) / H)))_j + 1)

Probes (written to ``capture`` when a dict is passed), in forward order; every probe is (B, T, ...). The
stream probes (``altup_streams``, ``*.altup_predict``, ``*.altup_correct``, ``*.out``) hold the n streams side by side as
(B, T, n * H): stream s is ``[..., s*H:(s+1)*H]`` (:func:`streams_of` undoes it).

* ``embed``: the scaled token embedding (stream 0), (B, T, H); ``altup_streams``: the n initial streams
* image-audio-text model (``reference_impl.media3n``): the towers' ``vision.*`` / ``audio.*`` first, and after
  ``embed`` the ``merge`` (hard media tokens and soft tokens in place), which then stands for ``embed``
* per layer ``layers.{i}.``:
  ``altup_predict`` (predicted streams), ``attn_input`` (pre-attention norm of the active prediction),
  ``laurel`` (LAuReL output: its input plus the normed low-rank branch), ``attn`` (attention output before
  its post-norm), ``mlp_input`` / ``mlp`` (MLP input and output before its post-norm), ``altup_correct``
  (corrected streams, before the PLE branch is added), ``ple_input`` (the per-layer projection's input,
  gelu(gate(scaled corrected[a])) * per-layer input, (B, T, P)) / ``ple`` (its output before the post-norm),
  ``out`` (the layer's output streams)
* ``final_norm_input`` (the average of the unprojected streams), ``final_norm``, ``logits``

HF hook points for the same values (``L = model.model.layers[i]``): ``embed_tokens`` output; layer 0's input
(``altup_streams``); ``L.altup.predict`` / ``L.altup.correct`` return values (methods, not modules: wrap them; ``correct``'s result is modified in place
afterwards, so copy it); ``L.input_layernorm``, ``L.laurel``, ``L.self_attn`` (``[0]``),
``L.pre_feedforward_layernorm``, ``L.mlp`` outputs; ``L.per_layer_projection`` input and output; ``L``'s output;
``model.model.norm`` input and output.

Numerics (file:line into ``transformers/models/gemma3n/modeling_gemma3n.py``, transformers 5.23):

* RMSNorm ``x * pow(mean(x²) + eps, -0.5) * w`` in fp32, one cast back (129-147): :class:`model.RMSNorm` with
  ``norm_offset 0`` and ``norm_pow``.
* Embedding times ``sqrt(H)`` rounded to the model dtype (917-928, 1587-1589); the PLE table times ``sqrt(P)``
  likewise (1601-1606); PLE ids outside ``[0, vocab_size_per_layer_input)`` look up row 0 (1749-1756).
* PLE: ``per_layer_model_projection(emb) * H^-½`` (a 0-dim tensor in the model dtype, 1764-1766), reshaped (L, P),
  normed, plus the table rows, times ``1/√2`` (a 0-dim tensor in the model dtype, 1781-1783; HF initialises it
  as ``rsqrt(2)`` at 1625 and overwrites it with ``1 / math.sqrt(2.0)`` at 1380, the same fp32 value).
* Streams 1..n−1: ``proj_j(emb) * rms(emb) / sqrt(clamp(mean(proj²), 1e-5))`` with ``rms = mean(x**2) ** 0.5``
  (1692-1705); at the end the same with the unembed projections and stream 0's RMS, then ``mean`` over the
  stacked streams (1728-1741), the final norm, the LM head and the logit softcap ``tanh(x / c) * c`` (1847-1851).
* AltUp router: ``tanh(fp32(modality_router(router_norm(x) * (1/H))))`` cast back (1009-1012); the ``1/H`` buffer is
  a 0-dim tensor (1007, 1369) multiplied in the model dtype. Predict: ``matmul(x.permute(1,2,3,0), coefs
  .reshape(B,T,n,n).permute(0,1,3,2))`` permuted back, plus x (1014-1040). Correct: ``(y − pred[a]).repeat(n) *
  (correction_coefs(mod) + 1.0)`` plus pred (1042-1071). The coefficient clip applies only in training (1026, 1058).
* ``correct_output_scale`` multiplies only the copy of corrected[a] that feeds the PLE gate; the stream itself is
  not scaled (1073-1083, 1317-1319). The PLE branch is added to streams ``[1:]``, whatever ``altup_active_idx`` is (1329).
* LAuReL: ``x + post_laurel_norm(linear_right(linear_left(x)))`` on the normed active prediction (931-946);
  ``(pred[a] + post_attn_norm(attn) + laurel) / math.sqrt(2)`` (1306-1309).
* Attention: scale 1.0 (1172), QK-norm with gains before RoPE, V-norm without (1211-1229); KV-shared layers read
  the K/V of the last earlier layer of their type (1221, ``configuration_gemma3n.py`` 206-232); no attention
  softcap; mask ``kv > q - sliding_window`` on sliding layers.
* Sparse MLP gate (961-984): ``m = Normal(0,1).icdf(tensor(s, fp32))`` = ``erfinv(2s − 1) * sqrt(2)`` in fp32, cast to
  the model dtype; ``relu(g − (mean(g) + std(g, unbiased=False) * m))`` before the GELU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .model import MLP, Attention, Gemma, Linear, PerLayerInput, RMSNorm, rope_tables
from .ops import put as _put
from .spec import Gemma3nMediaSpec, LayerSpec, ModelSpec
from .weights import WeightError

_LAYER_PROBE = re.compile(r"^layers\.(\d+)\.(\w+)$")

__all__ = ["Gemma3n", "build_gemma3n", "expected_shapes_gemma3n", "name_map_gemma3n", "streams_of"]


def _const(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim constant as HF holds its scale buffers: fp32, then cast to the model dtype."""
    return torch.tensor(value, dtype=torch.float32).to(dtype)


def _flat_streams(streams: torch.Tensor) -> torch.Tensor:
    """(n, B, T, H) -> (B, T, n * H), stream s at [..., s*H:(s+1)*H]."""
    n, b, t, h = streams.shape
    return streams.permute(1, 2, 0, 3).reshape(b, t, n * h)


def streams_of(probe: torch.Tensor, n: int) -> torch.Tensor:
    """A stream probe (B, T, n * H) back to HF's layout (n, B, T, H)."""
    b, t, nh = probe.shape
    return probe.reshape(b, t, n, nh // n).permute(2, 0, 1, 3)


def _put_streams(capture: dict | None, name: str, streams: torch.Tensor) -> torch.Tensor:
    if capture is not None:
        capture[name] = _flat_streams(streams)
    return streams


def gaussian_topk(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``relu(x − (mean + std * Φ⁻¹(sparsity)))`` over the last dim (HF ``_gaussian_topk``, 970-984)."""
    target = torch.tensor(sparsity, dtype=torch.float32)
    # torch.distributions.Normal(0, 1).icdf: loc + scale * erfinv(2p − 1) * sqrt(2), with loc 0 and scale 1 exact.
    multiplier = (torch.erfinv(2 * target - 1) * math.sqrt(2)).to(x.dtype)
    mean = torch.mean(x, dim=-1, keepdim=True)
    std = torch.std(x, dim=-1, keepdim=True, unbiased=False)
    return F.relu(x - (mean + std * multiplier))


class SparseMLP(MLP):
    """GeGLU whose gate is cut to its Gaussian top-k first on layers with sparsity > 0."""

    def __init__(self, hidden: int, intermediate: int, activation: str, sparsity: float):
        super().__init__(hidden, intermediate, activation)
        self.sparsity = sparsity

    def forward(self, x):
        gate = self.gate(x)
        if self.sparsity > 0.0:
            gate = gaussian_topk(gate, self.sparsity)
        return self.down(ops.gelu(gate, self.activation) * self.up(x))


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x)))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, r = spec.hidden_size, spec.gemma3n.laurel_rank
        self.left, self.right, self.post_norm = Linear(h, r), Linear(r, h), RMSNorm(h, spec)

    def forward(self, x):
        return x + self.post_norm(self.right(self.left(x)))


class AltUp(nn.Module):
    """Predict every stream from all of them; correct every stream with the active stream's innovation."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        g, h = spec.gemma3n, spec.hidden_size
        self.n, self.active, self.hidden = g.altup_num_inputs, g.altup_active_idx, h
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = Linear(self.n, self.n)
        self.prediction_coefs = Linear(self.n, self.n * self.n)
        self.modality_router = Linear(h, self.n)
        self.router_norm = RMSNorm(h, spec)

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.modality_router(self.router_norm(x) * _const(self.hidden**-1.0, x.dtype))
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """streams (n, B, T, H) -> predictions (n, B, T, H)."""
        modalities = self.modalities(streams[self.active])
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], self.n, self.n).permute(0, 1, 3, 2)
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)
        return (mixed + streams).contiguous()

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """predictions (n, B, T, H), the active stream's layer output (B, T, H) -> corrected (n, B, T, H)."""
        modalities = self.modalities(activated)
        innovation = (activated - predictions[self.active]).repeat(self.n, 1, 1, 1)
        coefs = (self.correction_coefs(modalities) + 1.0).permute(2, 0, 1).unsqueeze(-1)  # (n, B, T, 1)
        return (torch.mul(innovation, coefs) + predictions).contiguous()

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class Block3n(nn.Module):
    """One Gemma 3n decoder layer (see the module docstring's diagram)."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec)  # noqa: E731
        g = spec.gemma3n
        self.layer, self.active, self.correct_scale = layer, g.altup_active_idx, g.altup_correct_scale
        self.altup, self.laurel = AltUp(spec), Laurel(spec)
        self.attn_norm, self.attn, self.attn_post_norm = norm(), Attention(spec, layer), norm()
        self.mlp_norm, self.mlp_post_norm = norm(), norm()
        self.mlp = SparseMLP(spec.hidden_size, layer.intermediate_size, spec.activation, g.activation_sparsity[layer.index])
        self.ple = PerLayerInput(spec)  # gate, proj, post_norm

    def forward(self, streams, cos, sin, slots, valid, cache, shared, capture, ple_input):
        p = f"layers.{self.layer.index}"
        predictions = _put_streams(capture, f"{p}.altup_predict", self.altup.predict(streams))
        active = predictions[self.active]
        normed = _put(capture, f"{p}.attn_input", self.attn_norm(active))
        laurel = _put(capture, f"{p}.laurel", self.laurel(normed))
        attn = _put(capture, f"{p}.attn", self.attn(normed, cos, sin, slots, valid, cache, shared))
        x = self.after_attention(active, attn, laurel)
        m = _put(capture, f"{p}.mlp", self.mlp(_put(capture, f"{p}.mlp_input", self.mlp_norm(x))))
        corrected = _put_streams(capture, f"{p}.altup_correct", self.altup.correct(predictions, self.after_mlp(x, m)))
        gated = _put(capture, f"{p}.ple_input", self.ple_gated(corrected, ple_input))
        projected = _put(capture, f"{p}.ple", self.ple.proj(gated))
        return _put_streams(capture, f"{p}.out", self.finish(corrected, projected))

    # The operations between two probes, shared by the forward and :meth:`Gemma3n.stream` (bit for bit alike).

    def after_attention(self, active: torch.Tensor, attn: torch.Tensor, laurel: torch.Tensor) -> torch.Tensor:
        """(active prediction + post-attention norm(attn) + LAuReL) / sqrt(2): what the pre-MLP norm reads."""
        return (active + self.attn_post_norm(attn) + laurel) / math.sqrt(2)

    def after_mlp(self, x: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        """The layer's output on the active stream (what AltUp's correction reads)."""
        return x + self.mlp_post_norm(mlp)

    def ple_gated(self, corrected: torch.Tensor, ple_input: torch.Tensor) -> torch.Tensor:
        """gelu(gate(correct_output_scale * corrected[a])) * per-layer input: the per-layer projection's input."""
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale(first)
        return self.ple.gated(first, ple_input)

    def finish(self, corrected: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The layer's output streams: the post-PLE norm of the projection added to streams [1:] only."""
        ple = self.ple.post_norm(projected)
        return torch.cat((corrected[:1], corrected[1:] + ple))  # HF: corrected[1:] += ple, in place


class PerLayerEmbeddings3n(nn.Module):
    """(norm(proj(emb) * H^-½) + E_ple[ids] * √P) * 2^-½ per layer, (B, T, L, P); every scale a 0-dim tensor in
    the model dtype, ids outside the PLE vocabulary read row 0."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        ple, n = spec.ple, spec.num_layers
        self.table = nn.Embedding(ple.vocab_size, n * ple.dim)
        self.proj = Linear(spec.hidden_size, n * ple.dim)
        self.norm = RMSNorm(ple.dim, spec)
        self.shape, self.hidden, self.vocab = (n, ple.dim), spec.hidden_size, ple.vocab_size

    def forward(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        dtype = embedded.dtype
        ids = torch.where((ids >= 0) & (ids < self.vocab), ids, 0)
        tok = (self.table(ids) * _const(self.shape[1] ** 0.5, dtype)).reshape(*ids.shape, *self.shape)
        ctx = self.proj(embedded) * _const(self.hidden**-0.5, dtype)
        ctx = self.norm(ctx.reshape(*ids.shape, *self.shape))
        return (ctx + tok) * _const(1 / math.sqrt(2.0), dtype)


def _locate(probe: str) -> tuple[int | None, str]:
    """'layers.3.mlp' -> (3, 'mlp'); anything else -> (None, probe)."""
    match = _LAYER_PROBE.match(probe)
    return (int(match.group(1)), match.group(2)) if match else (None, probe)


def _rescaled(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x scaled to the RMS ``target`` (HF's clamp of the mean square at 1e-5)."""
    magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target / magnitude


class Gemma3n(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if spec.gemma3n is None or spec.ple is None:
            raise ValueError(f"a Gemma 3n model needs a gemma3n_text spec, got family {spec.family!r}")
        self.spec = spec
        h, n = spec.hidden_size, spec.gemma3n.altup_num_inputs
        with torch.device(device):
            self.embed = nn.Embedding(spec.vocab_size, h)
            self.ple = PerLayerEmbeddings3n(spec)
            self.altup_proj = nn.ModuleList(Linear(h, h) for _ in range(1, n))
            self.altup_unembed = nn.ModuleList(Linear(h, h) for _ in range(1, n))
            self.layers = nn.ModuleList(Block3n(spec, layer) for layer in spec.layers)
            self.final_norm = RMSNorm(h, spec)
            self.lm_head = None if spec.tie_embeddings else Linear(h, spec.vocab_size)
            self.media = None
            if isinstance(spec.multimodal, Gemma3nMediaSpec):  # Gemma3nForConditionalGeneration
                from .media3n import Gemma3nMedia

                self.media = Gemma3nMedia(spec.multimodal, h, dtype)
        self.to(dtype)
        if self.media is not None and torch.device(device).type != "meta":
            self.media.audio.keep_fp32_buffers()
        table_device = "cpu" if torch.device(device).type == "meta" else device
        self._inv_freq = rope_tables(spec, table_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, past + T); 0 = padding
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        capture: dict[str, torch.Tensor] | None = None,
        forced_routing: dict | None = None,  # no experts in Gemma 3n: accepted (the gate's interface) and unused
        with_logits: bool = True,
        **media: torch.Tensor | None,  # image-audio-text: pixel_values, audio_features, audio_mask (reference_impl.media3n)
    ) -> torch.Tensor:
        """Logits (B, T, V) (or, ``with_logits=False``, the final norm's output); a ``cache`` makes it incremental.
        An image-audio-text model embeds its hard media tokens with their own embedders and puts the soft tokens
        at the placeholders (the ``merge`` probe), which then stands where ``embed`` stands in a text model."""
        Gemma._check_ids(self, input_ids)
        b, t = input_ids.shape
        past = cache.seen if cache is not None else 0
        valid = Gemma._valid(attention_mask, b, t)
        positions = Gemma._positions(position_ids, valid, cache)
        slots = torch.arange(past, past + t, device=input_ids.device)

        x0 = _put(capture, "embed", self.embed(input_ids) * _const(self.spec.embed_scale, self.dtype))
        if self.media is not None:
            x0 = _put(capture, "merge", self.merge(input_ids, x0, self.media(capture, **media)))
        ple = self.ple(input_ids, x0)  # (B, T, L, P)
        streams = _put_streams(capture, "altup_streams", self.expand(x0))
        tables = {key: ops.rope_cos_sin(positions, inv, self.dtype) for key, inv in self._inv_freq.items()}
        shared: dict[int, tuple] = {}
        for i, block in enumerate(self.layers):
            layer = self.spec.layers[i]
            cos, sin = tables[(layer.head_dim, layer.rope)]
            streams = block(streams, cos, sin, slots, valid, cache, shared, capture, ple[:, :, i])
        x = _put(capture, "final_norm_input", self.collapse(streams))
        x = _put(capture, "final_norm", self.final_norm(x))
        if cache is not None:
            cache.seen = past + t
        return _put(capture, "logits", self.head(x)) if with_logits else x

    def _lookup_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every Gemma 3n id, its media tokens included, lies inside the text table (``Gemma._check_ids``)."""
        return input_ids

    def merge(self, input_ids: torch.Tensor, embedded: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedded text (B, T, H) with the hard media tokens embedded by their own embedders, then the image
        and audio placeholders replaced by the soft tokens (n, H) (HF ``masked_scatter``, unscaled); a count
        mismatch is a one-line error."""
        return Gemma.merge_rows(self, input_ids, self.media.hard(input_ids, embedded), rows)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return ops.softcap(logits, self.spec.final_softcap)

    def expand(self, x0: torch.Tensor) -> torch.Tensor:
        """The scaled embedding (B, T, H) -> the n initial streams (n, B, T, H): x0, then its AltUp projections
        rescaled to its RMS."""
        target = torch.mean(x0**2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([x0, *(_rescaled(proj(x0), target) for proj in self.altup_proj)], dim=0)

    def collapse(self, streams: torch.Tensor) -> torch.Tensor:
        """The last layer's streams (n, B, T, H) -> the final norm's input: streams 1.. unembedded and rescaled
        to stream 0's RMS, then the mean over the n streams."""
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [streams[0], *(_rescaled(proj(streams[j]), target) for j, proj in enumerate(self.altup_unembed, 1))]
        return torch.mean(torch.stack(outs), dim=0)

    # ---- one operation alone, on given values (the gate judges each probe of a candidate this way) ----

    def _rope(self, layer: LayerSpec, attention_mask, position_ids, b: int, t: int):
        valid = Gemma._valid(attention_mask, b, t)
        positions = Gemma._positions(position_ids, valid, None)
        cos, sin = ops.rope_cos_sin(positions, self._inv_freq[(layer.head_dim, layer.rope)], self.dtype)
        return cos, sin, valid

    @torch.no_grad()
    def sublayer(self, probe: str, inputs: Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, routing: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """This model's output of one sublayer probe (``layers.{i}.attn``, ``.laurel``, ``.mlp`` — its Gaussian
        top-k included on sparse layers —, ``.ple`` (the per-layer projection), or ``final_norm``) computed on
        ``inputs[probe + "_input"]`` (B, T, ...) rather than on its own stream (as :meth:`Gemma.sublayer`). A
        KV-shared layer's attention takes its keys and values from its donor's input,
        ``inputs[f"layers.{donor}.attn_input"]``, computed by the donor's own projections, norms and RoPE.
        ``routing`` and ``input_ids`` are unused (no experts, no images). None for any other probe."""
        if probe == "final_norm":
            return self.final_norm(inputs["final_norm_input"].to(self.dtype))
        i, kind = _locate(probe)
        if i is None or kind not in ("attn", "laurel", "mlp", "ple"):
            return None
        x = inputs[probe + "_input"].to(self.dtype)
        block, layer = self.layers[i], self.spec.layers[i]
        if kind == "mlp":
            return block.mlp(x)
        if kind == "laurel":
            return block.laurel(x)
        if kind == "ple":
            return block.ple.proj(x)
        b, t = x.shape[:2]
        cos, sin, valid = self._rope(layer, attention_mask, position_ids, b, t)
        slots, shared = torch.arange(t, device=x.device), {}
        if layer.kv_donor is not None:
            donor_layer = self.spec.layers[layer.kv_donor]
            donor = inputs[f"layers.{layer.kv_donor}.attn_input"].to(self.dtype)
            d_cos, d_sin, _ = self._rope(donor_layer, attention_mask, position_ids, b, t)
            shared[layer.kv_donor] = self.layers[layer.kv_donor].attn._own_kv(donor, d_cos, d_sin, slots, valid, None)
        return block.attn(x, cos, sin, slots, valid, None, shared)

    @torch.no_grad()
    def stream(self, probe: str, values: Mapping[str, torch.Tensor], input_ids: torch.Tensor,
               **media) -> torch.Tensor | None:
        """This model's value of a stream probe computed from given upstream probe values (the candidate's)
        instead of its own stream: the operations between two probes, alone (as :meth:`Gemma.stream`). With
        ``a`` the active stream, prev = ``altup_streams`` (layer 0) or ``layers.{i-1}.out``, pred =
        ``altup_predict``, x = (pred[a] + post-attention norm(``attn``) + ``laurel``) / sqrt(2) and
        y = x + post-MLP norm(``mlp``)::

            altup_streams = expand(embed)          altup_predict = AltUp predict(prev)
            attn_input = pre-attention norm(pred[a])   laurel = LAuReL(attn_input)
            mlp_input = pre-MLP norm(x)            altup_correct = AltUp correct(pred, y)
            ple_input = gelu(gate(scale(altup_correct[a]))) * per-layer input (from ``input_ids`` and ``embed``)
            out = altup_correct + post-PLE norm(``ple``) on streams [1:]
            final_norm_input = collapse(last ``out``)

        Stream probes are (B, T, n * H) (see :func:`streams_of`). None for any other probe."""
        n = self.spec.gemma3n.altup_num_inputs
        value = lambda name: values[name].to(self.dtype)  # noqa: E731
        streams = lambda name: streams_of(value(name), n).contiguous()  # noqa: E731  (HF's layout, bit for bit)
        context = "merge" if self.media is not None else "embed"  # what the streams and the PLE projection read
        if self.media is not None and probe.startswith(("vision.", "audio.")):
            return self.media.stream(probe, value, **media)
        if probe == "merge" and self.media is not None:
            rows = {kind: self.media.kept_rows(kind, value(f"{path}.proj"), **media)
                    for kind, path in (("image", "vision"), ("audio", "audio")) if f"{path}.proj" in values}
            return self.merge(input_ids, value("embed"), rows)
        if probe == "altup_streams":
            return _flat_streams(self.expand(value(context)))
        if probe == "final_norm_input":
            return self.collapse(streams(f"layers.{self.spec.num_layers - 1}.out"))
        i, kind = _locate(probe)
        if i is None:
            return None
        block, p = self.layers[i], f"layers.{i}"
        if kind == "altup_predict":
            return _flat_streams(block.altup.predict(streams("altup_streams" if i == 0 else f"layers.{i - 1}.out")))
        if kind == "attn_input":
            return block.attn_norm(streams(f"{p}.altup_predict")[block.active])
        if kind == "laurel":
            return block.laurel(value(f"{p}.attn_input"))
        if kind in ("mlp_input", "altup_correct"):
            predictions = streams(f"{p}.altup_predict")
            x = block.after_attention(predictions[block.active], value(f"{p}.attn"), value(f"{p}.laurel"))
            if kind == "mlp_input":
                return block.mlp_norm(x)
            return _flat_streams(block.altup.correct(predictions, block.after_mlp(x, value(f"{p}.mlp"))))
        if kind == "ple_input":
            return block.ple_gated(streams(f"{p}.altup_correct"), self.ple(input_ids, value(context))[:, :, i])
        if kind == "out":
            return _flat_streams(block.finish(streams(f"{p}.altup_correct"), value(f"{p}.ple")))
        return None


# ---- HF checkpoint names (Gemma3nForCausalLM.state_dict()) -> reference names, shapes ----

def _entries(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, reference name, shape) of every tensor: ``Gemma3nForCausalLM``'s, or for an image-audio-text
    model ``Gemma3nForConditionalGeneration``'s (the decoder under ``model.language_model.``, then the media)."""
    text = _text_entries(spec)
    if spec.multimodal is None:
        return text
    from .media3n import media_entries

    inner = [(hf if hf == "lm_head.weight" else "model.language_model." + hf.removeprefix("model."), ref, shape)
             for hf, ref, shape in text]
    return inner + media_entries(spec.multimodal, spec.hidden_size)


def _embedding_name(spec: ModelSpec) -> str:
    return "model.language_model.embed_tokens.weight" if spec.multimodal is not None else "model.embed_tokens.weight"


def _text_entries(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    h, v, g, ple = spec.hidden_size, spec.vocab_size, spec.gemma3n, spec.ple
    n, r, width = g.altup_num_inputs, g.laurel_rank, spec.num_layers * ple.dim
    out = [
        ("model.embed_tokens.weight", "embed.weight", (v, h)),
        ("model.norm.weight", "final_norm.weight", (h,)),
        ("model.embed_tokens_per_layer.weight", "ple.table.weight", (ple.vocab_size, width)),
        ("model.per_layer_model_projection.weight", "ple.proj.weight", (width, h)),
        ("model.per_layer_projection_norm.weight", "ple.norm.weight", (ple.dim,)),
    ]
    if not spec.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight", (v, h)))
    for j in range(n - 1):
        out += [
            (f"model.altup_projections.{j}.weight", f"altup_proj.{j}.weight", (h, h)),
            (f"model.altup_unembed_projections.{j}.weight", f"altup_unembed.{j}.weight", (h, h)),
        ]
    for layer in spec.layers:
        nq, k, d, f = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate_size
        per = [
            ("input_layernorm.weight", "attn_norm.weight", (h,)),
            ("post_attention_layernorm.weight", "attn_post_norm.weight", (h,)),
            ("pre_feedforward_layernorm.weight", "mlp_norm.weight", (h,)),
            ("post_feedforward_layernorm.weight", "mlp_post_norm.weight", (h,)),
            ("self_attn.q_proj.weight", "attn.q.weight", (nq * d, h)),
            ("self_attn.q_norm.weight", "attn.q_norm.weight", (d,)),
            ("self_attn.o_proj.weight", "attn.o.weight", (h, nq * d)),
            ("mlp.gate_proj.weight", "mlp.gate.weight", (f, h)),
            ("mlp.up_proj.weight", "mlp.up.weight", (f, h)),
            ("mlp.down_proj.weight", "mlp.down.weight", (h, f)),
            ("altup.correct_output_scale", "altup.correct_output_scale", (h,)),
            ("altup.correction_coefs.weight", "altup.correction_coefs.weight", (n, n)),
            ("altup.prediction_coefs.weight", "altup.prediction_coefs.weight", (n * n, n)),
            ("altup.modality_router.weight", "altup.modality_router.weight", (n, h)),
            ("altup.router_norm.weight", "altup.router_norm.weight", (h,)),
            ("laurel.linear_left.weight", "laurel.left.weight", (r, h)),
            ("laurel.linear_right.weight", "laurel.right.weight", (h, r)),
            ("laurel.post_laurel_norm.weight", "laurel.post_norm.weight", (h,)),
            ("per_layer_input_gate.weight", "ple.gate.weight", (ple.dim, h)),
            ("per_layer_projection.weight", "ple.proj.weight", (h, ple.dim)),
            ("post_per_layer_input_norm.weight", "ple.post_norm.weight", (h,)),
        ]
        if layer.has_kv:  # KV-shared layers carry no k/v projections or k norm (the v norm has no weight)
            per += [
                ("self_attn.k_proj.weight", "attn.k.weight", (k * d, h)),
                ("self_attn.v_proj.weight", "attn.v.weight", (k * d, h)),
                ("self_attn.k_norm.weight", "attn.k_norm.weight", (d,)),
            ]
        i = layer.index
        out += [(f"model.layers.{i}.{hf}", f"layers.{i}.{ref}", shape) for hf, ref, shape in per]
    return out


def name_map_gemma3n(spec: ModelSpec) -> dict[str, str]:
    """Every HF tensor name the checkpoint must carry -> reference parameter name."""
    return {hf: ref for hf, ref, _ in _entries(spec)}


def expected_shapes_gemma3n(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor of ``Gemma3nForCausalLM.state_dict()`` (a tied ``lm_head.weight``,
    which the state dict also lists, is accepted by the loader when it equals the embedding)."""
    return {hf: shape for hf, _, shape in _entries(spec)}


def check_state_dict_gemma3n(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise WeightError naming the first missing, unexpected or misshaped tensor."""
    shapes = expected_shapes_gemma3n(spec)
    tied_head = spec.tie_embeddings and "lm_head.weight" in state_dict
    embedding = _embedding_name(spec)
    if tied_head and not torch.equal(state_dict["lm_head.weight"], state_dict.get(embedding, state_dict["lm_head.weight"])):
        raise WeightError(f"tensor 'lm_head.weight' differs from {embedding!r} but the config ties them")
    missing = [name for name in shapes if name not in state_dict]
    if missing:
        raise WeightError(f"missing tensor {missing[0]!r} (expected shape {shapes[missing[0]]})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [name for name in state_dict if name not in shapes and not (tied_head and name == "lm_head.weight")]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]!r} (shape {tuple(state_dict[unexpected[0]].shape)})"
                          + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise WeightError(f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}")


def build_gemma3n(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Gemma3n:
    """A reference Gemma 3n of ``spec`` in ``dtype`` holding ``state_dict`` (HF ``Gemma3nForCausalLM`` names), strictly:
    built on the meta device and filled by assignment (a tensor already in ``dtype`` is held as is)."""
    check_state_dict_gemma3n(spec, state_dict)
    model = Gemma3n(spec, dtype=dtype, device="meta")
    if model.media is not None:  # built for real: the audio tower computes fixed buffers at construction
        from .media3n import Gemma3nMedia

        model.media = Gemma3nMedia(spec.multimodal, spec.hidden_size, dtype)
    with torch.no_grad():
        for hf_name, ref_name in name_map_gemma3n(spec).items():
            owner, _, leaf = ref_name.rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._buffers:  # a persistent buffer the checkpoint carries
                module._buffers[leaf] = state_dict[hf_name].to(dtype)
            else:
                module._parameters[leaf] = nn.Parameter(state_dict[hf_name].to(dtype), requires_grad=False)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightError(f"reference parameter {left[0]!r} has no tensor in the checkpoint's name map")
    return model.eval()
