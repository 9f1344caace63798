"""The norm ops' part of the benchmark report: per op and mode the times against PyTorch and
Flax, the fraction of the memory bandwidth, XLA's traffic, compile times, accuracy, the
allocator and OpenMP comparisons, and where lnjax is slower than Flax."""

from __future__ import annotations

import statistics
from collections import defaultdict

from benchmarks import contenders as C
from benchmarks import markdown as M
from benchmarks.markdown import COPIES, DT, FAST, FLAX, LNJAX, OPNAME, TORCH, XLA


def _norm_results(results, section="norms", allocator="reuse"):
    out = {}
    for r in results:
        if r["section"] == section and r["allocator"] == allocator and not r.get("xla_flags"):
            out[(r["op"], tuple(r["shape"]), r["dtype"])] = r
    return out


def _times_table(op, mode, keys, norms):
    """Median ms of every contender (but the copies) per shape and dtype, relative to PyTorch."""
    names = []
    for k in keys:
        for r in M.comparison(norms[k], mode)["rows"]:
            if r["name"] not in names and r["name"] not in COPIES:
                names.append(r["name"])
    rows = []
    for k in keys:
        comp = M.comparison(norms[k], mode)
        rr = M.by_name(comp)
        t = rr[TORCH[op]]["median_s"]
        cells = [f"{M.ms(rr[n]['median_s'])} ({rr[n]['median_s'] / t:.2f})" if n in rr else "" for n in names]
        rows.append([f"{M.shape(k[1])} {DT[k[2]]}", f"{norms[k]['out_mib']:.0f}", *cells,
                     f"{comp['meta']['load_before']:.1f}"])
    return [f"### {OPNAME[op]}, {mode}", "", M.table(["shape dtype", "output MiB", *names, "load"], rows), ""]


def _bandwidth_table(op, keys, norms):
    """The forward's time against copies of the same bytes."""
    rows = []
    for k in keys:
        rr = M.by_name(M.comparison(norms[k], "forward"))
        cj, cn, ct = (rr[n]["median_s"] for n in (C.COPY_JIT, C.COPY_NUMPY, C.COPY_TORCH))
        impl = [n for n in (LNJAX[op], XLA.get(op), TORCH[op]) if n and n in rr]
        cells = [f"{100 * cj / rr[n]['median_s']:.0f}% / {100 * cn / rr[n]['median_s']:.0f}%" for n in impl]
        nbytes = 2 * norms[k]["out_mib"] * 2**20
        rows.append([f"{M.shape(k[1])} {DT[k[2]]}", M.ms(cj), M.ms(cn), M.ms(ct), f"{nbytes / cn / 1e9:.1f}", *cells])
    return [
        f"### {OPNAME[op]}, forward as a fraction of the memory bandwidth",
        "",
        "The hardware limit of a forward pass is a copy of the same bytes (read x, write y). "
        "Cells: copy time / op time, against a jitted `x + 0` (allocates its output like the "
        "ops do) / against `np.copyto` into a preallocated buffer (no allocation at all).",
        "",
        M.table(["shape dtype", "copy jit ms", "np.copyto ms", "torch.clone ms", "np.copyto GB/s",
                 *[f"{n} % of copy" for n in impl]], rows),
        "",
    ]


def norm_tables(results):
    norms = _norm_results(results)
    if not norms:
        return [], {}
    lines = ["## Normalization ops", ""]
    lines += [
        "Shapes `[rows, features]`, normalized over the features (batch norm: over the rows). "
        "Parameters and outputs in the input's dtype for every contender (Flax: `dtype` and "
        "`param_dtype` set to it; PyTorch batch norm keeps its running statistics in it too). "
        "Flax runs with its default `use_fast_variance=True` (one-pass `E[x^2]-E[x]^2`); lnjax "
        "and PyTorch compute the variance exactly. Flax NNX modules are `nnx.split` outside and "
        "`nnx.merge`d inside `jax.jit` (no `nnx.jit` overhead). Each cell: median ms, and in "
        "brackets the time relative to PyTorch (below 1 is faster than PyTorch).",
        "",
    ]
    for op in C.OPS:
        keys = sorted((k for k in norms if k[0] == op), key=lambda k: (k[2] != "float32", k[1]))
        if not keys:
            continue
        for mode in C.MODES:
            lines += _times_table(op, mode, keys, norms)
        lines += _bandwidth_table(op, keys, norms)
        lines += _traffic_table(op, keys, norms, first=not any("memory traffic" in ln for ln in lines))
    return lines, norms


