"""KV cache for incremental decoding.

Every token gets an absolute *slot* (its index in the sequence, padding included); masks are built
from slots, RoPE from positions. A sliding layer keeps only its last ``window - 1`` slots: the next
query sees those plus itself, which is exactly the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import ModelSpec


@dataclass
class LayerCache:
    window: int | None
    keys: torch.Tensor | None = None  # (B, K, S, D)
    values: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # (S,)
    valid: torch.Tensor | None = None  # (B, S) bool

    def extend(self, k, v, slots, valid):
        """Return the keys/values a new query block attends to: the cache plus the new tokens."""
        if self.keys is None:
            return k, v, slots, valid
        return (
            torch.cat((self.keys, k), dim=2),
            torch.cat((self.values, v), dim=2),
            torch.cat((self.slots, slots)),
            torch.cat((self.valid, valid), dim=1),
        )

    def store(self, k, v, slots, valid):
        if self.window is not None:
            start = max(0, slots.numel() - (self.window - 1))
            k, v, slots, valid = k[:, :, start:], v[:, :, start:], slots[start:], valid[:, start:]
        self.keys, self.values, self.slots, self.valid = k, v, slots, valid

    @property
    def length(self) -> int:
        return 0 if self.slots is None else self.slots.numel()


@dataclass
class KVCache:
    layers: list[LayerCache]
    seen: int = 0  # slots consumed so far
    next_position: torch.Tensor | None = field(default=None)  # (B,) RoPE position of the next real token

    @classmethod
    def for_model(cls, spec: ModelSpec) -> KVCache:
        return cls(layers=[LayerCache(window=layer.window) for layer in spec.layers])

    def stored_tokens(self) -> list[int]:
        """Key/value entries held per layer (sliding layers stay at window - 1)."""
        return [layer.length for layer in self.layers]
