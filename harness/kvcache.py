"""Analytic KV-cache size, derived from the reference's per-layer spec (no second table of models).

A layer with its own K/V holds, per sequence, ``kv_heads x head_dim`` keys and as many values for every
token it can still attend to: all of them on a full layer, the last ``window`` on a sliding one (the
reference keeps ``window - 1`` between steps; the step's own token makes the window). A KV-shared layer
(Gemma 4 E-models) holds nothing: it reads its donor's. A K=V layer (Gemma 4 global layers) needs to keep
only the one projection (``minimal``); implementations, HF's included, store K and V both (``stored``).
"""

from __future__ import annotations

from collections import OrderedDict

from reference_impl.spec import LayerSpec, ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
CONTEXTS = (4096, 8192, 32768, 131072, 262144)  # the table's context lengths, each up to the model's maximum


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


def layer_type(layer: LayerSpec) -> str:
    """A layer's KV geometry as one name: attention type, window, KV heads x head dim, K=V, KV-shared."""
    kind = f"sliding {layer.window}" if layer.window is not None else "full"
    parts = [kind, f"{layer.num_kv_heads}x{layer.head_dim}"]
    if layer.k_eq_v:
        parts.append("K=V")
    if not layer.has_kv:
        parts.append(f"shared (reads layer {layer.kv_donor})")
    return " ".join(parts)


def breakdown(spec: ModelSpec, tokens: int, batch: int = 1, kv_dtype: str = "bfloat16") -> dict:
    """KV bytes held after ``tokens`` tokens by ``batch`` sequences in ``kv_dtype``, total and by layer
    type: ``stored`` (K and V both, as implementations keep them) and ``minimal`` (K=V layers keep
    their one projection)."""
    size = DTYPE_BYTES[kv_dtype]
    types: OrderedDict[str, dict] = OrderedDict()
    for layer in spec.layers:
        row = types.setdefault(layer_type(layer), {"layers": 0, "tokens_held": tokens_held(layer, tokens),
                                                    "stored_bytes": 0.0, "minimal_bytes": 0.0})
        row["layers"] += 1
        row["stored_bytes"] += layer_kv_bytes(layer, tokens, batch, size, stored=True)
        row["minimal_bytes"] += layer_kv_bytes(layer, tokens, batch, size, stored=False)
    return {"tokens": tokens, "batch": batch, "kv_dtype": kv_dtype,
            "stored_bytes": sum(r["stored_bytes"] for r in types.values()),
            "minimal_bytes": sum(r["minimal_bytes"] for r in types.values()),
            "by_layer_type": dict(types)}