def _traffic_table(op, keys, norms, first):
    """Where XLA:CPU's time goes: bytes its kernels move, per compiled program, in units of
    one array of x, against the fewest a fused kernel needs."""
    keys = [k for k in keys if "traffic" in norms[k]]
    if not keys:
        return []
    names = list(norms[keys[0]]["traffic"]["forward"])
    rows = []
    for k in keys:
        nbytes = norms[k]["out_mib"] * 2**20
        for mode, least in (("forward", 2), ("forward+backward", 5)):
            t = norms[k]["traffic"][mode]
            rows.append([f"{M.shape(k[1])} {DT[k[2]]}", mode, least,
                         *[f"{t[n]['bytes'] / nbytes:.1f} ({t[n]['kernels']})" if n in t else "" for n in names]])
    about = ("Bytes that XLA's cost model counts for each compiled program (`compile().cost_analysis()`: "
             "every kernel's operands and outputs, loops times their trip count), in units of one array "
             "of x, and in brackets the kernels launched at the top level. A single fused kernel needs "
             "the `least` column: forward reads x and writes y; forward+backward (as PyTorch's "
             "separate kernels) reads x, writes y, then reads x and g and writes dx. Traffic above "
             "that is full-size temporaries (`x - mean`, float32 copies of bfloat16 data) written and "
             "read again: it costs time where they do not fit in the caches.") if first else "As above."
    return [
        f"### {OPNAME[op]}: memory traffic of the compiled programs",
        "",
        about,
        "",
        M.table(["shape dtype", "mode", "least", *names], rows),
        "",
    ]


def compile_table(norms):
    per = defaultdict(lambda: defaultdict(list))
    for res in norms.values():
        for comp in res["comparisons"]:
            for r in comp["rows"]:
                if r["compile_s"] is not None and r["name"] not in COPIES:
                    per[r["name"]][comp["mode"]].append(r["compile_s"])
    rows = []
    for name, d in per.items():
        rows.append([name, *(f"{statistics.median(d[m]):.2f}" if d.get(m) else "" for m in ("forward", "forward+backward"))])
    return [
        "### Compile times of the norm ops",
        "",
        "Seconds for `lower(...).compile()`, median over shapes and dtypes (PyTorch eager: none).",
        "",
        M.table(["contender", "forward s", "forward+backward s"], rows),
        "",
    ]


def alloc_table(results):
    g = _norm_results(results, allocator="glibc")
    r_ = _norm_results(results, allocator="reuse")
    if not r_:
        return []
    rows = []
    for k, res in sorted(r_.items()):
        if k not in g:
            continue
        op = k[0]
        for mode in ("forward", "forward+backward"):
            a, b = M.by_name(M.comparison(g[k], mode)), M.by_name(M.comparison(res, mode))
            names = [n for n in (LNJAX[op], XLA.get(op), TORCH[op], C.COPY_JIT, C.COPY_NUMPY)
                     if n and n in a and n in b]
            for n in names:
                rows.append([f"{OPNAME[op]} {M.shape(k[1])} {DT[k[2]]}", mode, n, M.ms(a[n]["median_s"]),
                             M.ms(b[n]["median_s"])])
    if not rows:
        return []
    return [
        "## Allocation",
        "",
        "glibc serves blocks of 32 MiB or more (the float32 outputs of 8192x1024 and 32768x256) "
        "with a fresh `mmap` and unmaps them on free, so every such output is page-faulted in "
        "again on each call (numpy avoids part of it with huge pages). XLA:CPU and PyTorch both "
        "allocate their outputs with `malloc`, so both pay it alike, and the ratios shrink towards "
        "1 and vary from run to run with the page faults. The `reuse` setting "
        "(`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^46`, for every contender) makes glibc reuse "
        "freed memory like a caching allocator, as a training loop's steady state has it; the "
        "norm tables and targets are measured under it. These rows are the same comparisons "
        "under glibc's defaults (median ms). Buffer donation was not used for the norm ops: it "
        "would give JAX in-place outputs that PyTorch's functional ops cannot have.",
        "",
        M.table(["op", "mode", "contender", "glibc ms", "reuse ms"], rows),
        "",
    ]


