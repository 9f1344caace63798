"""Native CPU kernels through XLA's FFI: layer and RMS norm over the last axis, training-mode
batch norm, and one step of the LSTM and GRU cells (`csrc/`, built by `pip install .` with the
machine's compiler).

The row kernels normalize each row in cache, in one thread, with the same code whatever the
batch: a row's output is bitwise independent of the other rows, of jit vs eager and of the
thread count. The statistics are the exact corrected two-pass ones, and a row whose squares
would overflow or underflow is first scaled by a power of two (exact), so every finite input
gives a finite, correct output. Sums across rows (batch statistics, parameter gradients) are
combined in a fixed order.

Differentiation: every kernel call is a primitive with its own JVP rule, whose tangent is one
linear primitive: it lowers to the closed form in XLA (so `jvp`, `jacfwd` and second
derivatives run through XLA), and its transpose, the backward of `grad`/`vjp`, is the native
backward kernel. Under `vmap` the mapped axis joins the rows and the parameter groups.

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

from lnjax import _checks, _sharding

__all__ = ["available"]

_LIBRARY = "liblnjax_native.so"
_TARGETS = {  # FFI target name: the C symbol of its handler
    "lnjax_layer_norm_forward": "LnjaxLayerNormForward",
    "lnjax_layer_norm_backward": "LnjaxLayerNormBackward",
    "lnjax_rms_norm_forward": "LnjaxRmsNormForward",
    "lnjax_rms_norm_backward": "LnjaxRmsNormBackward",
    "lnjax_batch_norm_forward": "LnjaxBatchNormForward",
    "lnjax_batch_norm_backward": "LnjaxBatchNormBackward",
    "lnjax_lstm_step_forward": "LnjaxLstmStepForward",
    "lnjax_lstm_step_backward": "LnjaxLstmStepBackward",
    "lnjax_gru_step_forward": "LnjaxGruStepForward",
    "lnjax_gru_step_backward": "LnjaxGruStepBackward",
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
                      "installed?); the norms and RNN steps use the XLA path.", RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    lib = ctypes.CDLL(str(path))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def _call(target, out, *args, **attrs):
    out = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(*args, **attrs)
    return _sharding.varying_like(out, args)


def _alike(*args):
    """The arguments of a kernel, all varying over the same `shard_map` axes: a parameter
    replicated across a mesh meets data sharded over it, as in XLA's own ops (whose transpose
    then sums the parameter's gradient over the axes)."""
    return _sharding.varying_like(args, args)


def _like(*arrays):
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


# --- primitives --------------------------------------------------------------------------------
# Each kernel call is a primitive with its own JVP rule, so that every order of differentiation
# finds a rule (a `custom_jvp` is inlined to its primal function once differentiated, inside a
# `scan`, leaving a bare FFI call to the next order). Under `vmap` the mapped axis joins the rows
# and the parameter groups, which every kernel takes.


def _primitive(name, impl, *, multiple_results=False):
    """A primitive evaluated and lowered by `impl`, batched by folding the mapped axis."""
    p = Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(impl)

    def abstract(*avals, **params):
        out = jax.eval_shape(functools.partial(impl, **params), *_like(*avals))
        # The outputs vary over the mesh axes of the main input, inside `shard_map`.
        shaped = lambda o: avals[0].update(shape=o.shape, dtype=o.dtype, weak_type=False)  # noqa: E731
        return [shaped(o) for o in out] if multiple_results else shaped(out)

    def batch(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        lead = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims)]  # fmt: skip
        out = p.bind(*[a.reshape((-1,) + a.shape[2:]) for a in lead], **params)
        unfold = lambda o: o.reshape((size, -1) + o.shape[1:])  # noqa: E731
        return ([unfold(o) for o in out], [0] * len(out)) if multiple_results else (unfold(out), 0)

    p.def_abstract_eval(abstract)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=multiple_results))
    batching.primitive_batchers[p] = batch
    return p


