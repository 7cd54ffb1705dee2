"""``gemma-harness``: conformance gate and helpers.

Exit codes: 0 everything passed; 1 a check failed or a candidate errored (a malformed config file is
its run's error); 2 bad usage or input, refused before any work (an unknown model or dtype, an output
path that cannot be written, a file that is not a results file or that ``--resume`` may not reuse, a
run that does not fit in memory); 3 an internal error of the harness, printed as one line
(``GEMMA_HARNESS_DEBUG=1`` re-raises it, traceback and all); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING

import configs

if TYPE_CHECKING:
    from .adapters import Adapter
    from .gate import ConformanceResult, Plan

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_RUN_FIELDS = ("candidate", "implementation", "seed", "harness")  # the key fields every run of a command shares


class Refused(Exception):
    """Bad usage or input, found before any work: the message is the one line printed (exit 2)."""


def _check_output_path(path: str | None, flag: str) -> str | None:
    """Why ``path`` cannot be written (a folder, a parent that is a file, a place this process cannot
    write to), or None. Checked before any work, so a long run does not end on a bad path; missing
    folders are fine (they are created when it is written)."""
    if path is None:
        return None
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"{flag} {path}: is a directory"
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        return f"{flag} {path}: cannot write in {parent} ({exc.strerror})"
    return None


def _check_outputs(args, *flags: str) -> None:
    """Refuse the first of the output options ``flags`` (e.g. "--json") whose path cannot be written, or
    two of them naming the same file (the second would overwrite the first)."""
    seen: dict[str, str] = {}
    for flag in flags:
        path = getattr(args, flag.lstrip("-"))
        problem = _check_output_path(path, flag)
        if problem:
            raise Refused(problem)
        if path is not None:
            same = seen.setdefault(os.path.realpath(path), flag)
            if same != flag:
                raise Refused(f"{same} and {flag} name the same file {path}: give each its own")


def _dtypes(text: str) -> list[str]:
    """The comma-separated dtypes (each once), each one the tolerance policy knows."""
    from .tolerance import POLICY

    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    for dtype in dtypes or [text]:
        if dtype not in POLICY:
            raise Refused(f"unknown dtype {dtype!r}; choose from {', '.join(POLICY)}")
    return list(dict.fromkeys(dtypes))


def _check_model(name: str) -> None:
    """Refuse a model name that names no config file, or a malformed one."""
    try:
        configs.load(name)
    except KeyError as exc:
        raise Refused(exc.args[0]) from None
    except configs.ConfigError as exc:
        raise Refused(f"malformed config {exc}") from None


def _cmd_configs(args) -> int:
    from reference_impl.spec import ModelSpec
    from reference_impl.weights import count_parameters

    for reason in configs.broken().values():
        print(f"warning: left out malformed config {reason}", file=sys.stderr)
    tiny = True if args.tiny else (False if args.released else None)
    rows = []
    for name in configs.names(tiny=tiny, core=None):
        spec = ModelSpec.from_hf_config(configs.hf_config(name))
        kinds = "".join("G" if layer.attention == "global" else "s" for layer in spec.layers)
        layer0 = spec.layers[0]
        rows.append({
            "name": name, "family": spec.hf_config.get("model_type", spec.family), "layers": spec.num_layers, "hidden": spec.hidden_size,
            "heads": f"{layer0.num_heads}/{layer0.num_kv_heads}x{layer0.head_dim}", "window": spec.max_window,
            "pattern": kinds, "params": count_parameters(spec)["total"],
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'name':<20} {'family':<12} {'layers':>6} {'hidden':>6} {'heads':>10} {'window':>6} {'params':>15}  pattern (s=sliding, G=global)")
    for r in rows:
        pattern = r["pattern"] if len(r["pattern"]) <= 24 else r["pattern"][:24] + "…"
        print(f"{r['name']:<20} {r['family']:<12} {r['layers']:>6} {r['hidden']:>6} {r['heads']:>10} "
              f"{r['window'] or '-':>6} {r['params']:>15,}  {pattern}")
    return EXIT_OK


def _conform_models(args) -> tuple[list[str], dict[str, str]]:
    """The models to run, and the malformed config files (name -> reason): a malformed one asked for is its
    run's ERROR, so one bad file neither hides the rest nor goes unnoticed."""
    broken = configs.broken()
    if args.all:  # a malformed file cannot say whether it is a twin: its name does
        return configs.names(tiny=True, core=None) + [n for n in broken if n.endswith("-tiny")], broken
    if not args.model:
        raise Refused("give --model NAME or --all")
    for model in args.model:
        if model not in broken:
            _check_model(model)
    return list(dict.fromkeys(args.model)), broken


