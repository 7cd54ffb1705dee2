"""The gate's behaviour: result fields, candidate forms, crashes, unsupported probes, NaN, resume."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from harness.adapters import AdapterError, resolve
from harness.adapters.base import Unsupported
from harness.gate import conform
from harness.probes import canonical

pytest.importorskip("transformers")
MODEL = "gemma-2-2b-tiny"
ROOT = __file__.rsplit("/tests/", 1)[0]


def test_json_has_the_documented_fields():
    data = conform(MODEL).to_json()
    for key in ("passed", "model", "dtype", "reference", "candidate", "first_divergence", "probes"):
        assert key in data
    assert data["passed"] is True and data["first_divergence"] is None
    assert [p["name"] for p in data["probes"]] == canonical(4)
    assert {"name", "passed", "max_abs", "rel_rms", "min_cosine"} <= set(data["probes"][-1]) | set(data["probes"][-1]["metrics"])
    assert {"kl_max", "top1"} <= set(data["probes"][-1]["metrics"])
    assert data["environment"]["torch"] == torch.__version__


def test_candidate_as_module_class_string():
    result = conform(MODEL, candidate="examples.my_port:MyGemma2ForCausalLM")
    assert result.passed, result.verdict()
    assert result.candidate == "examples.my_port:MyGemma2ForCausalLM"


def test_logits_only_adapter_is_unsupported_not_failed():
    result = conform(MODEL, candidate="examples.my_port:LogitsOnlyAdapter")
    assert result.passed, result.verdict()
    statuses = {p.name: p.status for p in result.probes}
    assert statuses["logits"] == "pass"
    assert statuses["layers.0.attn"] == "unsupported"
    assert "logits only" in next(p for p in result.probes if p.name == "embed").note


def test_port_whose_forward_takes_fewer_arguments_is_still_judged():
    from transformers import Gemma2ForCausalLM

    class MinimalSignature(Gemma2ForCausalLM):
        def forward(self, input_ids, attention_mask=None):  # no position_ids / use_cache
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    result = conform(MODEL, candidate=MinimalSignature)
    assert result.error is None and result.passed, result.verdict()


class _Crashing:
    name = "crashing"

    def load(self, hf_config, state_dict, dtype):
        pass

    def run(self, batch):
        raise RuntimeError("kernel exploded")


def test_port_that_rejects_padding_is_judged_row_by_row_with_padding_unsupported():
    """An HF subclass that raises on a left-padded mask: every probe is judged on each row alone, and
    padding is its own capability line with the port's reason, neither a pass nor a crash."""
    from tests.ports import Gemma2RejectsPadding

    result = conform(Gemma2RejectsPadding.MODEL, candidate=Gemma2RejectsPadding)
    assert result.passed and result.error is None, result.verdict()
    assert not result.unsupported and len(result.probes) == len(canonical(4))
    assert result.capabilities["padding"].status == "unsupported"
    assert "left padding is not supported" in result.capabilities["padding"].reason
    assert result.capabilities["position_ids"].status == "judged"
    assert "padding: unsupported — NotImplementedError: left padding is not supported" in result.verdict()
    data = result.to_json()
    assert data["capabilities"]["padding"]["status"] == "unsupported"
    assert "each row alone" in data["inputs"]


def test_port_without_position_ids_is_judged_with_position_ids_unsupported():
    from tests.ports import Gemma3NoPositionIds

    result = conform(Gemma3NoPositionIds.MODEL, candidate=Gemma3NoPositionIds)
    assert result.passed, result.verdict()
    assert result.capabilities["position_ids"].status == "unsupported"
    assert "takes no position_ids" in result.capabilities["position_ids"].reason
    assert result.capabilities["padding"].status == "judged"  # the padded batch ran, positions its own


class _Declares:
    """An adapter that says up front it cannot pad, and raises Unsupported if given padding anyway."""

    name = "declares-no-padding"
    unsupported = {"padding": "single-sequence decoder"}

    def load(self, hf_config, state_dict, dtype):
        self.inner = resolve("hf")
        self.inner.load(hf_config, state_dict, dtype)

    def run(self, batch):
        if batch.padded:
            raise Unsupported("padding", "single-sequence decoder")
        return self.inner.run(batch)


