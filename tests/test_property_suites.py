"""The property suites catch what the gate cannot: a cache that is wrong only after the sliding window
wraps, and (again) a padding-mask bug — named by layer, and replayable with one command."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import configs
from harness.adapters import resolve
from harness.gate import conform
from harness.synthetic import make_batch, random_state_dict
from reference_impl.spec import ModelSpec
from suites.checks import decode_divergence, padding_divergence
from tests import mutants
from tests.mutants_cache import G2SlidingCacheWrapBug

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def _loaded(candidate, model):
    cfg = configs.hf_config(model)
    spec = ModelSpec.from_hf_config(cfg)
    adapter = resolve(candidate)
    adapter.load(cfg, random_state_dict(spec), torch.float32)
    return adapter, spec


def test_cache_wrap_bug_passes_the_gate_but_fails_decode_after_the_wrap():
    cls = G2SlidingCacheWrapBug
    assert conform(cls.MODEL, candidate=cls).passed  # its full forward is HF's: the gate cannot see it
    adapter, spec = _loaded(cls, cls.MODEL)
    w = spec.max_window
    before_wrap = make_batch(spec, length=w - 1)
    assert decode_divergence(adapter, spec, before_wrap, [1] * (w - 1)) is None
    batch = make_batch(spec)
    first = decode_divergence(adapter, spec, batch, [w - 2] + [1] * (batch.input_ids.shape[1] - w + 2))
    assert first is not None and first.name == cls.EXPECTED, first


@pytest.mark.parametrize("candidate", ["hf", "reference"])
def test_correct_caches_decode_like_the_full_forward(candidate):
    adapter, spec = _loaded(candidate, "gemma-2-2b-tiny")
    batch = make_batch(spec)
    n, w = batch.input_ids.shape[1], spec.max_window
    steps = [w - 2] + [1] * (n - w + 2)  # a prefill inside the window, then single tokens past it
    large = [w + 3] * (n // (w + 3)) + [n % (w + 3)]  # chunks larger than the window
    for chunks in (steps, [c for c in large if c]):
        assert sum(chunks) == n
        assert decode_divergence(adapter, spec, batch, chunks) is None


def test_padding_bug_is_seen_by_the_padding_property():
    bad, spec = _loaded(mutants.G1IgnoresPadding, mutants.G1IgnoresPadding.MODEL)
    good, _ = _loaded("hf", mutants.G1IgnoresPadding.MODEL)
    batch = make_batch(spec)
    first = padding_divergence(bad, spec, batch)
    assert first is not None and first.name == "layers.0.attn", first
    assert padding_divergence(good, spec, batch) is None


def _suite(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_properties.py", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_suite_run_against_the_cache_bug_fails_naming_the_layer_and_replay():
    proc = _suite("-k", "decode", "--candidate", "tests.mutants_cache:G2SlidingCacheWrapBug")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "diverges from the full forward first at layers.0.attn" in proc.stdout
    assert "python -m pytest 'suites/test_properties.py::test_decode_matches_full_forward'" in proc.stdout


def test_suite_run_against_hf_passes():
    proc = _suite("-k", "decode or padding", "--candidate", "transformers:Gemma2ForCausalLM")
    assert proc.returncode == 0, proc.stdout[-2000:]
