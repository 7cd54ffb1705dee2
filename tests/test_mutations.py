"""Mutation suite: the gate must catch each known Gemma porting bug and blame the right probe.

Every mutant in :mod:`tests.mutants` is an HF ``*ForCausalLM`` subclass with one real porting bug; it
runs through ``conform`` as a candidate class and must fail with its first divergence exactly at the
probe derived (in the mutant's ``EXPECTED``) from the probe semantics. The unmutated HF classes and
the bug-free "ported" controls must pass on the same models, and the CLI must turn a mutant into exit
code 1 with the right probe in its JSON and a failure in its JUnit XML.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM  # noqa: E402

import configs  # noqa: E402
from harness.adapters.hf import hf_config_object  # noqa: E402
from harness.gate import conform  # noqa: E402
from tests import mutants  # noqa: E402
from tests.mutant_checks import check_caught as _check_caught  # noqa: E402
from tests.mutant_checks import explain as _explain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HF_CLASS = {1: GemmaForCausalLM, 2: Gemma2ForCausalLM, 3: Gemma3ForCausalLM}


def _generation(cls) -> int:
    return next(g for g, base in HF_CLASS.items() if issubclass(cls, base))




# ------------------------------------------------------------------------------------------------
# The catalogue of mutants itself


def test_mutants_cover_all_generations_and_are_distinct():
    assert len(mutants.MUTANTS) >= 12
    assert len({m.__name__ for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    assert len({m.BUG for m in mutants.MUTANTS}) >= 12
    assert {_generation(m) for m in mutants.MUTANTS} == {1, 2, 3}
    for m in mutants.MUTANTS:
        hf = HF_CLASS[_generation(m)]
        assert m.__mro__[1:].count(hf) == 1, m
        assert m.MODEL in configs.names(tiny=True) and m.EXPECTED and m.BUG and m.SOURCE
        assert configs.load(m.MODEL)["generation"] == _generation(m), m


def test_mutations_stay_on_their_instance():
    """Building every mutant leaves the transformers classes (and a plain model) untouched."""
    modules = [transformers.models.gemma.modeling_gemma, transformers.models.gemma2.modeling_gemma2,
               transformers.models.gemma3.modeling_gemma3]

    def snapshot():
        out = {}
        for mod in modules:
            for name, obj in vars(mod).items():
                if isinstance(obj, type):  # (copy.deepcopy of a config caches __slotnames__: harmless)
                    out[(mod.__name__, name)] = {k: v for k, v in vars(obj).items() if k != "__slotnames__"}
                elif callable(obj):
                    out[(mod.__name__, name)] = obj
        return out

    before = snapshot()
    for m in mutants.MUTANTS + mutants.CONTROLS:
        m(hf_config_object(configs.hf_config(m.MODEL)))
    assert snapshot() == before
    plain = Gemma2ForCausalLM(hf_config_object(configs.hf_config("gemma-2-2b-tiny")))
    overridden = [n for n, mod in plain.named_modules() if "forward" in vars(mod)]
    assert overridden == []


# ------------------------------------------------------------------------------------------------
# Each mutant is caught and localised


@pytest.mark.parametrize("cls", mutants.MUTANTS, ids=lambda c: c.__name__)
def test_mutant_caught_float32(cls):
    _check_caught(cls, "float32")


@pytest.mark.parametrize("cls", [m for m in mutants.MUTANTS if m.BF16], ids=lambda c: c.__name__)
def test_large_mutant_caught_bfloat16(cls):
    _check_caught(cls, "bfloat16")



# ------------------------------------------------------------------------------------------------
# Unmutated candidates pass on the same models


@pytest.mark.parametrize("cls", mutants.BF16_ONLY, ids=lambda c: c.__name__)
def test_bf16_only_mutant_caught_in_bf16_and_passes_float32(cls):
    _check_caught(cls, "bfloat16")
    assert conform(cls.MODEL, candidate=cls, dtype="float32").passed


@pytest.mark.parametrize("model", sorted({m.MODEL for m in mutants.MUTANTS}))
def test_unmutated_hf_class_passes(model):
    result = conform(model, candidate=HF_CLASS[configs.load(model)["generation"]], dtype="float32")
    assert result.passed, _explain(result)


@pytest.mark.parametrize("cls", mutants.CONTROLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bug_free_port_passes(cls, dtype):
    """The mutants' own attention rewrite with no knob turned (mask rebuilt by the port) passes."""
    result = conform(cls.MODEL, candidate=cls, dtype=dtype)
    assert result.passed, _explain(result)
    assert max(p.metrics["max_abs"] for p in result.probes) == 0.0  # bit-exact with HF eager


@pytest.mark.parametrize("cls", mutants.BELOW_NOISE, ids=lambda c: c.__name__)
def test_below_noise_mutant_is_never_mislocalised(cls):
    """Not required to fail, but it must change the numbers (else the test tests nothing); if a tighter
    gate ever catches it, it must blame the first norm: the attention's input."""
    result = conform(cls.MODEL, candidate=cls, dtype="float32")
    assert result.error is None
    assert max(p.metrics.get("max_abs", 0.0) for p in result.probes) > 0, "the mutant changed nothing"
    assert result.passed or result.first_divergence.name == "layers.0.attn_input", _explain(result)


# ------------------------------------------------------------------------------------------------
# The CLI end to end


def _cli(tmp_path, candidate: str, model: str):
    out_json, out_xml = tmp_path / "result.json", tmp_path / "result.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "conform", "--model", model, "--candidate", candidate,
         "--json", str(out_json), "--junit", str(out_xml), "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    return proc, json.loads(out_json.read_text()), ET.parse(out_xml).getroot()


def test_cli_fails_on_mutant_and_passes_unmutated(tmp_path):
    mutant = mutants.G2NoPostFfwNorm
    proc, data, junit = _cli(tmp_path / "mutant", f"tests.mutants:{mutant.__name__}", mutant.MODEL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert data["passed"] is False and data["error"] is None
    assert data["first_divergence"]["probe"] == mutant.EXPECTED
    assert data["first_divergence"]["layer"] == 0 and data["first_divergence"]["sublayer"] == "out"
    cases = junit.iter("testcase")
    failures = [f for case in cases for f in case.findall("failure")]
    assert junit.get("failures") == "1" and len(failures) == 1
    assert mutant.EXPECTED in failures[0].get("message")

    proc, data, junit = _cli(tmp_path / "plain", "transformers:Gemma2ForCausalLM", mutant.MODEL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["passed"] is True and data["first_divergence"] is None
    assert junit.get("failures") == "0" and junit.get("errors") == "0"
    assert not [f for case in junit.iter("testcase") for f in case.findall("failure")]