def test_declared_padding_is_never_tried_and_rows_are_judged():
    result = conform(MODEL, candidate=_Declares())
    assert result.passed, result.verdict()
    assert result.capabilities["padding"].line("padding") == "padding: unsupported — single-sequence decoder"


class _CannotRunThisModel(_Crashing):
    """Declares, at load or at its first run, that it cannot run this model at all (a missing dependency)."""

    name = "no-backend"

    def __init__(self, when: str):
        self.when, self.runs = when, 0

    def load(self, hf_config, state_dict, dtype):
        if self.when == "load":
            raise Unsupported("model", "needs libfoo, which does not import here")

    def run(self, batch):
        self.runs += 1
        raise Unsupported("model", "needs libfoo, which does not import here")


@pytest.mark.parametrize("when", ["load", "run"])
def test_a_candidate_that_cannot_run_the_model_is_unsupported_not_failed(when, tmp_path):
    from harness import report
    from harness.gate import result_from_json

    candidate = _CannotRunThisModel(when)
    result = conform(MODEL, candidate=candidate)
    assert result.not_run == "needs libfoo, which does not import here" and result.error is None
    assert result.passed and not result.probes and candidate.runs == (0 if when == "load" else 1)  # not retried
    assert result.verdict() == f"UNSUPPORTED {MODEL} [float32] no-backend: needs libfoo, which does not import here"
    assert result_from_json(json.loads(json.dumps(result.to_json()))).not_run == result.not_run
    suite = ET.fromstring(report.junit_xml([result]).split("?>", 1)[1])
    assert suite.get("skipped") == "1" and suite.get("failures") == "0" and suite.find("testcase/skipped") is not None
    assert "| UNSUPPORTED |" in report.markdown([result])


def test_a_port_that_crashes_even_alone_is_an_error_not_unsupported():
    result = conform(MODEL, candidate=_Crashing())
    assert result.error and "kernel exploded" in result.error and not result.capabilities


class _ReturnsTensor(_Crashing):
    name = "returns-a-tensor"

    def run(self, batch):
        return torch.zeros(2, 3)


class _WrongProbeShape(_Crashing):
    name = "wrong-shape"

    def run(self, batch):
        return {"logits": torch.zeros(batch.input_ids.shape[1], 5)}


def test_adapter_returning_the_wrong_thing_is_a_one_line_error():
    result = conform(MODEL, candidate=_ReturnsTensor())
    assert result.error == "returns-a-tensor: run() returned Tensor, expected a dict of probe name -> tensor"
    result = conform(MODEL, candidate=_WrongProbeShape())
    assert "probe 'logits' has shape" in result.error and "\n" not in result.error


def test_bad_candidate_strings_are_clear_errors():
    with pytest.raises(AdapterError, match="MODULE:OBJECT"):
        resolve("no_colon_here")
    with pytest.raises(AdapterError, match="cannot import candidate module 'no_such_module_xyz'"):
        resolve("no_such_module_xyz:Thing")
    with pytest.raises(AdapterError, match="has no attribute 'Nope'"):
        resolve("examples.my_port:Nope")


class _NaNAtLayer2:
    """Returns the HF probes but with a NaN injected from layer 2's MLP on."""

    name = "nan-port"

    def __init__(self):
        self.inner = resolve("hf")

    def load(self, hf_config, state_dict, dtype):
        self.inner.load(hf_config, state_dict, dtype)

    def run(self, batch):
        out = self.inner.run(batch)
        poisoned = False
        for name in canonical(4):
            poisoned = poisoned or name == "layers.2.mlp"
            if poisoned:
                out[name] = out[name].clone()
                out[name][0, 7] = float("nan")
        return out


def test_crashing_candidate_is_a_result_not_a_crash():
    result = conform(MODEL, candidate=_Crashing())
    assert not result.passed
    assert "kernel exploded" in result.error and "RuntimeError" in result.error


def test_nan_is_reported_at_the_first_probe_it_appears():
    result = conform(MODEL, candidate=_NaNAtLayer2())
    first = result.first_divergence
    assert (first.name, first.status) == ("layers.2.mlp", "nonfinite")
    assert "NaN" in first.note


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_pass_writes_json_junit_and_report(tmp_path):
    js, xml, md = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    proc = _cli("conform", "--model", MODEL, "--json", str(js), "--junit", str(xml), "--report", str(md))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS gemma-2-2b-tiny" in proc.stdout and "layers.3.mlp" in proc.stdout  # the probe table
    assert json.loads(js.read_text())["passed"] is True
    suite = ET.parse(xml).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    assert "| gemma-2-2b-tiny | float32 | PASS |" in md.read_text()


