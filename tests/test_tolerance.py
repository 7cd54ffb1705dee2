"""The tolerance policy against its calibration: reports/calibration.json (``gemma-harness calibrate``)
holds the spread between correct implementations and the size of every mutant; every limit must be at
least 3x that spread and every bug meant to be caught at least 3x its limit. The file must cover what
it claims and match what this code computes (a spot check reruns part of it), and the mutants' BF16
flags must agree with it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import configs
from harness import calibrate
from harness.probes import canonical, for_spec, locate
from harness.tolerance import tolerance_for
from reference_impl.spec import ModelSpec

pytest.importorskip("transformers")
CALIBRATION = Path(__file__).resolve().parent.parent / "reports" / "calibration.json"
MUTANT_MODULES = ("tests.mutants", "tests.mutants_gemma4")


@pytest.fixture(scope="module")
def calibration() -> dict:
    return json.loads(CALIBRATION.read_text())


def test_every_limit_and_every_bug_has_its_margin(calibration):
    checks = calibrate.margins(calibration["rows"], calibration["mutants"])
    below = [calibrate.describe(c) for c in checks if not c["ok"]]
    assert not below, "\n".join(below)
    kinds = {(c["dtype"], c["kind"]) for c in checks if c["check"] == "noise"}
    assert {("bfloat16", k) for k in ("attn", "mlp", "moe", "ple", "router", "logits", "out")} <= kinds
    assert sum(c["check"] == "bug" for c in checks) >= 70


def test_calibration_covers_what_it_claims(calibration):
    rows, settings = calibration["rows"], calibration["settings"]
    assert settings["seeds"] == [0, 1, 2] and settings["drawn"] >= 20
    sources = {r["source"] for r in rows}
    assert set(configs.names(tiny=True)) <= sources
    assert sum(s.startswith("drawn-") for s in sources) == settings["drawn"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {r["pair"] for r in rows} == {"dtype-vs-float64", "eager-vs-sdpa"}
    assert {r["group"] for r in rows} == {"gemma1-3", "gemma4"}


def test_mutant_bf16_flags_agree_with_the_calibration(calibration):
    """A mutant is marked caught-in-bf16 exactly when the calibration measured it so; every mutant of the
    suites is in the file (a new one means: calibrate again)."""
    recorded = {(r["mutant"], r["dtype"]): r for r in calibration["mutants"]}
    for name in MUTANT_MODULES:
        module = importlib.import_module(name)
        for cls in module.MUTANTS:
            key = f"{name}:{cls.__name__}"
            assert (key, "float32") in recorded and (key, "bfloat16") in recorded, f"{key}: calibrate again"
            row = recorded[(key, "bfloat16")]
            assert row["meant_to_catch"] == cls.BF16 and row["expected"] == cls.EXPECTED, key


def test_gemma4_bf16_limits_are_within_3x_of_gemma_1_to_3(calibration):
    g13, g4 = tolerance_for("bfloat16", "gemma"), tolerance_for("bfloat16", "gemma4_text")
    spec4 = ModelSpec.from_hf_config(configs.hf_config("gemma-4-26b-a4b-tiny"))
    for probe in set(canonical(1)) | set(for_spec(spec4)):
        for isolated in (False, True):
            a, b = g13.for_probe(probe, isolated), g4.for_probe(probe, isolated)
            for metric in a.keys() & b.keys():
                assert b[metric] <= 3 * a[metric], (probe, isolated, metric, a[metric], b[metric])
    assert g4.router_margin <= 3 * g13.router_margin


@pytest.mark.parametrize("model", ["gemma-2-9b-tiny", "gemma-4-e2b-tiny"])
def test_the_file_is_what_this_code_measures(calibration, model):
    """Part of the calibration, rerun: the committed figures are this code's (an edit to the reference,
    the synthetic weights or the gate that moves them means the calibration must be run again)."""
    fresh = calibrate.measure([model], seeds=(0,))
    committed = [r for r in calibration["rows"] if r["source"] == model and r["seed"] == 0]
    key = lambda r: (r["dtype"], r["pair"], r["kind"], r["isolated"])  # noqa: E731
    assert sorted(map(key, fresh)) == sorted(map(key, committed))
    by_key = {key(r): r for r in committed}
    for row in fresh:
        for metric in calibrate.GATED:
            assert row.get(metric) == by_key[key(row)].get(metric), (key(row), metric)


def test_embed_bf16_limit_is_a_recipe_check(calibration):
    """Correct bf16 recipes agree at the embedding exactly; only the float64 one (no bf16 recipe) differs,
    and it is excluded from the bf16 embed spread by design."""
    embed = [r for r in calibration["rows"] if r["kind"] == "embed" and r["dtype"] == "bfloat16"]
    assert all(r["max_rel"] == 0 for r in embed if r["pair"] == "eager-vs-sdpa")
    assert all(calibrate._not_a_recipe(r) for r in embed if r["pair"] == "dtype-vs-float64")
    assert locate("embed") == (None, "embed")
