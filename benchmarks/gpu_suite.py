"""fastbyol on a GPU in two runs that each fit one device session: the results table.

    python -m benchmarks.gpu_suite run A --out $OUT     # environment, ceiling, model, peers, batch
                                                        # sweep, LARS + EMA, folder and ffcv (<= 6 min)
    python -m benchmarks.gpu_suite run B --out $OUT     # DALI, DDP, compiled variants (<= 3 min)
    python -m benchmarks.gpu_suite report A/results.jsonl B/results.jsonl   # one table of both
    python -m benchmarks.gpu_suite run all --device cpu --tiny --out /tmp/suite   # every stage, tiny

A run installs the offline wheelhouse (tools/wheelhouse.sh), then runs each stage in its own
process, killed at its budget, inside the run's deadline; every figure is saved to
OUT/results.jsonl the moment it is measured, and OUT/results.md is rewritten with it. The stage
table is benchmarks/suite/stages.py; the device session's exact calls are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.suite import records, runner
from benchmarks.suite.stages import BY_NAME, RUNS, TOTAL_S
from benchmarks.suite.table import markdown

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n")[0],
                                epilog="The GPU session's exact commands: benchmarks/README.md.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="install, then run the stages of run A, B or all (A then B)")
    r.add_argument("run", choices=("A", "B", "all"))
    r.add_argument("--out", type=Path, default=Path("results/suite"),
                   help="results.jsonl, results.md, suite.log, step_time_vs_batch.jsonl")
    r.add_argument("--work", type=Path, default=Path("/tmp/fastbyol-suite"),
                   help="scratch: installed wheels, images, .beton (a later run on the same machine reuses them)")
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    r.add_argument("--tiny", action="store_true", help="tiny sizes, no inductor: every stage in seconds on a CPU")
    r.add_argument("--stages", help="comma-separated stages to run instead of the run's own, in this order")
    r.add_argument("--total", type=float, help="seconds for the whole run, install included "
                                               f"(default: A {TOTAL_S['A']}, B {TOTAL_S['B']}, all both)")
    r.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    r.add_argument("--wheelhouse", type=Path, default=REPO / ".wheelhouse" / "core")
    r.add_argument("--dali-parts", type=Path, default=Path("/tmp/fastbyol-dali"),
                   help="folder holding dali.tar.part* and SHA256SUMS (brought over several commands)")
    rep = sub.add_parser("report", help="one Markdown table from the results.jsonl of several runs")
    rep.add_argument("files", type=Path, nargs="+")
    s = sub.add_parser("stage", help=argparse.SUPPRESS)  # one stage, in the process the runner starts
    s.add_argument("stage", choices=tuple(BY_NAME))
    s.add_argument("--run-id", required=True)
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "report":
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            p.error(f"report: no such file: {', '.join(missing)}")
        print(markdown(records.latest(records.read(args.files), runner.ORDER)), end="")
        return 0
    if args.command == "stage":
        return runner.child(args.stage, args.run_id, args.budget, args.device, args.tiny, args.work.resolve(),
                            args.out.resolve())
    stages = RUNS["A"] + RUNS["B"] if args.run == "all" else RUNS[args.run]
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in BY_NAME]
        if unknown:
            p.error(f"--stages: unknown {', '.join(unknown)}; expected some of {', '.join(BY_NAME)}")
    total = args.total if args.total is not None else (
        TOTAL_S["A"] + TOTAL_S["B"] if args.run == "all" else TOTAL_S[args.run])
    opts = runner.Options(args.out.resolve(), args.work.resolve(), args.device, args.tiny, total, args.budget_scale,
                          args.wheelhouse, args.dali_parts)
    return runner.run(args.run, list(stages), opts)


if __name__ == "__main__":
    raise SystemExit(main())
