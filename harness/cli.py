"""``gemma-harness``: conformance gate and helpers.

Exit codes: 0 everything passed; 1 a check failed or a candidate errored; 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import configs

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _cmd_configs(args) -> int:
    from reference_impl.spec import ModelSpec
    from reference_impl.weights import count_parameters

    tiny = True if args.tiny else (False if args.released else None)
    rows = []
    for name in configs.names(tiny=tiny):
        spec = ModelSpec.from_hf_config(configs.hf_config(name))
        kinds = "".join("G" if layer.attention == "global" else "s" for layer in spec.layers)
        layer0 = spec.layers[0]
        rows.append({
            "name": name, "family": spec.family, "layers": spec.num_layers, "hidden": spec.hidden_size,
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


def _cmd_conform(args) -> int:
    from tqdm import tqdm

    from . import report
    from .gate import conform
    from .tolerance import POLICY

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in POLICY]
    if bad:
        print(f"error: unknown dtype {bad[0]!r}; choose from {', '.join(POLICY)}", file=sys.stderr)
        return EXIT_USAGE
    if args.all:
        models = configs.names(tiny=True)
    elif args.model:
        models = args.model
        for m in models:
            try:
                configs.load(m)
            except KeyError as exc:
                print(f"error: {exc.args[0]}", file=sys.stderr)
                return EXIT_USAGE
    else:
        print("error: give --model NAME or --all", file=sys.stderr)
        return EXIT_USAGE
    candidate = args.candidate or args.against

    done = {}
    if args.resume and args.json and os.path.exists(args.json):
        done = {(r.model, r.dtype): r for r in report.load_results(args.json)}
    runs = [(m, d) for d in dtypes for m in models]
    results = []
    show_tables = len(runs) == 1 or args.verbose
    bar = tqdm(runs, desc="conform", unit="model", file=sys.stderr, disable=None if not args.quiet else True)
    for model, dtype in bar:
        bar.set_postfix_str(f"{model} [{dtype}]")
        if (model, dtype) in done:
            result = done[(model, dtype)]
        else:
            result = conform(model, candidate=candidate, dtype=dtype, seed=args.seed)
        results.append(result)
        if args.json:  # written as each result completes: an interrupted run keeps what it finished
            report.write_json(args.json, results)
        if show_tables and result.probes:
            tqdm.write(f"\n{result.model} [{result.dtype}]: {result.candidate} vs {result.reference}\n{report.probe_table(result)}", file=sys.stdout)
        elif not result.passed and result.probes and not args.quiet:
            tqdm.write(f"\n{report.probe_table(result)}", file=sys.stdout)
        tqdm.write(result.verdict(), file=sys.stdout)
    bar.close()
    if len(results) > 1:
        print("\n" + report.summary_table(results))
    if args.junit:
        report.write_junit(args.junit, results)
    if args.report:
        report.write_atomic(args.report, report.markdown(results, title=args.title))
    failed = [r for r in results if not r.passed]
    total = sum(r.wall_s for r in results)
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed ({total:.1f} s)")
    return EXIT_OK if not failed else EXIT_FAIL


def _cmd_diff(args) -> int:
    from . import report

    try:
        a, b = report.load_results(args.a), report.load_results(args.b)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read results: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text, worse = report.diff_markdown(a, b)
    print(text)
    if args.report:
        report.write_atomic(args.report, text)
    return EXIT_FAIL if worse else EXIT_OK


def _cmd_calibrate(args) -> int:
    from .calibrate import measure, summarise

    rows = measure(args.model or None, dtypes=[d.strip() for d in args.dtype.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'dtype':<9} {'pair':<18} {'kind':<11} {'worst max_rel':>13} {'worst rel_rms':>13} {'kl_max':>10}  worst max_rel at")
    for (dtype, pair, kind), agg in sorted(summarise(rows).items()):
        print(f"{dtype:<9} {pair:<18} {kind:<11} {agg['max_rel']:>13.3e} {agg['rel_rms']:>13.3e} {agg['kl_max']:>10.2e}  {agg['at']}")
    return EXIT_OK


def _cmd_realweights(args) -> int:
    from . import realweights, report

    try:
        loaded = realweights.load_real_model()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    dtypes = [d.strip() for d in args.dtype.split(",")]
    results = realweights.run(dtypes, tokens=args.tokens, candidate=args.candidate or args.against, loaded=loaded)
    for r in results:
        print(f"\n{r.model} [{r.dtype}]: {r.candidate} vs {r.reference}; {r.inputs}\n{report.probe_table(r)}\n{r.verdict()}")
    print("\n" + report.summary_table(results))
    if args.json:
        report.write_json(args.json, results)
    if args.report:
        report.write_atomic(args.report, report.markdown(results, title="Real weights: Gemma 3 270M (GGUF)"))
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


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
    p.add_argument("--json", metavar="PATH", help="write results as JSON (updated after every model)")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML")
    p.add_argument("--report", metavar="PATH", help="write a Markdown report")
    p.add_argument("--title", default="Conformance report")
    p.add_argument("--resume", action="store_true", help="skip the (model, dtype) runs already in --json")
    p.add_argument("-v", "--verbose", action="store_true", help="print every model's probe table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or failure tables")
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

    p = sub.add_parser("calibrate", help="measure the spread between correct implementations (tolerance basis)")
    p.add_argument("--model", action="append")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
