"""Benchmark suites: a YAML sweep expanded into cells.

A suite file::

    name: cpu-quick
    seed: 0
    settings:            # per cell; every key optional
      warmup: 1          # untimed runs before the timed ones (the first also measures the KV cache)
      min_reps: 3        # timed repetitions: at least this many ...
      max_reps: 10       # ... at most this many, stopping once e2el's coefficient of variation <= target_cv
      target_cv: 0.05
      max_seconds: 60    # stop adding repetitions past this much timed work
      timeout_s: 600     # a cell's child process is killed past this
      profile: false     # true: one more generation under torch.profiler, its top operators recorded
      threads: null      # torch intra-op threads in each cell (null: torch's default); recorded in the context
    sweep:               # a list of blocks; each block is the product of its lists
      - impl: [reference, hf]          # reference | hf | vllm | MODULE:OBJECT
        attn: [eager, sdpa]            # hf only (ignored, and not multiplied, for other impls)
        model: [gemma-3-270m-tiny, {name: gemma-3-1b, layers: 4}, {name: gemma-3-270m, weights: gguf}]
        dtype: [float32, bfloat16]
        batch: [1, 8]
        prompt: [64]
        gen: [16]
        device: [cpu]
        options: {}                    # passed to the implementation (e.g. vllm: tensor_parallel_size)

Every cell is B requests of P prompt tokens each generating G tokens greedily with EOS ignored: the
same work for every implementation. A cell's id is a hash of its parameters only, so it is stable
across runs, machines and suite edits that leave the cell alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

import configs

DEFAULT_SETTINGS = {"warmup": 1, "min_reps": 3, "max_reps": 10, "target_cv": 0.05, "max_seconds": 60.0,
                    "timeout_s": 600.0, "profile": False, "threads": None}
IMPLS_WITH_ATTN = ("hf",)
WEIGHTS = ("random", "gguf")
_AXES = ("impl", "attn", "model", "dtype", "batch", "prompt", "gen", "device")


class SuiteError(ValueError):
    """A suite file that cannot be expanded into cells (one line naming the file and the field)."""


@dataclass(frozen=True)
class Cell:
    impl: str
    model: str
    dtype: str
    batch: int
    prompt: int
    gen: int
    device: str = "cpu"
    attn: str | None = None
    layers: int | None = None  # cut to the first N layers (None: all)
    weights: str = "random"
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def params(self) -> dict:
        return asdict(self)

    @property
    def cell_id(self) -> str:
        canonical = json.dumps(self.params(), sort_keys=True)
        return "c-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def impl_label(self) -> str:
        return f"{self.impl}[{self.attn}]" if self.attn else self.impl

    @property
    def model_label(self) -> str:
        total = layers_total(self.model)
        name = self.model + (" (GGUF)" if self.weights == "gguf" else "")
        return f"{name} ({self.layers}/{total} layers)" if self.layers and self.layers < total else name

    @property
    def label(self) -> str:
        return (f"{self.impl_label} {self.model_label} {self.dtype} B={self.batch} P={self.prompt} "
                f"G={self.gen} {self.device}")


def layers_total(model: str) -> int:
    return configs.hf_config(model)["num_hidden_layers"]


@dataclass
class Suite:
    name: str
    path: str
    hash: str
    seed: int
    settings: dict
    cells: list[Cell]


def _as_list(value, key: str, where: str) -> list:
    if value is None:
        raise SuiteError(f"{where}: '{key}' is missing")
    return value if isinstance(value, list) else [value]


def _model_entries(values: list, where: str) -> list[dict]:
    out = []
    for value in values:
        entry = {"name": value} if isinstance(value, str) else value
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SuiteError(f"{where}: a model is a config name or {{name, layers, weights}}, got {value!r}")
        unknown = set(entry) - {"name", "layers", "weights"}
        if unknown:
            raise SuiteError(f"{where}: model {entry['name']!r} has unknown keys {sorted(unknown)}")
        try:
            total = layers_total(entry["name"])
        except KeyError as exc:
            raise SuiteError(f"{where}: {exc.args[0]}") from None
        layers = entry.get("layers")
        if layers is not None and (not isinstance(layers, int) or not 1 <= layers <= total):
            raise SuiteError(f"{where}: {entry['name']} has {total} layers; layers: {layers!r} is not 1..{total}")
        weights = entry.get("weights", "random")
        if weights not in WEIGHTS:
            raise SuiteError(f"{where}: weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
        if weights == "gguf" and entry["name"] != "gemma-3-270m":
            raise SuiteError(f"{where}: real GGUF weights exist only for gemma-3-270m, not {entry['name']}")
        out.append({"name": entry["name"], "layers": layers if layers != total else None, "weights": weights})
    return out


def _positive_ints(values: list, key: str, where: str) -> list[int]:
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SuiteError(f"{where}: {key} values are positive integers, got {v!r}")
    return values


def _expand(block: dict, where: str) -> list[Cell]:
    unknown = set(block) - set(_AXES) - {"options"}
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)} (expected {', '.join(_AXES)}, options)")
    impls = _as_list(block.get("impl"), "impl", where)
    models = _model_entries(_as_list(block.get("model"), "model", where), where)
    dtypes = _as_list(block.get("dtype", "float32"), "dtype", where)
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise SuiteError(f"{where}: dtype {d!r} is not float32, bfloat16 or float16")
    batches = _positive_ints(_as_list(block.get("batch"), "batch", where), "batch", where)
    prompts = _positive_ints(_as_list(block.get("prompt"), "prompt", where), "prompt", where)
    gens = _positive_ints(_as_list(block.get("gen"), "gen", where), "gen", where)
    devices = _as_list(block.get("device", "cpu"), "device", where)
    for dev in devices:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(dev)):
            raise SuiteError(f"{where}: device {dev!r} is not cpu or cuda:N")
    attns = _as_list(block.get("attn", "eager"), "attn", where)
    options = block.get("options") or {}
    if not isinstance(options, dict):
        raise SuiteError(f"{where}: options is a mapping, got {options!r}")
    cells = []
    for impl, m, dtype, b, p, g, dev in itertools.product(impls, models, dtypes, batches, prompts, gens, devices):
        for attn in (attns if impl in IMPLS_WITH_ATTN else [None]):
            cells.append(Cell(impl=str(impl), model=m["name"], layers=m["layers"], weights=m["weights"],
                              dtype=dtype, batch=b, prompt=p, gen=g, device=str(dev), attn=attn,
                              options=dict(options)))
    return cells


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the suite ({exc.strerror})") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), list) or not data["sweep"]:
        raise SuiteError(f"{path}: a suite is a mapping with a non-empty 'sweep' list")
    settings = dict(DEFAULT_SETTINGS)
    extra = set(data.get("settings") or {}) - set(DEFAULT_SETTINGS)
    if extra:
        raise SuiteError(f"{path}: unknown settings {sorted(extra)} (expected {', '.join(DEFAULT_SETTINGS)})")
    settings.update(data.get("settings") or {})
    cells: list[Cell] = []
    seen: set[str] = set()
    for i, block in enumerate(data["sweep"]):
        if not isinstance(block, dict):
            raise SuiteError(f"{path}: sweep[{i}] is not a mapping")
        for cell in _expand(block, f"{path}: sweep[{i}]"):
            if cell.cell_id not in seen:  # overlapping blocks: each cell once
                seen.add(cell.cell_id)
                cells.append(cell)
    return Suite(name=str(data.get("name", path.stem)), path=str(path), hash=hashlib.sha256(raw).hexdigest()[:12],
                 seed=int(data.get("seed", 0)), settings=settings, cells=cells)


# --filter: comma-separated terms, all must hold: key=value, key!=value, key<N, key<=N, key>N, key>=N;
# a value may list alternatives with | (impl=hf|reference). Keys are the cell's fields.
_TERM = re.compile(r"^\s*(\w+)\s*(==|=|!=|<=|>=|<|>)\s*(.+?)\s*$")


def parse_filter(expr: str):
    """A predicate over cells from a --filter expression (see above); a malformed term is a SuiteError."""
    fields = set(Cell.__dataclass_fields__)
    tests = []
    for term in filter(None, (t.strip() for t in expr.split(","))):
        m = _TERM.match(term)
        if not m or m.group(1) not in fields:
            raise SuiteError(f"--filter: cannot read {term!r} (key=value, key!=value, key<N ...; keys: "
                             f"{', '.join(sorted(fields - {'options'}))})")
        key, op, value = m.groups()
        tests.append((key, op, value.split("|")))

    def matches(cell: Cell) -> bool:
        for key, op, values in tests:
            have = getattr(cell, key)
            if op in ("=", "=="):
                ok = str(have) in values
            elif op == "!=":
                ok = str(have) not in values
            else:
                try:
                    limit = float(values[0])
                except ValueError:
                    raise SuiteError(f"--filter: {key}{op}{values[0]} compares with a number") from None
                if have is None:
                    return False
                ok = {"<": have < limit, "<=": have <= limit, ">": have > limit, ">=": have >= limit}[op]
            if not ok:
                return False
        return True

    return matches


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SuiteError(f"--shard {text!r}: expected i/n with 1 <= i <= n (e.g. 2/4)")
    return int(m.group(1)), int(m.group(2))


def select(cells: list[Cell], filter_expr: str | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
    """The cells a run takes: those matching the filter, then shard i of n, split by cell id (the same
    cell always lands in the same shard, whatever else the suite holds)."""
    if filter_expr:
        keep = parse_filter(filter_expr)
        cells = [c for c in cells if keep(c)]
    if shard:
        i, n = shard
        cells = [c for c in cells if int(c.cell_id[2:], 16) % n == i - 1]
    return cells
