"""Native CPU kernels for layer and RMS norm over the last axis, through XLA's FFI.

The C++ kernels (`csrc/row_norms.cc`, built by `pip install .` with the machine's compiler)
normalize each row in cache, in one thread, with the same code whatever the batch: a row's
output is bitwise independent of the other rows, of jit vs eager and of the thread count.
The statistics are the exact corrected two-pass ones, and a row whose magnitude would
overflow or underflow its squares is first scaled by a power of two (exact), so every
finite input gives a finite, correct output.

Differentiation: forward mode, reverse mode and higher derivatives all work. The derivative
is a `jax.custom_jvp` whose tangent is one linear primitive: it lowers to the closed form in
XLA (so `jvp`, `jacfwd` and second derivatives run through XLA), and its transpose, the
backward of `grad`/`vjp`, is the native backward kernel.

`available()` says whether the kernels are loaded; where they are not (no C++ compiler at
install time), lnjax warns once and uses its XLA path, with the same results to float
rounding.
"""

import ctypes
import functools
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from lnjax import _checks

__all__ = ["available"]

_LIBRARY = "liblnjax_native.so"
_TARGETS = {  # FFI target name: the C symbol of its handler
    "lnjax_layer_norm_forward": "LnjaxLayerNormForward",
    "lnjax_layer_norm_backward": "LnjaxLayerNormBackward",
    "lnjax_rms_norm_forward": "LnjaxRmsNormForward",
    "lnjax_rms_norm_backward": "LnjaxRmsNormBackward",
}


def _library_path() -> pathlib.Path | None:
    """The built library: beside this file (a regular install), else in an `lnjax` folder on
    `sys.path` (an editable install keeps the sources in the checkout and the library in
    site-packages)."""
    for folder in (pathlib.Path(__file__).parent, *(pathlib.Path(p) / "lnjax" for p in sys.path if p)):
        if (folder / _LIBRARY).is_file():
            return folder / _LIBRARY
    return None


@functools.cache
def available() -> bool:
    """Whether the native CPU kernels are loaded; `implementation=None` then uses them on CPU.

    The first call loads and registers them; if they were not built, it warns once.
    """
    path = _library_path()
    if path is None:
        warnings.warn("lnjax: the native CPU kernels were not built (no C++ compiler when lnjax was "
                      "installed?); layer and RMS norm use the XLA path.", RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    lib = ctypes.CDLL(str(path))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def _kind(center: bool) -> str:
    return "layer_norm" if center else "rms_norm"


def _stats_width(center: bool) -> int:
    return 4 if center else 2  # [mean, residual, rstd, e] or [rstd, e], scaled units


def _forward(x, scale, bias, *, eps, center):
    """`(y, stats)`: the native forward of `x` `[..., H]` with `[G, H]` parameters."""
    stats = jax.ShapeDtypeStruct(x.shape[:-1] + (_stats_width(center),), scale.dtype)
    call = jax.ffi.ffi_call(f"lnjax_{_kind(center)}_forward", (jax.ShapeDtypeStruct(x.shape, x.dtype), stats),
                            vmap_method="broadcast_all")  # fmt: skip
    return call(x, scale, bias, eps=np.float64(eps))


def _backward(x, dy, scale, stats, *, center):
    """`(dx, dscale, dbias)` of the native backward."""
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), *[jax.ShapeDtypeStruct(scale.shape, scale.dtype)] * 2)
    call = jax.ffi.ffi_call(f"lnjax_{_kind(center)}_backward", out, vmap_method="broadcast_all")
    return call(x, dy, scale, stats)


def _grouped(a, groups):
    """`[rows, ...]` as `[G, rows / G, ...]`."""
    return a.reshape((groups, -1) + a.shape[1:])


def _times_pow2(a, k):
    """`a * 2^k` for an integer array `k`, exact, as two factors each inside the float range
    (`2^149` alone is not a float32); linear in `a`, unlike `jnp.ldexp`."""
    half = k // 2
    return a * jnp.exp2(half.astype(a.dtype)) * jnp.exp2((k - half).astype(a.dtype))


def _scaled(x, stats, center):
    """`(v, xhat, rstd, e)` of the kernels, in the statistics dtype: `v = x * 2^-e` the scaled
    rows, `rstd` in scaled units (true `rstd * 2^-e`), arrays broadcasting over `[..., H]`."""
    e = jax.lax.stop_gradient(stats[..., -1:]).astype(jnp.int32)
    v = _times_pow2(x.astype(stats.dtype), -e)
    if center:
        rstd = stats[..., 2:3]
        return v, ((v - stats[..., 0:1]) - stats[..., 1:2]) * rstd, rstd, e
    rstd = stats[..., 0:1]
    return v, v * rstd, rstd, e


