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
    "lnjax_batch_norm_forward": "LnjaxBatchNormForward",
    "lnjax_batch_norm_backward": "LnjaxBatchNormBackward",
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


def _call(target, out, *args, **attrs):
    return jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(*args, **attrs)


def _like(*arrays):
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


# --- the tangents as primitives ----------------------------------------------------------------


class _Tangent:
    """A tangent `xla(x, scale, *aux, dx, dscale, dbias, **params)`, linear in its last three
    inputs, as one primitive: evaluated or differentiated it is XLA's closed form `xla` (so
    `jvp` and second derivatives run through XLA); transposed (the backward of `grad`) it is
    `native(x, scale, *aux, ct, **params) -> (dx, dscale, dbias)`, the native kernel, itself
    differentiable through XLA's transpose. Under `vmap` the mapped axis joins the rows and
    the parameter groups, which every kernel takes."""

    def __init__(self, name, xla, native):
        self.xla, self.native = xla, native
        self.p = Primitive(name)
        self.p.def_impl(xla)
        self.p.def_abstract_eval(lambda x, *args, **params: jax.core.ShapedArray(x.shape, x.dtype))
        mlir.register_lowering(self.p, mlir.lower_fun(xla, multiple_results=False))
        ad.primitive_jvps[self.p] = self._jvp
        ad.primitive_transposes[self.p] = self._transpose
        batching.primitive_batchers[self.p] = self._batch
        self._vjps = {}

    def bind(self, *args, **params):
        return self.p.bind(*args, **params)

    def _jvp(self, primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(functools.partial(self.xla, **params), primals, tangents)

    def _backward_xla(self, primals, ct, params):
        x, scale = primals[:2]
        return jax.linear_transpose(functools.partial(self.xla, *primals, **params), x, scale, scale)(ct)

    def _vjp(self, params):
        """The native backward for these static `params`, with XLA's derivative."""
        key = tuple(sorted(params.items()))
        if key not in self._vjps:
            @jax.custom_jvp
            def vjp(primals, ct):
                return self.native(*primals, ct, **params)

            @vjp.defjvp
            def vjp_jvp(args, tangents):
                _, t = jax.jvp(lambda p, c: self._backward_xla(p, c, params), args, tangents)
                return vjp(*args), t

            self._vjps[key] = vjp
        return self._vjps[key]

    def _transpose(self, ct, *args, **params):
        primals, linear = args[:-3], args[-3:]
        if type(ct) is ad.Zero:
            grads = [ad.Zero(a.aval) if ad.is_undefined_primal(a) else None for a in linear]
        else:
            grads = self._vjp(params)(tuple(primals), ct)
            grads = [g if ad.is_undefined_primal(a) else None for g, a in zip(grads, linear)]
        return [None] * len(primals) + list(grads)

    def _batch(self, args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        lead = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims)]  # fmt: skip
        out = self.bind(*[a.reshape((-1,) + a.shape[2:]) for a in lead], **params)
        return out.reshape((size, -1) + out.shape[1:]), 0


def _grouped(a, groups):
    """`[rows, ...]` as `[G, rows / G, ...]`."""
    return a.reshape((groups, -1) + a.shape[1:])


def _times_pow2(a, k):
    """`a * 2^k` for an integer array `k`, exact, as two factors each inside the float range
    (`2^149` alone is not a float32); linear in `a`, unlike `jnp.ldexp`."""
    half = k // 2
    return a * jnp.exp2(half.astype(a.dtype)) * jnp.exp2((k - half).astype(a.dtype))


# --- layer and RMS norm over rows ------------------------------------------------------------
# Per row the kernels save [mean, residual, rstd, e] (layer) or [rstd, e] (RMS), in the units of
# the row scaled by 2^-e (e = 0 for all but extreme rows).


def _row_kind(center):
    return "layer_norm" if center else "rms_norm"


def _row_forward(x, scale, bias, *, eps, center):
    stats = jax.ShapeDtypeStruct(x.shape[:-1] + (4 if center else 2,), scale.dtype)
    return _call(f"lnjax_{_row_kind(center)}_forward", (*_like(x), stats), x, scale, bias, eps=np.float64(eps))


def _row_backward(x, scale, stats, ct, *, center):
    return _call(f"lnjax_{_row_kind(center)}_backward", _like(x, scale, scale), x, ct, scale, stats)


def _scaled(x, stats, center):
    """`(xhat, rstd, e)` of the kernels, in the statistics dtype: `rstd` in scaled units (the
    true one is `rstd * 2^-e`), arrays broadcasting over `[..., H]`."""
    e = jax.lax.stop_gradient(stats[..., -1:]).astype(jnp.int32)
    v = _times_pow2(x.astype(stats.dtype), -e)
    if center:
        rstd = stats[..., 2:3]
        return ((v - stats[..., 0:1]) - stats[..., 1:2]) * rstd, rstd, e
    rstd = stats[..., 0:1]
    return v * rstd, rstd, e


def _row_tangent_xla(x, scale, stats, dx, dscale, dbias, *, center):
    """`scale * rstd * (d - mean_H(d) - xhat * mean_H(d * xhat)) + dscale * xhat + dbias`,
    `d = dx` (RMS: without `mean_H(d)`), for `x` `[rows, H]` and parameters `[G, H]`."""
    g = scale.shape[0]
    xhat, rstd, e = _scaled(_grouped(x, g), _grouped(stats, g), center)
    d = _grouped(dx, g).astype(stats.dtype)
    mean_d = jnp.mean(d, axis=-1, keepdims=True) if center else 0
    t = _times_pow2((d - mean_d - xhat * jnp.mean(d * xhat, axis=-1, keepdims=True)) * rstd, -e)
    t = t * scale[:, None] + xhat * dscale[:, None] + dbias[:, None]
    return t.reshape(x.shape).astype(x.dtype)


