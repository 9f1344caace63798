"""Layer, RMS and batch normalization with closed-form derivatives.

`lnjax.normalization` routes its common cases here (layer/RMS norm over the last axis;
training-mode batch norm over every axis but the last, without mask or axis_name). Same
numerical contract and statistics (`lnjax._stats`) as the public ops (at least float32, exact
corrected two-pass variance, output in the input's dtype); only the derivative differs.

Why: differentiating the plain formula leaves XLA:CPU a backward pass of several fusions,
each reading or writing full-size temporaries (`x - mean`, broadcasts of `rstd` and of the
scale), 2-3x slower than PyTorch's fused kernels (BENCHMARKS.md, "what was tried"). Here each
op is a `jax.custom_jvp` whose tangent is the closed form, linear in the tangents (layer
norm; `xhat = (x - mean) * rstd`, `H` features):

    dy = scale * rstd * (dx - mean_H(dx) - xhat * mean_H(dx * xhat)) + dscale * xhat + dbias

Reverse mode transposes it into the textbook backward
(`dx = rstd * (gs - mean_H(gs) - xhat * mean_H(gs * xhat))`, `gs = g * scale`,
`dscale = sum_rows(g * xhat)`, `dbias = sum_rows(g)`), and because it is a JVP, forward mode
(jvp, jacfwd, Hessian-vector products) works too, which a `custom_vjp` would refuse. Two
details make it fast: the tangent is `jax.checkpoint`ed, so linearization saves only `x` and
the per-row statistics (not `xhat`) and the backward recomputes `xhat` fused with its use; and
for float32 and wider on CPU it runs one block of rows of the size of the L2 cache at a time
(`lax.scan` over a reshape, where a block size divides the rows), so a block's temporaries
stay in cache: the
backward reads `x` and `g` once and writes `dx` once. (bfloat16/float16 blocks measured slower
than the whole array: XLA:CPU converts sliced narrow floats through float32 buffers.)
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lnjax import _stats, heuristics

def _rows(x):
    """`x` as `[rows, H]` (leading axes flattened)."""
    return x.reshape((-1, x.shape[-1])) if x.ndim != 2 else x


def _row(v, dtype):
    """A `[H]` parameter as a `[1, H]` row in `dtype` (explicit, for rank-promotion=raise)."""
    return v.astype(dtype).reshape((1, -1))


def _block_rows(n, h, budget):
    """Rows per block: about `budget` bytes of float32, preferring a divisor of `n`."""
    target = max(1, min(n, budget // (4 * max(h, 1))))
    for r in range(target, max(1, target // 4) - 1, -1):
        if n % r == 0:
            return r, True
    return target, False


def _affine_tangent(t, xhat, scale, dscale, dbias):
    """`scale * t + dscale * xhat + dbias` for `[rows, H]` float arrays and `[H]` parameters
    (`dscale` is None exactly when the primal scale is; `scale=None` leaves `t` as it is)."""
    dtype = t.dtype
    if scale is not None:
        t = t * _row(scale, dtype)
    if dscale is not None:
        t = t + xhat * _row(dscale, dtype)
    if dbias is not None:
        t = t + _row(dbias, dtype)
    return t


def _row_tangent(tangent, x, dx, row_stats, params):
    """Evaluates `tangent(x, dx, *row_stats, *params)` (row-wise ops, `[rows, H]` arrays and
    `[rows, 1]` statistics) under `jax.checkpoint`, by blocks of rows where that pays."""
    fn = jax.checkpoint(tangent)
    n, h = x.shape
    if jax.default_backend() != "cpu":  # blocks are for CPU caches; a GPU wants one kernel
        return fn(x, dx, *row_stats, *params)
    r, divides = _block_rows(n, h, heuristics.block_bytes())
    if r >= n or not divides or x.dtype.itemsize < 4:
        return fn(x, dx, *row_stats, *params)

    def step(carry, blocks):
        return carry, fn(*blocks, *params)

    split = lambda a: a.reshape((n // r, r) + a.shape[1:])  # noqa: E731
    _, t = lax.scan(step, None, tuple(split(a) for a in (x, dx, *row_stats)))
    return t.reshape((n, h))


def _normalize(x, axis, scale, bias, eps, barrier):
    """`(y, mean, residual, rstd, var)`: `x` (a `[rows, H]` array) normalized over `axis`, by
    the statistics core's corrected two-pass moments."""
    mean, residual, var, _ = _stats.moments(x, (axis,))
    rstd = _stats.inv_std(var, eps)
    m, r, rs = (mean, residual, rstd)
    if barrier:
        # When the statistics are also used by the tangent, XLA materializes `x - mean` once
        # for both the variance and y (a full-size temporary); the barrier makes y recompute
        # it from x instead, fused with the output.
        m, r, rs = lax.optimization_barrier((m, r, rs))
    y = _stats.scale_shift(_stats.center(x, m, r) * rs, scale, bias, (1,), 2)
    return y.astype(x.dtype), mean, residual, rstd, var


# ----------------------------------------------------------------------------------------
# Layer normalization.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _ln(x, scale, bias, eps):
    return _normalize(x, 1, scale, bias, eps, barrier=False)[0]


def _ln_tangent(x, dx, mean, residual, rstd, scale, dscale, dbias):
    dtype = mean.dtype
    xhat = _stats.center(x, mean, residual) * rstd
    d = dx.astype(dtype)
    # rstd multiplies the [rows, 1] means before they broadcast, so that the transpose (the
    # backward) needs only the row sums sum(g * scale) and sum(g * scale * xhat).
    d_mean = jnp.mean(d, axis=-1, keepdims=True)
    dxhat_mean = jnp.mean(d * xhat, axis=-1, keepdims=True)
    t = rstd * d - rstd * d_mean - xhat * (rstd * dxhat_mean)
    return _affine_tangent(t, xhat, scale, dscale, dbias).astype(x.dtype)