def _check_layers(layers: int | None, models: list[str]) -> None:
    """Refuse a ``--layers`` below 1 or above a model's layer count."""
    if layers is None:
        return
    if layers < 1:
        raise Refused(f"--layers {layers}: must be at least 1")
    for model in models:
        total = configs.text_config(configs.hf_config(model))["num_hidden_layers"]
        if layers > total:
            raise Refused(f"--layers {layers}: {model} has only {total} layers")


def _this_run(candidate: str, seed: int) -> tuple[Adapter | None, dict]:
    """The candidate resolved once (its name goes into every run's key; a vLLM-like one changes the
    config it runs), and the key fields all runs share. A candidate that cannot be resolved is left to
    each run to report as its ERROR, named as given."""
    from . import version_string
    from .adapters import AdapterError, resolve
    from .gate import candidate_label

    try:
        adapter = resolve(candidate)
    except AdapterError:
        adapter = None
    implementation = adapter.name if adapter is not None else candidate
    return adapter, {"candidate": candidate_label(candidate), "implementation": implementation, "seed": seed,
                     "harness": version_string()}


def _check_fits(plans: dict[tuple[str, str], Plan], adapter: Adapter | None, seed: int) -> None:
    """Refuse, before any work, a run whose memory estimate exceeds what is available (it would be killed
    by the kernel well into the run), with the figures and the largest ``--layers`` that would fit."""
    from . import footprint
    from .gate import plan
    from .tolerance import DTYPES

    free = footprint.available()
    for (model, dtype), run in plans.items():
        if footprint.fits(run.footprint, free):
            continue
        batch, tokens = run.batch.input_ids.shape
        cut = footprint.largest_cut(lambda n, m=model, d=dtype: plan(m, adapter, d, seed, n).spec, batch, tokens,
                                    DTYPES[dtype], configs.hf_config(model)["num_hidden_layers"], free)
        hint = f"--layers {cut} would fit" if cut else "not even its first layer would fit"
        raise Refused(f"{run.label} [{dtype}] needs {run.footprint.describe()}, which does not fit the "
                      f"{free / footprint.GIB:.1f} GiB of memory available (with headroom); {hint}")


def _fields(key: dict, names: list[str]) -> str:
    return ", ".join(f"{name} {key.get(name)}" for name in names)


def _resume_from(path: str, this_run: dict) -> dict[tuple[str, str], dict]:
    """The records of ``path`` by (model, dtype), in file order and as stored: a run reuses the one whose
    key equals its own, the rest are kept. Refused before any work when the file is not a results file,
    or holds a record with no key (an older harness) or of another candidate, implementation, seed or
    harness version: reusing it would report what this run did not compute. No file resumes nothing."""
    from . import report

    if not os.path.exists(path):
        return {}
    refusing = f"refusing to resume from {path}"
    try:
        records = report.load_records(path)
    except report.ResultsFileError as exc:
        raise Refused(f"{refusing}: {exc.reason}") from None
    for record in records:
        key = record.get("key")
        if not isinstance(key, dict) or not key:
            raise Refused(f"{refusing}: its {record['model']} [{record['dtype']}] has no key "
                          "(written by an older harness); rerun without --resume")
        differ = [name for name in _RUN_FIELDS if key.get(name) != this_run[name]]
        if differ:
            raise Refused(f"{refusing}: its results are for {_fields(key, differ)}; "
                          f"this run is {_fields(this_run, differ)}")
    return {(r["model"], r["dtype"]): r for r in records}


