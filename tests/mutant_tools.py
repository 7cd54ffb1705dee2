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
