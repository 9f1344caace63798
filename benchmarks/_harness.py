"""Measurement machinery shared by every benchmark: contenders, interleaved timing, agreement
checks, compile times, and the description of the machine and settings a run used.

A *comparison* is a list of `Contender`s that compute the same thing. `compare` checks that
they agree (`numpy.testing.assert_allclose` against the first one that is marked as the
reference), warms each up, then times them interleaved (A B C, C B A, A B C, ...) so that
slow drifts of the machine (other processes, thermal state, the allocator) fall on every
contender alike, and reports the median of each.
"""

from __future__ import annotations

import dataclasses
import json
import glob
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Environment variables that change how these benchmarks run; recorded with every result.
SETTING_VARS = (
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "LD_PRELOAD",
    "THP_MEM_ALLOC_ENABLE",
    "JAX_ENABLE_X64",
    "LNJAX_BENCH_GAP_S",
)

# Pause before each timed call, so that worker threads still spinning after the previous
# contender's call (XLA's pool, PyTorch's OpenMP team) have gone to sleep before the next one.
GAP_S = 0.005

# The allocator settings a job can run under (see BENCHMARKS.md, "Allocation").
ALLOCATORS = {
    # glibc as shipped: blocks of 32 MiB or more are mmap-ed fresh on every allocation and
    # returned to the kernel on free, so each such output page-faults on first touch.
    "glibc": {},
    # glibc with mmap disabled and no trimming: freed blocks of every size are reused, as
    # a caching allocator would. Applies to numpy, XLA:CPU and PyTorch alike.
    "reuse": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 46)},
}


@dataclasses.dataclass
class Contender:
    """One implementation in a comparison.

    Attributes:
      name: shown in the tables.
      run: runs the computation once, waits for it to finish, and returns its outputs
        (a tuple of arrays in the comparison's canonical order) for the agreement check.
      compile_s: seconds spent tracing and compiling (JAX), scripting and profiling runs
        (TorchScript), or None where there is nothing to compile (eager).
      check: compare this contender's outputs with the reference (False for, e.g., the
        copy that measures bandwidth).
      reference: the reference of its agreement group (the first one marked, else the
        group's first contender).
      note: a short remark for the table.
      outputs: what the agreement check compares, if not `run()`'s result (e.g. the loss and
        gradients of a training step whose timed `run` also updates parameters in place).
      group: contenders are checked against the reference of their own group (contenders
        computing different functions, e.g. LSTM and GRU, share a timing run).
      timed: False for a reference that only takes part in the agreement check (e.g. a
        float64 NumPy computation).
      tolerate: output labels whose disagreement is recorded (in the row's `errors`) instead
        of aborting the run, for known inaccuracies of a contender that the report states.
    """

    name: str
    run: Callable[[], Any]
    compile_s: float | None = None
    check: bool = True
    reference: bool = False
    note: str = ""
    outputs: Callable[[], Any] | None = None
    group: str = ""
    timed: bool = True
    tolerate: tuple[str, ...] = ()

    def result(self):
        return (self.outputs or self.run)()