def _unreadable(model: str, dtype: str, reason: str, this_run: dict) -> ConformanceResult:
    """The run of a model whose config file is malformed: an ERROR naming the file and why."""
    from .adapters import ReferenceAdapter
    from .gate import ConformanceResult, environment

    return ConformanceResult(model, dtype, ReferenceAdapter.name, this_run["implementation"],
                             error=f"malformed config {reason}", seed=this_run["seed"],
                             environment=environment(dtype), key={"model": model, "dtype": dtype, **this_run})


def _write_conform_outputs(args, records: list[ConformanceResult | dict], results: list[ConformanceResult]) -> None:
    """The JSON (with ``--resume``, every record of the file), JUnit XML and Markdown report as they stand:
    written after every result, so an interrupted run keeps what it finished."""
    from . import report

    if args.json:
        report.write_json(args.json, records)
    if args.junit:
        report.write_junit(args.junit, results)
    if args.report:
        report.write_atomic(args.report, report.markdown(results, title=args.title))


def _cmd_conform(args) -> int:
    from tqdm import tqdm

    from . import report
    from .gate import conform, plan, result_from_json

    dtypes = _dtypes(args.dtype)
    models, broken = _conform_models(args)
    readable = [m for m in models if m not in broken]
    _check_layers(args.layers, readable)
    _check_outputs(args, "--json", "--junit", "--report")
    if args.resume and not args.json:
        raise Refused("--resume needs --json PATH, the results file to resume from")
    candidate = args.candidate or args.against
    adapter, this_run = _this_run(candidate, args.seed)
    runs = [(m, d) for d in dtypes for m in models]
    plans = {(m, d): plan(m, adapter, d, args.seed, args.layers) for d in dtypes for m in readable}
    _check_fits(plans, adapter, args.seed)
    records = _resume_from(args.json, this_run) if args.resume else {}

    results = []
    show_tables = not args.quiet and (len(runs) == 1 or args.verbose)
    bar = tqdm(runs, desc="conform", unit="model", file=sys.stderr, disable=True if args.quiet else None)
    for model, dtype in bar:
        bar.set_postfix_str(f"{model} [{dtype}]")
        run = plans.get((model, dtype))
        slot = (run.label if run else model, dtype)
        key = run.key(this_run["candidate"], this_run["implementation"]) if run else None
        reused = key is not None and records.get(slot, {}).get("key") == key
        if reused:
            result = result_from_json(records[slot])  # the record stays in the file as stored
        elif run is None:
            result = _unreadable(model, dtype, broken[model], this_run)
        else:
            result = conform(model, candidate=candidate, dtype=dtype, seed=args.seed, layers=args.layers)
        if not reused:  # a record with another key for this run (e.g. an edited config) is replaced in place
            records[slot] = result
        results.append(result)
        _write_conform_outputs(args, list(records.values()), results)
        if show_tables and result.probes:
            tqdm.write(f"\n{result.model} [{result.dtype}]: {result.candidate} vs {result.reference}\n{report.probe_table(result)}", file=sys.stdout)
        elif not result.passed and result.probes and not args.quiet:
            tqdm.write(f"\n{report.probe_table(result)}", file=sys.stdout)
        tqdm.write(result.verdict(), file=sys.stdout)
    bar.close()
    failed = [r for r in results if not r.passed]
    if not args.quiet:
        if len(results) > 1:
            print("\n" + report.summary_table(results))
        not_run = sum(1 for r in results if r.not_run)
        print(f"\n{len(results) - len(failed) - not_run} passed, {len(failed)} failed"
              + (f", {not_run} not run (unsupported here)" if not_run else "")
              + f" ({sum(r.wall_s for r in results):.1f} s)")
    return EXIT_OK if not failed else EXIT_FAIL


def _cmd_diff(args) -> int:
    from . import report

    _check_outputs(args, "--report")
    try:
        a, b = report.load_results(args.a), report.load_results(args.b)
    except report.ResultsFileError as exc:
        raise Refused(str(exc)) from None
    text, worse = report.diff_markdown(a, b)
    print(text)
    if args.report:
        report.write_atomic(args.report, text)
    return EXIT_FAIL if worse else EXIT_OK


