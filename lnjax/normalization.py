"""Normalization as pure functions: layer, RMS, batch, group, instance and weight normalization.

The numerical contract, shared by every op here:

* statistics are computed in at least float32 (float64 inputs keep float64);
* the output has the input's dtype, whatever the dtype of `scale` and `bias`;
* the variance is the biased one (divide by n) and, by default, the exact two-pass form
  `mean((x - mean(x))**2)`; `fast_variance=True` opts into the one-pass `E[x^2] - E[x]^2`,
  clipped at zero, which cancels catastrophically when |mean| >> std;
* `eps` is added inside the square root: `(x - mu) / sqrt(var + eps)`;
* parameters are never broadcast: `scale`/`bias` must have exactly the shape of the axes they
  apply to, and a mismatch is a ValueError at trace time.

Layer and RMS norm over the last axis (the common case: a Python `eps`, no `fast_variance`)
run on CPU in the native kernels of `lnjax.native` (C++ through XLA's FFI: one pass over each
row in cache, exact and overflow-safe statistics, bitwise batch-invariant), and on other
platforms, or where the kernels were not built, in the fused path of `lnjax._fused`; the
choice is made per platform when the program is lowered. Training-mode batch norm over every
axis but the last, without `mask` or `axis_name`, takes the same two paths. The fused path is a
`jax.custom_jvp` whose tangent is the closed form: reverse mode then saves only `x` and the
per-row statistics and runs the textbook backward (for float32, one cache-sized block of rows
at a time). Forward mode, second derivatives, vmap and checkpointing work on every path.
`implementation="xla"` forces autodiff of the formula; `"native"` and `"fused"` raise where
they cannot apply. BENCHMARKS.md measures each.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from lnjax import _checks, _fused, _stats
from lnjax import native as lnjax_native
from lnjax._state import BatchNormState

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_state",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "rms_norm",
    "weight_norm",
]


def moments(x, axis=-1, *, keepdims=False, fast_variance=False, mask=None, axis_name=None):
    """Mean and biased variance of `x` over `axis`, in at least float32.

    The statistics every op in lnjax shares (Ba et al. 2016, eq. 3:
    `mu = 1/H sum_i a_i`, `sigma^2 = 1/H sum_i (a_i - mu)^2`).

    Args:
      x: floating array of any shape.
      axis: int or tuple of ints, the axes reduced.
      keepdims: keep reduced axes as size 1.
      fast_variance: one-pass `E[x^2] - E[x]^2` (clipped at 0) instead of the exact two-pass form.
      mask: optional boolean array of shape `x.shape[axis]`; False entries are left out.
        If every entry is masked, mean and variance are 0.
      axis_name: a named axis (vmap/shard_map/pmap) to reduce over as well.

    Returns:
      `(mean, var)`, each of shape `x.shape` without (or with size-1) `axis`, dtype
      `promote_types(x.dtype, float32)`.
    """
    x = _checks.floating(x)
    ax = _checks.axes(axis, x.ndim)
    m = _stats.expand_mask(mask, x, ax)
    mean, residual, var, _ = _stats.moments(x, ax, mask=m, axis_name=axis_name, fast_variance=fast_variance)
    mean = mean + residual
    if not keepdims:
        mean, var = jnp.squeeze(mean, ax), jnp.squeeze(var, ax)
    return mean, var


_IMPLEMENTATIONS = (None, "native", "fused", "xla")


def _checked_implementation(implementation):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f'`implementation` must be None, "native", "fused" or "xla", got {implementation!r}.')
    return implementation


def _route(implementation, x, ax, eps, *, native: bool = False, **conditions) -> str:
    """The path an op takes: "native" (the C++ kernels of `lnjax.native`, on CPU), "fused" (the
    closed-form derivative of `lnjax._fused`) or "xla" (autodiff of the formula). None picks the
    first that applies (`native`: whether the op has kernels); a named one raises where it
    cannot apply."""
    if _checked_implementation(implementation) == "xla":
        return "xla"
    checks = [
        (ax == (x.ndim - 1,), ValueError, f"normalizes over the last axis only, got axes {ax}"),
        (isinstance(eps, (int, float, np.floating, np.integer)), TypeError,
         f"needs a Python-number `eps` (it is static), got {eps!r}"),
        *[(ok, ValueError, f"does not support {what.replace('_', ' ')}") for what, ok in conditions.items()],
    ]
    if implementation == "native":
        checks.append((native, ValueError, "has no kernels for this op"))
    for ok, error, message in checks:
        if not ok:
            if implementation is not None:
                raise error(f"implementation={implementation!r} {message}.")
            return "xla"
    if implementation == "fused" or not native or x.size == 0:
        return "fused"
    if lnjax_native.available():
        return "native"
    if implementation == "native":
        raise ValueError('implementation="native": the native kernels were not built (see `lnjax.native`).')
    return "fused"


def _native_on_cpu(implementation, native_fn, fused_fn, *args):
    """The native kernels on CPU, the fused path elsewhere: decided per platform when the
    program is lowered, so one jitted function runs on CPU, GPU and TPU. Asked for by name,
    the native kernels run wherever the program does (CPU only)."""
    if implementation == "native":
        return native_fn(*args)
    return lax.platform_dependent(*args, cpu=native_fn, default=fused_fn)


def layer_norm(x, scale=None, bias=None, *, axis=-1, eps=1e-5, fast_variance=False, implementation=None):
    """Layer normalization (Ba, Kiros & Hinton 2016, eq. 3-5).

    `y = scale * (x - mu) / sqrt(sigma^2 + eps) + bias` with `mu`, `sigma^2` the mean and
    biased variance of each example over `axis`. Training and inference compute the same thing.

    Args:
      x: floating array `[..., *features]`.
      scale: the gain `g`, shape `x.shape[axis]` (or None for 1).
      bias: the bias `b`, shape `x.shape[axis]` (or None for 0).
      axis: int or tuple of ints, the axes normalized over (the "H units" of the paper).
      eps: added to the variance inside the square root; 1e-5 as in the authors' code.
      fast_variance: one-pass variance (see `moments`).
      implementation: None (default: "native" on CPU where it applies, else "fused" where it
        applies, else "xla"), "native" (the C++ kernels), "fused" (closed-form derivative) or
        "xla" (autodiff of the formula); see the module docstring.

    Returns:
      Array of `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    ax = _checks.axes(axis, x.ndim)
    scale, bias, eps = _checks.param_check(x, ax, scale, bias, eps)
    _checks.more_than_one_value(x, ax, f"layer statistic (over axes {ax})")
    route = _route(implementation, x, ax, eps, native=True,
                   fast_variance=not _checks.python_bool(fast_variance, "fast_variance"))
    if route == "native":
        return _native_on_cpu(implementation, functools.partial(lnjax_native.normalize, eps=float(eps), center=True),
                              functools.partial(_fused.layer_norm_2d, eps=float(eps)), x, scale, bias)
    if route == "fused":
        return _fused.layer_norm_2d(x, scale, bias, float(eps))
    xf = _stats.upcast(x)
    mean, residual, var, _ = _stats.moments(xf, ax, fast_variance=fast_variance)
    y = _stats.normalize(xf, mean, residual, var, eps)
    return _stats.scale_shift(y, scale, bias, ax, x.ndim).astype(x.dtype)


def rms_norm(x, scale=None, bias=None, *, axis=-1, eps=1e-6, implementation=None):
    """RMS normalization (Zhang & Sennrich 2019): layer norm without re-centering.

    `y = scale * x / sqrt(mean(x^2) + eps) + bias`, the mean over `axis`.

    Args:
      x: floating array `[..., *features]`.
      scale: gain, shape `x.shape[axis]` (or None).
      bias: optional bias, shape `x.shape[axis]`; off by default as in the authors' code.
      axis: int or tuple of ints reduced over.
      eps: inside the square root; 1e-6 as in Flax's RMSNorm.
      implementation: as for `layer_norm`.

    Returns:
      Array of `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    ax = _checks.axes(axis, x.ndim)
    scale, bias, eps = _checks.param_check(x, ax, scale, bias, eps)
    route = _route(implementation, x, ax, eps, native=True)
    if route == "native":
        return _native_on_cpu(implementation, functools.partial(lnjax_native.normalize, eps=float(eps), center=False),
                              functools.partial(_fused.rms_norm_2d, eps=float(eps)), x, scale, bias)
    if route == "fused":
        return _fused.rms_norm_2d(x, scale, bias, float(eps))
    y, _ = _stats.rms_normalize(x, ax, eps)
    return _stats.scale_shift(y, scale, bias, ax, x.ndim).astype(x.dtype)


