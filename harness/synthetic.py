"""Random weights and inputs that make conformance bugs visible on tiny models.

HF's default init (std 0.02) hides softcap, RoPE and norm bugs: logits stay near 0, attention is
nearly uniform, and a norm weight left at 0 makes (1 + w) look like w's absence. Instead:

* every tensor the checkpoint carries is random, norm weights included (N(0, 0.3) offsets);
* linear layers N(0, 1/fan_in), with q and k ×3 so attention logits reach the ±50 softcap;
* the (tied) embedding is scaled so the logits have std ≈ 13 and several % exceed the ±30 cap;
* sequences are ≥ 3× the largest sliding window, and the second row is left-padded.

Gemma 4 norms scale by ``w`` itself, so its norm gains are drawn around 1 (N(1, 0.25)); its q/k
norm gains N(1, 0.15)·D^-¼ (attention scale is 1.0: unit gains make attention near-argmax and the
tiny model chaotic); ``layer_scalar`` U(0.5, 0.9), ``per_expert_scale`` U(0.5, 1.5), router ``scale``
N(1, 0.25) — none left at its initial 1, where a port that drops it would pass.

That is :data:`BITE`, used for float32 runs. bfloat16 runs use :data:`TRAINED`: the same draws with
q/k at unit gain, the norms on sublayer outputs at half gain, Gemma 4's layer scalars in U(0.8, 0.95)
and a sharper router, so the random model is as tame as a trained one and two correct bf16
implementations stay close (calibrated in :mod:`harness.calibrate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from reference_impl.spec import ModelSpec
from reference_impl.weights import embedding_name, expected_shapes

MIN_LENGTH = 40
LEFT_PAD = 5


@dataclass(frozen=True)
class Conditioning:
    """How the random weights are drawn. ``BITE`` (float32 runs) makes bugs loud; ``TRAINED`` (bfloat16
    runs) keeps the model as tame as a trained one, so bf16 rounding is not amplified layer after
    layer into noise that hides bugs (see :mod:`harness.tolerance`)."""

    name: str
    purpose: str
    norm_std: float  # Gemma 1-3 norm weights: offsets from the implicit 1 (scale is 1 + w)
    gain_std: float  # Gemma 4 norm gains, drawn around 1 (scale is w)
    post_norm_gain: float  # scale of the norms on a sublayer's output before its residual add
    qk_gain: float  # q and k projections, relative to unit gain (Gemma 1-3)
    qk_norm_std: float  # Gemma 4 q/k norm gains: (1 + std * N(0, 1)) * head_dim^-1/4
    logit_std: float  # the (tied) embedding is scaled so the logits have about this std
    layer_scalar: tuple[float, float]  # Gemma 4 layer_scalar ~ U(low, high)
    router_gain: float = 1.0  # Gemma 4 router projection, relative to unit gain (higher: more decisive routing)


BITE = Conditioning("bite", "large gains: bugs loud", norm_std=0.3, gain_std=0.25, post_norm_gain=1.0, qk_gain=3.0, qk_norm_std=0.15,
                    logit_std=13.0, layer_scalar=(0.5, 0.9))
# For bf16 runs. Post-norm gains halved and layer scalars nearer 1: each layer's update stays small next
# to the stream, as in a trained model, instead of a chaotic random one where bf16 rounding grows ~1.5x
# per layer (Gemma 4 twins, BITE: logits KL 0.61 between two correct bf16 implementations; TRAINED:
# 5.2e-3, the Gemma 1-3 level of 3.2e-3). q/k at unit gain: attention scores near the softcap (BITE's x3) make bf16
# attention outputs noisy (Gemma 1/2 isolated attention rel_rms 0.021 -> 0.0075). A router 8x sharper:
# decisive expert choices, so a wrong one is not a near-tie. The logit scale stays as in BITE, so the
# final softcap still bites. Figures: reports/calibration.md.
TRAINED = replace(BITE, name="trained", purpose="tame as a trained model: bf16 rounding not amplified",
                  qk_gain=1.0, post_norm_gain=0.5, layer_scalar=(0.8, 0.95), router_gain=8.0)
_POST_NORMS = ("post_feedforward_layernorm.weight", "post_feedforward_layernorm_1.weight",
               "post_feedforward_layernorm_2.weight", "post_per_layer_input_norm.weight")


def conditioning_for(dtype: str) -> Conditioning:
    """float32 runs get the weights that bite; bfloat16 runs the trained-like ones."""
    return TRAINED if dtype == "bfloat16" else BITE


def _is_post_norm(spec: ModelSpec, name: str) -> bool:
    """Norms applied to a sublayer's output before the residual add (HF's post_attention_layernorm is the
    pre-MLP norm in Gemma 1, a post norm from Gemma 2 on)."""
    return name.endswith(_POST_NORMS) or (spec.family != "gemma" and name.endswith("post_attention_layernorm.weight"))


def random_state_dict(spec: ModelSpec, seed: int = 0, conditioning: Conditioning = BITE) -> dict[str, torch.Tensor]:
    """fp32 tensors under HF names for every tensor the checkpoint carries."""
    c = conditioning
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(spec).items():
        w = torch.randn(shape, generator=gen)
        if name.startswith(_TOWERS):
            state[name] = _tower_tensor(name, w, c)
            continue
        if spec.norm_offset == 0 and (len(shape) == 1 or name.endswith("layer_scalar")):
            w = _gemma4_gain(name, w, shape, gen, c)
            state[name] = w * c.post_norm_gain if c.post_norm_gain != 1 and _is_post_norm(spec, name) else w
            continue
        if len(shape) == 1:
            w *= c.norm_std
            if c.post_norm_gain != 1 and _is_post_norm(spec, name):  # (1 + w) scaled by the gain
                w = c.post_norm_gain * (1 + w) - 1
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w /= math.sqrt(shape[2])
        elif name in (embedding_name(spec), "lm_head.weight"):
            w *= c.logit_std / math.sqrt(spec.hidden_size)
        else:
            w /= math.sqrt(shape[1])
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w *= c.qk_gain
            elif name.endswith("router.proj.weight"):
                w *= c.router_gain
        state[name] = w
    return state


_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.")


def _tower_tensor(name: str, w: torch.Tensor, c: Conditioning) -> torch.Tensor:
    """A vision tower or projector tensor: no value HF's init gives (zero projector, zero biases, unit
    LayerNorms) that would hide a bug. LayerNorm gains ~ 1 + N(0, norm_std), biases N(0, 0.2), the
    position table N(0, 0.5) (patch embeddings have std ~0.6), matrices at unit gain over their fan-in
    (the projector is (C, H_text), used as x @ W: its fan-in is its first dim), q/k at ``qk_gain``."""
    if name.endswith("mm_soft_emb_norm.weight"):  # Gemma RMSNorm: 1 + w
        return w * c.norm_std
    if name.endswith("mm_input_projection_weight"):
        return w / math.sqrt(w.shape[0])
    if name.endswith("position_embedding.weight"):
        return w * 0.5
    if name.endswith(".bias"):
        return w * 0.2
    if w.dim() == 1:  # LayerNorm weight
        return 1 + w * c.norm_std
    w = w / math.sqrt(w[0].numel())  # (out, in) or a convolution (C, 3, p, p)
    return w * c.qk_gain if name.endswith(("q_proj.weight", "k_proj.weight")) else w


def _gemma4_gain(name: str, w: torch.Tensor, shape, gen, c: Conditioning) -> torch.Tensor:
    """Gains of a norm that multiplies by w (Gemma 4), and the other per-channel scales."""
    if name.endswith("layer_scalar"):
        low, high = c.layer_scalar
        return low + (high - low) * torch.rand(shape, generator=gen)  # never exactly 1
    if name.endswith("per_expert_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (1 + c.qk_norm_std * w) * shape[0] ** -0.25
    return 1 + c.gain_std * w


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = token, 0 = padding
    position_ids: torch.Tensor | None  # (B, T); None: the implementation counts positions from 0 itself
    # image-text models: the images of the placeholder runs in (row, position) order, (I, 3, S, S), and
    # the row each one is in, (I,)
    pixel_values: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None

    @property
    def media(self) -> dict[str, torch.Tensor]:
        """The batch's media inputs, as keyword arguments (none for a text batch)."""
        return {} if self.pixel_values is None else {"pixel_values": self.pixel_values}

    def _images_of(self, row: int) -> dict:
        if self.pixel_values is None:
            return {}
        keep = self.image_rows == row
        return {"pixel_values": self.pixel_values[keep], "image_rows": torch.zeros(int(keep.sum()), dtype=torch.long)}

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    def prompts(self) -> list[list[int]]:
        """Each row's real tokens (left padding dropped)."""
        return [row[mask.bool()].tolist() for row, mask in zip(self.input_ids, self.attention_mask, strict=True)]

    def rows(self, positions: bool = True) -> list[Batch]:
        """Each row alone, its padding dropped: (1, real tokens) batches at positions 0..n-1 (given
        explicitly, or left to the implementation with ``positions=False``)."""
        out = []
        for row, prompt in enumerate(self.prompts()):
            ids = torch.tensor([prompt], dtype=self.input_ids.dtype)
            out.append(Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None] if positions else None,
                             **self._images_of(row)))
        return out

    def without_positions(self) -> Batch:
        return replace(self, position_ids=None)

    def describe(self) -> str:
        b, t = self.input_ids.shape
        pads = (self.attention_mask == 0).sum(dim=1).tolist()
        images = ""
        if self.pixel_values is not None:
            per_row = torch.bincount(self.image_rows, minlength=b).tolist()
            images = f", images per row {per_row} ({'x'.join(map(str, self.pixel_values.shape[1:]))})"
        return f"batch {b} x {t} tokens, left padding per row {pads}{images}"