class _Tangent:
    """A tangent `xla(*primals, *tangents, **params)`, linear in its last `num_linear` inputs,
    as one primitive: evaluated or differentiated it is XLA's closed form `xla` (so `jvp` and
    second derivatives run through XLA); transposed (the backward of `grad`) it is the native
    kernel `native(*primals, ct, **params) -> grads`, itself a primitive whose derivative is
    XLA's transpose."""

    def __init__(self, name, xla, native, *, num_linear=3, multiple_results=False):
        self.xla, self.num_linear, self.multiple = xla, num_linear, multiple_results
        self.p = _primitive(name, xla, multiple_results=multiple_results)
        ad.primitive_jvps[self.p] = self._jvp
        ad.primitive_transposes[self.p] = self._transpose
        # The backward: (*primals, *cts) -> grads; `linear` (static) holds the linear inputs' shapes.
        self.backward = _primitive(f"{name}_backward", self._native_backward(native), multiple_results=True)
        ad.primitive_jvps[self.backward] = self._backward_jvp

    def bind(self, *args, **params):
        return self.p.bind(*args, **params)

    def _native_backward(self, native):
        def backward(*args, linear, num_primals, **params):
            primals, cts = args[:num_primals], args[num_primals:]
            return tuple(native(*primals, tuple(cts) if self.multiple else cts[0], **params))

        return backward

    def _backward_xla(self, *args, linear, num_primals, **params):
        primals, cts = args[:num_primals], args[num_primals:]
        tangent = functools.partial(self.xla, *primals, **params)
        return tuple(jax.linear_transpose(tangent, *linear)(tuple(cts) if self.multiple else cts[0]))

    def _backward_jvp(self, primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        _, t = jax.jvp(functools.partial(self._backward_xla, **params), primals, tangents)
        return self.backward.bind(*primals, **params), list(t)

    def _jvp(self, primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        out, t = jax.jvp(functools.partial(self.xla, **params), primals, tangents)
        return (list(out), list(t)) if self.multiple else (out, t)

    def _transpose(self, ct, *args, **params):
        primals, linear = args[:-self.num_linear], args[-self.num_linear:]
        cts = list(ct) if self.multiple else [ct]
        if all(type(c) is ad.Zero for c in cts):
            return [None] * len(primals) + [ad.Zero(a.aval) if ad.is_undefined_primal(a) else None for a in linear]
        shapes = tuple(jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) if ad.is_undefined_primal(a) else _like(a)[0]
                       for a in linear)  # fmt: skip
        grads = self.backward.bind(*primals, *[ad.instantiate_zeros(c) for c in cts], linear=shapes,
                                   num_primals=len(primals), **params)  # fmt: skip
        return [None] * len(primals) + [g if ad.is_undefined_primal(a) else None for g, a in zip(grads, linear)]


def _forward_primitive(name, impl, jvp):
    """The forward kernel `impl` as a primitive with the JVP rule `jvp(primals, tangents,
    **params) -> (outs, tangents_out)`."""
    p = _primitive(name, impl, multiple_results=True)
    ad.primitive_jvps[p] = lambda primals, tangents, **params: jvp(
        p, primals, tuple(ad.instantiate_zeros(t) for t in tangents), **params)
    return p


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


def _row_norm_jvp(p, primals, tangents, *, eps, center):
    x, scale, _ = primals
    y, stats = p.bind(*primals, eps=eps, center=center)
    return [y, stats], [_row_tangent.bind(x, scale, stats, *tangents, center=center),
                        _row_stats_tangent(x, stats, tangents[0], center=center)]


_row_norm = _forward_primitive("lnjax_native_row_norm", _row_forward, _row_norm_jvp)


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


def _bn_jvp(p, primals, tangents, *, eps):
    x, scale, _ = primals
    y, mean, residual, var = p.bind(*primals, eps=eps)
    _, _, _, dmean, dvar = _bn_parts(x, scale, mean, residual, var, tangents[0], eps)
    t = _bn_tangent.bind(x, scale, mean, residual, var, *tangents, eps=eps)
    return [y, mean, residual, var], [t, dmean[:, 0], jnp.zeros_like(residual), dvar[:, 0]]


_bn = _forward_primitive("lnjax_native_batch_norm", _bn_forward, _bn_jvp)


# --- one LSTM step: N_h, the gates, c_t and N_c ----------------------------------------------
# Kinds: N_h 0 (bias only), 1 (layer), 2 (RMS); N_c 0 (identity), 1 (layer), 2 (RMS).


def _lstm_forward(u, ah, cp, gh, bh, gc, bc, *, kh, kc, eps_h, eps_c):
    stats = jax.ShapeDtypeStruct(cp.shape[:-1] + (4,), cp.dtype)
    return _call("lnjax_lstm_step_forward", (*_like(cp, cp), stats, stats), u, ah, cp, gh, bh, gc, bc,
                 kh=np.int64(kh), kc=np.int64(kc), eps_h=np.float64(eps_h), eps_c=np.float64(eps_c))


def _lstm_backward(u, ah, cp, gh, bh, gc, bc, sh, sc, ct, *, kh, kc, eps_h, eps_c):
    dc, dh = ct
    return _call("lnjax_lstm_step_backward", _like(u, ah, cp, gh, bh, gc, bc), u, ah, cp, gh, bh, gc, bc, sh, sc,
                 dc, dh, kh=np.int64(kh), kc=np.int64(kc))


def _norm_xla(v, g, b, kind, eps):
    """N(v) * g + b of `[G, rows, n]` rows with `[G, n]` parameters, in XLA (kind 0: v + b)."""
    if kind == 1:
        v = v - jnp.mean(v, axis=-1, keepdims=True)
    if kind:
        v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + jnp.asarray(eps, v.dtype)) * g[:, None]
    return v + b[:, None]


