"""The benchmark's targets, as data: what each contender should reach against which peer, and
how far. The report's Targets table evaluates them on a run's results; a target naming a
contender that the registry (`benchmarks.contenders`) does not hold is a ValueError when the
table is built.

Kinds of target (each a function of the results below):
  worst: the largest ratio `contender / peer` of median times over every shape and dtype of
    `op` in `mode`, at most `threshold`;
  bandwidth: a jitted copy of the same bytes (`peer`) over the contender's time at `shape`, in
    each of `dtypes`, at least `threshold`;
  flax: never slower than the faster of the `peers` (Flax's two modules), at any shape or
    dtype, save where both compiled to the same program (then the gap is timing noise);
  speedup: the peer's training step over the contender's, at least `threshold`, at batch
    size `batch` (None: every configuration);
  overhead: the contender's training step over the peer's, at most `threshold`;
  sweep: `jax.vmap` of the sweep benchmark's runs against running them in turn (its
    contenders are that benchmark's own, not the registry's).
"""

from __future__ import annotations

import dataclasses

from benchmarks import contenders as C
from benchmarks.markdown import DT, FLAX, LNJAX, OPNAME, TORCH, XLA, by_name, comparison, shape, table

KINDS = ("worst", "bandwidth", "flax", "speedup", "overhead", "sweep")
LN_LSTM = tuple(C.cell_name("LN-LSTM", pre, xla) for xla in (False, True) for pre in (False, True))


@dataclasses.dataclass(frozen=True)
class Target:
    text: str  # as the report states it; {B} is the configuration's batch size, {dtype} the dtype
    kind: str
    op: str  # the norm op, or "rnn" / "sweep"
    mode: str
    contenders: tuple[str, ...]
    peers: tuple[str, ...]
    threshold: float
    batch: int | None = None
    shape: tuple[int, ...] = ()
    dtypes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of target {self.kind!r} in {self.text!r}; kinds: {KINDS}")
        if self.kind != "sweep":
            for name in (*self.contenders, *self.peers):
                C.get(name)


def _worst(text, op, mode, threshold):
    return Target(text, "worst", op, mode, (LNJAX[op], XLA[op]), (TORCH[op],), threshold)


def _bandwidth(op):
    return Target(f"{OPNAME[op]} forward >= 85% of copy bandwidth, 8192x1024 {{dtype}}", "bandwidth", op, "forward",
                  (LNJAX[op], XLA[op]), (C.COPY_JIT, C.COPY_NUMPY), 0.85, shape=(8192, 1024),
                  dtypes=("float32", "bfloat16"))


def _flax(op, mode):
    return Target(f"{OPNAME[op]} {mode} never slower than Flax, every shape/dtype", "flax", op, mode, (LNJAX[op],),
                  FLAX[op], 1.0)


TARGETS = (
    _worst("Layer norm forward <= 1.0x torch, every shape/dtype", "layer", "forward", 1.0),
    _worst("RMS norm forward <= 1.0x torch, every shape/dtype", "rms", "forward", 1.0),
    _bandwidth("layer"),
    _bandwidth("rms"),
    _worst("Layer norm forward+backward <= 1.3x torch", "layer", "forward+backward", 1.3),
    *(_flax(op, mode) for op in C.OPS for mode in C.MODES),
    _worst("Batch norm (training) forward+backward <= 1.0x torch", "batch", "forward+backward", 1.0),
    Target("LN-LSTM training >= 1.0x Flax OptimizedLSTMCell (B={B})", "speedup", "rnn", "training", LN_LSTM,
           (C.FLAX_LSTM,), 1.0, batch=32),
    Target("LN-LSTM training >= 1.5x scripted torch LN-LSTM (B={B})", "speedup", "rnn", "training", LN_LSTM,
           (C.TORCH_LN_LSTM[True],), 1.5, batch=32),
    Target("LN-LSTM training >= 5x eager torch LN-LSTM (B={B})", "speedup", "rnn", "training", LN_LSTM,
           (C.TORCH_LN_LSTM[False],), 5, batch=1),
    Target("unnormalized LSTM training >= 1.0x Flax OptimizedLSTMCell (B={B})", "speedup", "rnn", "training",
           (C.PLAIN_LSTM,), (C.FLAX_LSTM,), 1.0),
    Target("LN overhead <= 1.15x lnjax's unnormalized LSTM (B={B})", "overhead", "rnn", "training",
           (C.cell_name("LN-LSTM", True), C.cell_name("LN-LSTM", False)), (C.PLAIN_LSTM,), 1.15),
    Target("sweep never slower than sequential ({model})", "sweep", "sweep", "training", ("jax.vmap",), (), 1.0),
)


def _status(ok):
    return "met" if ok else "missed"


