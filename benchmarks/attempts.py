"""The layer-norm implementations tried while looking for a faster VJP on CPU ("what was
tried" in BENCHMARKS.md). They run as extra contenders of `benchmarks.norms` jobs, next to
lnjax's default `layer_norm` (the winner, F below), `layer_norm(implementation="xla")` and PyTorch.

Each is a complete layer norm over the last axis of a `[rows, H]` array with scale and bias,
`eps=1e-5`, statistics in float32, exact two-pass variance unless its name says otherwise.
"""

from __future__ import annotations

import functools

SHIFTED = "G shifted one-pass statistics"

DESCRIPTIONS = {
    "lnjax.layer_norm": "F, the default now: a custom_jvp whose tangent is the closed form (linear in the "
    "tangents), under jax.checkpoint and by 1 MiB blocks of rows (float32); reverse mode transposes it "
    "into C's backward, and forward mode works too",
    'lnjax.layer_norm(implementation="xla")': "autodiff of the two-pass formula (the default before F)",
    "torch F.layer_norm": "PyTorch eager (reference)",
    "lnjax.layer_norm(fast_variance=True)": "autodiff of the one-pass variance E[x^2]-E[x]^2 (what Flax does)",
    "A closed-form custom_vjp": "custom_vjp saving x, mean, rstd; textbook backward, one XLA program",
    "B closed form + optimization_barrier": "A, with barriers so XLA recomputes x - mean in each "
    "fusion instead of materializing it and the broadcasts",
    "C blocked backward 64 KiB": "B's forward; A's backward evaluated per block of rows "
    "(lax.scan), so each block's temporaries stay in cache",
    "C blocked backward 1 MiB": "same, 1 MiB blocks",
    "D blocked statistics, elementwise dx": "scan computes only the row sums and column partial "
    "sums per block; dx in one elementwise pass outside the loop",
    "E blocked forward and backward": "C (256 KiB) with the forward also evaluated block by block "
    "(lax.scan); like A-D, bfloat16 blocks not bit-cast (XLA:CPU then converts the whole "
    "buffer at every iteration)",
    SHIFTED: "the statistics in one pass over x shifted by its row's first "
    "entry x0: mean = x0 + mean(x - x0), var = mean((x - x0)^2) - mean(x - x0)^2 (exact for "
    "|mean| >> std, unlike E[x^2]-E[x]^2, but its rounding error grows with (x0 - mean)^2 / var, "
    "up to H times the two-pass's); backward by autodiff",
}


def _row(v, jnp):
    return v.astype(jnp.float32).reshape(1, -1)