def _lstm_step_xla(u, ah, cp, gh, bh, gc, bc, *, kh, kc, eps_h, eps_c):
    """`(c_t, h_t)` of the step in XLA: the derivative's reference."""
    g = gh.shape[0]
    u, ah, cp = (_grouped(a, g) for a in (u, ah, cp))
    i, f, gg, o = jnp.split(u + _norm_xla(ah, gh, bh, kh, eps_h), 4, axis=-1)
    c = jax.nn.sigmoid(f) * cp + jax.nn.sigmoid(i) * jnp.tanh(gg)
    cn = _norm_xla(c, gc, bc, kc, eps_c) if kc else c
    h = jax.nn.sigmoid(o) * jnp.tanh(cn)
    return c.reshape((-1,) + c.shape[2:]), h.reshape((-1,) + h.shape[2:])


def _lstm_tangent_xla(u, ah, cp, gh, bh, gc, bc, sh, sc, *tangents, **params):
    del sh, sc  # the kernels' saved statistics; XLA recomputes them
    _, t = jax.jvp(functools.partial(_lstm_step_xla, **params), (u, ah, cp, gh, bh, gc, bc), tangents)
    return t


_lstm_tangent = _Tangent("lnjax_native_lstm_step_tangent", _lstm_tangent_xla, _lstm_backward, num_linear=7,
                         multiple_results=True)


def _lstm_jvp(p, primals, tangents, **params):
    out = c, h, sh, sc = p.bind(*primals, **params)
    dc, dh = _lstm_tangent.bind(*primals, sh, sc, *tangents, **params)
    # The statistics only feed the native backward, whose derivative (XLA's) recomputes them.
    return list(out), [dc, dh, jnp.zeros_like(sh), jnp.zeros_like(sc)]


_lstm = _forward_primitive("lnjax_native_lstm_step", _lstm_forward, _lstm_jvp)


def lstm_step(u, ah, c, recurrent, cell, *, kinds: tuple[int, int], eps: tuple[float, float]):
    """`(c_t, h_t)` of one LSTM step by the native kernels: `u` = N_x(W_x x_t) and `ah` =
    W_h h_{t-1}, `[..., 4H]`; `c` = c_{t-1} `[..., H]`; `recurrent`, `cell`: the `(gain, bias)`
    of N_h and N_c (None for absent ones); `kinds`, `eps`: of N_h and N_c (see above). All in
    float32 or float64. Callers check that `available()`."""
    h, dtype = c.shape[-1], c.dtype
    params = [*_params_2d(*recurrent, 4 * h, dtype), *_params_2d(*cell, h, dtype)]
    rows = lambda a: a.reshape((-1, a.shape[-1]))  # noqa: E731
    c_new, h_new, _, _ = _lstm.bind(*_alike(rows(u), rows(ah), rows(c), *params), kh=int(kinds[0]), kc=int(kinds[1]),
                                    eps_h=float(eps[0]), eps_c=float(eps[1]))  # fmt: skip
    return c_new.reshape(c.shape), h_new.reshape(c.shape)


# --- one GRU step: N_1, N_4, the gates and h_t -------------------------------------------------
# Kinds of N_1 (the 2H gate terms) and N_4 (the H candidate terms): 0 (bias only), 1, 2.


def _gru_forward(u, a, hp, g1, b1, g4, b4, *, k1, k4, eps1, eps4):
    stats = jax.ShapeDtypeStruct(hp.shape[:-1] + (4,), hp.dtype)
    return _call("lnjax_gru_step_forward", (*_like(hp), stats, stats), u, a, hp, g1, b1, g4, b4,
                 k1=np.int64(k1), k4=np.int64(k4), eps1=np.float64(eps1), eps4=np.float64(eps4))


def _gru_backward(u, a, hp, g1, b1, g4, b4, s1, s4, dh, *, k1, k4, eps1, eps4):
    return _call("lnjax_gru_step_backward", _like(u, a, hp, g1, b1, g4, b4), u, a, hp, g1, b1, g4, b4, s1, s4, dh,
                 k1=np.int64(k1), k4=np.int64(k4))


