"""Trace-time argument checks shared by the ops; each error names the argument, the value and
what was expected, so that nothing is silently broadcast or truncated."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def nonnegative(value, name: str):
    """Raises ValueError if a concrete `value` is negative; traced values pass (checked by the user)."""
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return value
    if not v >= 0:  # also rejects NaN
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return value


def in_unit_interval(value, name: str):
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return value
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


def training_flag(training):
    """Raises TypeError unless `training` is a Python bool (it selects the program, statically)."""
    if not isinstance(training, bool):
        raise TypeError(f"`training` must be a Python bool, got {training!r}.")
    return training