def _worst_rows(t, norms):
    rows = []
    for name in t.contenders:
        ratios = []
        for k, res in norms.items():
            rr = by_name(comparison(res, t.mode))
            if k[0] == t.op and name in rr:
                p = rr[t.peers[0]]
                ratios.append((rr[name]["median_s"] / p["median_s"], k, rr[name]["min_s"] / p["min_s"]))
        if ratios:
            w = max(ratios)
            rows.append([t.text, name, _status(w[0] <= t.threshold),
                         f"worst {w[0]:.2f}x torch ({shape(w[1][1])} {DT[w[1][2]]}); "
                         f"ratio of the fastest calls there: {w[2]:.2f}x"])
    return rows


def _bandwidth_rows(t, norms):
    rows = []
    for dt in t.dtypes:
        k = (t.op, t.shape, dt)
        if k not in norms:
            continue
        rr = by_name(comparison(norms[k], t.mode))
        cj, cn = (rr[p]["median_s"] for p in t.peers)
        for name in (n for n in t.contenders if n in rr):
            s = rr[name]["median_s"]
            rows.append([t.text.format(dtype=DT[dt]), name, _status(cj / s >= t.threshold),
                         f"{100 * cj / s:.0f}% of a jitted copy, {100 * cn / s:.0f}% of np.copyto"])
    return rows


def _flax_rows(t, norms):
    slower, same, cells = [], [], 0
    name = t.contenders[0]
    for k, res in sorted(norms.items()):
        rr = by_name(comparison(res, t.mode))
        if k[0] != t.op or name not in rr:
            continue
        cells += 1
        fastest = min(t.peers, key=lambda f: rr[f]["median_s"])
        ratio = rr[name]["median_s"] / rr[fastest]["median_s"]
        program = {n: p.get("program") for n, p in res.get("traffic", {}).get(t.mode, {}).items()}
        if ratio > t.threshold:
            cell = f"{shape(k[1])} {DT[k[2]]} {ratio:.2f}x {fastest.split('.')[1]}"
            # The same compiled program as Flax's runs the same kernels: the gap is noise.
            (same if program.get(name) and any(program.get(name) == program.get(f) for f in t.peers) else slower).append(cell)
    if not cells:
        return []
    measured = f"slower in {len(slower)} of {cells}: " + ", ".join(slower) if slower else \
        f"not slower in {cells - len(same)} of {cells}"
    if same:
        measured += "; the same compiled program as Flax's, so timing noise, in " + ", ".join(same)
    return [[t.text, name, _status(not slower), measured]]


def _rnn_rows(B, r):
    """The recurrent targets at one configuration: the speed-ups at its batch size contender
    by contender, then those at every batch size, then the overheads."""
    rr, rows = by_name(r), []
    at = [t for t in TARGETS if t.kind == "speedup" and t.batch == B]
    for name in (n for n in LN_LSTM if n in rr):
        tag = name + (" (default)" if name.endswith(f"={r.get('default_precompute_inputs')}") else "")
        for t in (t for t in at if name in t.contenders):
            f = rr[t.peers[0]]["median_s"] / rr[name]["median_s"]
            rows.append([t.text.format(B=B), tag, _status(f >= t.threshold), f"{f:.2f}x"])
    for t in TARGETS:
        if t.kind in ("speedup", "overhead") and t.batch is None and t.peers[0] in rr:
            for name in (n for n in t.contenders if n in rr):
                mine, peer = rr[name]["median_s"], rr[t.peers[0]]["median_s"]
                f = peer / mine if t.kind == "speedup" else mine / peer
                ok = f >= t.threshold if t.kind == "speedup" else f <= t.threshold
                rows.append([t.text.format(B=B), name, _status(ok), f"{f:.2f}x"])
    return rows


NORM_ROWS = {"worst": _worst_rows, "bandwidth": _bandwidth_rows, "flax": _flax_rows}


def section(norms, rnn, sweep):
    """The report's Targets section: every target evaluated on the run's results (`norms` by
    (op, shape, dtype), `rnn` by (B, T), `sweep`: speed-up of vmap by model)."""
    rows = [row for t in TARGETS if t.kind in NORM_ROWS for row in NORM_ROWS[t.kind](t, norms)]
    for (B, T), r in sorted(rnn.items(), reverse=True):
        rows += _rnn_rows(B, r)
    for t in (t for t in TARGETS if t.kind == "sweep"):
        rows += [[t.text.format(model=model), t.contenders[0], _status(s >= t.threshold),
                  f"vmap {s:.2f}x the speed of 8 runs in turn"] for model, s in sweep.items()]
    return [
        "## Targets",
        "",
        "Ratios of median times measured in the same process (the norm ops with freed memory "
        "reused, `reuse`; see Allocation); the status "
        "follows the medians. Where the load distorts the medians, the ratio of the fastest call "
        "of each contender (its best case, when the machine was momentarily free) is given for "
        "context. lnjax's default on CPU is its native kernels (`lnjax.native`, C++ through XLA's "
        "FFI); `implementation=\"fused\"` is the closed-form derivative in XLA (`lnjax._fused`, a "
        "`custom_jvp`; the default off CPU) and `implementation=\"xla\"` autodiff of the formula.",
        "",
        table(["target", "implementation", "status", "measured"], rows),
        "",
    ]
