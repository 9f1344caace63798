"""Normalization ops: forward, and forward + backward, against Flax and PyTorch eager.

One job = one (op, shape, dtype) in its own process: the forward comparison (with copies of
the same bytes, the hardware limit) and the forward+backward comparison (a VJP with a fixed
random cotangent `g` with respect to x, scale and bias; PyTorch `y.backward(g)`).

    python -m benchmarks.norms '{"op": "layer", "shape": [8192, 1024], "dtype": "float32"}'
"""

from __future__ import annotations

import numpy as np

from benchmarks import _harness as H
from benchmarks.report import FAST, XLA

OPS = ("layer", "rms", "batch")
SHAPES = ((8192, 1024), (32768, 256), (512, 8192))
DTYPES = ("float32", "bfloat16")
EPS = {"layer": 1e-5, "rms": 1e-6, "batch": 1e-5}
MOMENTUM = 0.9  # Flax convention (weight of the old value); PyTorch's momentum=0.1

# Added to the data for the exactness check (the data's standard deviation is 1.5).
OFFSET = 1000.0

# Agreement tolerances: (rtol, atol as a fraction of max|reference|).
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 2e-2)}


def _data(shape, dtype):
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


def _jax_fns(op, h, dtype, *, with_xla=True, with_flax=True):
    """{name: (fn, note)} for the JAX implementations of `op`; all in `dtype` end to end."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lnjax

    dt = jnp.dtype(dtype)
    eps = EPS[op]
    fns = {}
    if op == "layer":
        fns["lnjax.layer_norm"] = (lambda x, s, b: lnjax.layer_norm(x, s, b, eps=eps),
                                   "default: closed-form custom_jvp, exact variance")
        if with_xla:
            fns[XLA["layer"]] = (
                lambda x, s, b: lnjax.layer_norm(x, s, b, eps=eps, implementation="xla"),
                "autodiff of the formula, exact variance",
            )
        fns[FAST["layer"]] = (lambda x, s, b: lnjax.layer_norm(x, s, b, eps=eps, fast_variance=True),
                              "one-pass variance, as Flax's default")
        lin = nn.LayerNorm(epsilon=eps, dtype=dt, param_dtype=dt)
        fns["flax.linen.LayerNorm"] = (
            lambda x, s, b: lin.apply({"params": {"scale": s, "bias": b}}, x),
            "use_fast_variance=True (default)",
        )
        mod = nnx.LayerNorm(h, epsilon=eps, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
    elif op == "rms":
        fns["lnjax.rms_norm"] = (lambda x, s, b: lnjax.rms_norm(x, s, eps=eps), "default: closed-form custom_jvp")
        if with_xla:
            fns[XLA["rms"]] = (
                lambda x, s, b: lnjax.rms_norm(x, s, eps=eps, implementation="xla"),
                "autodiff of the formula",
            )
        lin = nn.RMSNorm(epsilon=eps, dtype=dt, param_dtype=dt)
        fns["flax.linen.RMSNorm"] = (
            lambda x, s, b: lin.apply({"params": {"scale": s}}, x),
            "use_fast_variance=True (default; no effect without centring)",
        )
        mod = nnx.RMSNorm(h, epsilon=eps, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
    else:
        state0 = lnjax.batch_norm_state(h)
        fns["lnjax.batch_norm"] = (
            lambda x, s, b: lnjax.batch_norm(x, s, b, state0, training=True, momentum=MOMENTUM, eps=eps),
            "training=True, default: closed-form custom_jvp, exact variance",
        )
        if with_xla:
            fns[XLA["batch"]] = (
                lambda x, s, b: lnjax.batch_norm(x, s, b, state0, training=True, momentum=MOMENTUM, eps=eps,
                                                 implementation="xla"),
                "autodiff of the formula, exact variance",
            )
        fns[FAST["batch"]] = (
            lambda x, s, b: lnjax.batch_norm(x, s, b, state0, training=True, momentum=MOMENTUM, eps=eps,
                                             fast_variance=True),
            "one-pass variance, as Flax's default",
        )
        lin = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=eps, dtype=dt, param_dtype=dt)
        stats0 = {"mean": jnp.zeros((h,), jnp.float32), "var": jnp.ones((h,), jnp.float32)}

        def linen_bn(x, s, b):
            y, upd = lin.apply({"params": {"scale": s, "bias": b}, "batch_stats": stats0}, x,
                               mutable=["batch_stats"])
            return y, upd["batch_stats"]

        fns["flax.linen.BatchNorm"] = (linen_bn, "use_fast_variance=True (default)")
        mod = nnx.BatchNorm(h, use_running_average=False, momentum=MOMENTUM, epsilon=eps, dtype=dt,
                            param_dtype=dt, rngs=nnx.Rngs(0))

    graphdef, state = nnx.split(mod)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    leaves0 = [leaf for _, leaf in paths_leaves]

    def nnx_fn(x, s, b):
        new = {"scale": s, "bias": b}
        vals = [next((v for k, v in new.items() if f"'{k}'" in nm), leaf) for nm, leaf in zip(names, leaves0)]
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, vals))
        y = m(x)
        if op == "batch":
            return y, (m.mean.value, m.var.value)
        return y

    cls = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BatchNorm"}[op]
    fns[f"flax.nnx.{cls}"] = (nnx_fn, "use_fast_variance=True (default); split/merge inside jax.jit")
    if not with_flax:
        fns = {k: v for k, v in fns.items() if not k.startswith("flax.")}
    return fns


def _torch_fns(op, h, dtype):
    import torch
    import torch.nn.functional as F

    eps = EPS[op]
    if op == "layer":
        return lambda x, w, b: F.layer_norm(x, (h,), w, b, eps)
    if op == "rms":
        return lambda x, w, b: F.rms_norm(x, (h,), w, eps)
    # PyTorch's CPU kernel wants running statistics in the input's dtype when the weights
    # have it (as after `module.to(torch.bfloat16)`).
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    rm = torch.zeros(h, dtype=tdt)
    rv = torch.ones(h, dtype=tdt)
    return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, momentum=1 - MOMENTUM, eps=eps)


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
    x, g, s, b = _data(shape, dtype)
    xj, gj, sj, bj = (jnp.asarray(a, dt) for a in (x, g, s, b))
    xt, gt, st, bt = (torch.tensor(a).to(tdt) for a in (x, g, s, b))
    rtol, atol_frac = TOL[dtype]
    fns = _jax_fns(op, h, dtype, with_xla=job.get("with_xla", True), with_flax=job.get("flax", True))
    extra = job.get("extra_fns") or {}
    if extra:
        from benchmarks import attempts

        for name in extra:
            fns[name] = attempts.get(name, op)
    tfn = _torch_fns(op, h, dtype)
    torch_name = {"layer": "torch F.layer_norm", "rms": "torch F.rms_norm", "batch": "torch F.batch_norm"}[op]
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
    copy, cs = H.timed_compile(jax.jit(lambda a: a + 0), xj)
    cons.append(H.Contender("copy: jax.jit(x + 0)", lambda: H.block(copy(xj)), cs, check=False,
                            note="new output buffer, like the ops"))
    src = np.asarray(xj).view(np.uint8)
    dst = np.empty_like(src)
    cons.append(H.Contender("copy: np.copyto (preallocated)", lambda: np.copyto(dst, src), None, check=False,
                            note="no allocation: the bandwidth limit"))
    cons.append(H.Contender("copy: torch.clone", lambda: xt.clone(), None, check=False,
                            note="new output buffer"))
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