def _cmd_calibrate(args) -> int:
    dtypes = _dtypes(args.dtype)
    for model in args.model or []:
        _check_model(model)
    seeds = _ints(args.seeds, "--seeds")
    if args.drawn < 0:
        raise Refused(f"--drawn {args.drawn}: must be 0 or more")
    _check_outputs(args, "--json", "--report")

    from tqdm import tqdm

    from . import calibrate, report
    from .gate import environment

    mutant_modules = [m for group in args.mutants or [] for m in group.split(",") if m]
    with tqdm(desc="calibrate", unit="pair", file=sys.stderr, disable=None) as bar:
        rows = calibrate.measure(args.model or None, dtypes=dtypes, seeds=seeds, drawn=args.drawn, progress=bar)
    mutant_rows = calibrate.mutants(mutant_modules, dtypes=dtypes) if mutant_modules else []
    env = {k: v for k, v in environment("").items() if k != "dtype"}
    checks = calibrate.margins(rows, mutant_rows)
    if args.json:
        record = {"environment": env, "settings": calibrate.settings(seeds, args.drawn, args.model, mutant_modules),
                  "rows": rows, "mutants": mutant_rows}
        report.write_atomic(args.json, json.dumps(record, separators=(",", ":")) + "\n")
    text = calibrate.markdown(rows, mutant_rows, env)
    if args.report:
        report.write_atomic(args.report, text)
    below = [c for c in checks if not c["ok"]]
    for c in below:
        print(f"below margin: {calibrate.describe(c)}")
    print(f"{len(checks) - len(below)} of {len(checks)} margin checks hold (limit >= {calibrate.MARGIN:g}x the spread "
          f"of correct implementations, caught bugs >= {calibrate.MARGIN:g}x their limit)")
    return EXIT_OK if not below else EXIT_FAIL


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise Refused(f"{flag} {text}: give comma-separated integers (e.g. 0,1,2)") from None
    if not values:
        raise Refused(f"{flag} {text}: give at least one")
    return values


def _cmd_realweights(args) -> int:
    dtypes = _dtypes(args.dtype)
    if args.tokens < 2:
        raise Refused(f"--tokens {args.tokens}: must be at least 2 (the check predicts each next token)")
    _check_outputs(args, "--json", "--report")

    from . import realweights, report

    try:
        loaded = realweights.load_real_model()
    except ImportError as exc:
        raise Refused(str(exc)) from None
    results = realweights.run(dtypes, tokens=args.tokens, candidate=args.candidate or args.against, loaded=loaded)
    for r in results:
        print(f"\n{r.model} [{r.dtype}]: {r.candidate} vs {r.reference}; {r.inputs}\n{report.probe_table(r)}\n{r.verdict()}")
    print("\n" + report.summary_table(results))
    if args.json:
        report.write_json(args.json, results)
    if args.report:
        report.write_atomic(args.report, report.markdown(results, title="Real weights: Gemma 3 270M (GGUF)"))
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


def _cmd_bench(args) -> int:
    from .bench import records, runner
    from .bench.suite import SuiteError, load_suite, parse_shard, select

    try:
        suite = load_suite(args.suite)
        cells = select(suite.cells, args.filter, parse_shard(args.shard) if args.shard else None)
    except SuiteError as exc:
        raise Refused(str(exc)) from None
    if args.list:
        for cell in cells:
            print(cell.cell_id, cell.label)
        return EXIT_OK
    if not cells:
        raise Refused(f"{args.suite}: no cell matches" + (f" --filter {args.filter!r}" if args.filter else "")
                      + (f" in shard {args.shard}" if args.shard else ""))
    problem = _check_output_path(os.path.join(args.out, records.RECORDS_FILE), "--out")
    if problem:
        raise Refused(problem)
    if args.retry_errors:
        if not args.resume:
            raise Refused("--retry-errors goes with --resume (it reruns the error cells of that run)")
        dropped = records.drop_errors(records.records_path(args.out))
        if not args.quiet:
            print(f"--retry-errors: {dropped} error records removed; their cells run again", file=sys.stderr)
    try:
        written = runner.run(suite, cells, args.out, resume=args.resume, quiet=args.quiet, ray_address=args.ray)
    except (runner.RunError, records.RecordsError) as exc:
        raise Refused(str(exc)) from None
    counts = {s: sum(r["status"] == s for r in written) for s in records.STATUSES}
    print(f"{len(written)} cells run ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}); "
          f"records in {records.records_path(args.out)}")
    return EXIT_FAIL if counts["error"] else EXIT_OK


