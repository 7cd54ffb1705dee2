"""Gemma 3n mutation suite: the gate must catch each known Gemma 3n porting bug and blame the right probe.

Every mutant in :mod:`tests.mutants_gemma3n` is a ``Gemma3nForCausalLM`` subclass with one real porting bug
(AltUp prediction / correction, LAuReL, activation sparsity, the PLE branch, correct_output_scale, the stream
expansion and collapse, KV sharing). It runs through ``conform`` as a candidate class and must fail with its
first divergence exactly at the probe its ``EXPECTED`` names, blamed on the right kind of operation. The
unmutated class and the bug-free port must pass, bit-exact.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Gemma3nForCausalLM  # noqa: E402

import configs  # noqa: E402
from harness.adapters.hf import HFCausalLMAdapter, default_dtype, hf_config_object  # noqa: E402
from harness.gate import conform  # noqa: E402
from harness.probes import locate  # noqa: E402
from harness.synthetic import make_batch, random_state_dict  # noqa: E402
from reference_impl.spec import ModelSpec  # noqa: E402
from tests import mutants_gemma3n as mutants  # noqa: E402
from tests.mutant_checks import check_caught as _check_caught  # noqa: E402
from tests.mutant_checks import explain as _explain  # noqa: E402


def _build(cls, model: str = mutants.MODEL, dtype=torch.float32):
    with default_dtype(dtype):
        return cls(hf_config_object(configs.hf_config(model)))


def test_mutants_are_distinct_and_cover_the_3n_operations():
    assert len(mutants.MUTANTS) >= 6
    assert len({m.__name__ for m in mutants.MUTANTS}) == len({m.BUG for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS + mutants.CONTROLS:
        assert m.__mro__[1:].count(Gemma3nForCausalLM) == 1, m
        assert m.MODEL in configs.names(tiny=True, core=None), m
    for m in mutants.MUTANTS:
        assert m.EXPECTED and m.BUG and m.SOURCE and isinstance(m.BF16, bool), m
    kinds = {locate(m.EXPECTED)[1] for m in mutants.MUTANTS}
    assert kinds >= {"altup_streams", "altup_predict", "altup_correct", "mlp", "attn", "ple_input", "out",
                     "final_norm_input"}


def test_mutations_stay_on_their_instance():
    """Building every candidate leaves transformers' Gemma 3n classes untouched; a plain model has no
    instance-level forward or AltUp method, before and after a gate run (the probe wrappers are removed)."""
    module = transformers.models.gemma3n.modeling_gemma3n

    def snapshot():  # copy.deepcopy of a config caches __slotnames__ on its class, HF "can set" answers too: harmless
        return {name: {k: v for k, v in vars(obj).items() if k != "__slotnames__" and not k.endswith("_cached_value")}
                for name, obj in vars(module).items() if isinstance(obj, type)}

    before = snapshot()
    for m in mutants.MUTANTS + mutants.CONTROLS:
        _build(m)
    assert snapshot() == before
    plain = _build(Gemma3nForCausalLM)
    assert [n for n, mod in plain.named_modules() if "forward" in vars(mod)] == []
    assert all(not ({"predict", "correct"} & set(vars(layer.altup))) for layer in plain.model.layers)


def test_hf_probes_leave_the_port_as_it_was():
    """The gate wraps AltUp predict / correct during a forward only: a port's own bound ``correct`` is
    wrapped too (so its result is what is judged), and restored afterwards; HF's are left unbound."""
    spec = ModelSpec.from_hf_config(configs.hf_config(mutants.MODEL))
    adapter = HFCausalLMAdapter(mutants.N3AltUpNoCorrection)
    adapter.load(configs.hf_config(mutants.MODEL), random_state_dict(spec), torch.float32)
    own = [vars(layer.altup)["correct"] for layer in adapter.model.model.layers]
    out = adapter.run(make_batch(spec))
    assert [vars(layer.altup)["correct"] for layer in adapter.model.model.layers] == own
    assert all("predict" not in vars(layer.altup) for layer in adapter.model.model.layers)
    b, t = make_batch(spec).input_ids.shape
    n, h = spec.gemma3n.altup_num_inputs, spec.hidden_size
    for name in ("altup_streams", "layers.0.altup_predict", "layers.0.altup_correct", "layers.9.out"):
        assert out[name].shape == (b, t, n * h), name


@pytest.mark.parametrize("cls", mutants.MUTANTS, ids=lambda c: c.__name__)
def test_mutant_caught_float32(cls):
    _check_caught(cls, "float32")


@pytest.mark.parametrize("cls", [m for m in mutants.MUTANTS if m.BF16], ids=lambda c: c.__name__)
def test_mutant_caught_bfloat16(cls):
    _check_caught(cls, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", [Gemma3nForCausalLM, *mutants.CONTROLS], ids=lambda c: c.__name__)
def test_unmutated_and_bug_free_port_pass_bit_exact(cls, dtype):
    result = conform(mutants.MODEL, candidate=cls, dtype=dtype)
    assert result.passed, _explain(result)
    assert max(p.metrics["max_abs"] for p in result.probes) == 0.0