def _tangent_xla(x, scale, stats, dx, dscale, dbias, *, center):
    """The tangent of the normalization in XLA: `scale * rstd * (d - mean_H(d) - xhat *
    mean_H(d * xhat)) + dscale * xhat + dbias`, `d = dx` (RMS: without `mean_H(d)`), for `x`
    `[rows, H]` and parameters `[G, H]`."""
    g = scale.shape[0]
    xg, sg = _grouped(x, g), _grouped(stats, g)
    _, xhat, rstd, e = _scaled(xg, sg, center)
    d = _grouped(dx, g).astype(stats.dtype)
    mean_d = jnp.mean(d, axis=-1, keepdims=True) if center else 0
    t = _times_pow2((d - mean_d - xhat * jnp.mean(d * xhat, axis=-1, keepdims=True)) * rstd, -e)
    t = t * scale[:, None] + xhat * dscale[:, None] + dbias[:, None]
    return t.reshape(x.shape).astype(x.dtype)


def _stats_tangent(x, stats, dx, *, center):
    """The tangent of the saved statistics (for second derivatives): `d mean = mean_H(dv)`,
    `d residual = 0`, `d rstd = -rstd^3 mean_H(centred * dv)`, `e` constant, `dv = dx 2^-e`."""
    v, xhat, rstd, e = _scaled(x, stats, center)
    dv = _times_pow2(dx.astype(stats.dtype), -e)
    d_rstd = -rstd * rstd * jnp.mean(xhat * dv, axis=-1, keepdims=True)
    if not center:
        return jnp.concatenate([d_rstd, jnp.zeros_like(d_rstd)], axis=-1)
    d_mean = jnp.mean(dv, axis=-1, keepdims=True)
    zero = jnp.zeros_like(d_mean)
    return jnp.concatenate([d_mean, zero, d_rstd, zero], axis=-1)


# The tangent as a primitive, linear in (dx, dscale, dbias): XLA's closed form when evaluated
# or differentiated, the native backward kernel when transposed.
_tangent_p = Primitive("lnjax_native_norm_tangent")
_tangent_p.def_impl(_tangent_xla)
_tangent_p.def_abstract_eval(lambda x, *args, center: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_xla, multiple_results=False))


def _tangent_jvp(primals, tangents, *, center):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(functools.partial(_tangent_xla, center=center), primals, tangents)


def _backward_xla(x, ct, scale, stats, *, center):
    """`(dx, dscale, dbias)`: the transpose of `_tangent_xla`, for derivatives of the backward."""
    tangent = functools.partial(_tangent_xla, x, scale, stats, center=center)
    return jax.linear_transpose(tangent, x, scale, scale)(ct)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _vjp(x, ct, scale, stats, center):
    """The native backward, differentiable (through XLA's) for second derivatives."""
    return _backward(x, ct, scale, stats, center=center)


@_vjp.defjvp
def _vjp_jvp(center, primals, tangents):
    _, t = jax.jvp(functools.partial(_backward_xla, center=center), primals, tangents)
    return _vjp(*primals, center), t


def _tangent_transpose(ct, x, scale, stats, dx, dscale, dbias, *, center):
    if type(ct) is ad.Zero:
        return [None] * 3 + [None if not ad.is_undefined_primal(a) else ad.Zero(a.aval) for a in (dx, dscale, dbias)]
    gx, gscale, gbias = _vjp(x, ct, scale, stats, center)
    return [None] * 3 + [g if ad.is_undefined_primal(a) else None for g, a in
                         ((gx, dx), (gscale, dscale), (gbias, dbias))]  # fmt: skip


def _tangent_batch(args, dims, *, center):
    """vmap: the mapped axis joins the rows (and the parameter groups), which the kernels take."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    lead = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]  # fmt: skip
    flat = [a.reshape((-1,) + a.shape[2:]) for a in lead]
    out = _tangent_p.bind(*flat, center=center)
    return out.reshape((size, -1) + out.shape[1:]), 0


ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, eps, center):
    """`(y, stats)` of the native forward, differentiable to any order."""
    return _forward(x, scale, bias, eps=eps, center=center)


@_norm.defjvp
def _norm_jvp(eps, center, primals, tangents):
    x, scale, bias = primals
    dx = tangents[0]
    # Through `_norm` itself, so that under a second derivative its own rule applies.
    y, stats = _norm(x, scale, bias, eps, center)
    return (y, stats), (_tangent_p.bind(x, scale, stats, *tangents, center=center),
                        _stats_tangent(x, stats, dx, center=center))


def normalize(x, scale, bias, eps: float, *, center: bool):
    """Layer (`center`) or RMS normalization of `x` `[..., H]` over its last axis, by the
    native kernels; `scale`, `bias` `[H]` or None, `eps` a Python float. Callers check the
    arguments (`lnjax.layer_norm`, `lnjax.rms_norm`) and that `available()`."""
    h, dtype = x.shape[-1], _checks.stats_dtype(x.dtype)
    scale = jnp.ones((1, h), dtype) if scale is None else scale.astype(dtype).reshape((1, h))
    bias = jnp.zeros((1, h), dtype) if bias is None else bias.astype(dtype).reshape((1, h))
    return _norm(x.reshape((-1, h)), scale, bias, float(eps), center)[0].reshape(x.shape)