def omp_table(results):
    runs = [r for r in results if r["section"] == "omp"]
    spin = next((r for r in runs if "OMP_WAIT_POLICY" in r.get("env_overrides", {})), None)
    passive = next((r for r in runs if "OMP_WAIT_POLICY" not in r.get("env_overrides", {})), None)
    if not spin or not passive:
        return []
    op = spin["op"]
    rows = []
    for mode in ("forward", "forward+backward"):
        a, b = M.by_name(M.comparison(spin, mode)), M.by_name(M.comparison(passive, mode))
        for n in (LNJAX[op], TORCH[op], C.COPY_TORCH):
            if n in a and n in b:
                rows.append([mode, n, f"{M.ms(a[n]['median_s'])} (min {M.ms(a[n]['min_s'])})",
                             f"{M.ms(b[n]['median_s'])} (min {M.ms(b[n]['min_s'])})",
                             M.ms(a[n]["cpu_s"]), M.ms(b[n]["cpu_s"])])
    loads = f"{M.comparison(spin, 'forward')['meta']['load_before']:.1f} / {M.comparison(passive, 'forward')['meta']['load_before']:.1f}"
    return [
        "## PyTorch's thread wait policy",
        "",
        "Every job runs with `OMP_WAIT_POLICY=PASSIVE`. By default PyTorch's OpenMP threads spin "
        "while they wait; with the two cores shared with other processes, a parallel region then "
        "waits for team members that are not scheduled. Only PyTorch uses OpenMP (XLA has its own "
        f"thread pool). The same comparison ({OPNAME[op]} {M.shape(spin['shape'])} "
        f"{DT[spin['dtype']]}, lnjax and PyTorch) in two processes run back to back, median ms "
        f"(load {loads}):",
        "",
        M.table(["mode", "contender", "default (spinning)", "PASSIVE", "CPU ms spinning", "CPU ms PASSIVE"], rows),
        "",
    ]


def accuracy_table(norms):
    rows = []
    for k, res in sorted(norms.items()):
        if k[2] != "bfloat16":
            continue
        for r in M.comparison(res, "forward+backward")["rows"]:
            e = r.get("errors") or {}
            if not e:
                continue
            rows.append([f"{OPNAME[k[0]]} {M.shape(k[1])}", r["name"],
                         *(f"{100 * e[lab]:.2f}%" if lab in e else "" for lab in ("y", "dx", "dscale", "dbias")),
                         "tolerated: " + ", ".join(r["tolerated"]) if r.get("tolerated") else "within tolerance"])
    if not rows:
        return []
    return [
        "### Accuracy in bfloat16",
        "",
        "Every contender is checked against a float64 NumPy evaluation of the same formulas on "
        "the same (bfloat16-rounded) inputs before it is timed. Cells: max |error| / max |reference| "
        "per output (bfloat16 itself resolves 0.4%). PyTorch's CPU kernels accumulate the "
        "layer-norm parameter gradients in bfloat16 over the rows, which costs them several "
        "percent; the suite records that instead of stopping (lnjax and Flax accumulate in float32).",
        "",
        M.table(["op", "contender", "y", "dx", "dscale", "dbias", "check"], rows),
        "",
    ]

