"""The statistics core every normalization in lnjax shares: moments, centring, the affine
step and the running averages of batch statistics.

Arrays here are already checked (`_checks`); axes are tuples of non-negative ints, and
parameters have exactly the shape of the axes they apply to.
"""

import math

import jax.numpy as jnp
from jax import lax

from lnjax import _checks
from lnjax._state import BatchNormState


def upcast(x):
    """`x` in the statistics dtype (`_checks.stats_dtype`). Each op casts once, up front, and
    passes the result to every helper here: two casts of one low-precision `x` would each
    round their own cotangent to that precision in reverse mode, and the sum of those two
    large, partly cancelling terms loses most of the gradient's digits."""
    return x.astype(_checks.stats_dtype(x.dtype))


def broadcast_to_axes(p, ax: tuple[int, ...], ndim: int, dtype):
    """Reshapes a parameter of shape `x.shape[ax]` so it broadcasts against `x`."""
    shape = [1] * ndim
    for a, n in zip(ax, p.shape):
        shape[a] = n
    return p.astype(dtype).reshape(shape)


def scale_shift(y, scale, bias, ax, ndim):
    """`y * scale + bias`, each parameter (or None) of shape `y.shape[ax]`."""
    if scale is not None:
        y = y * broadcast_to_axes(scale, ax, ndim, y.dtype)
    if bias is not None:
        y = y + broadcast_to_axes(bias, ax, ndim, y.dtype)
    return y


def inv_std(var, eps):
    # eps is cast so that a NumPy/float64 eps never promotes float32 statistics.
    return lax.rsqrt(var + jnp.asarray(eps, var.dtype))


def expand_mask(mask, x, ax, name="mask", *, elementwise=False):
    """Checks a boolean mask for a reduction of `x` over `ax` and returns it ready to broadcast
    against `x`. Two forms, each explicit (anything else is a ValueError):

    * per position, shape `x.shape[ax]`: one flag for all the entries of each reduced position;
      returned with size-1 kept axes;
    * with `elementwise` (batch norm's, as Flax's), `x`'s rank with each dimension 1 or `x`'s:
      returned as `x.shape`, so that every kept position counts its own unmasked entries.
    """
    if mask is None:
        return None
    if not hasattr(mask, "shape"):
        mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be boolean, got dtype {mask.dtype}.")
    expected = tuple(x.shape[a] for a in ax)
    if tuple(mask.shape) == expected:
        return broadcast_to_axes(mask, ax, x.ndim, jnp.bool_)
    if elementwise and mask.ndim == x.ndim and all(m in (1, n) for m, n in zip(mask.shape, x.shape)):
        # Broadcast before any sum: a size-1 reduced axis must count all its entries.
        return jnp.broadcast_to(mask, x.shape)
    raise ValueError(
        f"`{name}` has shape {tuple(mask.shape)}; expected {expected} (one flag per position on the "
        f"reduced axes {ax})" + (f" or an elementwise mask of x's rank, each dimension 1 or x's (x has "
                                 f"shape {x.shape})" if elementwise else "") + "."
    )


def two_pass(xf, count, total, *, expand=None, keep=None):
    """(mean, residual, biased var) of `xf` for a linear reduction `total` and its `count`.

    The mean is returned in two parts, `mean + residual`: the first is the rounded mean, the
    second the mean of `x - mean` (the corrected two-pass algorithm of Chan, Golub & LeVeque).
    Centring as `(x - mean) - residual` is then exact to the precision of the deviations:
    for `1e4 + N(0, 1e-2)` in float32 the rounded mean alone is off by ~5% of the standard
    deviation, which a single subtraction would pass on to every output. The residual costs
    no extra pass: it is summed alongside the squares.

    `total` sums over axes (keepdims) or over segments; `expand` brings a statistic back to
    `xf`'s shape where broadcasting does not (a gather by segment); `keep` zeroes the entries
    left out of the statistics.
    """
    keep = keep or (lambda v: v)
    # `mean` only shifts the data; the gradient flows through the residual, which makes
    # `(x - mean) - residual` exactly `x - mean(x)` as a function of x.
    mean = lax.stop_gradient(total(keep(xf)) / count)
    d = keep(xf - (mean if expand is None else expand(mean)))
    residual = total(d) / count
    var = jnp.maximum(total(d * d) / count - residual * residual, 0)
    return mean, residual, var


