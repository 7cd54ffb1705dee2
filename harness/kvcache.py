"""Analytic KV-cache size, derived from the reference's per-layer spec (no second table of models).

A layer with its own K/V holds, per sequence, ``kv_heads x head_dim`` keys and as many values for every
token it can still attend to: all of them on a full layer, the last ``window`` on a sliding one (the
reference keeps ``window - 1`` between steps; the step's own token makes the window). A KV-shared layer
(Gemma 4 E-models) holds nothing: it reads its donor's. A K=V layer (Gemma 4 global layers) needs to keep
only the one projection (``minimal``); implementations, HF's included, store K and V both (``stored``).
"""

from __future__ import annotations

from reference_impl.spec import LayerSpec, ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def tokens_held(layer: LayerSpec, tokens: int) -> int:
    """KV entries a layer holds after ``tokens`` tokens (per sequence)."""
    if not layer.has_kv:
        return 0
    return tokens if layer.window is None else min(tokens, layer.window)


def layer_kv_bytes(layer: LayerSpec, tokens: int, batch: int, dtype_bytes: float, stored: bool = True) -> float:
    per_token = layer.num_kv_heads * layer.head_dim * (1 if (layer.k_eq_v and not stored) else 2)
    return per_token * tokens_held(layer, tokens) * batch * dtype_bytes


def kv_bytes(spec: ModelSpec, tokens: int, batch: int = 1, dtype_bytes: float = 2, stored: bool = True) -> float:
    """Total bytes of K/V held after ``tokens`` tokens by ``batch`` sequences."""
    return sum(layer_kv_bytes(layer, tokens, batch, dtype_bytes, stored) for layer in spec.layers)


def kv_bytes_read(spec: ModelSpec, tokens: int, batch: int = 1, dtype_bytes: float = 2) -> float:
    """Bytes of K/V one decode step reads at context ``tokens`` (the new token included): every layer
    reads the entries it attends to, a KV-shared layer its donor's."""
    total = 0.0
    for layer in spec.layers:
        source = spec.layers[layer.kv_donor] if layer.kv_donor is not None else layer
        seen = tokens if source.window is None else min(tokens, source.window)
        total += source.num_kv_heads * source.head_dim * 2 * seen * batch * dtype_bytes
    return total
