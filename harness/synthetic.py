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
from reference_impl.weights import expected_shapes

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
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            w *= c.logit_std / math.sqrt(spec.hidden_size)
        else:
            w /= math.sqrt(shape[1])
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w *= c.qk_gain
            elif name.endswith("router.proj.weight"):
                w *= c.router_gain
        state[name] = w
    return state


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
        for prompt in self.prompts():
            ids = torch.tensor([prompt], dtype=self.input_ids.dtype)
            out.append(Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None] if positions else None))
        return out

    def without_positions(self) -> Batch:
        return Batch(self.input_ids, self.attention_mask, None)

    def describe(self) -> str:
        b, t = self.input_ids.shape
        pads = (self.attention_mask == 0).sum(dim=1).tolist()
        return f"batch {b} x {t} tokens, left padding per row {pads}"


def default_length(spec: ModelSpec) -> int:
    window = spec.max_window or 0
    return max(MIN_LENGTH, 3 * window)


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
    return Batch(ids, mask, positions)