def _gru_step_xla(u, a, hp, g1, b1, g4, b4, *, k1, k4, eps1, eps4):
    """`h_t` of the step in XLA: the derivative's reference."""
    g = g4.shape[0]
    u, a, hp = (_grouped(v, g) for v in (u, a, hp))
    h = hp.shape[-1]
    rz = jax.nn.sigmoid(u[..., : 2 * h] + _norm_xla(a[..., : 2 * h], g1, b1, k1, eps1))
    r, z = rz[..., :h], rz[..., h:]
    n = jnp.tanh(u[..., 2 * h :] + r * _norm_xla(a[..., 2 * h :], g4, b4, k4, eps4))
    out = z * hp + (1 - z) * n
    return out.reshape((-1,) + out.shape[2:])


def _gru_tangent_xla(u, a, hp, g1, b1, g4, b4, s1, s4, *tangents, **params):
    del s1, s4  # the kernels' saved statistics; XLA recomputes them
    return jax.jvp(functools.partial(_gru_step_xla, **params), (u, a, hp, g1, b1, g4, b4), tangents)[1]


_gru_tangent = _Tangent("lnjax_native_gru_step_tangent", _gru_tangent_xla,
                        lambda *args, **params: _gru_backward(*args, **params), num_linear=7)


def _gru_jvp(p, primals, tangents, **params):
    out = _, s1, s4 = p.bind(*primals, **params)
    dh = _gru_tangent.bind(*primals, s1, s4, *tangents, **params)
    return list(out), [dh, jnp.zeros_like(s1), jnp.zeros_like(s4)]


_gru = _forward_primitive("lnjax_native_gru_step", _gru_forward, _gru_jvp)


def gru_step(u, a, h, gates, candidate, *, kinds: tuple[int, int], eps: tuple[float, float]):
    """`h_t` of one GRU step by the native kernels: `u` = [N_2(W_x x_t), N_3(W x_t)] and `a` =
    U h_{t-1}, `[..., 3H]`; `h` = h_{t-1} `[..., H]`; `gates`, `candidate`: the `(gain, bias)` of
    N_1 and N_4 (None for absent ones); `kinds`, `eps`: of N_1 and N_4. All in float32 or
    float64. Callers check that `available()`."""
    width, dtype = h.shape[-1], h.dtype
    params = [*_params_2d(*gates, 2 * width, dtype), *_params_2d(*candidate, width, dtype)]
    rows = lambda v: v.reshape((-1, v.shape[-1]))  # noqa: E731
    h_new, _, _ = _gru.bind(*_alike(rows(u), rows(a), rows(h), *params), k1=int(kinds[0]), k4=int(kinds[1]),
                            eps1=float(eps[0]), eps4=float(eps[1]))  # fmt: skip
    return h_new.reshape(h.shape)


def _params_2d(scale, bias, h, dtype):
    scale = jnp.ones((1, h), dtype) if scale is None else scale.astype(dtype).reshape((1, h))
    bias = jnp.zeros((1, h), dtype) if bias is None else bias.astype(dtype).reshape((1, h))
    return scale, bias


def batch_norm_train(x, scale, bias, eps: float):
    """Training-mode batch norm of `x` `[..., C]` over every axis but the last, by the native
    kernels: `(y, mean, var)`, the batch mean and biased variance `[C]` in the statistics
    dtype. Callers check the arguments (`lnjax.batch_norm`) and that `available()`."""
    c, dtype = x.shape[-1], _checks.stats_dtype(x.dtype)
    y, mean, residual, var = _bn.bind(*_alike(x.reshape((-1, c)), *_params_2d(scale, bias, c, dtype)), eps=float(eps))
    return y.reshape(x.shape), (mean + residual)[0], var[0]


def normalize(x, scale, bias, eps: float, *, center: bool):
    """Layer (`center`) or RMS normalization of `x` `[..., H]` over its last axis, by the
    native kernels; `scale`, `bias` `[H]` or None, `eps` a Python float. Callers check the
    arguments (`lnjax.layer_norm`, `lnjax.rms_norm`) and that `available()`."""
    h, dtype = x.shape[-1], _checks.stats_dtype(x.dtype)
    y, _ = _row_norm.bind(*_alike(x.reshape((-1, h)), *_params_2d(scale, bias, h, dtype)), eps=float(eps),
                          center=center)  # fmt: skip
    return y.reshape(x.shape)