def moments(x, ax, *, mask=None, axis_name=None, fast_variance=False):
    """(mean, residual, biased var, count) over `ax`, keepdims, in the statistics dtype.

    `mean + residual` is the mean (see `two_pass`; the residual is 0 with `fast_variance`).
    With `axis_name`, sums and counts are reduced across that named axis too, so every device
    sees the statistics of the global batch. The count returned is the number of entries
    reduced (0 for an empty or all-masked reduction, whose mean and variance are then 0, not
    NaN: the divisions use at least 1).
    """
    _checks.python_bool(fast_variance, "fast_variance")
    dtype = _checks.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    if mask is None:
        keep, count = None, jnp.asarray(math.prod(x.shape[a] for a in ax), dtype)
    else:
        keep = lambda v: jnp.where(mask, v, 0)  # noqa: E731
        count = jnp.sum(mask, axis=ax, keepdims=True, dtype=dtype)

    def total(v):
        s = jnp.sum(v, axis=ax, keepdims=True)
        return s if axis_name is None else lax.psum(s, axis_name)

    if axis_name is not None:
        count = lax.psum(count, _checks.bound_axis_name(axis_name))
    n = jnp.maximum(count, 1)
    if not fast_variance:
        return (*two_pass(xf, n, total, keep=keep), count)
    xf = xf if keep is None else keep(xf)
    mean = total(xf) / n
    var = jnp.maximum(total(xf * xf) / n - mean * mean, 0)
    return mean, jnp.zeros_like(mean), var, count


def center(x, mean, residual):
    """`(x - mean) - residual` in the statistics' dtype: `x` minus its mean (see `two_pass`)."""
    return (x.astype(mean.dtype) - mean) - residual


def normalize(x, mean, residual, var, eps):
    """`(x - mean - residual) / sqrt(var + eps)`, in the statistics' dtype."""
    return center(x, mean, residual) * inv_std(var, eps)


def rms_inv(x, ax, eps):
    """`(x, 1 / sqrt(mean(x^2) + eps))` over `ax`, both in the statistics dtype."""
    xf = x.astype(_checks.stats_dtype(x.dtype))
    return xf, inv_std(jnp.mean(xf * xf, axis=ax, keepdims=True), eps)


def rms_normalize(x, ax, eps):
    """`(x / sqrt(mean(x^2) + eps), 1 / sqrt(mean(x^2) + eps))` over `ax`, in the statistics dtype."""
    xf, rstd = rms_inv(x, ax, eps)
    return xf * rstd, rstd


def ema_update(state: BatchNormState, mean, var, count, momentum, unbiased=True) -> BatchNormState:
    """The running averages after one batch: `momentum * running + (1 - momentum) * batch`,
    with the unbiased `n / (n - 1) * var` (Ioffe & Szegedy 2015, Alg. 2), or `var` itself if not
    `unbiased` (Flax's convention).

    `mean`, `var` and `count` hold one value per feature, in any shape with the state's size
    (`count` may be a scalar); no gradient flows into the state. A feature that saw no data
    (`count` 0: an empty or all-masked batch) keeps its running averages.
    """
    flat = lambda s: lax.stop_gradient(s.reshape(state.mean.shape))  # noqa: E731
    n = flat(jnp.broadcast_to(count, mean.shape))
    new_var = flat(var) * (n / jnp.maximum(n - 1, 1)) if unbiased else flat(var)

    def ema(old, new):
        updated = (momentum * old + (1 - momentum) * new.astype(old.dtype)).astype(old.dtype)
        return jnp.where(n > 0, updated, old)

    return BatchNormState(ema(state.mean, flat(mean)), ema(state.var, new_var))


def batch_moments(x, red, state: BatchNormState, *, training, momentum, unbiased=True, **options):
    """`(mean, residual, var, new_state)` for batch normalization over the axes `red`.

    Training: the batch moments (`moments(x, red, **options)`) and the updated running averages;
    a feature that saw no data (an empty or all-masked batch) keeps its running averages and is
    normalized with them, as in evaluation (not with mean 0 and variance 0: `x / sqrt(eps)`).
    Inference: the running averages, shaped to broadcast against `x`, and `state` unchanged.
    """
    feat = tuple(a for a in range(x.ndim) if a not in red)
    dtype = _checks.stats_dtype(x.dtype)
    run_mean = broadcast_to_axes(state.mean, feat, x.ndim, dtype)
    run_var = broadcast_to_axes(state.var, feat, x.ndim, dtype)
    if not training:
        return run_mean, jnp.zeros_like(run_mean), run_var, state
    mean, residual, var, count = moments(x, red, **options)
    new_state = ema_update(state, mean + residual, var, count, momentum, unbiased)
    seen = count > 0
    return (jnp.where(seen, mean, run_mean), jnp.where(seen, residual, 0), jnp.where(seen, var, run_var),
            new_state)  # fmt: skip