def _cmd_report(args) -> int:
    from .bench import records
    from .bench.report import write_report

    _check_outputs(args, "--html", "--md")
    if not (args.html or args.md):
        raise Refused("report: give --html PATH and/or --md PATH")
    try:
        return write_report(args.sources, html_path=args.html, md_path=args.md, baseline=args.baseline,
                            title=args.title)
    except records.RecordsError as exc:
        raise Refused(str(exc)) from None


def _cmd_merge(args) -> int:
    from .bench import records

    try:
        merged, conflicts = records.merge(records.load([s]) for s in args.sources)
    except records.RecordsError as exc:
        raise Refused(str(exc)) from None
    target = records.records_path(args.out)
    if target.exists() and target.stat().st_size:
        raise Refused(f"--out {args.out} already holds records; merge into an empty directory")
    for record in merged:
        records.append_record(target, record)
    for line in conflicts:
        print(f"conflict: {line}", file=sys.stderr)
    print(f"{len(merged)} cells from {len(args.sources)} directories into {target}"
          + (f"; {len(conflicts)} conflicts (first record kept)" if conflicts else ""))
    return EXIT_FAIL if conflicts else EXIT_OK


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB"


def _cmd_memory(args) -> int:
    from reference_impl.spec import ModelSpec

    from .kvcache import CONTEXTS, DTYPE_BYTES, breakdown

    _check_model(args.model)
    if args.kv_dtype not in DTYPE_BYTES:
        raise Refused(f"unknown --kv-dtype {args.kv_dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    _check_outputs(args, "--json")
    config = configs.hf_config(args.model)
    spec = ModelSpec.from_hf_config(config)
    longest = config.get("max_position_embeddings")
    if args.context is not None and (args.context < 1 or (longest and args.context > longest)):
        raise Refused(f"--context {args.context}: {args.model} takes 1 to {longest} tokens")
    contexts = [args.context] if args.context else [c for c in CONTEXTS if not longest or c <= longest]
    results = [breakdown(spec, tokens, args.batch, args.kv_dtype) for tokens in contexts]
    print(f"{args.model}: KV cache, {args.kv_dtype}, batch {args.batch} (stored: K and V both; minimal: K=V "
          "layers keep their one projection)")
    for r in results:
        print(f"\n{r['tokens']:,} tokens: stored {_gib(r['stored_bytes'])}, minimal {_gib(r['minimal_bytes'])}")
        for name, row in r["by_layer_type"].items():
            print(f"  {row['layers']:>3} x {name:<36} holds {row['tokens_held']:>7,} tokens  "
                  f"stored {_gib(row['stored_bytes'])}  minimal {_gib(row['minimal_bytes'])}")
    if args.json:
        from .atomic import write_atomic

        write_atomic(args.json, json.dumps({"model": args.model, "max_context": longest, "results": results},
                                           indent=1) + "\n")
    return EXIT_OK


def _cmd_plan(args) -> int:
    """`plan`: a planner, not a gate: exit 0 whether the model fits or not; 2 for bad input."""
    from .planner import PlanError

    try:
        return _plan_claims(args) if args.claims else _plan_one(args)
    except PlanError as exc:
        raise Refused(str(exc)) from None


def _plan_one(args) -> int:
    from . import planner
    from .atomic import write_atomic

    if not args.model:
        raise Refused("plan: give --model NAME (a released variant), or --claims")
    if args.md:
        raise Refused("--md goes with --claims (the claims table); a model's plan writes --json")
    _check_model(args.model)
    _check_outputs(args, "--json")
    card = planner.gpu(args.device) if args.device else None
    result = planner.plan(args.model, args.weights or "bf16", args.kv or "bf16", args.context or "4k",
                          1 if args.batch is None else args.batch, args.ple_offload)
    rows = [planner.verdict(result, card)] if card else planner.verdicts(result)
    print("\n".join(planner.describe(result) + ["verdicts (a planner, not a gate: exit 0 either way):"]
                    + planner.verdict_lines(rows)))
    if args.json:
        write_atomic(args.json, json.dumps({**result, "verdicts": rows}, indent=1) + "\n")
    return EXIT_OK


def _plan_claims(args) -> int:
    from . import planner
    from .atomic import write_atomic

    given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--kv", args.kv),
                                      ("--context", args.context), ("--batch", args.batch),
                                      ("--device", args.device), ("--ple-offload", args.ple_offload))
             if value is not None and value is not False]
    if given:
        raise Refused(f"--claims judges the claims of harness/data/claims.yaml as written; drop {', '.join(given)}")
    _check_outputs(args, "--json", "--md")
    report = planner.check_claims()
    for row in report["claims"]:
        print(f"{row['source']}:{row['line']} {row['id']}: {row['verdict']}"
              + (f" ({row['why']})" if row.get("why") else ""))
    if args.md:
        write_atomic(args.md, planner.claims_markdown(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1) + "\n")
    return EXIT_OK


