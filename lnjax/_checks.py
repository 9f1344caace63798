"""Trace-time argument checks shared by the ops; each error names the argument, the value and
what was expected, so that nothing is silently broadcast or truncated."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lnjax._state import BatchNormState


def floating(x, name: str = "x"):
    """Returns `x` as an array, raising TypeError unless it is real floating point."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating-point array, got dtype {x.dtype}; "
            f"cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    return x


def stats_dtype(dtype):
    """The dtype statistics are computed in: at least float32, float64 if the input has it."""
    # Spelled out rather than promote_types, which strict dtype promotion refuses for bf16.
    return jnp.dtype(jnp.float64) if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def axes(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Normalizes an int or a sequence of ints to sorted non-negative axes of an ndim array."""
    raw = (axis,) if isinstance(axis, (int, np.integer)) else axis
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        raw = tuple(raw)
    else:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
    if not raw:
        raise ValueError(f"`{name}` must name at least one axis, got {axis!r}.")
    out = []
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axis!r} is out of range for an array with {ndim} dimensions; "
                f"expected axes in [{-ndim}, {ndim})."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis!r} repeats an axis; each axis may appear once.")
    return tuple(sorted(out))


def real_scalar(value, name: str):
    """Returns `value` after checking it is one real number: a Python or NumPy int or float, or
    a 0-d real array (possibly traced). Bools, strings and arrays with axes (which would
    broadcast) are a TypeError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok and hasattr(value, "shape") and hasattr(value, "dtype"):
        real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ok = value.shape == () and real
    if not ok:
        raise TypeError(f"`{name}` must be a real number (a Python or NumPy scalar, or a 0-d array), got {value!r}.")
    return value


def _concrete(value, name):
    """`float(value)` of a real scalar, or None for a traced one (the user's to check)."""
    real_scalar(value, name)
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None


def _poisoned(value, ok):
    """A traced out-of-range `value` cannot raise under `jit`: it becomes NaN instead, so that
    every output it reaches is NaN rather than silently wrong."""
    return jnp.where(ok, value, jnp.nan)


def nonnegative(value, name: str):
    """`value` after checking it is >= 0: a concrete one raises ValueError, a traced one is
    returned NaN where it is not (`_poisoned`)."""
    v = _concrete(value, name)
    if v is None:
        return _poisoned(value, value >= 0)
    if not v >= 0:  # also rejects NaN
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return value


def in_unit_interval(value, name: str):
    """`value` after checking it is in [0, 1], as `nonnegative` does."""
    v = _concrete(value, name)
    if v is None:
        return _poisoned(value, (value >= 0) & (value <= 1))
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
    return value


def shape(arr, expected: tuple[int, ...], name: str, hint: str = ""):
    """Returns `arr` as an array after checking its shape equals `expected` exactly."""
    if arr is None:
        return None
    if not hasattr(arr, "shape"):
        arr = jnp.asarray(arr)
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` has shape {tuple(arr.shape)}, expected {tuple(expected)}{hint}; "
            "lnjax does not broadcast parameters."
        )
    return arr


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def python_bool(value, name: str = "training"):
    """Raises TypeError unless `value` is a Python bool (it selects the program, statically)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a Python bool, got {value!r}.")
    return value


def param(p, expected: tuple[int, ...], name: str, hint: str = ""):
    """Returns an optional parameter `p`: None, or a floating array of shape `expected` exactly."""
    p = shape(p, expected, name, hint)
    return None if p is None else floating(p, name)


def param_check(x, ax, scale, bias, eps):
    """Returns `(scale, bias, eps)`: each of `scale`, `bias` None or a floating array of shape
    `x.shape[ax]`, and `eps` checked by `nonnegative`."""
    pshape = tuple(x.shape[a] for a in ax)
    hint = f" (x.shape[axis] for x of shape {x.shape} and axis {ax})"
    scale, bias = param(scale, pshape, "scale", hint), param(bias, pshape, "bias", hint)
    return scale, bias, nonnegative(eps, "eps")


def channel_axis(axis, ndim: int, *, batch_first: bool = False) -> int:
    """`axis` as the one (non-negative) channel axis; with `batch_first`, axis 0 is refused."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"`axis` must be a single int, the channel axis; got {axis!r}.")
    c = axes(axis, ndim)[0]
    if batch_first and c == 0:
        raise ValueError(f"`axis`={axis!r} is the batch axis 0; expected the channel axis.")
    return c


def spatial(x):
    """Returns `x` after checking it is `[batch, *spatial, channels]` with a spatial axis."""
    if x.ndim < 3:
        raise ValueError(
            f"`x` must be [batch, *spatial, channels] with at least one spatial axis, got shape "
            f"{x.shape}; without spatial axes every instance statistic is over one value."
        )
    return x


def more_than_one_value(x, ax, what: str, shape=None):
    """Raises ValueError if the statistics of `x` over `ax` would each be over one value: the
    centred value is then exactly 0 and the output only the bias, which no caller means.
    `shape`: the user's shape to name, where `x` is a reshape of it."""
    if math.prod(x.shape[a] for a in ax) == 1:
        raise ValueError(
            f"`x` of shape {x.shape if shape is None else shape} gives each {what} one value: the "
            "normalized output would be 0 everywhere (only `bias`). Normalize over more values, or "
            "leave this term unnormalized."
        )
    return x


def bound_axis_name(axis_name):
    """Returns `axis_name` (a name or a tuple of names) after checking each is bound here: by
    `vmap(axis_name=...)`, `pmap`, or `shard_map` over a mesh with that axis."""
    for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"`axis_name`={axis_name!r}: no axis {name!r} is bound here. Batch statistics across "
                "devices or examples need the call inside `jax.vmap(..., axis_name=...)`, `jax.pmap`, or "
                "`shard_map` over a mesh with that axis; leave `axis_name` None for local statistics."
            ) from None
    return axis_name


def batch_norm_state_check(state, fshape, x_shape, what="x.shape[axis]"):
    """Checks `state` is a `BatchNormState` whose arrays have the feature shape `fshape`
    (`what`, of `x` of shape `x_shape`)."""
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"`state` must be a BatchNormState (see `batch_norm_state`), got {type(state).__name__}."
        )
    hint = f" ({what} for x of shape {x_shape}; a state made for another shape?)"
    for name, value in zip(("state.mean", "state.var"), state):
        # An integer state would truncate every running average.
        floating(shape(value, fshape, name, hint), name)
    return state
