"""What every part of the benchmark report shares: number and shape formats, Markdown tables,
lookups in a job's results, and the norm ops' contenders by role (from the registry)."""

from __future__ import annotations

from benchmarks import contenders as C

OPNAME = {"layer": "Layer norm", "rms": "RMS norm", "batch": "Batch norm (training)"}
DT = {"float32": "f32", "bfloat16": "bf16"}
TORCH = {op: C.name(op, "torch") for op in C.OPS}
LNJAX = {op: C.name(op, "lnjax") for op in C.OPS}
XLA = {op: C.name(op, "xla") for op in C.OPS}
FAST = {op: C.name(op, "fast") for op in C.OPS if C.names(op, "fast")}
FLAX = {op: C.names(op, "flax") for op in C.OPS}  # (linen, nnx)
COPIES = C.names("layer", "copy")


def ms(s):
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def x(r):
    return f"{r:.2f}x"


def by_name(comp):
    """A comparison's rows by contender name."""
    return {r["name"]: r for r in comp["rows"]}


def shape(s):
    return "x".join(str(v) for v in s)


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def comparison(res, mode):
    """The comparison of a norms result in `mode` ("forward", "forward+backward")."""
    return next(c for c in res["comparisons"] if c["mode"] == mode)