def batch_norm_state(num_features, dtype=jnp.float32) -> BatchNormState:
    """Initial running statistics: mean 0, variance 1 (as Flax and PyTorch).

    Args:
      num_features: int or tuple, the feature shape (`x.shape[axis]` of `batch_norm`).
      dtype: dtype of the statistics; at least float32 is recommended.
    """
    if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, (int, np.integer, tuple, list)):
        raise TypeError(f"`num_features` must be an int or a tuple of ints, got {num_features!r}.")
    shape = (num_features,) if isinstance(num_features, (int, np.integer)) else tuple(num_features)
    for n in shape:
        _checks.positive_int(n, "num_features")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype (running averages), got {jnp.dtype(dtype)}.")
    return BatchNormState(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, dtype))


def batch_norm(x, scale, bias, state: BatchNormState, *, training: bool, axis=-1, momentum=0.99, eps=1e-5,
               axis_name=None, mask=None, fast_variance=False, unbiased_running_var=True,
               implementation=None):  # fmt: skip
    """Batch normalization (Ioffe & Szegedy 2015) with running statistics in `state`.

    Training: `y = scale * (x - mu_B) / sqrt(sigma_B^2 + eps) + bias` with the batch mean and
    biased variance over every axis except `axis`; the running averages become
    `momentum * running + (1 - momentum) * batch`, using the unbiased `m / (m - 1) * sigma_B^2`
    for the variance (as PyTorch; `unbiased_running_var=False` keeps `sigma_B^2`, as Flax).
    Inference (`training=False`) normalizes with the running averages and returns `state`
    unchanged.

    `momentum` follows Flax/Keras (the weight of the old value): PyTorch's `momentum=p`
    corresponds to `momentum=1 - p` here.

    Args:
      x: floating array, e.g. `[batch, features]` or `[batch, height, width, channels]`.
      scale: gain, shape `x.shape[axis]`, or None.
      bias: bias, shape `x.shape[axis]`, or None.
      state: a `BatchNormState` whose arrays have shape `x.shape[axis]`.
      training: use (and update) batch statistics if True, running statistics if False.
      axis: int or tuple of ints, the feature axes kept; statistics reduce over all others.
      momentum: in [0, 1].
      eps: inside the square root.
      axis_name: named axis (vmap/shard_map/pmap) across which batch statistics are synchronized.
      mask: optional boolean array, of shape `x.shape` without `axis` (one flag per position,
        e.g. `[batch]` for `[batch, features]`), or elementwise as Flax's: `x`'s rank, each
        dimension 1 or `x`'s (e.g. `[batch, 1]`, or `x.shape`), each feature then counting its
        own unmasked entries. False entries (padding) are left out of the statistics but still
        normalized with them, and their values (even NaN) reach no gradient. A feature with no
        data (an empty batch, or all its entries masked) keeps its running averages and is
        normalized with them, as in evaluation.
      fast_variance: one-pass variance (see `moments`).
      unbiased_running_var: the running variance averages the unbiased batch variance (True)
        or the biased one (False).
      implementation: None (default: "native" on CPU where it applies, else "fused" where it
        applies, else "xla"), "native", "fused" or "xla", as for `layer_norm`.
        Training mode only (inference is elementwise), over every axis but the last, without
        `mask`/`axis_name`.

    Returns:
      `(y, new_state)`, `y` with `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    feat = _checks.axes(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    if not red and axis_name is None:
        raise ValueError(
            f"`axis`={axis!r} keeps every axis of x (shape {x.shape}); batch_norm needs a batch "
            "axis to compute statistics over, or an `axis_name` when the batch is vmapped."
        )
    _checks.python_bool(training)
    _checks.python_bool(unbiased_running_var, "unbiased_running_var")
    scale, bias, eps = _checks.param_check(x, feat, scale, bias, eps)
    momentum = _checks.in_unit_interval(momentum, "momentum")
    _checks.batch_norm_state_check(state, tuple(x.shape[a] for a in feat), x.shape)
    m = _stats.expand_mask(mask, x, red, elementwise=True)
    if training and axis_name is None:
        _checks.more_than_one_value(x, red, f"batch statistic (over axes {red})")
    if not training:
        _checked_implementation(implementation)  # inference is elementwise, always the formula
    elif (route := _route(implementation, x, feat, eps, native=True, mask=mask is None, axis_name=axis_name is None,
                          fast_variance=not _checks.python_bool(fast_variance, "fast_variance"))) != "xla":
        fused = functools.partial(_fused.batch_norm_train_2d, eps=float(eps))
        if route == "native":
            y, mean, var = _native_on_cpu(implementation, functools.partial(lnjax_native.batch_norm_train, eps=float(eps)),
                                          fused, x, scale, bias)  # fmt: skip
        else:
            y, mean, var = fused(x, scale, bias)
        count = jnp.asarray(math.prod(x.shape[:-1]), var.dtype)
        return y, _stats.ema_update(state, mean, var, count, momentum, unbiased_running_var)
    xf = _stats.upcast(x)
    mean, residual, var, new_state = _stats.batch_moments(
        xf, red, state, training=training, momentum=momentum, unbiased=unbiased_running_var, mask=m,
        axis_name=axis_name, fast_variance=fast_variance,
    )

    def normalized(x):
        return _stats.scale_shift(_stats.normalize(x, mean, residual, var, eps), scale, bias, feat, x.ndim)

    if m is None:
        return normalized(xf).astype(x.dtype), new_state
    # Masked positions are normalized too, but through a branch without gradient, and the
    # differentiated branch sees zeros there: their values (even NaN) reach no gradient.
    y = jnp.where(m, normalized(jnp.where(m, xf, jnp.zeros((), xf.dtype))), lax.stop_gradient(normalized(xf)))
    return y.astype(x.dtype), new_state


def group_norm(x, num_groups, scale=None, bias=None, *, axis=-1, eps=1e-5, fast_variance=False):
    """Group normalization (Wu & He 2018).

    Per example, the channels are split into `num_groups` contiguous groups and each group is
    normalized over its channels and all spatial axes. `num_groups=1` is layer norm over
    channels and space; `num_groups=C` is instance norm.

    Args:
      x: floating array `[batch, *spatial, channels]` (axis 0 is the batch; use `jax.vmap`
        for other layouts or unbatched inputs).
      num_groups: positive int dividing the number of channels (Wu & He use 32).
      scale: per-channel gain, shape `[channels]`, or None.
      bias: per-channel bias, shape `[channels]`, or None.
      axis: the channel axis (-1 for NHWC, 1 for NCHW); must not be 0.
      eps: inside the square root.
      fast_variance: one-pass variance (see `moments`).

    Returns:
      Array of `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    if x.ndim < 2:
        raise ValueError(f"`x` must have a batch axis and a channel axis, got shape {x.shape}.")
    c = _checks.channel_axis(axis, x.ndim, batch_first=True)
    channels = x.shape[c]
    num_groups = _checks.positive_int(num_groups, "num_groups")
    if channels % num_groups:
        raise ValueError(
            f"`num_groups`={num_groups} does not divide the {channels} channels of x "
            f"(shape {x.shape}, channel axis {c})."
        )
    scale, bias, eps = _checks.param_check(x, (c,), scale, bias, eps)
    xg = x.reshape(x.shape[:c] + (num_groups, channels // num_groups) + x.shape[c + 1 :])
    red = tuple(a for a in range(1, xg.ndim) if a != c)
    _checks.more_than_one_value(xg, red, f"group statistic ({num_groups} groups of the channel axis {c})", x.shape)
    xg = _stats.upcast(xg)
    mean, residual, var, _ = _stats.moments(xg, red, fast_variance=fast_variance)
    y = _stats.normalize(xg, mean, residual, var, eps).reshape(x.shape)
    return _stats.scale_shift(y, scale, bias, (c,), x.ndim).astype(x.dtype)


def instance_norm(x, scale=None, bias=None, *, axis=-1, eps=1e-5, fast_variance=False):
    """Instance normalization (Ulyanov et al. 2016): per example and channel, over space.

    Args:
      x: floating array `[batch, *spatial, channels]` with at least one spatial axis.
      scale, bias: per-channel, shape `x.shape[axis]`, or None.
      axis: the channel axis, or a tuple of them (Flax's `feature_axes`); not the batch axis 0.
        The statistics are over every other axis but 0.
      eps: inside the square root.
      fast_variance: one-pass variance (see `moments`).

    Returns:
      Array of `x`'s shape and dtype. With one channel axis, equal to `group_norm(x, channels, ...)`.
    """
    x = _checks.spatial(_checks.floating(x))
    ch = _checks.axes(axis, x.ndim)
    if 0 in ch:
        raise ValueError(f"`axis`={axis!r} {'includes' if len(ch) > 1 else 'is'} the batch axis 0; expected "
                         f"the channel axes, among 1..{x.ndim - 1} for x of shape {x.shape}.")  # fmt: skip
    red = tuple(a for a in range(1, x.ndim) if a not in ch)
    if math.prod(x.shape[a] for a in red) == 1:
        raise ValueError(f"`x` of shape {x.shape} has one spatial position: every instance statistic "
                         "would be over one value (the output would be `bias`).")  # fmt: skip
    scale, bias, eps = _checks.param_check(x, ch, scale, bias, eps)
    xf = _stats.upcast(x)
    mean, residual, var, _ = _stats.moments(xf, red, fast_variance=fast_variance)
    y = _stats.normalize(xf, mean, residual, var, eps)
    return _stats.scale_shift(y, scale, bias, ch, x.ndim).astype(x.dtype)


def weight_norm(v, g, *, axis=-1, eps=1e-12):
    """Weight normalization (Salimans & Kingma 2016): `w = g * v / ||v||`.

    The norm is taken over every axis of `v` except `axis`, so each output unit's weight
    vector has norm `g`. For a Dense kernel `[in, out]` keep `axis=-1`; for a conv kernel
    `[h, w, in, out]` likewise.

    Args:
      v: floating array, the direction parameters.
      g: the norms, shape `v.shape[axis]`.
      axis: int or tuple of ints, the output axes kept.
      eps: inside the square root, to keep `v = 0` finite.

    Returns:
      `w`, with `v`'s shape and dtype.
    """
    v = _checks.floating(v, "v")
    keep = _checks.axes(axis, v.ndim)
    g = _checks.shape(g, tuple(v.shape[a] for a in keep), "g", f" (v.shape[axis] for v of shape {v.shape})")
    _checks.floating(g, "g")
    eps = _checks.nonnegative(eps, "eps")
    red = tuple(a for a in range(v.ndim) if a not in keep)
    if not red:
        raise ValueError(f"`axis`={axis!r} keeps every axis of v (shape {v.shape}): no axis is left to take the "
                         "norm over (each weight would become g * sign(v)).")  # fmt: skip
    vf = v.astype(_checks.stats_dtype(v.dtype))
    sq = jnp.sum(vf * vf, axis=red, keepdims=True)
    w = vf * _stats.inv_std(sq, eps) * _stats.broadcast_to_axes(g, keep, v.ndim, vf.dtype)
    return w.astype(v.dtype)
