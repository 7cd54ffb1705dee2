"""Incremental decoding with ``KVCache``: equals the full forward, bounded sliding-layer storage."""

from __future__ import annotations

import pytest
import torch

import configs
from harness.synthetic import make_batch, random_state_dict
from reference_impl.cache import KVCache
from reference_impl.model import Gemma
from reference_impl.spec import GLOBAL, SLIDING, ModelSpec
from reference_impl.weights import build

# One tiny model per generation, plus a Gemma 3 with a 16-token window and linear RoPE on globals.
MODELS = ["gemma-2b-tiny", "gemma-2-2b-tiny", "gemma-3-1b-tiny", "gemma-3-4b-tiny",
          "gemma-4-e2b-tiny", "gemma-4-26b-a4b-tiny", "gemma-4-31b-tiny"]
ATOL = 1e-4  # fp32, logits of std ~13
# Gemma 4 twins (attention scale 1.0 on q/k-normed heads, 10-12 layers) amplify fp32 reassociation more:
# cached vs full logits measured up to 2.7e-4 (std 11.4, i.e. 2.4e-5 relative) on these twins; a cache
# bug (wrong donor, untrimmed window) moves logits by O(1).
ATOL_GEMMA4 = 1e-3


def spec_of(name: str, **overrides) -> ModelSpec:
    cfg = configs.hf_config(name)
    cfg.update(overrides)
    return ModelSpec.from_hf_config(cfg)


_MODELS: dict[str, Gemma] = {}


def model_of(name: str) -> Gemma:
    if name not in _MODELS:
        spec = spec_of(name)
        _MODELS[name] = build(spec, random_state_dict(spec, seed=7))
    return _MODELS[name]


def _length(spec: ModelSpec) -> int:
    window = spec.max_window or 8
    return 3 * window + 5  # well past the window


def _run_chunks(model: Gemma, ids: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None):
    cache = KVCache.for_model(model.spec)
    out, start = [], 0
    with torch.no_grad():
        for size in sizes:
            end = start + size
            chunk_mask = None if mask is None else mask[:, :end]  # (B, past + T), as HF passes it
            out.append(model(ids[:, start:end], attention_mask=chunk_mask, cache=cache))
            start = end
    assert start == ids.shape[1]
    return torch.cat(out, dim=1), cache


def _atol(name: str) -> float:
    return ATOL_GEMMA4 if name.startswith("gemma-4-") else ATOL


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    assert want.std().item() > 5  # logits are large enough for the tolerance to mean something
    torch.testing.assert_close(got, want, rtol=0, atol=_atol(name))


@pytest.mark.parametrize("name", MODELS)
def test_token_by_token_decode_matches_full_forward(name):
    model = model_of(name)
    n = _length(model.spec)
    ids = make_batch(model.spec, seed=7, length=n).input_ids[:1]
    with torch.no_grad():
        full = model(ids)
    prefill = 4
    got, cache = _run_chunks(model, ids, [prefill] + [1] * (n - prefill))
    assert got.shape == full.shape
    _assert_close(got, full, name)
    assert cache.seen == n
    assert cache.next_position.tolist() == [n]