def default_length(spec: ModelSpec) -> int:
    window = spec.max_window or 0
    length = max(MIN_LENGTH, 3 * window)
    if spec.multimodal is not None:  # room for two images and text around them
        length = max(length, 2 * (spec.multimodal.tokens_per_image + 2) + 14)
    return length


def make_image(size: int, gen: torch.Generator) -> torch.Tensor:
    """(3, size, size) in [-1, 1] (the processor's range): a colour gradient, a bright square, noise —
    structure the pooling and the position table must keep in place."""
    ramp = torch.linspace(-1, 1, size)
    image = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                         (ramp[None, :] * ramp[:, None])])
    x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
    image[:, y0:y0 + size // 4, x0:x0 + size // 4] = 0.9
    return (image + 0.2 * torch.randn(image.shape, generator=gen)).clamp(-1, 1)


def _place_images(spec: ModelSpec, ids: torch.Tensor, mask: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 gets two images (after a short text, and a few tokens later), row 1 one image, each as
    ``<boi>`` + N placeholders + ``<eoi>``; returns (pixel values (I, 3, S, S), row of each image)."""
    mm = spec.multimodal
    n = mm.tokens_per_image
    ids[ids == mm.image_token_id] = mm.image_token_id - 1 if mm.image_token_id > 3 else mm.image_token_id + 1
    starts = {0: [4, 4 + n + 2 + 4], 1: [int((mask[1] == 0).sum()) + 6]}
    rows = []
    for row, offsets in starts.items():
        for start in offsets:
            ids[row, start] = mm.boi_token_id
            ids[row, start + 1:start + 1 + n] = mm.image_token_id
            ids[row, start + 1 + n] = mm.eoi_token_id
            rows.append(row)
    pixels = torch.stack([make_image(mm.vision.image_size, gen) for _ in rows])
    return pixels, torch.tensor(rows)


def make_batch(spec: ModelSpec, seed: int = 0, length: int | None = None, left_pad: int = LEFT_PAD) -> Batch:
    """Row 0: BOS + random ids over the whole vocabulary. Row 1: `left_pad` pad tokens, then the same."""
    length = length or default_length(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, spec.vocab_size, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    bos = spec.bos_token_id if spec.bos_token_id is not None else 2
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    ids[0, 0] = bos
    ids[1, :left_pad], mask[1, :left_pad] = pad, 0
    ids[1, left_pad] = bos
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if spec.multimodal is None:
        return Batch(ids, mask, positions)
    pixels, rows = _place_images(spec, ids, mask, gen)
    return Batch(ids, mask, positions, pixels, rows)
