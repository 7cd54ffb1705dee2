"""The published Gemma accuracy tables beside the harness's own lm-eval measurements.

``harness/data/accuracy_tables.yaml`` is the spec: every accuracy number the seed documents
(``shared/seeds/``, secondary sources) publish for a Gemma model, one row each (model, variant, task, shots,
metric, published percent, seed file:line and the quoted line), grouped into the tables they were printed in,
plus a ``tasks`` section saying which tasks the harness has offline data for (and which split).

- :func:`load_spec` / :func:`parse_spec`: the spec, validated (a malformed one raises :class:`ValueError`
  with one line naming the table / row and the field).
- :func:`why_not` / :func:`runnable`: whether a row can run here ("not run: no weights", "not run: no task
  data offline").
- :func:`render`: Markdown and a JSON-able dict, per published table, of published beside measured (± stderr,
  n, split, implementation), the difference in points and a status per row; one line per implementation
  measured. Measured records are the eval command's bench records (``kind: "eval"``; metric values are
  fractions, shown in percent).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

SPEC_SCHEMA = "gemma-harness/accuracy-tables/1"
REPORT_SCHEMA = "gemma-harness/accuracy-report/1"
RECORD_SCHEMA_PREFIX = "gemma-harness/bench-record/"
VARIANTS = ("pt", "it")

MEASURED = "measured"
NOT_RUN = "not run"
NO_WEIGHTS = "not run: no weights"
NO_DATA = "not run: no task data offline"

# when a record lacks the row's metric, the first of these it has is shown (and the swap noted)
FALLBACK_METRICS = ("acc_norm", "acc", "exact_match", "pass@1")

_ROW_REQUIRED = ("model", "variant", "task", "shots", "metric", "published", "source", "quote")
_ROW_OPTIONAL = ("config", "approx", "benchmark", "column", "note")
_TASK_FIELDS = ("title", "metric", "published_split", "local_split", "local", "reason", "note")
_ROW_SOURCE = re.compile(r"^(?P<file>[\w.-]+\.txt):(?P<line>[1-9]\d*)$")
_TABLE_SOURCE = re.compile(r"^[\w.-]+\.txt(:[1-9]\d*(-[1-9]\d*)?)?$")


@dataclass(frozen=True)
class Row:
    """One published number."""

    table: str
    index: int
    model: str
    variant: str
    task: str
    shots: int | None
    metric: str
    published: float
    source: str
    quote: str
    config: str | None = None
    approx: bool = False
    benchmark: str | None = None
    column: str | None = None
    note: str | None = None

    @property
    def where(self) -> str:
        return f"table {self.table!r} row {self.index} ({self.model} {self.task})"

    @property
    def file(self) -> str:
        return self.source.rsplit(":", 1)[0]

    @property
    def line(self) -> int:
        return int(self.source.rsplit(":", 1)[1])

    @property
    def printed(self) -> str:
        """The published number as the source prints it (without the percent sign)."""
        return ("~" if self.approx else "") + str(self.published)


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    source: str
    rows: tuple[Row, ...]
    note: str | None = None


@dataclass(frozen=True)
class TaskInfo:
    """What the harness can run of one task: ``local`` is the offline data (None: none, see ``reason``)."""

    name: str
    title: str
    metric: str
    published_split: str | None
    local_split: str | None
    local: dict | None
    reason: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Spec:
    tables: tuple[Table, ...]
    tasks: dict[str, TaskInfo] = field(default_factory=dict)

    def rows(self) -> list[Row]:
        return [row for table in self.tables for row in table.rows]

    def tasks_with_data(self) -> set[str]:
        """Tasks the harness has offline data for."""
        return {name for name, task in self.tasks.items() if task.local is not None}


# ------------------------------------------------------------------------------------------------ the spec


def _fail(where: str, name: str, problem: str) -> NoReturn:
    raise ValueError(f"accuracy spec: {where}: field {name!r} {problem}")


def _text(d: Mapping, name: str, where: str, required: bool = True) -> str | None:
    value = d.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        _fail(where, name, "missing or not a non-empty string" if required else "not a non-empty string")
    return value


def _opt_text(d: Mapping, name: str, where: str) -> str | None:
    return _text(d, name, where, required=False)


def _shots(d: Mapping, where: str) -> int | None:
    value = d["shots"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        _fail(where, "shots", f"must be a non-negative int or null, not {value!r}")
    return value


def _published(d: Mapping, where: str) -> float:
    value = d["published"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, "published", f"must be a number (percent), not {value!r}")
    if not 0 <= value <= 100:
        _fail(where, "published", f"must be a percent in [0, 100], not {value!r}")
    return float(value)


def parse_row(d: Any, table: str, index: int, tasks: Mapping[str, TaskInfo]) -> Row:
    """One row of a table, validated."""
    where = f"table {table!r} row {index}"
    if not isinstance(d, Mapping):
        _fail(where, "row", "must be a mapping")
    if isinstance(d.get("model"), str):
        where += f" ({d['model']} {d.get('task')})"
    unknown = sorted(set(d) - set(_ROW_REQUIRED) - set(_ROW_OPTIONAL))
    if unknown:
        _fail(where, unknown[0], "is not a row field")
    for name in _ROW_REQUIRED:
        if name not in d:
            _fail(where, name, "missing")
    if d["variant"] not in VARIANTS:
        _fail(where, "variant", f"must be one of {VARIANTS}, not {d['variant']!r}")
    task = _text(d, "task", where)
    if tasks and task not in tasks:
        _fail(where, "task", f"{task!r} is not in the spec's tasks section")
    source = _text(d, "source", where)
    if not _ROW_SOURCE.match(source):
        _fail(where, "source", f"must be 'seed-file.txt:LINE', not {source!r}")
    approx = d.get("approx", False)
    if not isinstance(approx, bool):
        _fail(where, "approx", f"must be a bool, not {approx!r}")
    return Row(
        table=table, index=index, model=_text(d, "model", where), variant=d["variant"], task=task,
        shots=_shots(d, where), metric=_text(d, "metric", where), published=_published(d, where),
        source=source, quote=_text(d, "quote", where).strip(), config=_opt_text(d, "config", where),
        approx=approx, benchmark=_opt_text(d, "benchmark", where), column=_opt_text(d, "column", where),
        note=_opt_text(d, "note", where),
    )


def parse_table(d: Any, index: int, tasks: Mapping[str, TaskInfo]) -> Table:
    where = f"table {index}"
    if not isinstance(d, Mapping):
        _fail(where, "table", "must be a mapping")
    table_id = _text(d, "id", where)
    where = f"table {table_id!r}"
    source = _text(d, "source", where)
    if not _TABLE_SOURCE.match(source):
        _fail(where, "source", f"must be 'seed-file.txt[:FIRST[-LAST]]', not {source!r}")
    rows = d.get("rows")
    if not isinstance(rows, list) or not rows:
        _fail(where, "rows", "missing or not a non-empty list")
    return Table(
        id=table_id, title=_text(d, "title", where), source=source, note=_opt_text(d, "note", where),
        rows=tuple(parse_row(row, table_id, i, tasks) for i, row in enumerate(rows)),
    )


def parse_task(name: str, d: Any) -> TaskInfo:
    where = f"task {name!r}"
    if not isinstance(d, Mapping):
        _fail(where, "task", "must be a mapping")
    unknown = sorted(set(d) - set(_TASK_FIELDS))
    if unknown:
        _fail(where, unknown[0], "is not a task field")
    local = d.get("local")
    if local is not None and not isinstance(local, Mapping):
        _fail(where, "local", "must be a mapping or null")
    if local is None and not d.get("reason"):
        _fail(where, "reason", "missing (required where local is null)")
    return TaskInfo(
        name=name, title=_text(d, "title", where), metric=_text(d, "metric", where),
        published_split=_opt_text(d, "published_split", where), local_split=_opt_text(d, "local_split", where),
        local=dict(local) if local is not None else None, reason=_opt_text(d, "reason", where),
        note=_opt_text(d, "note", where),
    )


def parse_spec(data: Any) -> Spec:
    """A spec from its parsed YAML (a mapping with ``tasks`` and ``tables``)."""
    if not isinstance(data, Mapping):
        _fail("spec", "spec", "must be a mapping")
    if data.get("schema", SPEC_SCHEMA) != SPEC_SCHEMA:
        _fail("spec", "schema", f"must be {SPEC_SCHEMA!r}, not {data.get('schema')!r}")
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, Mapping) or not raw_tasks:
        _fail("spec", "tasks", "missing or not a non-empty mapping")
    tasks = {str(name): parse_task(str(name), d) for name, d in raw_tasks.items()}
    raw_tables = data.get("tables")
    if not isinstance(raw_tables, list) or not raw_tables:
        _fail("spec", "tables", "missing or not a non-empty list")
    tables = tuple(parse_table(d, i, tasks) for i, d in enumerate(raw_tables))
    seen = Counter(table.id for table in tables)
    dup = [table_id for table_id, count in seen.items() if count > 1]
    if dup:
        _fail(f"table {dup[0]!r}", "id", "is not unique")
    return Spec(tables=tables, tasks=tasks)


def load_spec(path: str | Path | None = None) -> Spec:
    """The accuracy spec at ``path`` (default: the packaged ``harness/data/accuracy_tables.yaml``)."""
    if path is None:
        text = resources.files("harness").joinpath("data/accuracy_tables.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"accuracy spec: not YAML: {' '.join(str(exc).split())}") from None
    return parse_spec(data)


# ------------------------------------------------------------------------------------------------ runnable


def why_not(row: Row, models_with_weights: Iterable[str], tasks_with_data: Iterable[str]) -> str | None:
    """Why ``row`` cannot run here (no weights first, then no task data), or None when it can."""
    if row.model not in set(models_with_weights):
        return NO_WEIGHTS
    if row.task not in set(tasks_with_data):
        return NO_DATA
    return None


def runnable(spec: Spec, models_with_weights: set[str], tasks_with_data: set[str]) -> list[Row]:
    """The rows of ``spec`` that can run here."""
    return [row for row in spec.rows() if why_not(row, models_with_weights, tasks_with_data) is None]


# ------------------------------------------------------------------------------------------------ records


def eval_records(records: Iterable[dict]) -> list[dict]:
    """The eval records among ``records``, one per cell_id (the last one wins)."""
    by_id: dict[Any, dict] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or rec.get("kind") != "eval":
            continue
        if not str(rec.get("schema", RECORD_SCHEMA_PREFIX)).startswith(RECORD_SCHEMA_PREFIX):
            continue
        if not isinstance(rec.get("cell"), Mapping):
            continue
        by_id[rec.get("cell_id") or f"#{i}"] = dict(rec)
    return list(by_id.values())


def _metric(metrics: Mapping, name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of one metric, as fractions; a bare number is a value without stderr."""
    m = metrics.get(name)
    if isinstance(m, Mapping):
        return m.get("value"), m.get("stderr")
    if isinstance(m, (int, float)) and not isinstance(m, bool):
        return float(m), None
    return None, None