def _make(fwd_kind, bwd_kind, block_bytes=1 << 18):
    import jax
    import jax.numpy as jnp
    from jax import lax

    ob = lax.optimization_barrier

    def rows_for(n, h):
        r = max(1, min(n, block_bytes // (4 * h)))
        while n % r:
            r -= 1
        return r

    def fwd_plain(x, s, b, eps, barrier):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        d = xf - mean
        rstd = lax.rsqrt(jnp.mean(d * d, -1, keepdims=True) + eps)
        m2, r2 = ob((mean, rstd)) if barrier else (mean, rstd)
        y = ((xf - m2) * r2 * _row(s, jnp) + _row(b, jnp)).astype(x.dtype)
        return y, mean, rstd

    def fwd_blocked(x, s, b, eps):
        n, h = x.shape
        r = rows_for(n, h)

        def blk(_, xb):
            return None, fwd_plain(xb, s, b, eps, True)

        _, (y, m, rs) = lax.scan(blk, None, x.reshape(n // r, r, h))
        return y.reshape(n, h), m.reshape(n, 1), rs.reshape(n, 1)

    def rowstats(x, g, s, mean, rstd):
        xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
        xhat = (xf - mean) * rstd
        gs = gf * _row(s, jnp)
        return jnp.mean(gs, -1, keepdims=True), jnp.mean(gs * xhat, -1, keepdims=True), xhat, gs, gf

    def bwd_plain(x, g, s, mean, rstd, barrier):
        a, c, xhat, gs, gf = rowstats(x, g, s, mean, rstd)
        ds, db = jnp.sum(gf * xhat, 0), jnp.sum(gf, 0)
        if barrier:
            a, c, mean, rstd = ob((a, c, mean, rstd))
            _, _, xhat, gs, _ = rowstats(x, g, s, mean, rstd)
        return (rstd * (gs - a - xhat * c)).astype(x.dtype), ds, db

    def split(n, h, *arrays):
        r = rows_for(n, h)
        return tuple(a.reshape((n // r, r) + a.shape[1:]) for a in arrays)

    def bwd_scan(x, g, s, mean, rstd):
        n, h = x.shape

        def blk(carry, inp):
            dx, ds, db = bwd_plain(*inp[:2], s, *inp[2:], False)
            return (carry[0] + ds, carry[1] + db), dx

        z = jnp.zeros((h,), jnp.float32)
        (ds, db), dx = lax.scan(blk, (z, z), split(n, h, x, g, mean, rstd))
        return dx.reshape(n, h), ds, db

    def bwd_stats(x, g, s, mean, rstd):
        n, h = x.shape

        def blk(carry, inp):
            a, c, xhat, _, gf = rowstats(inp[0], inp[1], s, inp[2], inp[3])
            return (carry[0] + jnp.sum(gf * xhat, 0), carry[1] + jnp.sum(gf, 0)), (a, c)

        z = jnp.zeros((h,), jnp.float32)
        (ds, db), (a, c) = lax.scan(blk, (z, z), split(n, h, x, g, mean, rstd))
        a, c = a.reshape(n, 1), c.reshape(n, 1)
        xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
        dx = rstd * (gf * _row(s, jnp) - a - (xf - mean) * rstd * c)
        return dx.astype(x.dtype), ds, db

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def ln(x, s, b, eps):
        return fwd(x, s, b, eps)[0]

    def fwd(x, s, b, eps):
        if fwd_kind == "blocked":
            y, m, r = fwd_blocked(x, s, b, eps)
        else:
            y, m, r = fwd_plain(x, s, b, eps, fwd_kind == "barrier")
        return y, (x, s, b, m, r)

    def bwd(eps, res, g):
        x, s, b, m, r = res
        if bwd_kind in ("plain", "barrier"):
            dx, ds, db = bwd_plain(x, g, s, m, r, bwd_kind == "barrier")
        elif bwd_kind == "scan":
            dx, ds, db = bwd_scan(x, g, s, m, r)
        else:
            dx, ds, db = bwd_stats(x, g, s, m, r)
        return dx, ds.astype(s.dtype), db.astype(b.dtype)

    ln.defvjp(fwd, bwd)
    return lambda x, s, b: ln(x, s, b, 1e-5)


def _shifted():
    import jax.numpy as jnp
    from jax import lax

    def ln(x, s, b):
        xf = x.astype(jnp.float32)
        x0 = lax.stop_gradient(xf[:, :1])
        d = xf - x0
        m = jnp.mean(d, -1, keepdims=True)
        rstd = lax.rsqrt(jnp.maximum(jnp.mean(d * d, -1, keepdims=True) - m * m, 0) + 1e-5)
        return ((d - m) * rstd * _row(s, jnp) + _row(b, jnp)).astype(x.dtype)

    return ln


def builder(name):
    """The contenders' builder `(op, h, dtype) -> fn` of the attempt called `name` (layer norm
    only; `benchmarks.contenders` registers each)."""
    table = {
        "A closed-form custom_vjp": lambda: _make("plain", "plain"),
        "B closed form + optimization_barrier": lambda: _make("barrier", "barrier"),
        "C blocked backward 64 KiB": lambda: _make("barrier", "scan", 1 << 16),
        "C blocked backward 1 MiB": lambda: _make("barrier", "scan", 1 << 20),
        "D blocked statistics, elementwise dx": lambda: _make("barrier", "stats"),
        "E blocked forward and backward": lambda: _make("blocked", "scan"),
        SHIFTED: _shifted,
    }
    make = table[name]

    def build(op, h, dtype):
        if op != "layer":
            raise ValueError(f"attempts exist for layer norm only, not {op!r}")
        return make()
    return build


NAMES = (
    "lnjax.layer_norm(fast_variance=True)",
    "A closed-form custom_vjp",
    "B closed form + optimization_barrier",
    "C blocked backward 64 KiB",
    "C blocked backward 1 MiB",
    "D blocked statistics, elementwise dx",
    "E blocked forward and backward",
    SHIFTED,
)

# XLA:CPU fuses these programs with its YNNPACK library emitter by default; this turns that
# off for reductions, to see whether XLA's own loop emitters do better.
NO_YNN_REDUCE = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"


def jobs(quick):
    """`(job, allocator, xla_flags)` for the attempts section."""
    base = dict(op="layer", flax=False, extra_fns=list(NAMES))
    if quick:
        return [(dict(base, shape=[64, 128], dtype="float32", reps=2, warmup=1), "glibc", None)]
    out = [(dict(base, shape=list(s), dtype="float32"), "glibc", None)
           for s in ((8192, 1024), (32768, 256), (512, 8192))]
    out.append((dict(base, shape=[8192, 1024], dtype="bfloat16"), "glibc", None))
    out.append((dict(op="layer", flax=False, shape=[8192, 1024], dtype="float32"), "glibc", NO_YNN_REDUCE))
    return out