def _same_program_spread(norms):
    """The largest ratio of median times between two contenders of one comparison that XLA
    compiled to the same program: how far apart equal work measured in this run."""
    worst = None
    for k, res in sorted(norms.items()):
        for mode, progs in res.get("traffic", {}).items():
            rr = M.by_name(M.comparison(res, mode))
            names = [n for n, t in progs.items() if t.get("program") and n in rr]
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    if progs[a]["program"] == progs[b]["program"]:
                        ta, tb = sorted((rr[a]["median_s"], rr[b]["median_s"]))
                        if worst is None or tb / ta > worst[0]:
                            worst = (tb / ta, f"{a} and {b}, {OPNAME[k[0]]} {M.shape(k[1])} {DT[k[2]]} {mode}")
    return worst


def flax_misses(norms):
    """Why lnjax is slower than Flax where it is, with the traffic and exactness measured."""
    rows = []
    for k, res in sorted(norms.items()):
        err = res.get("offset_error") or {}
        if LNJAX[k[0]] in err and FLAX[k[0]][0] in err:
            fwd = res.get("traffic", {}).get("forward", {})
            traffic = " / ".join(f"{fwd[n]['bytes'] / (res['out_mib'] * 2**20):.0f}"
                                 for n in (LNJAX[k[0]], FLAX[k[0]][0]) if n in fwd)
            fast = FAST.get(k[0])
            if fast in err:
                rr = M.by_name(M.comparison(res, "forward"))
                flax_t = min(rr[f]["median_s"] for f in FLAX[k[0]])
                fast = f"{err[fast]:.1e}; {M.x(rr[fast]['median_s'] / flax_t)}"
            else:
                fast = "-"
            rows.append([OPNAME[k[0]], M.shape(k[1]), f"{err[LNJAX[k[0]]]:.1e}", f"{err[FLAX[k[0]][0]]:.1e}",
                         traffic, fast])
    if not rows:
        return []
    return [
        "## Where lnjax is slower than Flax, and why",
        "",
        "Flax's layer and batch norm default to `use_fast_variance=True`, the one-pass "
        "`E[x^2] - E[x]^2`. lnjax computes the variance exactly (the library's numerical default), "
        "which takes one more reduction: the mean first, then the deviations from it. On XLA:CPU "
        "each reduction is a pass over the data (its YNN fusions run them one after another over "
        "a row; batch norm's column sums read all of x), and where one fusion cannot hold the "
        "computation (batch norm; layer norm's 8192-wide rows) XLA writes `x - mean` as a "
        "full-size temporary and reads it back. Forward+backward is another matter: lnjax's "
        "closed-form derivative moves far fewer bytes than autodiff of either formula (the "
        "traffic tables). What the exact "
        "variance buys: the error of the forward output, float32, on the benchmark's data "
        "plus 1000 (its standard deviation is 1.5), against float64; and the forward traffic "
        "in arrays of x (lnjax / Flax). RMS norm has no mean to subtract and computes what "
        "Flax's RMSNorm computes, in as many passes. The last column is lnjax with "
        "`fast_variance=True`, Flax's one-pass formula: its error, and its forward time over the "
        "faster Flax module's. A one-pass form that keeps the variance exact (shifted by a value "
        "from the row) is attempt G in 'what was tried'.",
        "",
        M.table(["op", "shape (float32)", "lnjax: max error / max abs(y)", "Flax (linen): max error / max abs(y)",
                "forward traffic, lnjax / Flax", "lnjax fast_variance=True: error; time / Flax"], rows),
        "",
    ] + ([
        f"**How far apart equal work measured.** Contenders that XLA compiled to the same program "
        f"measured up to {M.x(spread[0])} apart in this run ({spread[1]}), interleaved in one "
        "process: ratios nearer 1 than that, for one cell in one run, do not say which is faster.",
        "",
    ] if (spread := _same_program_spread(norms)) else [])