def _pick_metric(metrics: Mapping, wanted: str) -> str | None:
    for name in (wanted, *FALLBACK_METRICS, *sorted(metrics)):
        if _metric(metrics, name)[0] is not None:
            return name
    return None


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def implementation(cell: Mapping) -> str:
    """'impl (weights, dtype)', e.g. 'reference (gguf-q4_k_m-dequantized, float32)'."""
    extra = [str(cell[k]) for k in ("weights", "dtype") if cell.get(k)]
    return str(cell.get("impl", "?")) + (f" ({', '.join(extra)})" if extra else "")


def measurement(rec: Mapping, metric: str, task: TaskInfo | None = None, row: Row | None = None) -> dict:
    """One ok record as a measured line: the metric in percent, stderr, n, split, and what differs from
    the published conditions (split, shots, metric, a limit)."""
    cell = rec["cell"]
    metrics = rec.get("metrics") or {}
    name = _pick_metric(metrics, metric)
    value, stderr = _metric(metrics, name) if name else (None, None)
    value, stderr = _pct(value), _pct(stderr)
    notes = []
    if name is None:
        notes.append("the record carries no metric")
    elif name != metric:
        notes.append(f"{metric} not in the record; {name} shown")
    split, shots, limit = cell.get("split"), cell.get("num_fewshot"), cell.get("limit")
    published_split = task.published_split if task else None
    if row is not None:
        if published_split and split and split != published_split:
            notes.append(f"split differs: published {published_split}, measured {split}")
        if row.shots is None:
            notes.append("published shots not stated")
        elif shots is not None and shots != row.shots:
            notes.append(f"shots differ: published {row.shots}, measured {shots}")
        if row.approx:
            notes.append("published number approximate")
    if limit:
        notes.append(f"limit {limit}: a subset of the split")
    diff = value - row.published if row is not None and value is not None else None
    return {
        "implementation": implementation(cell), "impl": cell.get("impl"), "weights": cell.get("weights"),
        "dtype": cell.get("dtype"), "device": cell.get("device"), "metric": name, "value": value,
        "stderr": stderr, "n": rec.get("n"), "split": split, "shots": shots, "limit": limit,
        "diff_points": diff, "diff_se": abs(diff) / stderr if diff is not None and stderr else None,
        "cell_id": rec.get("cell_id"), "notes": notes,
    }


