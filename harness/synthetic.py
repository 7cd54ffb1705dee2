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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from reference_impl.spec import ModelSpec
from reference_impl.weights import expected_shapes

NORM_STD = 0.3
QK_GAIN = 3.0
LOGIT_STD = 13.0
MIN_LENGTH = 40
LEFT_PAD = 5


def random_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 tensors under HF names for every tensor the checkpoint carries."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(spec).items():
        w = torch.randn(shape, generator=gen)
        if spec.norm_offset == 0 and (len(shape) == 1 or name.endswith("layer_scalar")):
            state[name] = _gemma4_gain(name, w, shape, gen)
            continue
        if len(shape) == 1:
            w *= NORM_STD
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w /= math.sqrt(shape[2])
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            w *= LOGIT_STD / math.sqrt(spec.hidden_size)
        else:
            w /= math.sqrt(shape[1])
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w *= QK_GAIN
        state[name] = w
    return state


def _gemma4_gain(name: str, w: torch.Tensor, shape, gen) -> torch.Tensor:
    """Gains of a norm that multiplies by w (Gemma 4), and the other per-channel scales."""
    if name.endswith("layer_scalar"):
        return 0.5 + 0.4 * torch.rand(shape, generator=gen)  # U(0.5, 0.9): never near 1
    if name.endswith("per_expert_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (1 + 0.15 * w) * shape[0] ** -0.25
    return 1 + 0.25 * w


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