def _row_stats_tangent(x, stats, dx, *, center):
    """The tangent of the saved statistics (for second derivatives): `d mean = mean_H(dv)`,
    `d residual = 0`, `d rstd = -rstd^2 mean_H(xhat * dv)`, `e` constant, `dv = dx 2^-e`."""
    xhat, rstd, e = _scaled(x, stats, center)
    dv = _times_pow2(dx.astype(stats.dtype), -e)
    d_rstd = -rstd * rstd * jnp.mean(xhat * dv, axis=-1, keepdims=True)
    zero = jnp.zeros_like(d_rstd)
    if not center:
        return jnp.concatenate([d_rstd, zero], axis=-1)
    return jnp.concatenate([jnp.mean(dv, axis=-1, keepdims=True), zero, d_rstd, zero], axis=-1)


_row_tangent = _Tangent("lnjax_native_row_norm_tangent", _row_tangent_xla, _row_backward)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _row_norm(x, scale, bias, eps, center):
    """`(y, stats)` of the native forward, differentiable to any order."""
    return _row_forward(x, scale, bias, eps=eps, center=center)


@_row_norm.defjvp
def _row_norm_jvp(eps, center, primals, tangents):
    x, scale, bias = primals
    # Through `_row_norm` itself, so that under a second derivative its own rule applies.
    y, stats = _row_norm(x, scale, bias, eps, center)
    return (y, stats), (_row_tangent.bind(x, scale, stats, *tangents, center=center),
                        _row_stats_tangent(x, stats, tangents[0], center=center))


# --- batch norm over columns -------------------------------------------------------------------


def _bn_forward(x, scale, bias, *, eps):
    """`(y, mean, residual, var)`: the mean as a rounded `mean` and its `residual`."""
    return _call("lnjax_batch_norm_forward", _like(x, scale, scale, scale), x, scale, bias, eps=np.float64(eps))


def _bn_backward(x, scale, mean, residual, var, ct, *, eps):
    return _call("lnjax_batch_norm_backward", _like(x, scale, scale), x, ct, scale, mean, residual, var,
                 eps=np.float64(eps))


def _bn_parts(x, scale, mean, residual, var, dx, eps):
    """`(d, xhat, rstd, mean_N(d), d var)` per group, `[G, rows / G, C]` and `[G, 1, C]`."""
    g = scale.shape[0]
    xg, d = (_grouped(a, g).astype(scale.dtype) for a in (x, dx))
    centred = (xg - mean[:, None]) - residual[:, None]
    rstd = jax.lax.rsqrt(var[:, None] + jnp.asarray(eps, var.dtype))
    # d(biased var) = 2 mean_N((x - mu) dx): the d mu term vanishes as sum(x - mu) = 0.
    return d, centred * rstd, rstd, jnp.mean(d, axis=1, keepdims=True), 2 * jnp.mean(centred * d, axis=1, keepdims=True)


def _bn_tangent_xla(x, scale, mean, residual, var, dx, dscale, dbias, *, eps):
    d, xhat, rstd, dmean, dvar = _bn_parts(x, scale, mean, residual, var, dx, eps)
    k = rstd * scale[:, None]
    t = k * d - k * dmean - xhat * (k * rstd * dvar / 2) + xhat * dscale[:, None] + dbias[:, None]
    return t.reshape(x.shape).astype(x.dtype)


_bn_tangent = _Tangent("lnjax_native_batch_norm_tangent", _bn_tangent_xla, _bn_backward)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _bn(x, scale, bias, eps):
    """`(y, mean, residual, var)` of the native training-mode forward, differentiable to any order."""
    return _bn_forward(x, scale, bias, eps=eps)


@_bn.defjvp
def _bn_jvp(eps, primals, tangents):
    x, scale, bias = primals
    out = y, mean, residual, var = _bn(x, scale, bias, eps)
    _, _, _, dmean, dvar = _bn_parts(x, scale, mean, residual, var, tangents[0], eps)
    t = _bn_tangent.bind(x, scale, mean, residual, var, *tangents, eps=eps)
    return out, (t, dmean[:, 0], jnp.zeros_like(residual), dvar[:, 0])


def _params_2d(scale, bias, h, dtype):
    scale = jnp.ones((1, h), dtype) if scale is None else scale.astype(dtype).reshape((1, h))
    bias = jnp.zeros((1, h), dtype) if bias is None else bias.astype(dtype).reshape((1, h))
    return scale, bias


def batch_norm_train(x, scale, bias, eps: float):
    """Training-mode batch norm of `x` `[..., C]` over every axis but the last, by the native
    kernels: `(y, mean, var)`, the batch mean and biased variance `[C]` in the statistics
    dtype. Callers check the arguments (`lnjax.batch_norm`) and that `available()`."""
    c, dtype = x.shape[-1], _checks.stats_dtype(x.dtype)
    y, mean, residual, var = _bn(x.reshape((-1, c)), *_params_2d(scale, bias, c, dtype), float(eps))
    return y.reshape(x.shape), (mean + residual)[0], var[0]


def normalize(x, scale, bias, eps: float, *, center: bool):
    """Layer (`center`) or RMS normalization of `x` `[..., H]` over its last axis, by the
    native kernels; `scale`, `bias` `[H]` or None, `eps` a Python float. Callers check the
    arguments (`lnjax.layer_norm`, `lnjax.rms_norm`) and that `available()`."""
    h, dtype = x.shape[-1], _checks.stats_dtype(x.dtype)
    return _row_norm(x.reshape((-1, h)), *_params_2d(scale, bias, h, dtype), float(eps), center)[0].reshape(x.shape)
