"""The CLI on bad input: every refusal is an exit code and one line naming what is wrong, never a
traceback; ``--resume`` reuses only what this run would have computed and drops nothing."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import configs
from harness import footprint
from harness.cli import main
from harness.gate import plan

pytest.importorskip("transformers")
MODEL = "gemma-2b-tiny"  # the fastest twin
ROOT = __file__.rsplit("/tests/", 1)[0]
UNWRITABLE = "/proc/gemma-harness-test/out"  # nothing can be created in /proc, not even by root


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _refused(capsys, *argv, match: str, code: int = 2) -> str:
    """Run, expect exit `code` and exactly one stderr line matching `match`; return that line."""
    got, out, err = _main(capsys, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1, out + err
    assert lines[0].startswith("error: ") and re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> str:
    """A results file of one passing run of MODEL in float32."""
    path = tmp_path_factory.mktemp("baseline") / "r.json"
    assert main(["conform", "--model", MODEL, "--json", str(path), "-q"]) == 0
    return str(path)


@pytest.fixture
def no_work(monkeypatch):
    """Any gate run or real-weights load fails the test: refusals come before any work."""
    def work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr("harness.gate.conform", work)
    monkeypatch.setattr("harness.realweights.load_real_model", work)


def _edit(baseline: str, path, change) -> bytes:
    """Write `change(record of the baseline)` to `path`; return the bytes written."""
    record = json.loads(open(baseline).read())
    change(record)
    text = json.dumps(record).encode()
    path.write_bytes(text)
    return text


@pytest.mark.parametrize("argv, change, match", [
    (["--seed", "1"], None, r"its results are for seed 0; this run is seed 1$"),
    (["--against", "reference"], None,
     r"its results are for candidate hf, implementation hf-transformers-\S+; this run is candidate reference, "
     r"implementation reference$"),
    ([], lambda r: r["key"].update(harness="0.0.1+old"), r"its results are for harness 0\.0\.1\+old; this run is harness "),
    ([], lambda r: r.pop("key"), r"its gemma-2b-tiny \[float32\] has no key \(written by an older harness\)"),
])
def test_resume_refuses_results_of_another_run(baseline, tmp_path, capsys, no_work, argv, change, match):
    js = tmp_path / "r.json"
    before = _edit(baseline, js, change or (lambda r: None))
    line = _refused(capsys, "conform", "--model", MODEL, "--json", js, "--resume", "-q", *argv,
                    match=f"^error: refusing to resume from {re.escape(str(js))}: " + match)
    assert js.read_bytes() == before, line  # refused before any work: the file is untouched


@pytest.mark.parametrize("text, match", [
    ('{"passed": true, "results": [', r"not JSON \(Expecting value at line 1 column 30, char 29\)"),
    ("passed: yes", r"not JSON \(Expecting value at line 1 column 1, char 0\)"),
    ("[1, 2]", r"not a results file: its top level is an array, not an object"),
    ('{"passed": true}', r"not a results file: result 1 lacks 'model'"),
    ('{"results": {"a": 1}}', r"not a results file: its 'results' is not a list"),
])
def test_resume_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys, no_work, text, match):
    js = tmp_path / "r.json"
    js.write_text(text)
    _refused(capsys, "conform", "--model", MODEL, "--json", js, "--resume",
             match=f"^error: refusing to resume from {re.escape(str(js))}: {match}$")
    assert js.read_text() == text


def test_resume_reuses_equal_keys_reruns_stale_ones_and_drops_nothing(baseline, tmp_path, capsys, monkeypatch):
    """The file holds MODEL with a stale key (its config hash differs) between records of a model and
    a dtype this run does not plan. Resuming MODEL + another model reruns MODEL in place, adds the other
    at the end and keeps both foreign records as stored; resuming again reruns nothing."""
    base = json.loads(open(baseline).read())
    other_model = copy.deepcopy(base)
    other_model["model"] = other_model["key"]["model"] = "gemma-7b-tiny"
    other_dtype = copy.deepcopy(base)
    other_dtype["dtype"] = other_dtype["key"]["dtype"] = "bfloat16"
    stale = copy.deepcopy(base)
    stale["key"]["config_sha256"], stale["wall_s"] = "0" * 16, -1.0
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"passed": True, "results": [other_model, stale, other_dtype]}))

    import harness.gate

    calls = []
    real = harness.gate.conform
    monkeypatch.setattr("harness.gate.conform", lambda model, **kw: calls.append(model) or real(model, **kw))
    argv = ("conform", "--model", MODEL, "--model", "gemma-2-2b-tiny", "--json", js, "--resume", "-q")
    code, out, err = _main(capsys, *argv)
    assert code == 0 and calls == [MODEL, "gemma-2-2b-tiny"], out + err
    records = json.loads(js.read_text())["results"]
    assert [(r["model"], r["dtype"]) for r in records] == [
        ("gemma-7b-tiny", "float32"), (MODEL, "float32"), (MODEL, "bfloat16"), ("gemma-2-2b-tiny", "float32")]
    assert records[0] == other_model and records[2] == other_dtype  # kept as stored
    assert records[1]["wall_s"] > 0 and records[1]["key"] == base["key"]  # rerun, in its place

    written = js.read_bytes()
    code, out, err = _main(capsys, *argv)
    assert code == 0 and len(calls) == 2, out + err  # both reused
    assert len(out.splitlines()) == 2 and out.startswith(f"PASS {MODEL} [float32]")
    assert js.read_bytes() == written


def test_resume_needs_json(capsys, no_work):
    _refused(capsys, "conform", "--model", MODEL, "--resume", match=r"^error: --resume needs --json PATH")


def test_outputs_are_written_after_every_result(tmp_path, capsys, monkeypatch):
    """Interrupted during the second run: the JSON, JUnit XML and report hold the first (exit 130)."""
    import harness.gate

    real = harness.gate.conform

    def first_only(model, **kwargs):
        if model != MODEL:
            raise KeyboardInterrupt
        return real(model, **kwargs)

    monkeypatch.setattr("harness.gate.conform", first_only)
    js, xml, md = tmp_path / "r.json", tmp_path / "out" / "r.xml", tmp_path / "r.md"
    code, out, err = _main(capsys, "conform", "--model", MODEL, "--model", "gemma-2-2b-tiny", "--json", js,
                           "--junit", xml, "--report", md, "-q")
    assert code == 130 and err.strip() == "interrupted", out + err
    assert json.loads(js.read_text())["model"] == MODEL
    assert ET.parse(xml).getroot().get("tests") == "1"
    assert f"| {MODEL} | float32 | PASS |" in md.read_text()
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # written atomically: no temporary left behind


_OUTPUTS = [
    (["conform", "--model", MODEL], "--json"),
    (["conform", "--model", MODEL], "--junit"),
    (["conform", "--model", MODEL], "--report"),
    (["diff", "BASE", "BASE"], "--report"),
    (["realweights"], "--json"),
    (["realweights"], "--report"),
    (["calibrate", "--model", MODEL], "--json"),
]


@pytest.mark.parametrize("argv, flag", _OUTPUTS, ids=[f"{a[0]}{f}" for a, f in _OUTPUTS])
@pytest.mark.parametrize("kind", ["directory", "under-a-file", "unwritable"])
def test_output_paths_are_checked_before_any_work(baseline, tmp_path, capsys, no_work, argv, flag, kind):
    (tmp_path / "a-file").write_text("")
    path, match = {
        "directory": (tmp_path, "is a directory"),
        "under-a-file": (tmp_path / "a-file" / "sub" / "out", f"{re.escape(str(tmp_path / 'a-file'))} is a file, not a directory"),
        "unwritable": (UNWRITABLE, r"cannot write in /proc \("),
    }[kind]
    if kind == "unwritable" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    argv = [baseline if a == "BASE" else a for a in argv]
    _refused(capsys, *argv, flag, path, match=f"^error: {flag} {re.escape(str(path))}: {match}")


@pytest.mark.parametrize("text, match", [
    ("[]", "not a results file: its top level is an array, not an object"),
    ('{"model": "x"}', "not a results file: result 1 lacks 'dtype'"),
    ("{nope", r"not JSON \(Expecting property name enclosed in double quotes at line 1 column 2, char 1\)"),
    (None, r"cannot read it \(No such file or directory\)"),
])
def test_diff_refuses_a_file_that_is_not_a_results_file(baseline, tmp_path, capsys, text, match):
    bad = tmp_path / "b.json"
    if text is not None:
        bad.write_text(text)
    _refused(capsys, "diff", baseline, bad, match=f"^error: {re.escape(str(bad))}: {match}$")


@pytest.mark.parametrize("argv, match", [
    (["--dtype", "float16"], r"unknown dtype 'float16'; choose from float32, bfloat16$"),
    (["--tokens", "0"], r"--tokens 0: must be at least 2"),
    (["--tokens", "1"], r"--tokens 1: must be at least 2"),
])
def test_realweights_refuses_bad_dtype_and_tokens_before_loading(capsys, no_work, argv, match):
    _refused(capsys, "realweights", *argv, match="^error: " + match)


@pytest.mark.parametrize("argv, match", [
    (["--model", "gemma-99-tiny"], r"unknown config 'gemma-99-tiny'; did you mean .*gemma-2-9b-tiny"),
    (["--model", MODEL, "--dtype", "float64"], r"unknown dtype 'float64'"),
    (["--model", MODEL, "--dtype", ""], r"unknown dtype ''"),
])
def test_calibrate_refuses_unknown_model_and_dtype(capsys, argv, match):
    _refused(capsys, "calibrate", *argv, match="^error: " + match)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """configs/ with two readable configs and a truncated one."""
    for name in ("gemma-2b", "gemma-2b-tiny"):
        shutil.copy(configs.CONFIG_DIR / f"{name}.json", tmp_path)
    (tmp_path / "gemma-bad-tiny.json").write_text('{"name": "gemma-bad-tiny", "generation": 1')
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._read.cache_clear()
    yield tmp_path
    configs._read.cache_clear()


BAD = r"malformed config gemma-bad-tiny\.json: invalid JSON \(Expecting ',' delimiter: line 1 column 43 \(char 42\)\)"


def test_a_malformed_config_is_its_runs_error_and_the_rest_run(config_dir, tmp_path, capsys):
    js, xml, md = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    code, out, err = _main(capsys, "conform", "--all", "--json", js, "--junit", xml, "--report", md, "-q")
    assert code == 1, out + err
    passed, error = out.splitlines()  # -q: the verdicts, nothing else
    assert passed.startswith(f"PASS {MODEL} [float32]")
    assert re.fullmatch(r"ERROR gemma-bad-tiny \[float32\] hf-transformers-\S+: " + BAD, error), error
    records = json.loads(js.read_text())["results"]
    assert records[1]["model"] == "gemma-bad-tiny" and re.fullmatch(BAD, records[1]["error"])
    cases = ET.parse(xml).getroot().findall("testcase")
    assert re.fullmatch(BAD, cases[1].find("error").get("message"))
    assert re.search(r"\| gemma-bad-tiny \| float32 \| ERROR \| .* \| " + BAD + r" \|", md.read_text())


def test_configs_lists_the_readable_and_warns_about_the_malformed(config_dir, capsys):
    code, out, err = _main(capsys, "configs")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["gemma-2b", MODEL]
    assert re.fullmatch("warning: left out " + BAD, err.strip()), err


def test_a_run_that_does_not_fit_in_memory_is_refused_with_the_cut_that_would(tmp_path, capsys, monkeypatch, no_work):
    free = 12 * footprint.GIB
    monkeypatch.setattr(footprint, "available", lambda: free)
    js = tmp_path / "r.json"
    estimate = re.escape(plan("gemma-2b").footprint.describe())
    line = _refused(capsys, "conform", "--model", "gemma-2b", "--json", js,
                    match=rf"^error: gemma-2b \[float32\] needs {estimate}, which does not fit the "
                          r"12\.0 GiB of memory available \(with headroom\); --layers (\d+) would fit$")
    cut = int(re.search(r"--layers (\d+)", line).group(1))
    assert footprint.fits(plan("gemma-2b", layers=cut).footprint, free)
    assert not footprint.fits(plan("gemma-2b", layers=cut + 1).footprint, free)
    assert not js.exists()
    monkeypatch.setattr(footprint, "available", lambda: footprint.GIB)
    _refused(capsys, "conform", "--model", "gemma-2b", "--layers", 1,
             match=r"^error: gemma-2b \(first 1 of 18 layers\) \[float32\] needs .* not even its first layer would fit$")


def test_layers_cuts_the_model_and_is_validated(capsys, no_work, monkeypatch):
    _refused(capsys, "conform", "--model", MODEL, "--layers", 0, match=r"^error: --layers 0: must be at least 1$")
    _refused(capsys, "conform", "--model", MODEL, "--layers", 5, match=rf"^error: --layers 5: {MODEL} has only 4 layers$")
    monkeypatch.undo()
    code, out, err = _main(capsys, "conform", "--model", MODEL, "--layers", 2, "-q")
    assert code == 0 and len(out.splitlines()) == 1, out + err
    assert out.startswith(f"PASS {MODEL} (first 2 of 4 layers) [float32]")


def test_an_unresolvable_candidate_is_each_runs_error(capsys):
    code, out, err = _main(capsys, "conform", "--model", MODEL, "--candidate", "no_such_module_xyz:Thing", "-q")
    assert code == 1 and len(out.splitlines()) == 1, out + err
    assert out.startswith(f"ERROR {MODEL} [float32] no_such_module_xyz:Thing: cannot import candidate module "
                          "'no_such_module_xyz'")


@pytest.mark.parametrize("argv, match", [
    (["conform", "--model", MODEL, "--bogus"], r"unrecognized arguments: --bogus"),
    (["conform", "--model", MODEL, "-q", "-v"], r"argument -v/--verbose: not allowed with argument -q/--quiet"),
    (["conform", "--seed", "x"], r"argument --seed: invalid int value: 'x'"),
])
def test_usage_errors_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in out + err
    assert re.search(match, err.strip().splitlines()[-1])


def test_usage_without_a_model_exits_2(capsys, no_work):
    _refused(capsys, "conform", match=r"^error: give --model NAME or --all$")
    _refused(capsys, "conform", "--model", "gemma-99-tiny", match=r"^error: unknown config 'gemma-99-tiny'")


def test_an_internal_error_is_one_line_exit_3(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("harness.gate.conform", broken)
    _refused(capsys, "conform", "--model", MODEL, code=3,
             match=r"^error: internal error: RuntimeError: boom second line \(at .*test_cli\.py:\d+\)$")
    monkeypatch.setenv("GEMMA_HARNESS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["conform", "--model", MODEL])


_INJECT = ("import sys, harness.gate; harness.gate.conform = lambda *a, **k: {}['missing']; "
           "from harness.cli import main; sys.exit(main(sys.argv[1:]))")


def test_exit_paths_in_a_real_process(tmp_path):
    """The console entry point's exit codes: a refusal (2), an internal error (3; with
    GEMMA_HARNESS_DEBUG=1 the traceback instead)."""
    bad = tmp_path / "r.json"
    bad.write_text("[")
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_HARNESS_DEBUG"}

    def run(*args, debug=False):
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**env, "GEMMA_HARNESS_DEBUG": "1"} if debug else env)

    proc = run("-m", "harness.cli", "conform", "--model", MODEL, "--json", str(bad), "--resume")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == f"error: refusing to resume from {bad}: not JSON (Expecting value at line 1 column 2, char 1)\n"
    proc = run("-c", _INJECT, "conform", "--model", MODEL)
    assert proc.returncode == 3 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert re.fullmatch(r"error: internal error: KeyError: 'missing' \(at <string>:1\)\n", proc.stderr)
    proc = run("-c", _INJECT, "conform", "--model", MODEL, debug=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr


def test_two_outputs_naming_one_file_are_refused(capsys, tmp_path, no_work):
    path = tmp_path / "same.out"
    _refused(capsys, "conform", "--model", MODEL, "--json", path, "--report", path,
             match="--json and --report name the same file")


def test_litgpt_not_installed_is_each_runs_error_not_a_traceback(capsys, monkeypatch):
    from importlib.metadata import PackageNotFoundError

    import harness.adapters.litgpt as litgpt_adapter

    def missing():
        raise PackageNotFoundError("litgpt")

    monkeypatch.setattr(litgpt_adapter, "litgpt_version", missing)
    code, out, err = _main(capsys, "conform", "--model", MODEL, "--against", "litgpt", "-q")
    assert code == 1 and "ERROR gemma-2b-tiny [float32] litgpt: litgpt is not installed" in out, out + err


def test_a_port_given_as_module_object_is_keyed_by_its_source(tmp_path, monkeypatch):
    """Editing a port's file changes its key, so --resume does not reuse what the old port computed."""
    from harness.gate import candidate_label

    (tmp_path / "some_port.py").write_text("from transformers import Gemma2ForCausalLM\n\n\n"
                                          "class Port(Gemma2ForCausalLM):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    first = candidate_label("some_port:Port")
    assert first.startswith("some_port:Port@")
    (tmp_path / "some_port.py").write_text("from transformers import Gemma2ForCausalLM\n\n\n"
                                          "class Port(Gemma2ForCausalLM):\n    pass  # edited\n")
    sys.modules.pop("some_port", None)
    assert candidate_label("some_port:Port") != first