def test_cli_unknown_model_and_dtype_exit_2():
    assert _cli("conform", "--model", "gemma-99-tiny").returncode == 2
    assert _cli("conform", "--model", MODEL, "--dtype", "float8").returncode == 2


def test_cli_resume_keeps_finished_results(tmp_path):
    js = tmp_path / "r.json"
    assert _cli("conform", "--model", MODEL, "--json", str(js)).returncode == 0
    first = json.loads(js.read_text())
    proc = _cli("conform", "--model", MODEL, "--model", "gemma-2b-tiny", "--json", str(js), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(js.read_text())
    assert [r["model"] for r in data["results"]] == [MODEL, "gemma-2b-tiny"]
    assert data["results"][0]["wall_s"] == first["wall_s"]  # reused, not rerun


def test_cli_configs_lists_every_variant():
    proc = _cli("configs")
    assert proc.returncode == 0
    for name in ("gemma-2b", "gemma-2-27b-tiny", "gemma-3-270m", "gemma-3-27b-tiny"):
        assert name in proc.stdout


def test_cli_diff_shows_what_changed_between_two_runs(tmp_path):
    """Two runs of the same models: HF, then a port with exact GELU. The diff names the changed probes
    and exits 1 because a verdict got worse; a run against itself is identical and exits 0."""
    a, b, md = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "d.md"
    assert _cli("conform", "--model", MODEL, "--model", "gemma-2b-tiny", "--json", str(a), "-q").returncode == 0
    _cli("conform", "--model", MODEL, "--model", "gemma-2b-tiny", "--candidate", "tests.mutants:G1ExactGelu",
         "--json", str(b), "-q")
    same = _cli("diff", str(a), str(a))
    assert same.returncode == 0 and "2 of 2 runs identical at every probe; 0 verdicts worse" in same.stdout
    proc = _cli("diff", str(a), str(b), "--report", str(md))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): line for line in md.read_text().splitlines() if line.startswith("| gemma")}
    assert "| PASS | **FAIL** |" in rows["gemma-2b-tiny"] and "`layers.0.mlp`" in rows["gemma-2b-tiny"]
    assert "ERROR" in rows[MODEL]  # a Gemma 1 class cannot load a Gemma 2 config: that run's error
    assert _cli("diff", str(a), str(tmp_path / "missing.json")).returncode == 2


class _WritesToItsWeights(_Crashing):
    """Converts the checkpoint in place (adds 1 to the norm weights, a Llama habit) instead of copying."""

    name = "in-place-converter"

    def load(self, hf_config, state_dict, dtype):
        for name, tensor in state_dict.items():
            if name.endswith("norm.weight"):
                tensor.add_(1.0)
        self.inner = resolve("hf")
        self.inner.load(hf_config, state_dict, dtype)

    def run(self, batch):
        return self.inner.run(batch)


def test_a_candidate_that_writes_to_the_shared_weights_is_an_error():
    """The reference shares the float32 state dict with no copy; a port that writes to it would move the
    reference too, and pass whatever it computes."""
    result = conform(MODEL, candidate=_WritesToItsWeights())
    assert result.error and "modified the weights it was given in place" in result.error, result.verdict()


def test_lazily_computed_reference_logits_judge_like_whole_ones(monkeypatch):
    """A full-size vocabulary's reference logits are computed a slice at a time while compared; the same
    run with the threshold lowered to force that path gives the same figures."""
    whole = conform("gemma-3-270m-tiny", dtype="bfloat16")
    monkeypatch.setattr("harness.gate.LAZY_LOGITS_ABOVE", 0)
    lazy = conform("gemma-3-270m-tiny", dtype="bfloat16")
    assert lazy.passed and [p.metrics for p in lazy.probes] == [p.metrics for p in whole.probes]
    broken = conform("gemma-2-2b-tiny", candidate="tests.mutants:G2NoFinalSoftcap")
    assert broken.first_divergence.name == "logits"