def timed_compile(jitted, *args):
    """`(compiled, seconds)` for `jax.jit(...)` lowered and compiled on `args`."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def traffic(compiled) -> dict:
    """What XLA's cost model counts for a compiled program: `bytes` read and written by its
    kernels (each fusion's operands and outputs: its passes over memory; loops times their
    trip count), `kernels`, the kernels launched at the top level of the program, and
    `program`, a hash of its instructions without names or source locations (two contenders
    with equal hashes run the same kernels, so any gap between their times is noise)."""
    import hashlib
    import re

    text = compiled.as_text()
    entry = text.split("\nENTRY ", 1)[-1].split("\n}\n", 1)[0]
    launched = re.findall(r"= \S+ (fusion|custom-call|dot|copy|while|convolution|reduce)\(", entry)
    code = [re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", line)).strip()
            for line in text.splitlines() if " = " in line and "{file" not in line]  # fmt: skip
    program = hashlib.sha256("\n".join(code).encode()).hexdigest()[:16]
    return dict(bytes=float(compiled.cost_analysis()["bytes accessed"]), kernels=len(launched), program=program)


def kernel_profile(run: Callable[[], Any], compiled, *, steps: int, reps: int = 5) -> dict:
    """Where the time of `run` (which calls `compiled`, a program with a `lax.scan` of `steps`
    steps and its transpose) goes, from a `jax.profiler` trace of `reps` calls on XLA:CPU.

    Each kernel the trace records is an instruction of `compiled`; its source location says
    whether it runs in a loop body and whether it belongs to the backward pass (the transpose).
    Returns, per call, `{part: {"ms": ..., "kernels": ...}}` for the parts `forward loop,
    matmuls`, `forward loop, other`, the same two for the backward loop (kernels per step), and
    `outside the loops` (kernels per call); None where the trace has no kernel events (a backend
    other than XLA:CPU's thunk runtime).
    """
    import re
    import tempfile

    import jax

    # The instructions of each computation, and the loops: a while's body runs in its loop,
    # forward or backward as the while's own source location says.
    comps, body_of = {}, {}
    for block in re.split(r"\n(?=%|ENTRY )", compiled.as_text()):
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block)
        if head:
            comps[head.group(1)] = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\((.*)$", block, re.M)
    for insts in comps.values():
        for _, kind, rest in insts:
            if kind == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                body_of[body] = "backward" if "transpose(" in rest else "forward"
    where = {}
    for comp, insts in comps.items():
        side = body_of.get(comp)
        for name, kind, rest in insts:
            if kind in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while"):
                continue
            matmul = kind == "dot" or re.search(r'op_name="[^"]*dot_general"', rest)
            where[name] = f"{side} loop, " + ("matmuls" if matmul else "other") if side else "outside the loops"
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(reps):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                part = where.get(ev.name)
                if part:
                    ms, n = totals.get(part, (0.0, 0))
                    totals[part] = (ms + ev.duration_ns / 1e6, n + 1)
    if not totals:
        return None
    return {part: {"ms": ms / reps, "kernels": n / reps / (1 if part == "outside the loops" else steps)}
            for part, (ms, n) in totals.items()}


def block(tree):
    """Waits for every JAX array in `tree`; returns `tree`."""
    import jax

    return jax.block_until_ready(tree)


def to_numpy(tree) -> list[np.ndarray]:
    """Flattens a pytree of JAX/NumPy arrays or torch tensors to float64 NumPy arrays."""
    import jax

    out = []
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "detach"):  # torch.Tensor
            leaf = leaf.detach().float().cpu().numpy()
        out.append(np.asarray(np.asarray(leaf, dtype=np.float32), dtype=np.float64))
    return out


def assert_agree(name, got, ref, *, rtol, atol_frac, labels=None, tolerate=()):
    """Asserts `got` matches `ref` leaf by leaf; `atol` is `atol_frac * max|ref|` per leaf.

    Returns `({label: max|got - ref| / max|ref|}, [labels that disagreed but are tolerated])`.
    """
    got, ref = to_numpy(got), to_numpy(ref)
    if len(got) != len(ref):
        raise AssertionError(f"{name}: {len(got)} outputs, reference has {len(ref)}")
    errors, tolerated = {}, []
    for i, (a, b) in enumerate(zip(got, ref)):
        label = labels[i] if labels else f"output {i}"
        if a.shape != b.shape:
            raise AssertionError(f"{name}: {label} has shape {a.shape}, reference {b.shape}")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        errors[label] = float(np.max(np.abs(a - b))) / scale if scale else 0.0
        try:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * scale, err_msg=f"{name}: {label} disagrees")
        except AssertionError:
            if label not in tolerate:
                raise
            tolerated.append(label)
    return errors, tolerated


def interleave(contenders: Sequence[Contender], *, warmup: int, reps: int, gap_s: float = 0.0,
               budget_s: float | None = None, min_reps: int = 3):
    """Times each contender `reps` times, interleaved, after `warmup` untimed calls each.

    The order alternates (A B C, C B A, ...) so that no contender always follows the same
    one. With `budget_s`, the number of repetitions is lowered (not below `min_reps`) so that
    the timed rounds take about that long, judging by each contender's last warm-up call.
    Returns `({name: [wall seconds, ...]}, {name: [process CPU seconds, ...]})`.
    """
    est = 0.0
    for c in contenders:
        for _ in range(max(warmup, 1)):
            t = time.perf_counter()
            c.run()
            last = time.perf_counter() - t
        est += last
    if budget_s is not None and est > 0:
        reps = max(min(reps, min_reps), min(reps, int(budget_s / est)))
    times = {c.name: [] for c in contenders}
    cpu = {c.name: [] for c in contenders}
    order = list(contenders)
    for r in range(reps):
        for c in order if r % 2 == 0 else reversed(order):
            if gap_s:
                time.sleep(gap_s)
            p = time.process_time()
            t = time.perf_counter()
            c.run()
            times[c.name].append(time.perf_counter() - t)
            cpu[c.name].append(time.process_time() - p)
    return times, cpu


def compare(contenders: Sequence[Contender], *, warmup, reps, rtol, atol_frac, labels=None, gap_s=None,
            budget_s=None):
    """Checks agreement, then times the contenders interleaved.

    Returns `(rows, meta)`: a row dict per contender (name, median_s, min_s, q1_s, q3_s, n,
    cpu_s (median process CPU seconds per call, all threads), compile_s, note, group,
    reference), and the load average and this process's CPU share during the timing.
    """
    refs, errors = {}, {}
    for group in dict.fromkeys(c.group for c in contenders):
        members = [c for c in contenders if c.group == group]
        ref = next((c for c in members if c.reference), members[0])
        refs[group] = ref
        ref_out = ref.result()
        for c in members:
            if c.check and c is not ref:
                errors[c.name] = assert_agree(f"{c.name} vs {ref.name}", c.result(), ref_out, rtol=rtol,
                                              atol_frac=atol_frac, labels=labels, tolerate=c.tolerate)
        del ref_out
    untimed = [c.name for c in contenders if not c.timed]
    contenders = [c for c in contenders if c.timed]
    load_before = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if gap_s is None:
        gap_s = float(os.environ.get("LNJAX_BENCH_GAP_S", GAP_S))
    times, cpu = interleave(contenders, warmup=warmup, reps=reps, gap_s=gap_s, budget_s=budget_s)
    cpu_share = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    rows = []
    for c in contenders:
        ts = sorted(times[c.name])
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
        rows.append(
            dict(
                name=c.name,
                median_s=statistics.median(ts),
                min_s=ts[0],
                q1_s=q[0],
                q3_s=q[2],
                n=len(ts),
                cpu_s=statistics.median(cpu[c.name]),
                compile_s=c.compile_s,
                note=c.note,
                group=c.group,
                reference=c is refs[c.group],
                errors=errors.get(c.name, ({}, []))[0],
                tolerated=errors.get(c.name, ({}, []))[1],
            )
        )
    meta = dict(load_before=load_before, load_after=os.getloadavg()[0], cpu_share=cpu_share,
                checked_against=[refs[g].name for g in refs], untimed=untimed)
    return rows, meta


# ----------------------------------------------------------------------------------------
# The machine and the settings.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def caches() -> str:
    """cpu0's caches as sysfs reports them, e.g. "L1d 32K, L1i 32K, L2 1024K, L3 32768K" (the
    fused kernels' blocks are the L2 size)."""
    out = []
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        kind = {"Data": "d", "Instruction": "i"}.get(_read(f"{d}/type"), "")
        out.append(f"L{_read(f'{d}/level')}{kind} {_read(f'{d}/size')}")
    return ", ".join(out) or "n/a"


def machine_info() -> dict:
    """CPU, ISA, caches, cores, memory, kernel and transparent-huge-page mode of this machine."""
    mem = "n/a"
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    flags = _read("/proc/cpuinfo")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return dict(
        cpu=cpu_model(),
        cores=cores,
        isa=" ".join(isa),
        caches=caches(),
        memory=mem,
        kernel=platform.release(),
        python=platform.python_version(),
        thp=_read("/sys/kernel/mm/transparent_hugepage/enabled"),
    )


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy

    out = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, numpy=numpy.__version__)
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    return out