def _problem(rec: Mapping) -> str:
    reason = " ".join(str(rec.get("reason") or "no reason given").split())
    return f"{rec.get('status')}: {reason}"


def _row_result(row: Row, recs: list[dict], task: TaskInfo, weights: set[str], data: set[str]) -> dict:
    ok = [rec for rec in recs if rec.get("status") == "ok"]
    failed = [rec for rec in recs if rec.get("status") in ("error", "unsupported")]
    why = why_not(row, weights, data)
    if ok:
        status = MEASURED
    elif failed:
        errors = [rec for rec in failed if rec.get("status") == "error"]
        status = _problem((errors or failed)[-1])
    else:
        status = why or NOT_RUN
    out = asdict(row)
    out.update(
        status=status, why_not=why, published_split=task.published_split,
        measured=[measurement(rec, row.metric, task, row) for rec in ok],
        problems=[{"implementation": implementation(rec["cell"]), "status": rec.get("status"),
                   "reason": rec.get("reason"), "cell_id": rec.get("cell_id")} for rec in failed],
    )
    return out


def _unmatched(recs: list[dict], spec: Spec) -> list[dict]:
    """Records for a (model, task) no published row has: all metrics, so nothing measured goes unseen."""
    out = []
    for rec in recs:
        cell = rec["cell"]
        task = spec.tasks.get(str(cell.get("task")))
        entry = {"model": cell.get("model"), "task": cell.get("task"), "status": rec.get("status")}
        if rec.get("status") == "ok":
            entry.update(measurement(rec, task.metric if task else "acc", task))
            entry["all_metrics"] = {
                name: {"value": _pct(_metric(rec["metrics"], name)[0]),
                       "stderr": _pct(_metric(rec["metrics"], name)[1])}
                for name in sorted(rec.get("metrics") or {}) if _metric(rec["metrics"], name)[0] is not None
            }
        else:
            entry.update(implementation=implementation(cell), reason=rec.get("reason"),
                         shots=cell.get("num_fewshot"), split=cell.get("split"), cell_id=rec.get("cell_id"))
        out.append(entry)
    return out