def _context_list(text: str) -> list[int]:
    """``4k,32k`` / ``4096,32768`` -> [4096, 32768] (k = 1024)."""
    from .planner import PlanError, parse_context

    out = []
    for part in text.split(","):
        try:
            out.append(parse_context(part))
        except PlanError:
            raise Refused(f"--contexts: {part.strip()!r} is not a token count (e.g. 4096 or 4k)") from None
    return out


def _cmd_kv_measure(args) -> int:
    from . import kvmeasure

    models = [m.strip() for m in args.models.split(",")]
    for model in models:
        _check_model(model)
    impls = [i.strip() for i in args.impls.split(",")]
    unknown = [i for i in impls if i not in kvmeasure.IMPLS]
    if unknown:
        raise Refused(f"unknown implementation {unknown[0]!r}; choose from {', '.join(kvmeasure.IMPLS)}")
    contexts = _context_list(args.contexts)
    for model in models:
        longest = configs.hf_config(model).get("max_position_embeddings")
        if longest and min(contexts) > longest:
            raise Refused(f"--contexts: {model} takes at most {longest} tokens")
        for context in (c for c in contexts if longest and c > longest):
            print(f"{model}: {context} tokens skipped (its maximum is {longest})", file=sys.stderr)
    records = kvmeasure.run(models, contexts, impls, args.out, args.dtype, resume=args.resume,
                            progress=(lambda line: None) if args.quiet else print)
    bad = [r for r in records if r["status"] == "error" or (r["status"] == "ok" and not r["explained"])]
    print(f"{len(records)} records in {args.out}/records.jsonl, report {args.out}/report.md; "
          f"{len(bad)} errors or unexplained differences")
    return EXIT_FAIL if bad else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configs", help="list the model configs (released variants and tiny twins)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true", help="only the tiny twins")
    group.add_argument("--released", action="store_true", help="only the released variants")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("conform", help="layer-by-layer conformance gate against the reference implementation")
    p.add_argument("--model", action="append", help="config name (repeatable); see `gemma-harness configs`")
    p.add_argument("--all", action="store_true", help="every tiny model")
    p.add_argument("--against", default="hf", help="implementation to gate: hf (default), vllm, or reference")
    p.add_argument("--candidate", metavar="MODULE:OBJECT",
                   help="a third-party port: an adapter, or a torch module class with the HF *ForCausalLM interface")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, or both comma-separated (default float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, metavar="N",
                   help="cut each model to its first N layers (a full-size model that does not fit in memory)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (updated after every model)")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML (updated after every model)")
    p.add_argument("--report", metavar="PATH", help="write a Markdown report (updated after every model)")
    p.add_argument("--title", default="Conformance report")
    p.add_argument("--resume", action="store_true",
                   help="reuse the results in --json whose key (model, dtype, candidate, implementation, seed, "
                        "inputs, config, harness version) equals the run's; keep the file's other records")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print every model's probe table")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only the one-line verdict per run")
    p.set_defaults(func=_cmd_conform)

    p = sub.add_parser("realweights", help="reference vs HF on the real Gemma 3 270M GGUF (needs the `real` extra)")
    p.add_argument("--against", default="hf")
    p.add_argument("--candidate", metavar="MODULE:OBJECT")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=1100, help="prompt length (default 1100, > 2x the 512 window)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--report", metavar="PATH")
    p.set_defaults(func=_cmd_realweights)

    p = sub.add_parser("diff", help="two conform --json runs side by side (e.g. two transformers versions)")
    p.add_argument("a", help="results JSON (the baseline)")
    p.add_argument("b", help="results JSON to compare with it")
    p.add_argument("--report", metavar="PATH", help="write the Markdown table here too")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("calibrate", help="measure the spread between correct implementations and the size of "
                                         "known bugs, and check the tolerance policy's margins against them")
    p.add_argument("--model", action="append", help="a tiny model (repeatable; default: every twin)")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--seeds", default="0,1,2", help="weight and input seeds (default 0,1,2)")
    p.add_argument("--drawn", type=int, default=30, help="configs drawn by the property suites' strategies (default 30)")
    p.add_argument("--mutants", action="append", metavar="MODULE",
                   help="mutation-suite modules (e.g. tests.mutants,tests.mutants_gemma4): their bugs' sizes")
    p.add_argument("--json", metavar="PATH", help="everything measured (reports/calibration.json)")
    p.add_argument("--report", metavar="PATH", help="the margin table as Markdown (reports/calibration.md)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("memory", help="analytic KV-cache bytes of a model, by layer type, at one or several contexts")
    p.add_argument("--model", required=True, help="config name (see `gemma-harness configs`)")
    p.add_argument("--context", type=int, help="tokens (default: 4K, 8K, 32K, 128K, 256K up to the model's maximum)")
    p.add_argument("--kv-dtype", default="bfloat16", help="bfloat16 (default), float32, float16, fp8, int8, int4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the totals and the breakdown as JSON")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("plan", help="accelerator memory a released model needs (weights, KV, activations, "
                                    "overhead) and the GPUs it fits; --claims judges the published claims")
    p.add_argument("--model", help="a released variant (see `gemma-harness configs --released`)")
    p.add_argument("--weights", help="weights dtype: bf16 (default), fp16, fp8, int8, int4 (+ group scales), fp32")
    p.add_argument("--kv", help="KV-cache dtype: bf16 (default), fp16, fp8, int8, int4, fp32")
    p.add_argument("--context", help="tokens per sequence: 4096, 4k, 128K (k = 1024; default 4k)")
    p.add_argument("--batch", type=int, help="sequences (default 1)")
    p.add_argument("--device", metavar="GPU", help="one card of harness/data/gpus.yaml, e.g. h100-80gb "
                                                   "(default: the verdict on every card)")
    p.add_argument("--ple-offload", action="store_true",
                   help="keep the per-layer-embedding table in host memory (Gemma 4 E2B/E4B only)")
    p.add_argument("--claims", action="store_true",
                   help="judge the published hardware claims (harness/data/claims.yaml) instead of one model")
    p.add_argument("--json", metavar="PATH", help="write the plan (or, with --claims, the claims report) as JSON")
    p.add_argument("--md", metavar="PATH", help="with --claims: the regenerated table as Markdown")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("kv-measure", help="measured KV-cache bytes per implementation vs the analytic figure, "
                                          "every difference explained")
    p.add_argument("--models", required=True, help="comma-separated config names (released variants)")
    p.add_argument("--contexts", default="4k,32k", help="comma-separated token counts (default 4k,32k)")
    p.add_argument("--impls", default="reference,hf,vllm,vllm-nohybrid,llamacpp,llamacpp-swa",
                   help="comma-separated: reference, hf, vllm, vllm-nohybrid, llamacpp, llamacpp-swa "
                        "(llama.cpp: the real gemma-3-270m GGUF only)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--resume", action="store_true", help="keep DIR's records and measure only what is missing")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_kv_measure)

    sub.add_parser("eval", add_help=False, help="lm-eval scores through implementations, --compare A B, --table "
                                                "(see eval --help)")
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with the gemma-harness model and the "
                                                   "local tasks")
    sub.add_parser("logprobs", add_help=False, help="real 270M next-token distributions per implementation vs the "
                                                    "reference: KL, top-k, log-prob error (see logprobs --help)")
    sub.add_parser("moe-cost", add_help=False,
                   help="Gemma 4 26B-A4B MoE layer cost per part and dispatch strategy (see moe-cost --help)")

    p = sub.add_parser("bench", help="run a benchmark sweep (suites/bench/*.yaml) into JSON Lines records")
    p.add_argument("suite", help="the suite file (YAML)")
    p.add_argument("--out", required=True, metavar="DIR", help="records go to DIR/records.jsonl")
    p.add_argument("--resume", action="store_true", help="skip the cells DIR already holds records of")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: run the cells recorded as errors again")
    p.add_argument("--shard", metavar="I/N", help="run shard I of N (cells split by cell id)")
    p.add_argument("--filter", metavar="EXPR", help="only cells matching, e.g. 'impl=hf|reference,batch<=4'")
    p.add_argument("--list", action="store_true", help="print the selected cells and exit")
    p.add_argument("--ray", metavar="ADDRESS", help="run the cells as tasks of a Ray cluster (`local`: start one here)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-cell lines")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="benchmark records into HTML and Markdown reports (`report merge` joins shards)")
    p.add_argument("sources", nargs="+", metavar="DIR", help="records directories (or records.jsonl files)")
    p.add_argument("--baseline", metavar="DIR", help="compare with these records: exit 1 on a regression")
    p.add_argument("--html", metavar="PATH")
    p.add_argument("--md", metavar="PATH")
    p.add_argument("--title", default="Benchmark report")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("merge", help="(also `report merge`) join shards' records, deduplicated by cell id")
    p.add_argument("sources", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=_cmd_merge)
    return parser