@_ln.defjvp
def _ln_jvp(eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    y, mean, residual, rstd, _ = _normalize(x, 1, scale, bias, eps, barrier=True)
    return y, _row_tangent(_ln_tangent, x, dx, (mean, residual, rstd), (scale, dscale, dbias))


def layer_norm_2d(x, scale=None, bias=None, eps=1e-5):
    """`lnjax.layer_norm(x, scale, bias, axis=-1, eps=eps)` with the closed-form derivative.

    Args:
      x: floating array `[..., H]`, normalized over its last axis.
      scale, bias: `[H]` or None.
      eps: a Python float (static).

    Returns:
      Array of `x`'s shape and dtype.
    """
    return _ln(_rows(x), scale, bias, float(eps)).reshape(x.shape)


# ----------------------------------------------------------------------------------------
# RMS normalization: `dy = scale * rstd * (dx - xhat * mean_H(dx * xhat)) + ...`, `xhat = x * rstd`.


def _rms_forward(x, scale, bias, eps):
    y, rstd = _stats.rms_normalize(x, (1,), eps)
    return _stats.scale_shift(y, scale, bias, (1,), 2).astype(x.dtype), rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _rms(x, scale, bias, eps):
    if scale is None or x.dtype.itemsize >= 4:
        return _rms_forward(x, scale, bias, eps)[0]
    # Narrow floats, undifferentiated: the gain folded into 1/rms before it meets x, Flax's
    # order, so that XLA compiles the very program of flax's RMSNorm (BENCHMARKS.md checks it).
    # `(x * rstd) * scale` measured slower than it in bfloat16 on XLA:CPU, and faster in
    # float32 and under differentiation, which keep it.
    xf, rstd = _stats.rms_inv(x, (1,), eps)
    y = xf * (rstd * _row(scale, rstd.dtype))
    return _stats.scale_shift(y, None, bias, (1,), 2).astype(x.dtype)


def _rms_tangent(x, dx, rstd, scale, dscale, dbias):
    dtype = rstd.dtype
    xhat = x.astype(dtype) * rstd
    d = dx.astype(dtype)
    t = rstd * d - xhat * (rstd * jnp.mean(d * xhat, axis=-1, keepdims=True))
    return _affine_tangent(t, xhat, scale, dscale, dbias).astype(x.dtype)


@_rms.defjvp
def _rms_jvp(eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    y, rstd = _rms_forward(x, scale, bias, eps)
    return y, _row_tangent(_rms_tangent, x, dx, (rstd,), (scale, dscale, dbias))


def rms_norm_2d(x, scale=None, bias=None, eps=1e-6):
    """`lnjax.rms_norm(x, scale, bias, axis=-1, eps=eps)` with the closed-form derivative."""
    return _rms(_rows(x), scale, bias, float(eps)).reshape(x.shape)


# ----------------------------------------------------------------------------------------
# Batch normalization, training mode: the statistics are over the rows (axis 0).


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _bn(x, scale, bias, eps):
    y, mean, residual, _, var = _normalize(x, 0, scale, bias, eps, barrier=False)
    return y, (mean + residual)[0], var[0]


def _bn_tangent(x, dx, mean, residual, rstd, scale, dscale, dbias):
    dtype = mean.dtype
    centred = _stats.center(x, mean, residual)
    xhat = centred * rstd
    d = dx.astype(dtype)
    dmean = jnp.mean(d, axis=0, keepdims=True)
    # d(biased var) = 2 mean_N((x - mu) dx): the dmu term vanishes as sum(x - mu) = 0.
    dvar = 2 * jnp.mean(centred * d, axis=0, keepdims=True)
    # Per-channel factors multiply the [1, C] statistics before they broadcast, so that the
    # transpose (the backward) needs only the two column sums sum(g) and sum(g * xhat).
    k = rstd if scale is None else rstd * _row(scale, dtype)
    t = k * d - k * dmean - xhat * (k * rstd * dvar / 2)
    return _affine_tangent(t, xhat, None, dscale, dbias).astype(x.dtype), dmean[0], dvar[0]


@_bn.defjvp
def _bn_jvp(eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    y, mean, residual, rstd, var = _normalize(x, 0, scale, bias, eps, barrier=True)
    out = (y, (mean + residual)[0], var[0])
    return out, jax.checkpoint(_bn_tangent)(x, dx, mean, residual, rstd, scale, dscale, dbias)


def batch_norm_train_2d(x, scale=None, bias=None, eps=1e-5):
    """Training-mode batch norm of `[..., C]` over every axis but the last, closed-form derivative.

    Returns `(y, mean, var)`: `y` of `x`'s shape and dtype; the batch mean and biased
    variance `[C]` in the statistics dtype (differentiable too, for completeness; callers
    that only feed running averages stop their gradient). The tangent is
    `dy = scale * rstd * (dx - mean_N(dx) - xhat * mean_N(dx * xhat)) + dscale * xhat + dbias`,
    whose transpose is the textbook backward
    `dx = rstd * scale * (g - mean_N(g) - xhat * mean_N(g * xhat))`.
    """
    y, mean, var = _bn(_rows(x), scale, bias, float(eps))
    return y.reshape(x.shape), mean, var