def thread_settings() -> dict:
    """What each framework will use: torch intra-op threads, XLA's CPU device count/flags."""
    out = {k: os.environ.get(k, "") for k in SETTING_VARS}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        pass
    import jax

    out["jax_devices"] = len(jax.devices())
    out["jax_backend"] = jax.default_backend()
    return out


# ----------------------------------------------------------------------------------------
# Jobs: each comparison runs in a fresh process.


# Settings every job runs with unless it overrides them (see BENCHMARKS.md, "Settings").
# PyTorch's OpenMP threads spin-wait by default; on a machine whose cores are shared with
# other processes that makes each parallel region wait for descheduled threads, which cost
# PyTorch up to 30x on small ops here. PASSIVE lets them sleep; JAX does not use OpenMP.
DEFAULT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def job_env(allocator: str = "glibc", xla_flags: str | None = None, overrides: dict | None = None) -> dict:
    """The environment of a job's process: this one's, minus every setting in SETTING_VARS,
    plus DEFAULT_ENV, the allocator's settings, the XLA flags and `overrides` (a value of
    None unsets the variable)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS}
    env.update(DEFAULT_ENV)
    env.update(ALLOCATORS[allocator])
    env["XLA_FLAGS"] = xla_flags or ""
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
    for k, v in (overrides or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_job(module: str, job: dict, *, allocator="glibc", xla_flags=None, env=None, timeout=1200) -> dict:
    """Runs `python -m benchmarks.<module> '<job json>'` in a fresh process; returns its result.

    The child prints progress on stderr and its JSON result as the last line of stdout.
    """
    cmd = [sys.executable, "-m", f"benchmarks.{module}", json.dumps(job)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=job_env(allocator, xla_flags, env), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark job {module} {job} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["job_wall_s"] = time.perf_counter() - t
    result["allocator"] = allocator
    return result


def job_main(run: Callable[[dict], dict]):
    """Entry point of a job module: reads the job from argv, prints the JSON result.

    A job still running after `LNJAX_BENCH_JOB_TIMEOUT_S` (default 900 s) prints every
    thread's stack to stderr and exits, so that a hang is reported rather than waited on.
    """
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("LNJAX_BENCH_JOB_TIMEOUT_S", 900)), exit=True)
    job = json.loads(sys.argv[1])
    result = run(job)
    faulthandler.cancel_dump_traceback_later()
    result["settings"] = thread_settings()
    result["job"] = job
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


def log(*args):
    print(*args, file=sys.stderr, flush=True)