def render(
    spec: Spec,
    records: list[dict],
    *,
    models_with_weights: Iterable[str] | None = None,
    tasks_with_data: Iterable[str] | None = None,
) -> tuple[str, dict]:
    """Markdown and a JSON-able dict: each published table with the measurements beside it.

    ``models_with_weights``: models the harness has weights for (any model with an eval record counts too);
    ``tasks_with_data``: default the spec's tasks with offline data. Renders with zero records.
    """
    recs = eval_records(records)
    weights = set(models_with_weights or ()) | {str(rec["cell"].get("model")) for rec in recs}
    data = spec.tasks_with_data() if tasks_with_data is None else set(tasks_with_data)
    by_key: dict[tuple, list[dict]] = {}
    for rec in recs:
        by_key.setdefault((rec["cell"].get("model"), rec["cell"].get("task")), []).append(rec)
    tables = []
    for table in spec.tables:
        rows = [_row_result(row, by_key.get((row.model, row.task), []), spec.tasks[row.task], weights, data)
                for row in table.rows]
        tables.append({"id": table.id, "title": table.title, "source": table.source, "note": table.note,
                       "rows": rows})
    published = {(row.model, row.task) for row in spec.rows()}
    unmatched = _unmatched([rec for rec in recs if (rec["cell"].get("model"), rec["cell"].get("task"))
                            not in published], spec)
    statuses = Counter(row["status"] for table in tables for row in table["rows"])
    report = {
        "schema": REPORT_SCHEMA,
        "summary": {"rows": sum(statuses.values()), "records": len(recs),
                    "ok_records": sum(rec.get("status") == "ok" for rec in recs),
                    "by_status": dict(sorted(statuses.items()))},
        "tables": tables,
        "unmatched": unmatched,
    }
    return render_markdown(report), report


