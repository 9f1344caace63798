"""Normalization ops: forward, and forward + backward, against Flax and PyTorch eager.

One job = one (op, shape, dtype) in its own process: the forward comparison (with copies of
the same bytes, the hardware limit) and the forward+backward comparison (a VJP with a fixed
random cotangent `g` with respect to x, scale and bias; PyTorch `y.backward(g)`).

    python -m benchmarks.norms '{"op": "layer", "shape": [8192, 1024], "dtype": "float32"}'
"""

from __future__ import annotations

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


def jax_fns(op, h, dtype, *, roles=("lnjax", "xla", "fast", "flax"), extra=()):
    """{name: (fn, note)}: the registered JAX contenders of `op` in `roles`, then those named
    in `extra` (e.g. the attempts); all in `dtype` end to end."""
    entries = C.of("norms", op, *roles) + [C.get(n) for n in extra]
    return {e.name: (e.build(op, h, dtype), e.note) for e in entries}


# ----------------------------------------------------------------------------------------


def run(job):
    import jax
    import jax.numpy as jnp
    import torch

    op, shape, dtype = job["op"], tuple(job["shape"]), job["dtype"]
    reps, warmup = job.get("reps", 15), job.get("warmup", 2)
    budget = job.get("budget_s", {"forward": 4.0, "forward+backward": 8.0})
    n, h = shape
    dt = jnp.dtype(dtype)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    x, g, s, b = data(shape, dtype)
    xj, gj, sj, bj = (jnp.asarray(a, dt) for a in (x, g, s, b))
    xt, gt, st, bt = (torch.tensor(a).to(tdt) for a in (x, g, s, b))
    rtol, atol_frac = TOL[dtype]
    roles = ("lnjax",) + ("xla",) * job.get("with_xla", True) + ("fast",) + ("flax",) * job.get("flax", True)
    fns = jax_fns(op, h, dtype, roles=roles, extra=job.get("extra_fns") or ())
    torch_name = C.name(op, "torch")
    tfn = C.get(torch_name).build(op, h, dtype)
    has_bias = op != "rms"
    nbytes = x.size * dt.itemsize
    result = dict(op=op, shape=list(shape), dtype=dtype, out_mib=nbytes / 2**20, comparisons=[])

    def first_y(out):
        return out[0] if op == "batch" else out

    # Forward ---------------------------------------------------------------------------
    cons, result["traffic"] = [], {"forward": {}, "forward+backward": {}}
    # Exactness where the mean dominates (OFFSET + the same data, float32): what a one-pass
    # E[x^2] - E[x]^2 variance gives up.
    result["offset_error"] = {}
    if dtype == "float32":
        x_off = xj + jnp.asarray(OFFSET, dt)
        ref_off = reference(op, *(np.asarray(a, np.float64) for a in (x_off, gj, sj, bj)), backward=False)[0]
    for name, (fn, note) in fns.items():
        compiled, cs = H.timed_compile(jax.jit(fn), xj, sj, bj)
        result["traffic"]["forward"][name] = H.traffic(compiled)
        if dtype == "float32":
            err = np.max(np.abs(np.asarray(first_y(compiled(x_off, sj, bj)), np.float64) - ref_off))
            result["offset_error"][name] = float(err / np.max(np.abs(ref_off)))
        cons.append(H.Contender(name, lambda c=compiled: H.block(first_y(c(xj, sj, bj))), cs, note=note))

    def torch_fwd():
        with torch.no_grad():
            return tfn(xt, st, bt if has_bias else None)

    rounded = [np.asarray(a.astype(jnp.float32)) for a in (xj, gj, sj, bj)]
    cons.insert(0, H.Contender("float64 reference", lambda: reference(op, *rounded, backward=False),
                               reference=True, timed=False))
    cons.append(H.Contender(torch_name, torch_fwd, None, note="eager, no_grad"))
    for copy in C.of("norms", op, "copy"):
        copy_run, cs = copy.build(xj, xt)
        cons.append(H.Contender(copy.name, copy_run, cs, check=False, note=copy.note))
    H.log(f"norms {op} {shape} {dtype}: forward")
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=rtol, atol_frac=atol_frac, labels=["y"],
                           budget_s=budget and budget["forward"])
    result["comparisons"].append(dict(mode="forward", rows=rows, meta=meta, bytes_moved=2 * nbytes))

    # Forward + backward ------------------------------------------------------------------
    cons = []
    for name, (fn, note) in fns.items():
        if op == "batch":

            def fb(x, s, b, g, fn=fn):
                y, vjp, stats = jax.vjp(fn, x, s, b, has_aux=True)
                return (y, *vjp(g)), stats

            out = lambda o: o[0]  # noqa: E731
        elif has_bias:

            def fb(x, s, b, g, fn=fn):
                y, vjp = jax.vjp(fn, x, s, b)
                return (y, *vjp(g))

            out = lambda o: o  # noqa: E731
        else:

            def fb(x, s, b, g, fn=fn):
                y, vjp = jax.vjp(lambda x, s: fn(x, s, None), x, s)
                return (y, *vjp(g))

            out = lambda o: o  # noqa: E731

        compiled, cs = H.timed_compile(jax.jit(fb), xj, sj, bj, gj)
        result["traffic"]["forward+backward"][name] = H.traffic(compiled)
        cons.append(H.Contender(name, lambda c=compiled, out=out: H.block(out(c(xj, sj, bj, gj))), cs, note=note))

    xg = xt.clone().requires_grad_(True)
    sg = st.clone().requires_grad_(True)
    bg = bt.clone().requires_grad_(True) if has_bias else None
    leaves = [xg, sg] + ([bg] if has_bias else [])

    def torch_fb():
        for t in leaves:
            t.grad = None
        y = tfn(xg, sg, bg)
        y.backward(gt)
        return (y, *(t.grad for t in leaves))

    cons.insert(0, H.Contender("float64 reference", lambda: reference(op, *rounded, backward=True),
                               reference=True, timed=False))
    # PyTorch's bfloat16 kernels accumulate the parameter gradients in bfloat16 (errors of
    # several % of their scale, see BENCHMARKS.md); recorded, not fatal.
    tolerate = ("dscale", "dbias") if dtype == "bfloat16" else ()
    cons.append(H.Contender(torch_name, torch_fb, None, note="eager, y.backward(g)", tolerate=tolerate))
    labels = ["y", "dx", "dscale"] + (["dbias"] if has_bias else [])
    H.log(f"norms {op} {shape} {dtype}: forward+backward")
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=rtol, atol_frac=atol_frac, labels=labels,
                           budget_s=budget and budget["forward+backward"])
    result["comparisons"].append(dict(mode="forward+backward", rows=rows, meta=meta))
    return result


if __name__ == "__main__":
    H.job_main(run)
