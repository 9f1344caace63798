"""Layer, RMS and batch normalization with hand-written (closed-form) backward passes.

Private: `lnjax.normalization` may route its common cases here (layer/RMS norm over the last
axis; training-mode batch norm over every axis but the last, without mask or axis_name). Same
numerical contract as the public ops (statistics in at least float32, exact two-pass
variance, output in the input's dtype); only the derivative is computed differently.

Why: differentiating the plain formula leaves XLA:CPU a backward pass of several fusions,
each reading or writing full-size temporaries (`x - mean`, broadcasts of `rstd` and of the
scale), 2-3x slower than PyTorch's fused kernels (BENCHMARKS.md, "what was tried"). Here the
forward saves only `x` and the per-row mean and reciprocal standard deviation, and the
backward is the closed form (layer norm; `xhat = (x - mean) * rstd`, `gs = g * scale`, `H`
features):

    dx     = rstd * (gs - mean_H(gs) - xhat * mean_H(gs * xhat))
    dscale = sum_rows(g * xhat)
    dbias  = sum_rows(g)

evaluated one block of rows at a time (`lax.scan` over blocks of about `_BLOCK_BYTES`, or a
`fori_loop` when no block size divides the rows), so that a block's temporaries stay in
cache: the backward reads `x` and `g` once and writes `dx` once. For bfloat16/float16 the
forward of the VJP, which must also output the statistics, runs by blocks too; in float32 an
optimization barrier keeps XLA from materializing `x - mean` for both the variance and y. The
plain forward (no VJP) is the single fusion XLA already makes well.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lnjax import _checks

# Working-set size of one block of rows (float32 bytes of one operand); chosen on a 2-core
# AMD EPYC with 1 MiB of L2 per core (BENCHMARKS.md, "what was tried").
_BLOCK_BYTES = 1 << 20


def _rows(x):
    """`x` as `[rows, H]` (leading axes flattened)."""
    return x.reshape((-1, x.shape[-1])) if x.ndim != 2 else x


def _row(v, dtype):
    """A `[H]` parameter as a `[1, H]` row in `dtype` (explicit, for rank-promotion=raise)."""
    return v.astype(dtype).reshape((1, -1))


def _block_rows(n, h, block_bytes):
    """Rows per block: about `block_bytes` of float32, preferring a divisor of `n`."""
    target = max(1, min(n, block_bytes // (4 * h)))
    for r in range(target, max(1, target // 4) - 1, -1):
        if n % r == 0:
            return r, True
    return target, False


def _as_bits(a):
    """Floating arrays narrower than 32 bits as unsigned integers of the same width.

    XLA:CPU upcasts bfloat16/float16 `dynamic_slice` / `dynamic_update_slice` to float32,
    converting the *whole* buffer at every iteration of a loop (quadratic work: the
    bfloat16 backward was 2-20x slower than float32). Moving the blocks through the loop as
    raw bits avoids that; `_from_bits` undoes it.
    """
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4:
        return lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
    return a


def _from_bits(a, dtype):
    return lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _blocked(arrays, body, init, out_dtype, block_bytes):
    """Applies `body` to blocks of rows of `arrays` (each `[n, ...]`), accumulating sums.

    `body(blocks, valid)` gets the blocks (same order as `arrays`) and a `[r, 1]` boolean
    mask of the rows to include in the sums (None: all), and returns
    `(partial_sums, out_block)`; the partial sums (a tuple like `init`) are added up and the
    out blocks assembled into an `[n, H]` array of `out_dtype`. With a block size dividing
    `n` this is a `lax.scan` over a free reshape; otherwise a `fori_loop` whose last block is
    shifted back to end at row `n`, `valid` masking the rows it shares with its predecessor.
    """
    n, h = arrays[0].shape
    r, divides = _block_rows(n, h, block_bytes)
    if r >= n:
        return body(arrays, None)
    dtypes = [a.dtype for a in arrays]
    arrays = [_as_bits(a) for a in arrays]

    def run(blocks, valid):
        part, out = body(tuple(_from_bits(b, d) for b, d in zip(blocks, dtypes)), valid)
        return part, _as_bits(out)

    if divides:

        def scan_step(sums, blocks):
            part, out = run(blocks, None)
            return tuple(s + p for s, p in zip(sums, part)), out

        blocks = tuple(a.reshape((n // r, r) + a.shape[1:]) for a in arrays)
        sums, out = lax.scan(scan_step, init, blocks)
        return sums, _from_bits(out.reshape((n, h)), jnp.dtype(out_dtype))

    def loop_step(i, carry):
        sums, out = carry
        start = jnp.minimum(i * r, n - r)
        valid = (start + lax.broadcasted_iota(jnp.int32, (r, 1), 0)) >= i * r
        part, blk = run(tuple(lax.dynamic_slice_in_dim(a, start, r, 0) for a in arrays), valid)
        sums = tuple(s + p for s, p in zip(sums, part))
        return sums, lax.dynamic_update_slice_in_dim(out, blk, start, axis=0)

    init_out = _as_bits(jnp.zeros((n, h), out_dtype))
    sums, out = lax.fori_loop(0, -(-n // r), loop_step, (init, init_out))
    return sums, _from_bits(out, jnp.dtype(out_dtype))


def _forward_blocked(forward, x):
    """`forward(x) -> (y, *row_stats)` evaluated one block of rows at a time (`lax.scan`).

    The forward of a VJP must also output its per-row statistics (`[n, 1]` residuals); with
    those as outputs XLA:CPU no longer fuses a bfloat16/float16 normalization into one loop
    and upcasts the whole input to float32 in memory. By blocks, that stays in cache. For
    float32 and wider the whole-array forward (with its optimization barrier) measured
    faster, so this returns None for them, and where no block size divides the rows (the
    caller then evaluates `forward` on the whole array).
    """
    n, h = x.shape
    r, divides = _block_rows(n, h, _BLOCK_BYTES)
    if r >= n or not divides or x.dtype.itemsize >= 4:
        return None

    def step(carry, blk):
        y, *stats = forward(_from_bits(blk, x.dtype))
        return carry, (_as_bits(y), *stats)

    _, (y, *stats) = lax.scan(step, None, _as_bits(x).reshape((n // r, r, h)))
    return (_from_bits(y.reshape((n, h)), x.dtype), *(v.reshape((n, 1)) for v in stats))


# ----------------------------------------------------------------------------------------
# Layer normalization.


def _stats(xf, axis, eps):
    """(mean, residual, rstd) by the corrected two-pass algorithm (as `normalization._moments`):
    centring as `(x - mean) - residual` stays exact when |mean| >> std."""
    mean = jnp.mean(xf, axis=axis, keepdims=True)
    d = xf - mean
    residual = jnp.mean(d, axis=axis, keepdims=True)
    var = jnp.maximum(jnp.mean(d * d, axis=axis, keepdims=True) - residual * residual, 0)
    return mean, residual, lax.rsqrt(var + jnp.asarray(eps, xf.dtype)), var


def _ln_forward(x, scale, bias, eps, barrier=False):
    dtype = _checks.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    mean, residual, rstd, _ = _stats(xf, -1, eps)
    if barrier:
        # When the statistics are also outputs (the residuals of the VJP), XLA materializes
        # `x - mean` once for both the variance and y (a full-size temporary); the barrier
        # makes y recompute it from x instead, fused with the output.
        mean, residual, rstd = lax.optimization_barrier((mean, residual, rstd))
    y = ((xf - mean) - residual) * rstd
    if scale is not None:
        y = y * _row(scale, dtype)
    if bias is not None:
        y = y + _row(bias, dtype)
    return y.astype(x.dtype), mean, residual, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ln(x, scale, bias, eps):
    return _ln_forward(x, scale, bias, eps)[0]


def _ln_fwd(x, scale, bias, eps):
    y, *stats = _forward_blocked(lambda xb: _ln_forward(xb, scale, bias, eps), x) or _ln_forward(
        x, scale, bias, eps, barrier=True
    )
    return y, (x, scale, bias, *stats)


def _ln_bwd(eps, res, g):
    del eps
    x, scale, bias, mean, residual, rstd = res
    dtype = mean.dtype
    s_row = None if scale is None else _row(scale, dtype)

    def body(blocks, valid):
        xb, gb, m, r, rs = blocks
        xf, gf = xb.astype(dtype), gb.astype(dtype)
        xhat = ((xf - m) - r) * rs
        gs = gf if s_row is None else gf * s_row
        a = jnp.mean(gs, axis=-1, keepdims=True)
        c = jnp.mean(gs * xhat, axis=-1, keepdims=True)
        dx = (rs * (gs - a - xhat * c)).astype(x.dtype)
        gv = gf if valid is None else jnp.where(valid, gf, 0)
        return (jnp.sum(gv * xhat, axis=0), jnp.sum(gv, axis=0)), dx

    zero = jnp.zeros((x.shape[1],), dtype)
    (dscale, dbias), dx = _blocked((x, g, mean, residual, rstd), body, (zero, zero), x.dtype, _BLOCK_BYTES)
    dscale = None if scale is None else dscale.astype(scale.dtype)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dx, dscale, dbias


_ln.defvjp(_ln_fwd, _ln_bwd)


def _layer_norm_2d(x, scale=None, bias=None, eps=1e-5):
    """`lnjax.layer_norm(x, scale, bias, axis=-1, eps=eps)` with the closed-form backward.

    Args:
      x: floating array `[..., H]`, normalized over its last axis.
      scale, bias: `[H]` or None.
      eps: a Python float (static).

    Returns:
      Array of `x`'s shape and dtype.
    """
    shape = x.shape
    return _ln(_rows(x), scale, bias, float(eps)).reshape(shape)


# ----------------------------------------------------------------------------------------
# RMS normalization.


def _rms_forward(x, scale, bias, eps):
    dtype = _checks.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    rstd = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.asarray(eps, dtype))
    y = xf * rstd
    if scale is not None:
        y = y * _row(scale, dtype)
    if bias is not None:
        y = y + _row(bias, dtype)
    return y.astype(x.dtype), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rms(x, scale, bias, eps):
    return _rms_forward(x, scale, bias, eps)[0]


def _rms_fwd(x, scale, bias, eps):
    y, rstd = _forward_blocked(lambda xb: _rms_forward(xb, scale, bias, eps), x) or _rms_forward(
        x, scale, bias, eps
    )
    return y, (x, scale, bias, rstd)


def _rms_bwd(eps, res, g):
    del eps
    x, scale, bias, rstd = res
    dtype = rstd.dtype
    s_row = None if scale is None else _row(scale, dtype)

    def body(blocks, valid):
        xb, gb, rs = blocks
        xf, gf = xb.astype(dtype), gb.astype(dtype)
        xhat = xf * rs
        gs = gf if s_row is None else gf * s_row
        c = jnp.mean(gs * xhat, axis=-1, keepdims=True)
        dx = (rs * (gs - xhat * c)).astype(x.dtype)
        gv = gf if valid is None else jnp.where(valid, gf, 0)
        return (jnp.sum(gv * xhat, axis=0), jnp.sum(gv, axis=0)), dx

    zero = jnp.zeros((x.shape[1],), dtype)
    (dscale, dbias), dx = _blocked((x, g, rstd), body, (zero, zero), x.dtype, _BLOCK_BYTES)
    dscale = None if scale is None else dscale.astype(scale.dtype)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dx, dscale, dbias


_rms.defvjp(_rms_fwd, _rms_bwd)


def _rms_norm_2d(x, scale=None, bias=None, eps=1e-6):
    """`lnjax.rms_norm(x, scale, bias, axis=-1, eps=eps)` with the closed-form backward:
    `dx = rstd * (gs - xhat * mean_H(gs * xhat))`, `xhat = x * rstd`, `gs = g * scale`."""
    shape = x.shape
    return _rms(_rows(x), scale, bias, float(eps)).reshape(shape)


# ----------------------------------------------------------------------------------------
# Batch normalization, training mode.


def _bn_forward(x, scale, bias, eps, barrier=False):
    dtype = _checks.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    mean, residual, rstd, var = _stats(xf, 0, eps)
    m, r, rs = lax.optimization_barrier((mean, residual, rstd)) if barrier else (mean, residual, rstd)
    y = ((xf - m) - r) * rs
    if scale is not None:
        y = y * _row(scale, dtype)
    if bias is not None:
        y = y + _row(bias, dtype)
    return y.astype(x.dtype), mean, residual, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x, scale, bias, eps):
    y, mean, residual, var, _ = _bn_forward(x, scale, bias, eps)
    return y, (mean + residual)[0], var[0]


def _bn_fwd(x, scale, bias, eps):
    y, mean, residual, var, rstd = _bn_forward(x, scale, bias, eps, barrier=True)
    return (y, (mean + residual)[0], var[0]), (x, scale, bias, mean, residual, rstd)


def _bn_bwd(eps, res, cts):
    del eps
    x, scale, bias, mean, residual, rstd = res
    gy, gmean, gvar = cts
    dtype = mean.dtype
    n = x.shape[0]
    xf, gf = x.astype(dtype), gy.astype(dtype)
    xhat = ((xf - mean) - residual) * rstd
    dbias = jnp.sum(gf, axis=0, keepdims=True)
    dscale = jnp.sum(gf * xhat, axis=0, keepdims=True)
    mean, residual, rstd = lax.optimization_barrier((mean, residual, rstd))
    k = rstd if scale is None else rstd * _row(scale, dtype)
    d = (xf - mean) - residual
    dx = k * (gf - dbias / n - d * rstd * (dscale / n))
    # The statistics are outputs too (for running averages); their cotangents, usually zero.
    dx = dx + gmean.astype(dtype).reshape(1, -1) / n + d * (2 * gvar.astype(dtype).reshape(1, -1) / n)
    dscale = None if scale is None else dscale[0].astype(scale.dtype)
    dbias = None if bias is None else dbias[0].astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


_bn.defvjp(_bn_fwd, _bn_bwd)


def _batch_norm_train_2d(x, scale=None, bias=None, eps=1e-5):
    """Training-mode batch norm of `[..., C]` over every axis but the last, closed-form VJP.

    Returns `(y, mean, var)`: `y` of `x`'s shape and dtype; the batch mean and biased
    variance `[C]` in the statistics dtype (differentiable too, for completeness; callers
    that only feed running averages stop their gradient). The backward is
    `dx = rstd * scale * (g - mean_N(g) - xhat * mean_N(g * xhat))`,
    `dscale = sum_N(g * xhat)`, `dbias = sum_N(g)`.
    """
    shape = x.shape
    y, mean, var = _bn(_rows(x), scale, bias, float(eps))
    return y.reshape(shape), mean, var
