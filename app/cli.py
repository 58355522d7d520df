"""The ``accel`` command.

    $ accel bench tiny          # tiny PixArt: StaticCache vs diffusers' caches, table + JSON
    $ accel bench overhead      # hook overhead on a 12-block PixArt

Results go to ``benchmarks/results/SUITE.json`` and ``SUITE.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _bench(args: argparse.Namespace) -> int:
    import torch

    from accel.bench import run_bench, write_results
    from app.bench_suites import SUITES

    if args.suite not in SUITES:
        print(f"unknown suite {args.suite!r}; choose one of: {', '.join(sorted(SUITES))}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]()
    result = run_bench(
        suite.pipe, suite.entries, suite.prompts[: args.prompts] if args.prompts else suite.prompts,
        suite.call_kwargs, runs=args.runs or suite.runs, warmup=suite.warmup, suite=args.suite,
        notes=suite.notes, progress=not args.quiet,
    )
    path = write_results(result, args.out, command="accel " + shlex.join(sys.argv[1:]))
    print(result["table"])
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Diffusion acceleration suite")
    parser.add_argument("--version", action="version", version="accel-suite 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite and write JSON + markdown")
    bench.add_argument("suite", nargs="?", default="tiny", help="suite name (default: tiny)")
    bench.add_argument("--runs", type=int, default=0, help="timed runs per method (default: the suite's)")
    bench.add_argument("--prompts", type=int, default=0, help="use only the first N prompts")
    bench.add_argument("--out", default="benchmarks/results", help="output folder")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
