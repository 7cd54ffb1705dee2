"""Gemma 3's image path: the SigLIP vision tower and the projector that turns its output into soft tokens.

Probes (``capture``), each shaped (images, tokens, features)::

    pixels (I, 3, S, S) ── patch conv + position table ──▶ vision.embed          (I, P, C)   P = (S/p)^2
      ── encoder layer 0 … L-1 (pre-LayerNorm, biases) ──▶ vision.layers.{i}.out (I, P, C)
      ── post LayerNorm ──────────────────────────────────▶ vision.post_norm      (I, P, C)
      ── k×k average pool over the patch grid ────────────▶ vision.pool          (I, N, C)   N = tokens_per_image
      ── RMSNorm (1 + w) ── x @ W (C, H_text) ────────────▶ vision.proj          (I, N, H)   what is merged

Each encoder layer: ``x + out_proj(attn(LN1(x)))``, then ``+ fc2(gelu_tanh(fc1(LN2(x))))``; attention
over every patch (no mask), scale ``head_dim**-0.5``, softmax in fp32 cast back (HF
``models/siglip/modeling_siglip.py``: embeddings 175-184, eager attention 237-247, layer 325-357,
post_layernorm 612). The projector (HF ``models/gemma3/modeling_gemma3.py`` 650-683): the patch grid
row-major, ``AvgPool2d(k, k)``, then ``Gemma3RMSNorm`` (1 + w, fp32 inside, eps of the vision config)
and ``torch.matmul(x, W)`` with W stored (C, H_text) — not the ``nn.Linear`` layout. The soft tokens are
*not* multiplied by sqrt(H) when merged (the text embedding is).

Linear layers, LayerNorms and the convolution are torch's own functional ops, which HF's modules call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import put as _put
from .spec import MultimodalSpec, SiglipSpec


class _Dense(nn.Module):
    """``nn.Linear`` with a bias: F.linear, as HF's module calls it."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(n_out, n_in)), nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    """Standard LayerNorm (weight, bias; no 1 + w), in the model dtype as ``nn.LayerNorm`` runs it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class EncoderLayer(nn.Module):
    """x ─┬─ LN1 ─ attention ─(+)─┬─ LN2 ─ fc1 ─ gelu ─ fc2 ─(+)─▶
          └────────────────────┘└───────────────────────────┘"""

    def __init__(self, spec: SiglipSpec):
        super().__init__()
        c = spec.hidden_size
        self.norm1, self.norm2 = _LayerNorm(c, spec.layer_norm_eps), _LayerNorm(c, spec.layer_norm_eps)
        self.q, self.k, self.v, self.o = _Dense(c, c), _Dense(c, c), _Dense(c, c), _Dense(c, c)
        self.fc1, self.fc2 = _Dense(c, spec.intermediate_size), _Dense(spec.intermediate_size, c)
        self.heads, self.activation = spec.num_heads, spec.activation

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        i, p, c = x.shape
        split = lambda t: t.view(i, p, self.heads, -1).transpose(1, 2)  # noqa: E731  (I, heads, P, D)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(i, p, c)
        return self.o(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(ops.gelu(self.fc1(self.norm2(x)), self.activation))


class SiglipTower(nn.Module):
    def __init__(self, spec: SiglipSpec):
        super().__init__()
        c, p = spec.hidden_size, spec.patch_size
        self.spec = spec
        self.patch = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.position = nn.Parameter(torch.zeros(spec.patches_per_side**2, c))
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.num_layers))
        self.post_norm = _LayerNorm(c, spec.layer_norm_eps)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) -> (I, P, C): the patch grid row-major, plus the learned position of each patch."""
        s = self.spec.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (images, 3, {s}, {s}), got shape {tuple(pixels.shape)}")
        patches = self.patch(pixels.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position

    def forward(self, pixels: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        x = _put(capture, "vision.embed", self.embed(pixels))
        for i, layer in enumerate(self.layers):
            x = _put(capture, f"vision.layers.{i}.out", layer(x))
        return _put(capture, "vision.post_norm", self.post_norm(x))


class Projector(nn.Module):
    """The tower's output (I, P, C) -> soft tokens (I, N, H): pool, then RMSNorm (1 + w) and x @ W."""

    def __init__(self, mm: MultimodalSpec, text_hidden: int):
        super().__init__()
        c = mm.vision.hidden_size
        self.norm_weight = nn.Parameter(torch.zeros(c))
        self.weight = nn.Parameter(torch.zeros(c, text_hidden))  # (C, H): used as x @ W
        self.side, self.kernel, self.eps = mm.vision.patches_per_side, mm.pool_kernel, mm.projector_eps

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        i, _, c = x.shape
        grid = x.transpose(1, 2).reshape(i, c, self.side, self.side).contiguous()
        return F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        normed = ops.rms_norm(pooled, self.norm_weight, self.eps, offset=1.0)
        return torch.matmul(normed, self.weight).type_as(pooled)

    def forward(self, x: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        return _put(capture, "vision.proj", self.project(_put(capture, "vision.pool", self.pool(x))))


class Vision(nn.Module):
    """Tower + projector: pixels (I, 3, S, S) -> soft tokens (I, N, H_text)."""

    def __init__(self, mm: MultimodalSpec, text_hidden: int):
        super().__init__()
        self.tower, self.projector = SiglipTower(mm.vision), Projector(mm, text_hidden)

    def forward(self, pixels: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        return self.projector(self.tower(pixels, capture), capture)

    def stream(self, probe: str, value) -> torch.Tensor | None:
        """The value of vision probe ``probe`` computed from the probe before it (``value(name)`` gives
        that one, e.g. a candidate's): each step of the image path judged alone. None for other probes."""
        num_layers = len(self.tower.layers)
        if probe.startswith("vision.layers."):
            i = int(probe.split(".")[2])
            return self.tower.layers[i](value("vision.embed" if i == 0 else f"vision.layers.{i - 1}.out"))
        if probe == "vision.post_norm":
            return self.tower.post_norm(value("vision.embed" if num_layers == 0 else f"vision.layers.{num_layers - 1}.out"))
        if probe == "vision.pool":
            return self.projector.pool(value("vision.post_norm"))
        if probe == "vision.proj":
            return self.projector.project(value("vision.pool"))
        return None


def vision_entries(mm: MultimodalSpec, text_hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name as ``Gemma3ForConditionalGeneration.state_dict()`` gives it, reference name, shape)."""
    v = mm.vision
    c, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    tower, ref = "model.vision_tower.", "vision.tower."
    out = [
        (f"{tower}embeddings.patch_embedding.weight", f"{ref}patch.weight", (c, 3, p, p)),
        (f"{tower}embeddings.patch_embedding.bias", f"{ref}patch.bias", (c,)),
        (f"{tower}embeddings.position_embedding.weight", f"{ref}position", (v.patches_per_side**2, c)),
    ]
    for i in range(v.num_layers):
        hf, r = f"{tower}encoder.layers.{i}.", f"{ref}layers.{i}."
        for hf_sub, ref_sub, shape in (("layer_norm1", "norm1", (c,)), ("layer_norm2", "norm2", (c,)),
                                       ("self_attn.q_proj", "q", (c, c)), ("self_attn.k_proj", "k", (c, c)),
                                       ("self_attn.v_proj", "v", (c, c)), ("self_attn.out_proj", "o", (c, c)),
                                       ("mlp.fc1", "fc1", (f, c)), ("mlp.fc2", "fc2", (c, f))):
            out += [(f"{hf}{hf_sub}.weight", f"{r}{ref_sub}.weight", shape), (f"{hf}{hf_sub}.bias", f"{r}{ref_sub}.bias", shape[:1])]
    out += [
        (f"{tower}post_layernorm.weight", f"{ref}post_norm.weight", (c,)),
        (f"{tower}post_layernorm.bias", f"{ref}post_norm.bias", (c,)),
        ("model.multi_modal_projector.mm_soft_emb_norm.weight", "vision.projector.norm_weight", (c,)),
        ("model.multi_modal_projector.mm_input_projection_weight", "vision.projector.weight", (c, text_hidden)),
    ]
    return out