@pytest.mark.parametrize("name", MODELS)
def test_decode_from_empty_cache(name):
    model = model_of(name)
    n = _length(model.spec)
    ids = make_batch(model.spec, seed=8, length=n).input_ids[:1]
    with torch.no_grad():
        full = model(ids)
    got, _ = _run_chunks(model, ids, [1] * n)
    _assert_close(got, full, name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk", ["small", "window", "large"])
def test_chunked_prefill_matches_full_forward(name, chunk):
    model = model_of(name)
    n = _length(model.spec)
    window = model.spec.max_window or 8
    size = {"small": 3, "window": window, "large": window + 5}[chunk]
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    ids = make_batch(model.spec, seed=9, length=n).input_ids[:1]
    with torch.no_grad():
        full = model(ids)
    got, _ = _run_chunks(model, ids, sizes)
    _assert_close(got, full, name)


@pytest.mark.parametrize("name", MODELS)
def test_sliding_layers_store_window_minus_one(name):
    model = model_of(name)
    spec = model.spec
    n = _length(spec)
    ids = make_batch(spec, seed=10, length=n).input_ids[:1]
    cache = KVCache.for_model(spec)
    with torch.no_grad():
        for seen in range(1, n + 1):
            model(ids[:, seen - 1 : seen], cache=cache)
            stored = cache.stored_tokens()
            for layer, count in zip(spec.layers, stored, strict=True):
                if not layer.has_kv:  # Gemma 4 KV-shared layer: reads its donor's, stores nothing
                    assert count == 0, layer.index
                elif layer.attention == SLIDING:
                    assert count == min(seen, layer.window - 1), (seen, layer.index)
                else:
                    assert layer.attention == GLOBAL
                    assert count == seen
    # The kept entries are the most recent slots.
    for layer, layer_cache in zip(spec.layers, cache.layers, strict=True):
        if not layer.has_kv:
            continue
        keep = n if layer.window is None else layer.window - 1
        assert layer_cache.slots.tolist() == list(range(n - keep, n))
        assert layer_cache.keys.shape[2] == keep == layer_cache.values.shape[2]
        assert layer_cache.valid.shape == (1, keep)
    if spec.max_window is not None:
        assert n >= 3 * spec.max_window


@pytest.mark.parametrize("name", ["gemma-2-2b-tiny", "gemma-3-1b-tiny"])
def test_large_chunk_also_trims_sliding_cache(name):
    model = model_of(name)
    spec = model.spec
    n = _length(spec)
    _, cache = _run_chunks(model, make_batch(spec, length=n).input_ids[:1], [n])
    for layer, count in zip(spec.layers, cache.stored_tokens(), strict=True):
        assert count == (n if layer.window is None else layer.window - 1)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sizes", ["tokens", "chunks"])
def test_left_padded_batch_incremental_matches_full(name, sizes):
    model = model_of(name)
    n = _length(model.spec)
    batch = make_batch(model.spec, seed=11, length=n)
    pad = int((batch.attention_mask[1] == 0).sum())
    with torch.no_grad():
        full = model(batch.input_ids, batch.attention_mask)
    # "tokens": a 3-token prefill that is all padding in row 1, then one token at a time;
    # "chunks": chunk edges that cut through the padding and through the window.
    split = [3] + [1] * (n - 3) if sizes == "tokens" else [2, 5, 9] + [n - 16]
    got, cache = _run_chunks(model, batch.input_ids, split, mask=batch.attention_mask)
    real = batch.valid
    assert full[real].std().item() > 5
    torch.testing.assert_close(got[real], full[real], rtol=0, atol=_atol(name))
    assert cache.next_position.tolist() == [n, n - pad]


def test_explicit_positions_with_cache():
    model = model_of("gemma-3-1b-tiny")
    n = _length(model.spec)
    batch = make_batch(model.spec, seed=12, length=n)
    with torch.no_grad():
        full = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
        cache = KVCache.for_model(model.spec)
        parts = [model(batch.input_ids[:, :10], batch.attention_mask[:, :10], batch.position_ids[:, :10], cache=cache)]
        for i in range(10, n):
            parts.append(model(batch.input_ids[:, i : i + 1], batch.attention_mask[:, : i + 1], batch.position_ids[:, i : i + 1], cache=cache))
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(got[batch.valid], full[batch.valid], rtol=0, atol=ATOL)


def test_cache_windows_follow_spec():
    spec = spec_of("gemma-3-4b-tiny")
    cache = KVCache.for_model(spec)
    assert [c.window for c in cache.layers] == [layer.window for layer in spec.layers]
    assert cache.stored_tokens() == [0] * spec.num_layers and cache.seen == 0


def test_window_one_cache_stores_nothing():
    spec = spec_of("gemma-2-2b-tiny", sliding_window=1)
    model = build(spec, random_state_dict(spec))
    ids = make_batch(spec, length=6).input_ids[:1]
    with torch.no_grad():
        full = model(ids)
        got, cache = _run_chunks(model, ids, [1] * 6)
    torch.testing.assert_close(got, full, rtol=0, atol=ATOL)  # the mask still keeps results right
    assert [count for layer, count in zip(spec.layers, cache.stored_tokens(), strict=True) if layer.window] == [0, 0]
