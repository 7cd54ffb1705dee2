"""Building blocks shared by the mutation suites: how a porter's bug is put on one instance only."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn


def private_config(config, **changes):
    """A copy of the config with `changes` applied, so the mutation stays on this instance."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def bind(module: nn.Module, fn) -> None:
    """Replace `module.forward` on this instance only (hooks still fire: they wrap __call__)."""
    module.forward = types.MethodType(fn, module)


def unscaled_embedding(self, input_ids):
    """A plain ``nn.Embedding`` lookup: the table's scale (sqrt(hidden), or sqrt(P) for PLE) is forgotten."""
    return nn.functional.embedding(input_ids, self.weight, self.padding_idx)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def exact_gelu(model: nn.Module, part: str = "mlp") -> None:
    """Every layer's ``part`` (``mlp`` or ``experts``) uses exact-erf GELU instead of the tanh approximation."""
    for layer in model.model.layers:
        getattr(layer, part).act_fn = nn.GELU()


def image_block_masks(input_ids, padding, block_tokens, sliding_window: int, dtype, full_blocks: bool = True,
                      window_over_blocks: bool = True) -> dict:
    """A port's own additive attention masks for an image-text model, {"full_attention", "sliding_attention"}
    (B, 1, T, T): causal, or both ways between tokens of one image block (a run of ``block_tokens``), padded
    keys masked. Sliding layers: the window over everything (HF: AND(window, OR(causal, block))), or, with
    ``window_over_blocks=False``, over the causal part only (OR(sliding, block)). Full layers see the blocks
    when ``full_blocks`` (Gemma 3), else stay causal (Gemma 4)."""
    t = input_ids.shape[1]
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    is_image = torch.isin(input_ids, torch.tensor(block_tokens))
    starts = is_image & ~nn.functional.pad(is_image, (1, 0))[:, :-1]
    blocks = torch.where(is_image, starts.cumsum(1) - 1, -1)
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    causal = (k <= q)[None]
    window = k > q - sliding_window
    keys = padding.bool()[:, None, :] if padding is not None else torch.ones_like(same)
    full = ((causal | same) if full_blocks else causal.expand_as(same)) & keys
    sliding = ((causal | same) & window if window_over_blocks else (causal & window) | same) & keys
    return {name: torch.zeros(a.shape, dtype=dtype).masked_fill(~a, torch.finfo(dtype).min)[:, None]
            for name, a in (("full_attention", full), ("sliding_attention", sliding))}