# ------------------------------------------------------------------------------------------------ Markdown


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _measured_cell(m: Mapping) -> str:
    if m.get("value") is None:
        return "—"
    return _num(m["value"]) + (f" ± {_num(m['stderr'])}" if m.get("stderr") is not None else "")


def _diff_cell(m: Mapping) -> str:
    if m.get("diff_points") is None:
        return "—"
    return _num(m["diff_points"], signed=True) + (f" ({m['diff_se']:.1f}σ)" if m.get("diff_se") else "")


def _short_source(source: str) -> str:
    """'000_9307dc036eed8d65.txt:25' -> '000:25'."""
    file, _, line = source.partition(":")
    return file.split("_", 1)[0] + (f":{line}" if line else "")


_HEAD = ("| model | task | shots | metric | published | source | measured | n | split | implementation | Δ pts "
         "| status | notes |")


def _table_lines(table: Mapping) -> list[str]:
    out = [f"## {table['id']}: {table['title']}", "", f"Source: `{table['source']}`."]
    if table.get("note"):
        out[-1] += " " + _cell(table["note"])
    out += ["", _HEAD, "|" + "---|" * 13]
    footnotes: list[str] = []
    for row in table["rows"]:
        published = ("~" if row["approx"] else "") + str(row["published"])
        if row.get("note"):
            footnotes.append(row["note"])
            published += f" [{len(footnotes)}]"
        shots = "—" if row["shots"] is None else f"{row['shots']}-shot"
        lead = f"| {row['model']} | {row['task']} | {shots} | {row['metric']} | {published} " \
               f"| {_short_source(row['source'])} "
        for m in row["measured"]:
            out.append(
                lead + f"| {_measured_cell(m)} | {_cell(m['n'])} | {_cell(m['split'])} "
                f"| {_cell(m['implementation'])} | {_diff_cell(m)} | {MEASURED} | {_cell('; '.join(m['notes']))} |"
            )
        for p in row["problems"]:
            status = _cell(f"{p['status']}: {p['reason'] or 'no reason given'}")
            out.append(lead + f"| — | — | — | {_cell(p['implementation'])} | — | {status} | |")
        if not row["measured"] and not row["problems"]:
            out.append(lead + f"| — | — | — | — | — | {_cell(row['status'])} | |")
    if footnotes:
        out += ["", *(f"[{i}] {_cell(note)}  " for i, note in enumerate(footnotes, 1))]
    return out + [""]


def _unmatched_lines(unmatched: list[Mapping]) -> list[str]:
    out = ["## Measured without a published number", ""]
    if not unmatched:
        return out + ["None.", ""]
    out += ["| model | task | shots | split | n | implementation | metrics | status |", "|" + "---|" * 8]
    for u in unmatched:
        metrics = "; ".join(
            f"{name} {_measured_cell(m)}" for name, m in (u.get("all_metrics") or {}).items()
        ) or "—"
        status = u["status"] if u["status"] == "ok" else _cell(f"{u['status']}: {u.get('reason')}")
        out.append(f"| {_cell(u['model'])} | {_cell(u['task'])} | {_cell(u.get('shots'))} | {_cell(u.get('split'))} "
                   f"| {_cell(u.get('n'))} | {_cell(u.get('implementation'))} | {_cell(metrics)} | {status} |")
    return out + [""]


def render_markdown(report: Mapping) -> str:
    """The Markdown of a :func:`render` report."""
    summary = report["summary"]
    counts = ", ".join(f"{n} {status}" for status, n in summary["by_status"].items())
    files = sorted({row["source"].split(":")[0] for t in report["tables"] for row in t["rows"]})
    out = [
        "# Published Gemma accuracy vs measured",
        "",
        "Published: `harness/data/accuracy_tables.yaml`, transcribed from the seed documents in `shared/seeds/`",
        "(secondary sources). Measured: the harness's eval records, in percent, ± the stderr lm-eval reports;",
        "Δ = measured − published in points (σ: |Δ| over the measured stderr). One line per implementation",
        "measured. Metrics are the task's usual ones where the source states none.",
        "",
        f"{summary['rows']} published rows ({counts}); {summary['records']} eval records, "
        f"{summary['ok_records']} ok.",
        "",
    ]
    for table in report["tables"]:
        out += _table_lines(table)
    out += _unmatched_lines(report["unmatched"])
    out += ["Source column: the seed file's 3-digit prefix and line; files: " + ", ".join(files) + ".", ""]
    return "\n".join(out)