def _crash_line(exc: BaseException) -> str:
    """The gate's one-line form of an exception (type, message, innermost frame); type and message only
    when the gate itself cannot be imported (a broken install)."""
    try:
        from .gate import crash_line
    except ImportError:
        return f"{type(exc).__name__}: {exc}"
    return crash_line(exc)


def _lmeval(argv: list[str]) -> int:
    """``eval``, ``lm-eval`` and ``logprobs``: their own parsers (harness.lmeval)."""
    try:
        from .lmeval import cli as lmeval_cli
    except ImportError as exc:
        print(f"error: lm-eval is not installed ({exc}): pip install -e '.[eval]'", file=sys.stderr)
        return EXIT_USAGE
    if argv[0] == "lm-eval":
        return lmeval_cli.lm_eval_main(argv[1:])
    if argv[0] == "logprobs":
        from .lmeval import logit_conformance

        return logit_conformance.main(argv[1:])
    return lmeval_cli.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every ending is an exit code (see the module docstring) with at most one line on
    stderr, never a traceback, unless GEMMA_HARNESS_DEBUG=1 asks for one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["report", "merge"]:
        argv = ["merge", *argv[2:]]
    if argv[:1] == ["moe-cost"]:  # its own parser (harness.bench.moe_cost), options and help included
        from .bench import moe_cost

        return moe_cost.main(argv[1:])
    try:
        if argv[:1] in (["eval"], ["lm-eval"], ["logprobs"]):  # lm-eval scores: their own parsers
            return _lmeval(argv)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug of the harness: one line, not a traceback
        if os.environ.get("GEMMA_HARNESS_DEBUG") == "1":
            raise
        print(f"error: internal error: {_crash_line(exc)}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
