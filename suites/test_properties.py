"""Differential and metamorphic properties, on drawn configs and inputs, for every implementation under
test: the reference and HF Transformers, or ``--candidate MODULE:OBJECT``.

Run: ``pytest suites/`` (``--candidate my_port:MyGemmaForCausalLM``, ``--hypothesis-profile=nightly``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from harness import probes as probe_names
from harness.adapters import ReferenceAdapter, resolve
from harness.gate import compare_implementations
from harness.synthetic import Batch, random_state_dict
from reference_impl.spec import ModelSpec

from . import strategies as S
from .checks import decode_divergence, padding_divergence


def _families_of(adapter) -> tuple[str, ...]:
    """Which Gemma generations a candidate can build: an HF-compatible class knows its config's
    model_type; an adapter may declare ``families``; otherwise every generation is drawn."""
    model_class = getattr(adapter, "model_class", None)
    model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if model_type in S.FAMILIES:
        return (model_type,)
    return tuple(getattr(adapter, "families", S.FAMILIES))


@pytest.fixture(scope="session")
def families(candidate_target):
    return _families_of(resolve(candidate_target)) if candidate_target else S.FAMILIES


@pytest.fixture(scope="session")
def implementations(candidate_target):
    """(name, factory) of each implementation under test."""
    if candidate_target:
        return [(candidate_target, lambda: resolve(candidate_target))]
    impls = [("reference", ReferenceAdapter)]
    try:
        import transformers  # noqa: F401

        impls.append(("hf", lambda: resolve("hf")))
    except ImportError:
        pass
    return impls


def _setup(cfg: dict, implementations, seed: int = 0):
    """(config, spec, random weights). An implementation that runs only a variant of the drawn config
    (``prepare_config``: vLLM's head sizes) gets it, and so does everything else in the property."""
    for _, factory in implementations:
        prepare = getattr(factory(), "prepare_config", None)
        cfg = prepare(cfg) if prepare else cfg
    note(f"config: {cfg}")
    spec = ModelSpec.from_hf_config(cfg)
    return cfg, spec, random_state_dict(spec, seed)


def _loaded(factory, cfg, state, dtype=torch.float32):
    adapter = factory()
    adapter.load(cfg, state, dtype)
    return adapter


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = float(a.float().pow(2).mean().sqrt()) or 1.0
    err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    assert err <= 1e-5 * max(scale, 1.0), f"{what}: max abs difference {err:.3g} (reference scale {scale:.3g})"


# --------------------------------------------------------------------------------------------------
# Differential: candidate ≡ reference ≡ HF at every probe


@given(data=st.data())
def test_differential_every_probe(implementations, families, data):
    cfg = data.draw(S.any_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    batch = data.draw(S.batches(cfg))
    for name, factory in implementations:
        if name == "reference":
            continue
        result = compare_implementations("drawn", cfg, state, batch, candidate=factory(), dtype="float32")
        assert result.passed, f"{name}: {result.verdict()}"


# --------------------------------------------------------------------------------------------------
# Causality: changing token t never changes outputs before t


@given(data=st.data())
def test_causality(implementations, families, data):
    cfg = data.draw(S.any_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    batch = data.draw(S.batches(cfg, min_length=2))
    length = batch.input_ids.shape[1]
    t = data.draw(st.integers(1, length - 1), label="changed position")
    changed = batch.input_ids.clone()
    changed[0, t] = (changed[0, t] + data.draw(st.integers(1, S.VOCAB - 1), label="token shift")) % S.VOCAB
    for name, factory in implementations:
        adapter = _loaded(factory, cfg, state)
        before = adapter.run(batch)["logits"][0, :t]
        after = adapter.run(Batch(changed, batch.attention_mask, batch.position_ids))["logits"][0, :t]
        _close(before, after, f"{name}: logits before position {t} changed when token {t} changed")


# --------------------------------------------------------------------------------------------------
# Window locality: on an all-sliding model, outputs at t ignore tokens beyond the window's reach


@given(data=st.data())
def test_window_locality(implementations, families, data):
    if not any(f in ("gemma2", "gemma3_text") for f in families):
        pytest.skip("window locality needs an all-sliding model: Gemma 2 or 3")
    cfg = data.draw(S.all_sliding_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    reach = spec.num_layers * (spec.max_window - 1)  # how far back information can travel
    length = reach + data.draw(st.integers(2, 6), label="extra tokens")
    ids = torch.tensor([data.draw(st.lists(st.integers(0, S.VOCAB - 1), min_size=length, max_size=length))])
    ones = torch.ones_like(ids)
    batch = Batch(ids, ones, torch.arange(length)[None])
    p = data.draw(st.integers(0, length - reach - 2), label="changed position")
    changed = ids.clone()
    changed[0, p] = (changed[0, p] + 1) % S.VOCAB
    for name, factory in implementations:
        adapter = _loaded(factory, cfg, state)
        a = adapter.run(batch)["logits"][0, p + reach + 1:]
        b = adapter.run(Batch(changed, ones, batch.position_ids))["logits"][0, p + reach + 1:]
        _close(a, b, f"{name}: token {p} reached position {p + reach + 1} through {spec.num_layers} sliding layers")


# --------------------------------------------------------------------------------------------------
# Prefill ≡ token-by-token decode ≡ chunked prefill ≡ forward without cache


def _schedules(length: int, window: int):
    prefill = st.integers(1, length).map(lambda k: [k] + [1] * (length - k))
    def chunks(size):
        return [size] * (length // size) + ([length % size] if length % size else [])
    small = st.integers(1, max(1, window - 1)).map(chunks)
    large = st.integers(window + 1, window + 8).map(chunks)
    return st.one_of(prefill, small, large)


@given(data=st.data())
def test_decode_matches_full_forward(implementations, families, data):
    cfg = data.draw(S.any_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    window = spec.max_window or 8
    batch = data.draw(S.batches(cfg, max_factor=4))
    schedule = data.draw(_schedules(batch.input_ids.shape[1], window), label="chunk schedule")
    for name, factory in implementations:
        adapter = _loaded(factory, cfg, state)
        if not hasattr(adapter, "decode"):
            pytest.skip(f"{name} has no decode(): cache properties unsupported")
        first = decode_divergence(adapter, spec, batch, schedule)
        assert first is None, (f"{name}: cached decode (chunks {schedule}) diverges from the full forward first at "
                               f"{first.name}: {first.note}")


# --------------------------------------------------------------------------------------------------
# Left-padded batch ≡ each row alone


@given(data=st.data())
def test_left_padding_matches_row_alone(implementations, families, data):
    cfg = data.draw(S.any_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    batch = data.draw(S.batches(cfg))
    for name, factory in implementations:
        first = padding_divergence(_loaded(factory, cfg, state), spec, batch)
        assert first is None, (f"{name}: left-padded row departs from the same row alone first at {first.name}: "
                               f"{first.note}")


# --------------------------------------------------------------------------------------------------
# float16: a scan reports the first probe with Inf/NaN instead of crashing


@given(data=st.data(), blowup=st.sampled_from([1.0, 300.0]))
def test_float16_scan_reports_first_nonfinite_probe(implementations, families, data, blowup):
    from harness.scan import first_nonfinite

    cfg = data.draw(S.any_config(families), label="config")
    cfg, spec, state = _setup(cfg, implementations)
    state = {k: (v * blowup if k.endswith("embed_tokens.weight") else v) for k, v in state.items()}
    batch = data.draw(S.batches(cfg))
    order = probe_names.for_spec(spec)
    for name, factory in implementations:
        adapter = _loaded(factory, cfg, state, torch.float16)
        outputs = adapter.run(batch)
        found = first_nonfinite(outputs, order, batch.valid)
        finite = [p for p in order if p in outputs and torch.isfinite(outputs[p][batch.valid]).all()]
        if found is None:
            assert len(finite) == len([p for p in order if p in outputs]), name
        else:
            assert found.probe not in finite and all(p in finite for p in order[: order.index(found.probe)]), name
