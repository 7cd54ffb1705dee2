"""``gemma-harness eval``: lm-eval scores, their comparison between implementations, accuracy tables.

    gemma-harness eval --impl reference,hf --model gemma-3-270m --tasks arc_easy,piqa --out DIR
    gemma-harness eval --compare reference vllm --out DIR        # exit 1 on a significant loss
    gemma-harness eval --table [SPEC] --out DIR [--run]          # measured beside published
    gemma-harness eval --task-dir DIR                             # the local task YAMLs, for lm_eval

and ``gemma-harness lm-eval ARGS``: lm-eval's own command line with the ``gemma-harness`` model
registered and the local tasks included (``lm_eval --model gemma-harness`` works the same once
``harness.lmeval.lm`` is imported, e.g. through ``lm_eval.simple_evaluate`` in Python).

Exit codes: 0 done; 1 a cell failed, or ``--compare`` found a significant loss; 2 bad usage or input
(unknown task or implementation, missing task data, a pre-flight violation); 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-harness eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", type=_list, default=["reference"],
                   help="implementations, comma-separated: reference, hf, hf-sdpa, vllm, llamacpp, llamacpp-f32, "
                        "MODULE:OBJECT (default reference)")
    p.add_argument("--model", default="gemma-3-270m", help="gemma-3-270m (real weights) or a config name "
                                                           "(random weights, byte tokenizer)")
    p.add_argument("--tasks", type=_list, help="local tasks, comma-separated (see --list-tasks)")
    p.add_argument("--limit", type=int, help="the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the reference and HF run there)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render requests in the model's chat format (harness-rendered, BOS once)")
    p.add_argument("--out", metavar="DIR", help="records (DIR/records.jsonl) and per-document samples")
    p.add_argument("--resume", action="store_true", help="keep DIR's finished cells, run the rest")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="pair B's per-document results with A's on every task both ran (in --out): exit 1 if B "
                        "is significantly worse on any (B may list several, comma-separated)")
    p.add_argument("--metric", default="acc", help="--compare: the per-document metric (default acc)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--power", type=float, default=0.8)
    p.add_argument("--table", nargs="?", const="", metavar="SPEC",
                   help="render the accuracy table (the packaged spec, or SPEC) from --out's records")
    p.add_argument("--run", action="store_true", help="--table: first run the rows this machine can run")
    p.add_argument("--md", metavar="PATH", help="--compare/--table: write Markdown here")
    p.add_argument("--json", metavar="PATH", help="--compare/--table: write JSON here")
    p.add_argument("--task-dir", metavar="DIR", help="write the local task YAMLs to DIR and exit")
    p.add_argument("--list-tasks", action="store_true")
    p.add_argument("--register-lm-eval", action="store_true",
                   help="make `lm_eval --model gemma-harness` work in this environment (writes a .pth hook)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


class Usage(Exception):
    pass


def _write(path: str | None, text: str) -> None:
    if path:
        from ..atomic import write_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)


def _eval_records(out: str) -> list[dict]:
    from ..bench import records

    path = records.records_path(out)
    if not path.exists():
        raise Usage(f"{out}: no records (run gemma-harness eval --out {out} first)")
    return [r for r in records.iter_records(path) if r.get("kind") == "eval"]


def compare_runs(out: str, a: str, b: str, metric: str, alpha: float, power: float,
                 tasks: list[str] | None = None) -> list:
    """stats.Comparison per task that both A and B ran (same model, shots and chat flag), paired on the
    documents both scored: a run cut with --limit is compared on its documents (n says how many)."""
    from . import stats
    from .run import load_samples

    def key(r):
        c = r["cell"]
        return (c["model"], c["task"], c["num_fewshot"], c["chat_template"])

    ok = [r for r in _eval_records(out) if r["status"] == "ok" and (not tasks or r["cell"]["task"] in tasks)]
    by_impl: dict[str, dict] = {a: {}, b: {}}
    for r in ok:  # per implementation and key, the run that scored the most documents
        impl = r["cell"]["impl"]
        if impl in by_impl and (r["n"] or 0) > (by_impl[impl].get(key(r), {}).get("n") or 0):
            by_impl[impl][key(r)] = r
    common = sorted(set(by_impl[a]) & set(by_impl[b]), key=str)
    if not common:
        raise Usage(f"--compare: no task that both {a} and {b} ran successfully in {out}")
    out_list = []
    for k in common:
        sa, sb = load_samples(out, by_impl[a][k]), load_samples(out, by_impl[b][k])
        docs = set(sa) & set(sb)
        out_list.append(stats.compare(k[1], a, b, {d: sa[d] for d in docs}, {d: sb[d] for d in docs},
                                      metric=metric, alpha=alpha, power=power))
    return out_list


def compare_markdown(comparisons) -> str:
    """The verdict lines, then one table row per comparison with the paired log-likelihood differences."""
    out = [f"- {c.line()}" for c in comparisons] + ["", "| B vs A | task | n | A % | B % | Δ points | 95 % CI | "
                                                      "McNemar p (B-only / A-only right) | detectable | "
                                                      "log-likelihoods: pairs | max abs Δ | mean Δ | Wilcoxon p |",
                                                      "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        ll = c.loglik
        lls = (f"{ll.pairs} | {ll.max_abs:.2g} | {ll.mean:+.2g} | {ll.wilcoxon_p:.2g}" if ll else "— | — | — | —")
        out.append(f"| {c.name_b} vs {c.name_a} | {c.task} | {c.n} | {c.accuracy_a * 100:.2f} | "
                   f"{c.accuracy_b * 100:.2f} | {c.diff_points:+.2f} | [{c.ci_points[0]:+.2f}, {c.ci_points[1]:+.2f}] | "
                   f"{c.mcnemar.p_value:.2g} ({c.mcnemar.only_b} / {c.mcnemar.only_a}) | {c.mde_points:.2g} | {lls} |")
    return "\n".join(out) + "\n"


def _compare(args) -> int:
    from . import stats

    if not args.out:
        raise Usage("--compare needs --out DIR (the records of both implementations)")
    base, candidates = args.compare[0], _list(args.compare[1])
    comparisons = [c for b in candidates
                   for c in compare_runs(args.out, base, b, args.metric, args.alpha, args.power, args.tasks)]
    lines = [c.line() for c in comparisons]
    print("\n".join(lines))
    _write(args.md, compare_markdown(comparisons))
    _write(args.json, json.dumps([c.to_dict() for c in comparisons], indent=1) + "\n")
    return EXIT_FAIL if stats.verdict(comparisons) else EXIT_OK


def _table(args) -> int:
    from . import table, tasks
    from .run import run
    from .scorers import models_with_weights

    spec = table.load_spec(args.table or None)
    if not args.out:
        raise Usage("--table needs --out DIR (where the measured records are, or go with --run)")
    have_data = set(tasks.TASKS)
    if args.run:
        rows = table.runnable(spec, models_with_weights(), have_data)
        plan: dict[tuple[str, int | None], list[str]] = {}
        for row in rows:
            plan.setdefault((row.model, row.shots), []).append(row.task)
        for (model, shots), names in plan.items():
            run(args.impl, model, sorted(set(names)), args.out, limit=args.limit, num_fewshot=shots or 0,
                batch=args.batch_size, dtype=args.dtype, resume=True, quiet=args.quiet, device=args.device)
    records = _eval_records(args.out) if Path(args.out, "records.jsonl").exists() else []
    markdown, data = table.render(spec, records, models_with_weights=models_with_weights(), tasks_with_data=have_data)
    _write(args.md, markdown)
    _write(args.json, json.dumps(data, indent=1) + "\n")
    if not args.md:
        print(markdown)
    return EXIT_OK


def _evaluate(args) -> int:
    from .run import run

    if not args.tasks or not args.out:
        raise Usage("give --tasks and --out (or --compare, --table, --task-dir, --list-tasks)")
    records = run(args.impl, args.model, args.tasks, args.out, limit=args.limit, num_fewshot=args.num_fewshot,
                  batch=args.batch_size, dtype=args.dtype, chat_template=args.apply_chat_template,
                  resume=args.resume, quiet=args.quiet, device=args.device)
    failed = [r for r in records if r["status"] != "ok"]
    if not args.quiet:
        print(f"{len(records)} cell(s), {len(failed)} failed; records in {Path(args.out) / 'records.jsonl'}")
    return EXIT_FAIL if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from .preflight import PreflightError
    from .scorers import ScorerError
    from .tasks import TASKS, TaskDataError, resolve, write_task_dir

    args = parser().parse_args(argv)
    try:
        if args.register_lm_eval:
            import gemma_harness_lm_eval

            print(f"lm_eval --model {gemma_harness_lm_eval.NAME} is known from now on ({gemma_harness_lm_eval.install()})")
            return EXIT_OK
        if args.list_tasks:
            for task in TASKS.values():
                print(f"{task.name}\t{task.split}\t(published on {task.published_split})\t{task.data}")
            return EXIT_OK
        if args.task_dir:
            print(write_task_dir(args.task_dir, resolve(args.tasks) if args.tasks else None))
            return EXIT_OK
        if args.compare:
            return _compare(args)
        if args.table is not None:
            return _table(args)
        return _evaluate(args)
    except (Usage, TaskDataError, PreflightError, ScorerError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE


def lm_eval_main(argv: list[str]) -> int:
    """lm-eval's own command line, with the gemma-harness model registered and the local tasks included."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm  # noqa: F401 - registers the model
    from .tasks import write_task_dir

    task_dir = write_task_dir(Path(tempfile.mkdtemp(prefix="gemma-harness-tasks-")))
    if "--include_path" not in argv:
        argv = [*argv, "--include_path", str(task_dir)]
    sys.argv = ["lm_eval", *argv]
    return cli_evaluate() or 0
