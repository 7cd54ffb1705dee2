"""The benchmark runner: suites expand into stable cells, records are complete and consistent, a
crash / hang / missing feature is that cell's record, a killed sweep resumes without losing or
duplicating a cell, shards merge into the unsharded set. Never a timing threshold."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import configs
from harness.bench import check, cost, records
from harness.bench.runner import latency_metrics
from harness.bench.suite import Cell, SuiteError, load_suite, parse_filter, select
from harness.kvcache import kv_bytes, tokens_held
from reference_impl.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(warmup=1, min_reps=2, max_reps=2, target_cv=0.5, max_seconds=5, timeout_s=120)


def _suite(tmp_path, sweep, name="t", **settings) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, "settings": {**QUICK, **settings}, "sweep": sweep}))
    return path


def _bench(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "harness.cli", "bench", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


TINY = {"model": ["gemma-3-270m-tiny"], "dtype": ["float32"], "batch": [1], "prompt": [12], "gen": [4]}


# --- suites ---------------------------------------------------------------------------------------

def test_suite_expands_hf_by_attention_only(tmp_path):
    suite = load_suite(_suite(tmp_path, [{"impl": ["reference", "hf"], "attn": ["eager", "sdpa"], **TINY,
                                          "batch": [1, 2]}]))
    labels = sorted(c.impl_label for c in suite.cells)
    assert labels == sorted(["reference", "reference", "hf[eager]", "hf[eager]", "hf[sdpa]", "hf[sdpa]"])
    assert len({c.cell_id for c in suite.cells}) == 6


def test_cell_ids_are_stable_across_processes_and_suite_order(tmp_path):
    a = load_suite(_suite(tmp_path, [{"impl": ["reference", "hf"], **TINY}], name="a"))
    b = load_suite(_suite(tmp_path, [{"impl": ["hf"], **TINY}, {"impl": ["reference"], **TINY}], name="b"))
    assert {c.cell_id for c in a.cells} == {c.cell_id for c in b.cells}
    code = ("from harness.bench.suite import Cell; print(Cell(impl='hf', attn='eager', model='gemma-3-270m-tiny', "
            "dtype='float32', batch=1, prompt=12, gen=4).cell_id)")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    hf = next(c for c in a.cells if c.impl == "hf")
    assert other.stdout.strip() == hf.cell_id


@pytest.mark.parametrize("block, message", [
    ({"impl": ["reference"], **TINY, "colour": ["red"]}, "unknown keys ['colour']"),
    ({"impl": ["reference"], **TINY, "model": [{"name": "gemma-3-1b", "layers": 99}]}, "has 26 layers"),
    ({"impl": ["reference"], **TINY, "model": ["gemma-9-tiny"]}, "unknown config 'gemma-9-tiny'"),
    ({"impl": ["reference"], **TINY, "device": ["tpu"]}, "device 'tpu' is not cpu or cuda:N"),
    ({"impl": ["reference"], **TINY, "batch": [0]}, "batch values are positive integers"),
    ({"impl": ["reference"], **TINY, "model": [{"name": "gemma-3-1b", "weights": "gguf"}]}, "only for gemma-3-270m"),
])
def test_malformed_suites_are_one_line_errors(tmp_path, block, message):
    with pytest.raises(SuiteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_suite(_suite(tmp_path, [block]))


def test_filter_and_shards_partition_the_cells(tmp_path):
    suite = load_suite(_suite(tmp_path, [{"impl": ["reference", "hf"], "attn": ["eager", "sdpa"], **TINY,
                                          "batch": [1, 2, 4], "prompt": [8, 16]}]))
    assert len(suite.cells) == 18
    small = select(suite.cells, "impl=hf,batch<=2,attn!=sdpa")
    assert {(c.impl, c.attn, c.batch) for c in small} == {("hf", "eager", 1), ("hf", "eager", 2)}
    shards = [select(suite.cells, shard=(i, 3)) for i in (1, 2, 3)]
    ids = [c.cell_id for s in shards for c in s]
    assert sorted(ids) == sorted(c.cell_id for c in suite.cells) and len(set(ids)) == len(ids)
    with pytest.raises(SuiteError, match="cannot read"):
        parse_filter("colour=red")


# --- records --------------------------------------------------------------------------------------

def _record(cid, **extra):
    return {"schema": records.SCHEMA, "cell_id": cid, "label": cid, "status": "ok", "metrics": {}, **extra}


def test_a_partial_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "records.jsonl"
    records.append_record(path, _record("c-1"))
    with open(path, "ab") as f:
        f.write(b'{"schema": "gemma-harness/bench-rec')  # a write cut by a kill
    assert [r["cell_id"] for r in records.iter_records(path)] == ["c-1"]
    records.append_record(path, _record("c-2"))
    assert [r["cell_id"] for r in records.iter_records(path)] == ["c-1", "c-2"]
    assert path.read_bytes().count(b"\n") == 2


def test_a_malformed_line_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"not": "a record"}\n')
    with pytest.raises(records.RecordsError, match="records.jsonl:1: not a benchmark record"):
        list(records.iter_records(path))


def test_merge_deduplicates_and_reports_conflicts():
    a, b = [_record("c-1"), _record("c-2")], [_record("c-2"), _record("c-3", started_at="x")]
    merged, conflicts = records.merge([a, b])
    assert [r["cell_id"] for r in merged] == ["c-1", "c-2", "c-3"] and not conflicts
    merged, conflicts = records.merge([a, [_record("c-1", status="error")]])
    assert len(merged) == 2 and len(conflicts) == 1 and "c-1" in conflicts[0]


# --- metrics and cost model -----------------------------------------------------------------------

def test_latency_metrics_follow_vllm_bench_definitions():
    cell = Cell(impl="reference", model="gemma-3-270m-tiny", dtype="float32", batch=2, prompt=10, gen=4)
    stamps = [[0.100, 0.110, 0.130, 0.160], [0.200, 0.210, 0.220, 0.230]]
    m, samples = latency_metrics(stamps, cell)
    assert m["ttft_ms"]["mean"] == pytest.approx(150) and m["e2el_ms"]["mean"] == pytest.approx(195)
    assert samples["tpot_ms"] == pytest.approx([20, 10])  # (last - first) / (G - 1): the first token excluded
    assert m["itl_ms"]["n"] == 6 and m["itl_ms"]["mean"] == pytest.approx(15)
    assert m["output_throughput"] == pytest.approx(2 * 2 * 4 / 0.39)
    assert m["prefill_tok_s"] == pytest.approx(2 * 2 * 10 / 0.3)
    assert m["decode_tok_s"] == pytest.approx(2 * 2 * 3 / 0.09)


@pytest.mark.parametrize("name", configs.names(tiny=False))
def test_parameter_count_matches_the_published_total(name):
    """The cost model counts what the reference builds; the released configs carry their published totals."""
    facts = cost.model_facts(ModelSpec.from_hf_config(configs.hf_config(name)))
    published = configs.load(name)["published_params"]
    text_total = published.get("text", published["total"])
    assert abs(facts["params"] - text_total) / text_total < 0.06, (facts["params"], published)


def test_kv_bytes_follow_the_layer_types():
    spec = ModelSpec.from_hf_config(configs.hf_config("gemma-3-1b"))
    window = next(layer.window for layer in spec.layers if layer.window)
    sliding = [layer for layer in spec.layers if layer.window]
    full = [layer for layer in spec.layers if not layer.window]
    assert len(sliding) == 5 * len(full) + (len(spec.layers) - 6 * len(full))
    assert tokens_held(sliding[0], 10 * window) == window and tokens_held(full[0], 10 * window) == 10 * window
    per_token = full[0].num_kv_heads * full[0].head_dim * 2 * 2
    assert kv_bytes(spec, 4096, dtype_bytes=2) == per_token * (len(full) * 4096 + len(sliding) * window)
    e2b = ModelSpec.from_hf_config(configs.hf_config("gemma-4-e2b"))
    shared = [layer for layer in e2b.layers if not layer.has_kv]
    assert shared and all(tokens_held(layer, 4096) == 0 for layer in shared)


# --- the runner, end to end -----------------------------------------------------------------------

def test_sweep_records_are_complete_and_consistent(tmp_path):
    sweep = [{"impl": ["reference", "hf", "tests.bench_ports:NoGenerate", "tests.bench_ports:CrashesInGenerate"],
              **TINY, "batch": [2]}]
    suite = _suite(tmp_path, sweep)
    proc = _bench(suite, "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr[-2000:]  # the crashing port's cell is an error
    recs = records.load([tmp_path / "out"])
    by_impl = {r["cell"]["impl"]: r for r in recs}
    assert by_impl["tests.bench_ports:NoGenerate"]["status"] == "unsupported"
    assert "no bench_generate()" in by_impl["tests.bench_ports:NoGenerate"]["reason"]
    crash = by_impl["tests.bench_ports:CrashesInGenerate"]
    assert crash["status"] == "error" and "RuntimeError: kernel launch failed" in crash["reason"]
    expected = {c.cell_id for c in load_suite(suite).cells}
    assert check.run_problems(recs, expected) == []
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        assert r["kv_cache"]["after_last_token_bytes"] > r["kv_cache"]["after_prefill_bytes"] > 0
        assert r["roofline"]["decode_bw_pct"] > 0 and r["roofline"]["prefill_flop_pct"] > 0
        assert r["context"]["device"]["type"] == "cpu" and r["context"]["suite_hash"]
    # the same model, the same cache geometry: the reference and HF hold the same K/V bytes
    assert by_impl["reference"]["kv_cache"] == {**by_impl["hf"]["kv_cache"], "source": "reference.cache_bytes()"}
    assert "error" in proc.stdout and "unsupported" in proc.stdout


def test_a_hanging_cell_times_out_and_the_sweep_goes_on(tmp_path):
    suite = _suite(tmp_path, [{"impl": ["tests.bench_ports:Hangs", "reference"], **TINY}], timeout_s=40)
    proc = _bench(suite, "--out", tmp_path / "out", "-q")
    recs = {r["cell"]["impl"]: r for r in records.load([tmp_path / "out"])}
    assert proc.returncode == 1
    assert recs["tests.bench_ports:Hangs"]["status"] == "error"
    assert "timed out after 40 s" in recs["tests.bench_ports:Hangs"]["reason"]
    assert recs["reference"]["status"] == "ok"


def _records_now(out: Path) -> int:
    path = records.records_path(out)
    return len(list(records.iter_records(path))) if path.exists() else 0


def test_killed_sweep_resumes_without_losing_or_duplicating_a_cell(tmp_path):
    """SIGKILL the runner at random moments (once just after a record was written, once early, during
    start-up or a cell), resume each time: every cell exactly once at the end."""
    suite = _suite(tmp_path, [{"impl": ["reference"], **TINY, "batch": [1, 2], "gen": [2, 3]}])
    out = tmp_path / "out"
    expected = {c.cell_id for c in load_suite(suite).cells}
    rng = random.Random(0)

    def start():
        cmd = [sys.executable, "-m", "harness.cli", "bench", str(suite), "--out", str(out), "-q"]
        return subprocess.Popen(cmd + (["--resume"] if out.exists() else []), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill_when(proc, ready, then_wait=0.0):
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(then_wait)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    proc = start()  # killed 0-2 s after its first record: mid-way through the next cell
    kill_when(proc, lambda: _records_now(out) >= 1, then_wait=rng.uniform(0, 2))
    first = _records_now(out)
    assert 1 <= first < len(expected)
    proc = start()  # killed early: during start-up or the first resumed cell
    delay = time.monotonic() + rng.uniform(1, 6)
    kill_when(proc, lambda: time.monotonic() > delay)
    proc = start()
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-2000:]
    recs = records.load([out])
    assert check.run_problems(recs, expected) == []


def test_shards_merge_into_the_unsharded_cell_set(tmp_path):
    suite = _suite(tmp_path, [{"impl": ["reference"], **TINY, "gen": [2, 3]}])
    listed = _bench(suite, "--out", tmp_path / "x", "--list").stdout.split()
    all_ids = {w for w in listed if w.startswith("c-")}
    for i in (1, 2):
        assert _bench(suite, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2", "-q").returncode == 0
    merged = subprocess.run([sys.executable, "-m", "harness.cli", "report", "merge", tmp_path / "s1", tmp_path / "s2",
                             "--out", tmp_path / "all"], cwd=ROOT, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    recs = records.load([tmp_path / "all"])
    assert {r["cell_id"] for r in recs} == all_ids and len(recs) == len(all_ids) == 2
    again = subprocess.run([sys.executable, "-m", "harness.cli", "merge", tmp_path / "s1", tmp_path / "all",
                            "--out", tmp_path / "all2"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and len(records.load([tmp_path / "all2"])) == 2  # same records: no conflict


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    suite = _suite(tmp_path, [{"impl": ["reference"], **TINY}])
    records.append_record(records.records_path(tmp_path / "out"), _record("c-x"))
    proc = _bench(suite, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "already holds 1 records: --resume" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_suite_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: [{impl: [reference], model: [gemma-3-270m-tiny], batch: [1], prompt: [4]}]")
    proc = _bench(bad, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "'gen' is missing" in proc.stderr


def test_regression_gate_flags_a_real_slowdown_and_stays_quiet_on_the_same_code(tmp_path):
    """Three runs of one cell: the baseline, the same code again, and the same code doing its forward
    twice (a real slowdown of the same path). The gate must flag the third and only the third."""
    from harness.bench.regress import compare

    sweep = [{"impl": ["tests.bench_ports:Reference"], "model": [{"name": "gemma-3-270m", "layers": 1}],
              "dtype": ["float32"], "batch": [1], "prompt": [32], "gen": [6]}]
    # One torch thread: with two on this 2-core machine, two runs of the same code differed by 2.8-10.2 %
    # in mean e2el/TPOT (p < 0.01 in 2 of 3 pairs of separate runs, measured 2026-11-30), a real
    # between-run shift the within-run repetitions cannot see; with one, by 0.8-5.0 %.
    suite = _suite(tmp_path, sweep, min_reps=8, max_reps=8, max_seconds=60, threads=1)
    for run, slow in (("base", "0"), ("same", "0"), ("slow", "1")):
        proc = _bench(suite, "--out", tmp_path / run, "-q", env={"GEMMA_TEST_SLOWDOWN": slow})
        assert proc.returncode == 0, proc.stderr[-2000:]
    base, same, slow = (records.load([tmp_path / run]) for run in ("base", "same", "slow"))
    # The gate's default 5 % threshold is meant for a quiet benchmark machine. On CI's 2 shared cores the
    # same code, one thread, measured -6.0 to +5.8 % between runs (this test failed 1 of 3 fresh-clone CI
    # runs at 5 %, 2026-11-30), while doing the forward twice measured +83 to +93 % (2026-12-01). At 25 %
    # the threshold sits 4x above that drift and 3x below the slowdown, so both verdicts test the gate's
    # rule (size AND significance) rather than this machine's between-run noise.
    threshold = 0.25
    quiet = compare(same, base, threshold=threshold)
    assert not quiet.failed, quiet.markdown()
    flagged = compare(slow, base, threshold=threshold)
    assert flagged.failed and {c.metric for c in flagged.regressions} >= {"tpot_ms", "e2el_ms"}, flagged.markdown()
    report = subprocess.run([sys.executable, "-m", "harness.cli", "report", tmp_path / "slow", "--baseline",
                             tmp_path / "base", "--md", tmp_path / "r.md"], cwd=ROOT, capture_output=True, text=True)
    assert report.returncode == 1, report.stderr
    assert "regression" in (tmp_path / "r.md").read_text().lower()


def test_sweep_over_a_local_ray_instance(tmp_path):
    """--ray: one task per cell, the driver appending each record as its result arrives."""
    pytest.importorskip("ray")
    suite = _suite(tmp_path, [{"impl": ["reference", "hf"], **TINY}])
    proc = _bench(suite, "--out", tmp_path / "out", "--ray", "local", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records.load([tmp_path / "out"])
    assert check.run_problems(recs, {c.cell_id for c in load_suite(suite).cells}) == []
    assert all(r["context"]["node"] for r in recs) and all(r["roofline"]["bandwidth_gb_s"] for r in recs)


def test_a_port_without_generate_is_unsupported_not_benchmarked_through_a_loop_of_ours():
    import torch

    from harness.adapters import HFCausalLMAdapter, Unsupported

    adapter = HFCausalLMAdapter(torch.nn.Linear, name="plain")
    adapter.model = torch.nn.Linear(2, 2)
    with pytest.raises(Unsupported, match="Linear has no generate"):
        adapter.bench_generate(torch.zeros(1, 3, dtype=torch.long), 2, lambda t: None)


@pytest.mark.gpu
def test_cuda_cell_records_gpu_memory_energy_and_device_facts(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    suite = _suite(tmp_path, [{"impl": ["reference", "hf"], **TINY, "device": ["cuda:0"]}])
    proc = _bench(suite, "--out", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records.load([tmp_path / "out"])
    assert check.run_problems(recs, {c.cell_id for c in load_suite(suite).cells}) == []
    for r in recs:
        assert r["memory"]["torch_max_allocated_bytes"] > 0
        assert r["context"]["device"]["type"] == "cuda" and r["context"]["device"].get("uuid")
        assert r["roofline"]["bandwidth_gb_s"] > 100  # any datacenter GPU; a CPU probe would be ~10-50


def test_a_cuda_cell_on_a_machine_without_cuda_is_unsupported(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    suite = _suite(tmp_path, [{"impl": ["reference"], **TINY, "device": ["cuda:0"]}])
    proc = _bench(suite, "--out", tmp_path / "out", "-q")
    assert proc.returncode == 0
    (record,) = records.load([tmp_path / "out"])
    assert record["status"] == "unsupported" and "no CUDA device here" in record["reason"]


def test_retry_errors_reruns_only_the_error_cells(tmp_path):
    path = records.records_path(tmp_path)
    for cid, status in (("c-1", "ok"), ("c-2", "error"), ("c-3", "unsupported")):
        records.append_record(path, _record(cid, status=status))
    assert records.drop_errors(path) == 1
    assert [r["cell_id"] for r in records.iter_records(path)] == ["c-1", "c-3"]
    assert records.finished_ids(path) == {"c-1", "c-3"}
