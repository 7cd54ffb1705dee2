"""Porting bugs that only a cached decode shows: candidates for the property suites (suites/).

Each is an HF-compatible class whose full forward (``use_cache=False``) is exactly HF's, so the
layer-by-layer gate passes it; the bug lives in the cache.
"""

from __future__ import annotations

import torch
from transformers import Gemma2ForCausalLM
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer


class _StaleAfterWrap(DynamicSlidingWindowLayer):
    """A sliding-window cache layer that is right until it wraps: once more than window - 1 tokens have
    been seen it keeps the window - 1 entries *before* the newest (one stale, the newest dropped) — the
    off-by-one ring-buffer slice of catalogue rows 51/55."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        keep = self.sliding_window - 1
        if full_k.shape[-2] > keep:  # wrapped: the slice is off by one
            self.keys, self.values = full_k[:, :, -keep - 1:-1], full_v[:, :, -keep - 1:-1]
        else:
            self.keys, self.values = full_k, full_v
        return full_k, full_v


class G2SlidingCacheWrapBug(Gemma2ForCausalLM):
    MODEL = "gemma-2-2b-tiny"
    EXPECTED = "layers.0.attn"  # layer 0 is the first sliding layer
    BUG = "sliding-window KV cache keeps a stale entry and drops the newest once it wraps"

    def forward(self, *args, past_key_values=None, use_cache=None, **kwargs):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
            for i, layer in enumerate(past_key_values.layers):
                if isinstance(layer, DynamicSlidingWindowLayer):
                    stale = _StaleAfterWrap(sliding_window=layer.sliding_window)
                    past_key_values.layers[i] = stale
        return super().forward(*args, past_key_values=past_key_values, use_cache=use_cache, **kwargs)
