"""Runs the benchmark suite and writes its tables to Markdown.

    python -m benchmarks [--quick] [--only norms|rnn|sweep|memory|attempts] [--out BENCHMARKS.md]

writes the Markdown and, beside it, the results it was rendered from (BENCHMARKS.json), which
`python -m benchmarks --render BENCHMARKS.json` renders again.

Every comparison runs in a fresh process (`python -m benchmarks.<section> '<job json>'`), so
that no comparison inherits another's compiled programs, allocator state or thread pools.
`--quick` runs tiny shapes with 1-2 repetitions: a smoke test of the code paths, whose
timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

from benchmarks import _harness as H
from benchmarks import report

SECTIONS = ("norms", "attempts", "rnn", "sweep", "memory")


def plan(quick: bool, only: list[str]):
    """The jobs to run: a list of (section, module, job dict, allocator, xla_flags, env overrides)."""
    jobs = []
    sel = set(only or SECTIONS)
    if "norms" in sel:
        from benchmarks.contenders import OPS
        from benchmarks.norms import DTYPES, SHAPES

        # Freed memory reused (`reuse`), as a training loop's steady state has it: with glibc's
        # defaults every output of 32 MiB or more is page-faulted in afresh on each call, a cost
        # as large as the op's own, which all contenders pay alike (see Allocation).
        if quick:
            for op in OPS:
                for dt in DTYPES:
                    jobs.append(("norms", "norms", dict(op=op, shape=[64, 128], dtype=dt, reps=2, warmup=1),
                                 "reuse", None, None))
        else:
            for op in OPS:
                for shape in SHAPES:
                    for dt in DTYPES:
                        jobs.append(("norms", "norms", dict(op=op, shape=list(shape), dtype=dt), "reuse", None, None))
            # The same under glibc's defaults, for outputs that it maps fresh each time.
            for op, shape in (("layer", (8192, 1024)), ("layer", (32768, 256)), ("batch", (8192, 1024))):
                jobs.append(("norms", "norms", dict(op=op, shape=list(shape), dtype="float32"), "glibc", None, None))
    if "attempts" in sel:
        from benchmarks import attempts

        for job, alloc, flags in attempts.jobs(quick):
            jobs.append(("attempts", "norms", job, alloc, flags, None))
    if "norms" in sel:
        # PyTorch's OpenMP wait policy: the suite's PASSIVE against the default (spinning), in
        # two processes run back to back (the policy is read once, at start-up).
        job = dict(op="layer", shape=[64, 128] if quick else [4096, 256], dtype="float32", flax=False,
                   with_xla=False, reps=2 if quick else 15)
        if quick:
            job["warmup"] = 1
        jobs.append(("omp", "norms", job, "glibc", None, {"OMP_WAIT_POLICY": None}))
        jobs.append(("omp", "norms", job, "glibc", None, None))
    if "rnn" in sel:
        # The kernel profile at B=32 only: at B=1 tracing each of the tiny kernels costs more than
        # the kernel itself.
        if quick:
            jobs.append(("rnn", "rnn", dict(T=5, B=2, H=8, I=4, reps=2, warmup=1, profile=True), "glibc", None, None))
        else:
            for cfg in ({"T": 100, "B": 32, "H": 256, "I": 128, "profile": True}, {"T": 200, "B": 1, "H": 128, "I": 128}):
                jobs.append(("rnn", "rnn", cfg, "glibc", None, None))
    if "sweep" in sel:
        for model in ("ln_mlp", "ln_lstm"):
            job = dict(model=model, steps=3, reps=1, warmup=1) if quick else dict(model=model)
            jobs.append(("sweep", "sweep", job, "glibc", None, None))
    if "memory" in sel:
        job = dict(T=20, B=2, H=8, I=4, reps=1, warmup=1) if quick else dict(T=1000)
        jobs.append(("memory", "memory", job, "glibc", None, None))
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 repetitions (smoke test)")
    ap.add_argument("--only", action="append", choices=SECTIONS,
                    help="run only this section (repeatable); default: all")
    ap.add_argument("--out", default="BENCHMARKS.md", help="Markdown file to write (default: BENCHMARKS.md)")
    ap.add_argument("--json", help="save the raw results to this JSON file (default: --out with the suffix .json), "
                                   "from which --render writes the same Markdown")
    ap.add_argument("--render", metavar="JSON", help="do not measure: re-render --out from results saved with --json")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        with open(args.out, "w") as f:
            f.write(report.render(saved["header"], saved["results"]))
        H.log(f"wrote {args.out} from {args.render}")
        return 0

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    jobs = plan(args.quick, args.only)
    started = time.perf_counter()
    header = dict(
        command=command.strip(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=H.machine_info(),
        versions=H.versions(),
        load_start=os.getloadavg(),
        quick=args.quick,
    )
    results, failures = [], []
    for i, (section, module, job, alloc, flags, env) in enumerate(jobs, 1):
        H.log(f"[{i}/{len(jobs)}] {section}: {job} (allocator={alloc}{', XLA_FLAGS=' + flags if flags else ''}"
              f"{', env ' + str(env) if env else ''})")
        try:
            res = H.run_job(module, job, allocator=alloc, xla_flags=flags, env=env)
        except Exception as e:  # a failed comparison (e.g. a disagreement) must not hide the rest
            H.log(str(e))
            failures.append(dict(section=section, job=job, allocator=alloc, error=str(e)[-3000:]))
            continue
        res["section"] = section
        res["xla_flags"] = flags or ""
        res["env_overrides"] = env or {}
        results.append(res)
    header["wall_s"] = time.perf_counter() - started
    header["load_end"] = os.getloadavg()
    header["failures"] = failures
    with open(args.json or os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(header=header, results=results), f)
    text = report.render(header, results)
    with open(args.out, "w") as f:
        f.write(text)
    H.log(f"wrote {args.out} ({len(jobs)} jobs, {len(failures)} failed, {header['wall_s']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
