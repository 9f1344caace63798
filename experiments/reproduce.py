"""The paper reproduction (the main job): trains every experiment's sweep and writes a
self-contained report directory (report.md, PNG plots, the configs, the raw metrics).

    python -m experiments            # full run (README.md gives its measured duration)
    python -m experiments --quick    # ~2.5 minute smoke version, compile-bound (the test suite runs it)

Every run checkpoints; re-running the same command resumes where it stopped. The report's
sections, each with its runs, tables, figures and verdicts, are `experiments/sections/`;
`--quick`, `--seed-offset` and `--compare` apply to all of them alike.
"""

import argparse
import json
import pathlib
import shutil
import time

from tqdm.auto import tqdm

from experiments import train
from experiments.report import Result, write_report
from experiments.sections import SECTIONS

SEEDS = 5  # per sweep in the full run (the quick run: 2); verdicts rest on them


def plan(quick: bool, seed_offset: int = 0, sections=SECTIONS):
    """(section key, run name, label, config) for every run of the sections, in order; the
    sweeps' seeds are `seed_offset + (0, ..., n - 1)`, so another offset gives a disjoint seed set."""
    seeds = tuple(seed_offset + i for i in range(2 if quick else SEEDS))
    runs = [(s.key, run.name, run.label, run.config(quick, seeds)) for s in sections for run in s.runs]
    names = [name for _, name, _, _ in runs]
    if len(set(names)) < len(names):  # runs/<name>/ would hold two runs' checkpoints
        raise ValueError(f"run names must be unique across sections, got {sorted(n for n in set(names) if names.count(n) > 1)}")
    return runs


def _parser():
    # The docstring's whole first paragraph: its first line alone stops mid-sentence.
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="python -m experiments", description=summary)
    parser.add_argument("--quick", action="store_true", help="~2.5 minute smoke version (compile-bound)")
    parser.add_argument("--out", default=None, help="report directory (default: report/ or report-quick/)")
    parser.add_argument("--fresh", action="store_true", help="delete the report directory first")
    parser.add_argument("--seed-offset", type=int, default=0, metavar="K",
                        help="train seeds K, K+1, ...: a disjoint seed set to check that the verdicts hold")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="the report directory of a run with a disjoint seed set (--seed-offset): "
                             "compare every verdict with its verdicts.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="show absl's INFO logs (orbax's among them)")
    return parser


def _compared(parser, directory, runs):
    """`(verdicts, seeds)` of the report in `directory`, checked before anything is trained."""
    path = pathlib.Path(directory) / "verdicts.json"
    try:
        record = json.loads(path.read_text())
        compare = (dict(record["verdicts"]), list(record["seeds"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--compare: {path} is not a report's verdicts.json ({type(e).__name__}: {e})")
    if set(compare[1]) & {s for *_, cfg in runs for s in cfg.sweep.seed}:
        parser.error(f"--compare: {directory} trained seeds {compare[1]}, not disjoint from this run's")
    return compare


def _train(out: pathlib.Path, runs):
    """Trains (or resumes) every run into `out/runs/<name>`: its `Result` by name, and the
    training seconds by section."""
    results, costs = {}, {}
    # One bar over the runs (run k of N, elapsed, ETA), each run's own bar nested below it.
    with tqdm(runs, desc="reproduction", unit="run") as bar:
        for section, name, label, cfg in bar:
            t = time.time()
            _, rows, _ = train.fit(cfg, out / "runs" / name, desc=name)
            seconds = time.time() - t
            costs[section] = costs.get(section, 0.0) + seconds
            results[name] = Result(label, rows, seconds)
            # The report directory's own copy of the raw metrics (runs/ holds the checkpoints too).
            shutil.copyfile(out / "runs" / name / "metrics.jsonl", out / "metrics" / f"{name}.jsonl")
    return results, costs


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    train.set_verbosity(args.verbose)
    if args.seed_offset < 0:
        parser.error(f"--seed-offset must be >= 0, got {args.seed_offset}")
    runs = plan(args.quick, args.seed_offset)
    compare = _compared(parser, args.compare, runs) if args.compare else None
    out = pathlib.Path(args.out or ("report-quick" if args.quick else "report"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    start = time.time()
    measured = {s.key: s.measure() for s in SECTIONS if s.measure}
    results, costs = _train(out, runs)
    findings = write_report(out, SECTIONS, results, measured, args.quick, time.time() - start, costs, compare)
    print(f"\nreport written to {out / 'report.md'}")
    for f in findings:
        print(" -", f)
    (out / "findings.json").write_text(json.dumps(findings, indent=1))
