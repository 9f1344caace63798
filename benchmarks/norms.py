"""Normalization ops: forward, and forward + backward, against Flax and PyTorch eager.

One job = one (op, shape, dtype) in its own process: the forward comparison (with copies of
the same bytes, the hardware limit) and the forward+backward comparison (a VJP with a fixed
random cotangent `g` with respect to x, scale and bias; PyTorch `y.backward(g)`).

    python -m benchmarks.norms '{"op": "layer", "shape": [8192, 1024], "dtype": "float32"}'
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import _harness as H
from benchmarks import contenders as C
from benchmarks.contenders import EPS

SHAPES = ((8192, 1024), (32768, 256), (512, 8192))
DTYPES = ("float32", "bfloat16")

# Added to the data for the exactness check (the data's standard deviation is 1.5).
OFFSET = 1000.0

# Agreement tolerances: (rtol, atol as a fraction of max|reference|).
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 2e-2)}


def data(shape, dtype):
    rng = np.random.default_rng(0)
    n, h = shape
    x = (rng.standard_normal(shape, dtype=np.float32) * 1.5 + 0.3).astype(np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    scale = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(h)).astype(np.float32)
    return x, g, scale, bias


def reference(op, x, g, scale, bias, *, backward):
    """The op, and its VJP with cotangent g, in float64 NumPy (inputs already rounded to the
    benchmark dtype): `(y,)` or `(y, dx, dscale[, dbias])`."""
    x, g, s, b = (np.asarray(a, np.float64) for a in (x, g, scale, bias))
    eps = EPS[op]
    ax = 0 if op == "batch" else -1
    if op == "rms":
        rstd = 1 / np.sqrt(np.mean(x * x, axis=ax, keepdims=True) + eps)
        xhat = x * rstd
        y = xhat * s
    else:
        mean = x.mean(axis=ax, keepdims=True)
        rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=ax, keepdims=True) + eps)
        xhat = (x - mean) * rstd
        y = xhat * s + b
    if not backward:
        return (y,)
    if op == "batch":
        gs = g * s
        dx = rstd * (gs - gs.mean(0, keepdims=True) - xhat * (gs * xhat).mean(0, keepdims=True))
    else:
        gs = g * s
        centre = 0 if op == "rms" else gs.mean(-1, keepdims=True)
        dx = rstd * (gs - centre - xhat * (gs * xhat).mean(-1, keepdims=True))
    out = (y, dx, (g * xhat).sum(0))
    return out if op == "rms" else out + (g.sum(0),)


# ----------------------------------------------------------------------------------------
# The JAX contenders: each is `fn(x, scale, bias) -> y` (batch norm: `-> (y, new_stats)`).


# Roles timed by their own code here (PyTorch's eager calls, the copies) or only when a job
# names them (the attempts).
APART = ("torch", "copy", "attempt")


def jax_fns(op, h, dtype, *, roles=None, skip=(), extra=()):
    """{name: (fn, note)}: the registered JAX contenders of `op` in `roles` (default: every role
    but those measured apart) less those in `skip`, then those named in `extra` (e.g. the
    attempts); all in `dtype` end to end."""
    entries = [e for e in C.of("norms", op, *(roles or ())) if e.role not in (*APART, *skip)]
    entries += [C.get(n) for n in extra]
    return {e.name: (e.build(op, h, dtype), e.note) for e in entries}


@dataclasses.dataclass
class _Job:
    """One (op, shape, dtype): its data in JAX and PyTorch, its contenders and its settings."""

    op: str
    shape: tuple
    dtype: str
    arrays: tuple  # x, g, scale, bias as JAX arrays in dtype
    tensors: tuple  # the same as torch tensors
    rounded: list  # the same as float32 NumPy arrays, for the float64 reference
    fns: dict  # the JAX contenders: {name: (fn, note)}
    torch_name: str
    torch_fn: object
    settings: dict  # H.compare's warmup, reps, rtol and atol_frac

    def first_y(self, out):
        return out[0] if self.op == "batch" else out


def _job(job) -> _Job:
    import jax.numpy as jnp
    import torch

    op, shape, dtype = job["op"], tuple(job["shape"]), job["dtype"]
    h, dt = shape[1], jnp.dtype(dtype)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    raw = data(shape, dtype)
    arrays = tuple(jnp.asarray(a, dt) for a in raw)
    skip = ("xla",) * (not job.get("with_xla", True)) + ("flax",) * (not job.get("flax", True))
    torch_name = C.name(op, "torch")
    rtol, atol_frac = TOL[dtype]
    return _Job(op, shape, dtype, arrays, tuple(torch.tensor(a).to(tdt) for a in raw),
                [np.asarray(a.astype(jnp.float32)) for a in arrays],
                jax_fns(op, h, dtype, skip=skip, extra=job.get("extra_fns") or ()), torch_name,
                C.get(torch_name).build(op, h, dtype),
                dict(warmup=job.get("warmup", 2), reps=job.get("reps", 15), rtol=rtol, atol_frac=atol_frac))


def _forward(j: _Job, result, budget_s):
    import jax
    import jax.numpy as jnp
    import torch

    xj, gj, sj, bj = j.arrays
    xt, _, st, bt = j.tensors
    cons = [H.Contender("float64 reference", lambda: reference(j.op, *j.rounded, backward=False),
                        reference=True, timed=False)]
    # Exactness where the mean dominates (OFFSET + the same data, float32): what a one-pass
    # E[x^2] - E[x]^2 variance gives up.
    if j.dtype == "float32":
        x_off = xj + jnp.asarray(OFFSET, xj.dtype)
        ref_off = reference(j.op, *(np.asarray(a, np.float64) for a in (x_off, gj, sj, bj)), backward=False)[0]
    for name, (fn, note) in j.fns.items():
        compiled, cs = H.timed_compile(jax.jit(fn), xj, sj, bj)
        result["traffic"]["forward"][name] = H.traffic(compiled)
        if j.dtype == "float32":
            err = np.max(np.abs(np.asarray(j.first_y(compiled(x_off, sj, bj)), np.float64) - ref_off))
            result["offset_error"][name] = float(err / np.max(np.abs(ref_off)))
        cons.append(H.Contender(name, lambda c=compiled: H.block(j.first_y(c(xj, sj, bj))), cs, note=note))

    def torch_fwd():
        with torch.no_grad():
            return j.torch_fn(xt, st, bt if j.op != "rms" else None)

    cons.append(H.Contender(j.torch_name, torch_fwd, None, note="eager, no_grad"))
    for copy in C.of("norms", j.op, "copy"):
        copy_run, cs = copy.build(xj, xt)
        cons.append(H.Contender(copy.name, copy_run, cs, check=False, note=copy.note))
    H.log(f"norms {j.op} {j.shape} {j.dtype}: forward")
    rows, meta = H.compare(cons, labels=["y"], budget_s=budget_s, **j.settings)
    result["comparisons"].append(dict(mode="forward", rows=rows, meta=meta, bytes_moved=2 * xj.nbytes))


def _vjp(op, fn):
    """`(f(x, scale, bias, g) -> (y, dx, dscale[, dbias]) [, stats], its y and gradients)`."""
    import jax

    if op == "batch":
        def fb(x, s, b, g):
            y, vjp, stats = jax.vjp(fn, x, s, b, has_aux=True)
            return (y, *vjp(g)), stats
        return fb, lambda o: o[0]
    if op == "rms":
        def fb(x, s, b, g):
            y, vjp = jax.vjp(lambda x, s: fn(x, s, None), x, s)
            return (y, *vjp(g))
        return fb, lambda o: o

    def fb(x, s, b, g):
        y, vjp = jax.vjp(fn, x, s, b)
        return (y, *vjp(g))
    return fb, lambda o: o


def _forward_backward(j: _Job, result, budget_s):
    import jax

    xj, gj, sj, bj = j.arrays
    cons = [H.Contender("float64 reference", lambda: reference(j.op, *j.rounded, backward=True),
                        reference=True, timed=False)]
    for name, (fn, note) in j.fns.items():
        fb, out = _vjp(j.op, fn)
        compiled, cs = H.timed_compile(jax.jit(fb), xj, sj, bj, gj)
        result["traffic"]["forward+backward"][name] = H.traffic(compiled)
        cons.append(H.Contender(name, lambda c=compiled, out=out: H.block(out(c(xj, sj, bj, gj))), cs, note=note))
    has_bias = j.op != "rms"
    xt, gt, st, bt = j.tensors
    leaves = [xt.clone().requires_grad_(True), st.clone().requires_grad_(True)]
    leaves += [bt.clone().requires_grad_(True)] if has_bias else []

    def torch_fb():
        for t in leaves:
            t.grad = None
        y = j.torch_fn(*leaves[:2], leaves[2] if has_bias else None)
        y.backward(gt)
        return (y, *(t.grad for t in leaves))

    # PyTorch's bfloat16 kernels accumulate the parameter gradients in bfloat16 (errors of
    # several % of their scale, see BENCHMARKS.md); recorded, not fatal.
    tolerate = ("dscale", "dbias") if j.dtype == "bfloat16" else ()
    cons.append(H.Contender(j.torch_name, torch_fb, None, note="eager, y.backward(g)", tolerate=tolerate))
    labels = ["y", "dx", "dscale"] + (["dbias"] if has_bias else [])
    H.log(f"norms {j.op} {j.shape} {j.dtype}: forward+backward")
    rows, meta = H.compare(cons, labels=labels, budget_s=budget_s, **j.settings)
    result["comparisons"].append(dict(mode="forward+backward", rows=rows, meta=meta))


def run(job):
    j = _job(job)
    budget = job.get("budget_s", {"forward": 4.0, "forward+backward": 8.0})
    result = dict(op=j.op, shape=list(j.shape), dtype=j.dtype, out_mib=j.arrays[0].nbytes / 2**20, comparisons=[],
                  traffic={"forward": {}, "forward+backward": {}}, offset_error={})
    _forward(j, result, budget and budget["forward"])
    _forward_backward(j, result, budget and budget["forward+backward"])
    return result


if __name__ == "__main__":
    H.job_main(run)
