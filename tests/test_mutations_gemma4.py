"""Gemma 4 mutation suite: the gate must catch each known Gemma 4 porting bug and blame the right probe.

Every mutant in :mod:`tests.mutants_gemma4` is a ``Gemma4ForCausalLM`` subclass with one real porting
bug, across the dense (31B), MoE (26B-A4B) and edge (E2B / E4B) twins. It runs through ``conform`` as a
candidate class and must fail with its first divergence exactly at the probe its ``EXPECTED`` names.
The unmutated class and the bug-free ports must pass on the same models; a weight-shape bug must be
an error naming the tensor, not a divergence; HF's eager experts in bf16 must pass with its near-tie
expert flips reported as such; and the CLI must turn a mutant into exit code 1 with the right probe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Gemma4ForCausalLM  # noqa: E402

import configs  # noqa: E402
from harness.adapters.hf import default_dtype, hf_config_object  # noqa: E402
from harness.gate import conform  # noqa: E402
from harness.probes import locate  # noqa: E402
from harness.tolerance import tolerance_for  # noqa: E402
from tests import mutants_gemma4 as mutants  # noqa: E402
from tests.mutant_checks import check_caught as _check_caught  # noqa: E402
from tests.mutant_checks import explain as _explain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TWINS = ["gemma-4-e2b-tiny", "gemma-4-e4b-tiny", "gemma-4-26b-a4b-tiny", "gemma-4-31b-tiny"]
MOE = "gemma-4-26b-a4b-tiny"






def _build(cls, model: str, dtype=torch.float32):
    with default_dtype(dtype):
        return cls(hf_config_object(configs.hf_config(model)))


# ------------------------------------------------------------------------------------------------
# The catalogue of mutants itself


def test_mutants_cover_every_gemma4_shape_and_are_distinct():
    assert len(mutants.MUTANTS) >= 8
    assert len({m.__name__ for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    assert len({m.BUG for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    assert {m.MODEL for m in mutants.MUTANTS} == set(TWINS)  # dense, MoE and both edge shapes
    everything = mutants.MUTANTS + mutants.CONTROLS + mutants.WLOAD + mutants.EQUIVALENT + mutants.BELOW_NOISE
    for m in everything:
        assert m.__mro__[1:].count(Gemma4ForCausalLM) == 1, m
        assert m.MODEL in configs.names(tiny=True) and configs.load(m.MODEL)["generation"] == 4, m
    for m in mutants.MUTANTS:
        assert m.EXPECTED and m.BUG and m.SOURCE and isinstance(m.BF16, bool), m
    # every sublayer is exercised (its input or its output), the MoE, PLE and KV-sharing ones included
    kinds = {locate(m.EXPECTED)[1].removesuffix("_input") for m in mutants.MUTANTS}
    assert kinds >= {"attn", "mlp", "router", "moe", "ple", "out"}


def test_mutations_stay_on_their_instance():
    """Building every candidate leaves the transformers Gemma 4 classes (and a plain model) untouched."""
    modules = [transformers.models.gemma4.modeling_gemma4, transformers.integrations.moe]

    def snapshot():
        out = {}
        for mod in modules:
            for name, obj in vars(mod).items():
                if isinstance(obj, type):  # HF caches "can set kernel" answers on its classes: harmless
                    out[(mod.__name__, name)] = {k: v for k, v in vars(obj).items()
                                                 if k != "__slotnames__" and not k.endswith("_cached_value")}
                elif callable(obj):
                    out[(mod.__name__, name)] = obj
        return out

    before = snapshot()
    everything = mutants.MUTANTS + mutants.CONTROLS + mutants.WLOAD + mutants.EQUIVALENT + mutants.BELOW_NOISE
    for m in everything + [mutants.G4EagerExperts]:
        _build(m, m.MODEL)
    assert snapshot() == before
    for model in TWINS:
        plain = _build(Gemma4ForCausalLM, model)
        assert [n for n, mod in plain.named_modules() if "forward" in vars(mod)] == []
        assert "project_per_layer_inputs" not in vars(plain.model)
        assert plain.config._experts_implementation == "grouped_mm"


def test_moe_candidates_keep_hf_default_experts_kernel():
    """A Gemma4ForCausalLM subclass defined outside transformers would get the eager experts loop
    (HF's source-grep heuristic) unless HF's own class was built first in the process; these
    candidates pin grouped_mm, so their bf16 results do not depend on test order."""
    for m in mutants.MUTANTS + mutants.CONTROLS + mutants.EQUIVALENT:
        if m.MODEL == MOE:
            assert _build(m, MOE).config._experts_implementation == "grouped_mm", m
    assert _build(mutants.G4EagerExperts, MOE).config._experts_implementation == "eager"


# ------------------------------------------------------------------------------------------------
# Each mutant is caught and localised


@pytest.mark.parametrize("cls", mutants.MUTANTS, ids=lambda c: c.__name__)
def test_mutant_caught_float32(cls):
    _check_caught(cls, "float32")


@pytest.mark.parametrize("cls", [m for m in mutants.MUTANTS if m.BF16], ids=lambda c: c.__name__)
def test_large_mutant_caught_bfloat16(cls):
    _check_caught(cls, "bfloat16")


@pytest.mark.parametrize("cls", mutants.WLOAD, ids=lambda c: c.__name__)
def test_weight_shape_bug_is_an_error_naming_the_tensor(cls):
    """A port that builds the wrong shapes cannot load the checkpoint: an error, not a divergence."""
    result = conform(cls.MODEL, candidate=cls, dtype="float32")
    assert not result.passed
    assert result.error is not None and cls.TENSOR in result.error, result.error
    assert "size mismatch" in result.error
    assert result.probes == [] and result.first_divergence is None
    assert result.verdict().startswith("ERROR")


# ------------------------------------------------------------------------------------------------
# Correct candidates pass on the same models


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", TWINS)
def test_unmutated_hf_class_passes(model, dtype):
    result = conform(model, candidate=Gemma4ForCausalLM, dtype=dtype)
    assert result.passed, _explain(result)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", mutants.CONTROLS, ids=lambda c: c.__name__)
def test_bug_free_port_passes(cls, dtype):
    """The mutants' own attention / decoder-layer / router rewrite with no knob turned passes, bit-exact."""
    result = conform(cls.MODEL, candidate=cls, dtype=dtype)
    assert result.passed, _explain(result)
    assert max(p.metrics["max_abs"] for p in result.probes) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", mutants.EQUIVALENT, ids=lambda c: c.__name__)
def test_equivalent_rewrite_passes(cls, dtype):
    result = conform(cls.MODEL, candidate=cls, dtype=dtype)
    assert result.passed, _explain(result)


@pytest.mark.parametrize("cls", mutants.BELOW_NOISE, ids=lambda c: c.__name__)
def test_below_noise_mutant_is_never_mislocalised(cls):
    """Not required to fail, but it must change the numbers (else the test tests nothing); if a tighter
    gate ever catches it, it must blame layer 0's per-layer input."""
    result = conform(cls.MODEL, candidate=cls, dtype="float32")
    assert result.error is None
    assert max(p.metrics.get("max_abs", 0.0) for p in result.probes) > 0, "the mutant changed nothing"
    assert result.passed or result.first_divergence.name == "layers.0.ple_input", _explain(result)


def test_eager_experts_bf16_passes_with_flips_reported_as_near_ties():
    """HF's own eager experts loop (bf16 accumulation per expert) vs the grouped_mm recipe the reference
    follows: some expert choices flip on near-ties; the gate reports them and judges the rest rerouted."""
    result = conform(MOE, candidate=mutants.G4EagerExperts, dtype="bfloat16")
    assert result.passed, _explain(result)
    routers = [p for p in result.probes if p.sublayer == "router"]
    flipped = [p for p in routers if p.metrics.get("tokens_flipped", 0) > 0]
    assert flipped, "eager experts flipped no expert choice: the near-tie path is not exercised"
    margin = tolerance_for("bfloat16", "gemma4_text").router_margin
    for p in flipped:
        assert p.status == "pass" and p.metrics["flip_max_margin"] <= margin, p
        assert "near-tie" in p.note, p.note
    assert "near-ties" in result.verdict()
    assert all(p.metrics.get("tokens_flipped", 0) == 0 for p in conform(MOE, mutants.G4EagerExperts, "float32").probes)


def test_wrong_experts_without_router_input_are_caught():
    """An adapter that gives the router's dispatch but not its input: the router cannot be judged alone,
    so its expert sets are compared with the reference's own routing (near-tie rule). Wrong experts fail
    there instead of passing against a reference routed as the candidate."""
    adapter = mutants.WrongExpertsWithoutRouterInput()
    result = conform(adapter.MODEL, candidate=adapter, dtype="float32")
    first = result.first_divergence
    assert first is not None and first.name == adapter.EXPECTED, _explain(result)
    assert "not isolated" in first.note and "beyond a near-tie" in first.note, first.note
    assert first.metrics["tokens_flipped"] > 0


# ------------------------------------------------------------------------------------------------
# The CLI end to end


def test_cli_fails_on_moe_mutant(tmp_path):
    mutant = mutants.G4PerExpertScaleIgnored
    out_json = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "conform", "--model", mutant.MODEL,
         "--candidate", f"tests.mutants_gemma4:{mutant.__name__}", "--json", str(out_json), "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and data["error"] is None
    assert data["model"] == MOE and data["candidate"] == f"tests.mutants_gemma4:{mutant.__name__}"
    first = data["first_divergence"]
    assert first["probe"] == mutant.EXPECTED and first["status"] == "fail"
    assert (first["layer"], first["sublayer"]) == (0, "router")
    assert mutant.EXPECTED in proc.stdout
