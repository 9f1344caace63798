"""Core ops of `lnjax.normalization` against float64 NumPy transcriptions of the formulas.

Every reference below is a direct transcription of the equation in PAPER.md (biased variance,
eps inside the square root, gain and bias applied after normalizing), evaluated in float64 on
the very values the op received (low-precision inputs are cast up *after* rounding), so the only
difference left is the op's own arithmetic.
"""

from functools import partial

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from jax.test_util import check_grads

import lnjax
from lnjax import BatchNormState, _fused, batch_norm, batch_norm_state

SHAPE = (4, 6, 8)  # reused everywhere so that eager primitives and jits compile once per dtype
SMALL = (3, 4, 6)  # for finite differences and check_grads
DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16]
# Relative tolerance per output dtype, applied to max|reference| (see `assert_close`):
# the op computes in >= float32 and rounds once at the end, so low precision costs one rounding
# of the output (half an ulp: 2**-9 for bfloat16, 2**-12 for float16) plus float32 noise.
RTOL = {
    jnp.dtype(jnp.float64): 1e-12,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 2**-8,
    jnp.dtype(jnp.float16): 2**-10,
}


# ----------------------------------------------------------------------------------------------
# float64 NumPy references
# ----------------------------------------------------------------------------------------------


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def norm_axes(axis, ndim):
    t = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in t))


def pshape(shape, axis):
    return tuple(shape[a] for a in norm_axes(axis, len(shape)))


def at_axes(p, ax, ndim):
    """Reshapes `p` (shape x.shape[ax]) to broadcast against an ndim array."""
    shape = [1] * ndim
    for a, n in zip(ax, np.shape(p)):
        shape[a] = n
    return f64(p).reshape(shape)


def affine(y, scale, bias, ax):
    if scale is not None:
        y = y * at_axes(scale, ax, y.ndim)
    if bias is not None:
        y = y + at_axes(bias, ax, y.ndim)
    return y


def ref_layer_norm(x, scale=None, bias=None, axis=-1, eps=1e-5):
    x = f64(x)
    ax = norm_axes(axis, x.ndim)
    mu = x.mean(ax, keepdims=True)
    var = ((x - mu) ** 2).mean(ax, keepdims=True)
    return affine((x - mu) / np.sqrt(var + eps), scale, bias, ax)


def ref_rms_norm(x, scale=None, bias=None, axis=-1, eps=1e-6):
    x = f64(x)
    ax = norm_axes(axis, x.ndim)
    return affine(x / np.sqrt((x**2).mean(ax, keepdims=True) + eps), scale, bias, ax)


def ref_batch_norm(x, scale=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """Training-mode batch norm; returns (y, batch mean, biased batch var, count m)."""
    x = f64(x)
    feat = norm_axes(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    w = np.ones([x.shape[a] for a in red]) if mask is None else np.asarray(mask, np.float64)
    w = np.broadcast_to(at_axes(w, red, x.ndim), x.shape)
    m = w.sum(red, keepdims=True)
    mu = (w * x).sum(red, keepdims=True) / m
    var = (w * (x - mu) ** 2).sum(red, keepdims=True) / m
    y = affine((x - mu) / np.sqrt(var + eps), scale, bias, feat)
    fshape = pshape(x.shape, axis)
    return y, mu.reshape(fshape), var.reshape(fshape), float(m.reshape(-1)[0])


def ref_group_norm(x, num_groups, scale=None, bias=None, axis=-1, eps=1e-5):
    """Moves the channel axis last, splits it into contiguous groups, normalizes per (n, group)."""
    x = f64(x)
    c = axis % x.ndim
    xt = np.moveaxis(x, c, -1)
    xg = xt.reshape(xt.shape[:-1] + (num_groups, xt.shape[-1] // num_groups))
    red = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mu = xg.mean(red, keepdims=True)
    var = ((xg - mu) ** 2).mean(red, keepdims=True)
    y = np.moveaxis(((xg - mu) / np.sqrt(var + eps)).reshape(xt.shape), -1, c)
    return affine(y, scale, bias, (c,))


def ref_instance_norm(x, scale=None, bias=None, axis=-1, eps=1e-5):
    x = f64(x)
    c = axis % x.ndim
    red = tuple(a for a in range(1, x.ndim) if a != c)
    mu = x.mean(red, keepdims=True)
    var = ((x - mu) ** 2).mean(red, keepdims=True)
    return affine((x - mu) / np.sqrt(var + eps), scale, bias, (c,))


def ref_weight_norm(v, g, axis=-1):
    v = f64(v)
    keep = norm_axes(axis, v.ndim)
    red = tuple(a for a in range(v.ndim) if a not in keep)
    return v / np.sqrt((v**2).sum(red, keepdims=True)) * at_axes(g, keep, v.ndim)


def assert_close(actual, expected, rtol, atol=None):
    """allclose with the absolute tolerance scaled to the reference's magnitude by default."""
    a, e = f64(actual), f64(expected)
    if atol is None:
        atol = rtol * max(float(np.max(np.abs(e))), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# The ops under a common signature f(x, scale, bias, axis, eps, **kw)
# ----------------------------------------------------------------------------------------------


# Jitted with the configuration static, so that tests sharing a shape, dtype and axis share one
# compilation (op-by-op eager dispatch compiles every primitive separately and is several times
# slower); eager execution itself is compared with these transformations further down.
_static = ("axis", "eps", "fast_variance")


@partial(jax.jit, static_argnames=_static)
def _ln(x, s, b, axis=-1, eps=1e-5, fast_variance=False):
    return lnjax.layer_norm(x, s, b, axis=axis, eps=eps, fast_variance=fast_variance)


@partial(jax.jit, static_argnames=("axis", "eps"))
def _rms(x, s, b, axis=-1, eps=1e-5):
    return lnjax.rms_norm(x, s, b, axis=axis, eps=eps)


@partial(jax.jit, static_argnames=_static)
def _bn_train(x, s, b, axis=-1, eps=1e-5, fast_variance=False):
    state = batch_norm_state(pshape(x.shape, axis))
    return batch_norm(x, s, b, state, training=True, axis=axis, eps=eps, fast_variance=fast_variance)[0]


@partial(jax.jit, static_argnames=_static)
def _gn(x, s, b, axis=-1, eps=1e-5, fast_variance=False):
    return lnjax.group_norm(x, 2, s, b, axis=axis, eps=eps, fast_variance=fast_variance)


@partial(jax.jit, static_argnames=_static)
def _in(x, s, b, axis=-1, eps=1e-5, fast_variance=False):
    return lnjax.instance_norm(x, s, b, axis=axis, eps=eps, fast_variance=fast_variance)


jln = jax.jit(lnjax.layer_norm, static_argnames=_static)
jgn = jax.jit(lnjax.group_norm, static_argnames=("num_groups",) + _static)
jin = jax.jit(lnjax.instance_norm, static_argnames=_static)
jbn = jax.jit(batch_norm, static_argnames=("training", "momentum", "axis_name", "unbiased_running_var", "implementation")
              + _static)

OPS = {
    "layer_norm": (_ln, lambda x, s, b, axis=-1, eps=1e-5: ref_layer_norm(x, s, b, axis, eps)),
    "rms_norm": (_rms, lambda x, s, b, axis=-1, eps=1e-5: ref_rms_norm(x, s, b, axis, eps)),
    "batch_norm": (_bn_train, lambda x, s, b, axis=-1, eps=1e-5: ref_batch_norm(x, s, b, axis, eps)[0]),
    "group_norm": (_gn, lambda x, s, b, axis=-1, eps=1e-5: ref_group_norm(x, 2, s, b, axis, eps)),
    "instance_norm": (_in, lambda x, s, b, axis=-1, eps=1e-5: ref_instance_norm(x, s, b, axis, eps)),
}
# (op, axis) on SHAPE: single, negative, tuple, negative tuple, non-contiguous axes.
CASES = [
    ("layer_norm", -1),
    ("layer_norm", 1),
    ("layer_norm", (1, 2)),
    ("layer_norm", (-1, -2)),
    ("layer_norm", (0, 2)),
    ("rms_norm", -1),
    ("rms_norm", (-3, -1)),
    ("rms_norm", (1, 2)),
    ("batch_norm", -1),
    ("batch_norm", 1),
    ("batch_norm", (1, 2)),
    ("batch_norm", (0, -1)),
    ("group_norm", -1),
    ("group_norm", 1),
    ("instance_norm", -1),
    ("instance_norm", 1),
]
CASE_IDS = [f"{op}-{axis}" for op, axis in CASES]


def make_inputs(shape, axis, dtype, seed=0, loc=3.0, scale_=2.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(loc + scale_ * rng.normal(size=shape), dtype)
    ps = pshape(shape, axis)
    s = jnp.asarray(1.0 + 0.5 * rng.normal(size=ps), dtype)
    b = jnp.asarray(rng.normal(size=ps), dtype)
    return x, s, b


# ----------------------------------------------------------------------------------------------
# Values against the references
# ----------------------------------------------------------------------------------------------


# Every case in float64 and float32; the half-precision dtypes on one case per op.
DTYPE_CASES = [(op, axis, dt) for op, axis in CASES for dt in (jnp.float64, jnp.float32)] + [
    (op, -1, dt) for op in OPS for dt in (jnp.bfloat16, jnp.float16)
]


@pytest.mark.parametrize(
    "op,axis,dtype", DTYPE_CASES, ids=[f"{o}-{a}-{jnp.dtype(d).name}" for o, a, d in DTYPE_CASES]
)
def test_matches_reference(op, axis, dtype):
    fn, ref = OPS[op]
    x, s, b = make_inputs(SHAPE, axis, dtype)
    y = fn(x, s, b, axis=axis)
    assert y.dtype == jnp.dtype(dtype) and y.shape == x.shape
    assert_close(y, ref(x, s, b, axis=axis), RTOL[jnp.dtype(dtype)])
    # Unit scale and zero bias (same compiled function): the normalized values themselves.
    one, zero = jnp.ones_like(s), jnp.zeros_like(b)
    assert_close(fn(x, one, zero, axis=axis), ref(x, None, None, axis=axis), RTOL[jnp.dtype(dtype)])


def test_normalized_output_has_zero_mean_unit_variance():
    x, _, _ = make_inputs(SHAPE, -1, jnp.float64)
    y = np.asarray(lnjax.layer_norm(x, axis=(1, 2), eps=0.0))
    np.testing.assert_allclose(y.mean((1, 2)), 0, atol=1e-13)
    np.testing.assert_allclose(y.var((1, 2)), 1, rtol=1e-13)
    r = np.asarray(lnjax.rms_norm(x, eps=0.0))
    np.testing.assert_allclose((r**2).mean(-1), 1, rtol=1e-13)


@pytest.mark.parametrize(
    "xdtype,pdtype",
    [(jnp.float32, jnp.float64), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.bfloat16), (jnp.float64, jnp.float32)],
    ids=["f32x-f64p", "bf16x-f32p", "f16x-bf16p", "f64x-f32p"],
)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm", "group_norm"])
def test_output_dtype_is_input_dtype_whatever_the_parameter_dtype(op, xdtype, pdtype):
    fn, ref = OPS[op]
    x, s, b = make_inputs(SHAPE, -1, xdtype)
    s, b = s.astype(pdtype), b.astype(pdtype)
    y = fn(x, s, b)
    assert y.dtype == jnp.dtype(xdtype)
    # Parameters are applied at the (>= float32) statistics precision; y is rounded to x's dtype once.
    assert_close(y, ref(x, s, b), RTOL[jnp.dtype(xdtype)])  # the reference sees the same params


# ----------------------------------------------------------------------------------------------
# Adversarial inputs
# ----------------------------------------------------------------------------------------------

LARGE_MEAN_OPS = {
    # each: (x shape, f(x, fast_variance) -> y, reference, the variances of its statistics groups),
    # every statistic over 64 values
    "layer_norm": (
        (8, 64),
        lambda x, fv: _ln(x, None, None, fast_variance=fv),
        ref_layer_norm,
        lambda x: x.var(-1),
    ),
    "batch_norm": (
        (64, 8),
        lambda x, fv: _bn_train(x, None, None, fast_variance=fv),
        lambda x: ref_batch_norm(x)[0],
        lambda x: x.var(0),
    ),
    "group_norm": (
        (8, 4, 32),
        lambda x, fv: _gn(x, None, None, fast_variance=fv),
        lambda x: ref_group_norm(x, 2),
        lambda x: x.reshape(8, 4, 2, 16).var((1, 3)),
    ),
}


@pytest.mark.parametrize("op", sorted(LARGE_MEAN_OPS))
def test_large_mean_float32_two_pass_is_exact_and_fast_variance_is_not(op):
    """1e4 + N(0, 1e-2) in float32: the default two-pass variance is right, E[x^2]-E[x]^2 is not.

    What "exact" can mean here: float32 cannot hold the mean of values near 1e4 closer than half
    an ulp (ulp(1e4) = 2**-10 ~ 1e-3, i.e. ~5% of the 1e-2 standard deviation; PyTorch's float32
    layer_norm has the same error), so the output may differ from the float64 reference by at
    most a couple of ulp(1e4)/sigma, and nothing else: the two-pass variance has no cancellation.
    The one-pass form cancels catastrophically (variance 0 or a multiple of 8: garbage).
    """
    shape, fn, ref, group_var = LARGE_MEAN_OPS[op]
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(0.0, 1e-2, size=shape)).astype(np.float32)
    expected = ref(x)
    sigma = np.sqrt(group_var(f64(x)).min() + 1e-5)  # the smallest denominator, eps included
    bound = 2 * np.spacing(np.float32(1e4)) / sigma + 1e-4
    err = np.abs(f64(fn(x, False)) - expected).max()
    assert err <= bound, (err, bound)
    err_fast = np.abs(f64(fn(x, True)) - expected).max()
    assert err_fast > 1.0, err_fast  # documented contrast: fast_variance loses it


@pytest.mark.parametrize("op", sorted(LARGE_MEAN_OPS))
def test_large_mean_float32_to_full_float32_precision(op):
    shape, fn, ref, _ = LARGE_MEAN_OPS[op]
    x = (1e4 + np.random.default_rng(1).normal(0.0, 1e-2, size=shape)).astype(np.float32)
    assert np.abs(f64(fn(x, False)) - ref(x)).max() < 1e-4


def test_large_mean_moments_two_pass_variance_is_exact_given_its_mean():
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(0.0, 1e-2, size=(8, 64))).astype(np.float32)
    xd = f64(x)
    mean, var = lnjax.moments(x)
    mean, var = f64(mean), f64(var)
    ulp = float(np.spacing(np.float32(1e4)))
    # The float32 mean is within two ulp of the true mean ...
    np.testing.assert_array_less(np.abs(mean - xd.mean(-1)), 2 * ulp)
    # ... and the variance is the true variance to float32 precision (the corrected two-pass
    # form centres with mean + residual, so the mean's rounding does not enter it).
    np.testing.assert_allclose(var, xd.var(-1), rtol=1e-5)
    _, var_fast = lnjax.moments(x, fast_variance=True)
    rel_fast = np.abs(f64(var_fast) - xd.var(-1)) / xd.var(-1)
    assert rel_fast.max() > 0.5, rel_fast  # one-pass: catastrophic cancellation


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("magnitude", [1e-20, 1e15])
@pytest.mark.parametrize("op", sorted(OPS))
def test_tiny_and_huge_scales(op, magnitude, dtype):
    """x = magnitude * (0.5 + N(0, 1)): finite and equal to the reference (eps included).

    With the default eps, tiny inputs give outputs ~ x / sqrt(eps); huge inputs normalize exactly.
    (float16 cannot represent either magnitude.) Squares of 1e15 (1e30) fit float32's range.
    """
    fn, ref = OPS[op]
    x, s, _ = make_inputs(SHAPE, -1, dtype, seed=3, loc=0.5 * magnitude, scale_=magnitude)
    y = fn(x, s, jnp.zeros_like(s))  # no bias, so that outputs of size 1e-18 are compared relatively
    assert y.dtype == jnp.dtype(dtype)
    assert np.all(np.isfinite(f64(y)))
    assert_close(y, ref(x, s, None), RTOL[jnp.dtype(dtype)])


@pytest.mark.parametrize("op", sorted(OPS))
def test_tiny_scale_float64_without_eps_still_normalizes(op):
    fn, ref = OPS[op]
    x, s, b = make_inputs(SHAPE, -1, jnp.float64, seed=4, loc=5e-21, scale_=1e-20)
    y = fn(x, s, jnp.zeros_like(b), eps=0.0)
    assert_close(y, ref(x, s, None, eps=0.0), 1e-10)
    assert np.abs(f64(y)).max() > 0.5  # normalized, not ~1e-20


def _constify(op, x):
    """Makes each group the op normalizes over constant (a different constant per group)."""
    xd = f64(x)
    if op in ("layer_norm", "rms_norm"):
        c = np.broadcast_to(xd.mean(-1, keepdims=True), xd.shape).copy()
        if op == "rms_norm":
            c[::2] = 0.0  # all-zero rows: mean square 0
        return c
    if op == "batch_norm":
        return np.broadcast_to(xd.mean((0, 1), keepdims=True), xd.shape)
    if op == "instance_norm":
        return np.broadcast_to(xd.mean(1, keepdims=True), xd.shape)
    if op == "group_norm":
        g = xd.reshape(xd.shape[:-1] + (2, xd.shape[-1] // 2)).mean((1, 3), keepdims=True)
        return np.broadcast_to(g, xd.shape[:1] + (xd.shape[1], 2, xd.shape[-1] // 2)).reshape(xd.shape)
    raise AssertionError(op)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", sorted(OPS))
def test_constant_groups_give_finite_values_and_gradients(op, dtype):
    fn, _ = OPS[op]
    x0, s, b = make_inputs(SHAPE, -1, dtype, seed=5)
    x = jnp.asarray(_constify(op, x0), dtype)
    y = fn(x, s, b)
    assert np.all(np.isfinite(f64(y)))
    if op != "rms_norm":  # zero variance: x - mean ~ 0, so y ~ bias (eps keeps it finite)
        assert_close(y, np.broadcast_to(f64(b), x.shape), 1e-3, atol=1e-3)
    w = jnp.asarray(np.random.default_rng(6).normal(size=SHAPE), dtype)
    grads = jax.jit(jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b) * w), argnums=(0, 1, 2)))(x, s, b)
    for gr in grads:
        assert np.all(np.isfinite(f64(gr)))


def test_zero_weight_vector_gives_finite_weight_and_gradient():
    v = np.random.default_rng(7).normal(size=(5, 3))
    v[:, 1] = 0.0
    g = np.array([1.0, 2.0, 3.0])
    w = lnjax.weight_norm(v, g)
    assert np.all(np.isfinite(f64(w))) and np.all(f64(w)[:, 1] == 0)
    gv, gg = jax.grad(lambda v, g: jnp.sum(lnjax.weight_norm(v, g) ** 2), argnums=(0, 1))(v, g)
    assert np.all(np.isfinite(f64(gv))) and np.all(np.isfinite(f64(gg)))


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def fd_grad(fun, args, h=1e-6):
    """Central finite differences of a float64 NumPy scalar function w.r.t. each argument."""
    out = []
    for i, a in enumerate(args):
        a = f64(a)
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus, minus = a.copy(), a.copy()
            plus[idx] += h
            minus[idx] -= h
            ap = list(args[:i]) + [plus] + list(args[i + 1 :])
            am = list(args[:i]) + [minus] + list(args[i + 1 :])
            grad[idx] = (fun(*ap) - fun(*am)) / (2 * h)
        out.append(grad)
    return out


GRAD_CASES = [("layer_norm", -1), ("layer_norm", (0, 2)), ("rms_norm", (1, 2)), ("batch_norm", -1),
              ("batch_norm", 1), ("group_norm", -1), ("instance_norm", 1)]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op,axis", GRAD_CASES, ids=[f"{o}-{a}" for o, a in GRAD_CASES])
def test_vjp_matches_finite_differences_of_reference(op, axis, dtype):
    fn, ref = OPS[op]
    x, s, b = make_inputs(SMALL, axis, dtype, seed=8)
    ct = np.random.default_rng(9).normal(size=SMALL)
    got = jax.jit(lambda x, s, b, ct: jax.vjp(lambda *a: fn(*a, axis=axis), x, s, b)[1](ct))(
        x, s, b, jnp.asarray(ct, dtype)
    )
    expected = fd_grad(lambda x, s, b: np.sum(ref(x, s, b, axis=axis) * ct), (x, s, b))
    rtol = 1e-7 if dtype == jnp.float64 else 1e-4
    for gj, ge in zip(got, expected):
        assert gj.dtype == jnp.dtype(dtype)
        assert_close(gj, ge, rtol)


def test_weight_norm_vjp_matches_finite_differences():
    rng = np.random.default_rng(10)
    v, g, ct = rng.normal(size=(4, 5, 3)), rng.uniform(0.5, 2, size=(3,)), rng.normal(size=(4, 5, 3))
    _, vjp = jax.vjp(lnjax.weight_norm, v, g)
    for gj, ge in zip(vjp(ct), fd_grad(lambda v, g: np.sum(ref_weight_norm(v, g) * ct), (v, g))):
        assert_close(gj, ge, 1e-7)


def test_layer_norm_gradient_matches_analytic_formula():
    """dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * scale."""
    x, s, b = make_inputs(SHAPE, -1, jnp.float64, seed=11)
    ct = np.random.default_rng(12).normal(size=SHAPE)
    xd, sd = f64(x), f64(s)
    mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
    r = 1 / np.sqrt(var + 1e-5)
    xhat = (xd - mu) * r
    dxhat = ct * sd
    dx = r * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    _, vjp = jax.vjp(lnjax.layer_norm, x, s, b)
    gx, gs, gb = vjp(ct)
    assert_close(gx, dx, 1e-12)
    assert_close(gs, (ct * xhat).sum((0, 1)), 1e-12)
    assert_close(gb, ct.sum((0, 1)), 1e-12)


CHECK_GRADS = {
    "layer_norm": lambda x, s, b: lnjax.layer_norm(x, s, b, axis=(0, 2)),
    "rms_norm": lambda x, s, b: lnjax.rms_norm(x, s, b, axis=(0, 2)),
    "batch_norm_train": lambda x, s, b: _bn_train(x, s, b, axis=(0, 2)),
    "batch_norm_eval": lambda x, s, b: batch_norm(
        x, s, b, BatchNormState(jnp.asarray(s) - 1, jnp.asarray(b) ** 2 + 0.5), training=False, axis=(0, 2)
    )[0],
    "group_norm": lambda x, s, b: lnjax.group_norm(x, 2, s[0], b[0], axis=-1),
    "instance_norm": lambda x, s, b: lnjax.instance_norm(x, s[0], b[0], axis=-1),
    "weight_norm": lambda x, s, b: lnjax.weight_norm(x, s, axis=(0, 2)),
    "moments": lambda x, s, b: lnjax.moments(x, axis=(0, 2)),
    "moments_fast": lambda x, s, b: lnjax.moments(x, axis=1, fast_variance=True),
}


# Second order where the op has its own math; first order where it reuses another's
# (instance_norm is group_norm, eval batch norm is affine, moments are inside every op).
CHECK_ORDER = {"batch_norm_eval": 1, "instance_norm": 1, "moments": 1, "moments_fast": 1}


@pytest.mark.parametrize("name", sorted(CHECK_GRADS))
def test_check_grads(name):
    x, s, b = make_inputs(SMALL, (0, 2), jnp.float64, seed=13)  # scale/bias of shape (3, 6)
    check_grads(jax.jit(CHECK_GRADS[name]), (x, s, b), order=CHECK_ORDER.get(name, 2), modes=["rev", "fwd"])


# ----------------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), (-2, -1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_moments(axis, dtype):
    x, _, _ = make_inputs(SHAPE, -1, dtype, seed=14)
    ax = norm_axes(axis, 3)
    mean, var = lnjax.moments(x, axis)
    stats = jnp.float64 if dtype == jnp.float64 else jnp.float32
    assert mean.dtype == stats and var.dtype == stats
    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    assert_close(mean, f64(x).mean(ax), rtol)
    assert_close(var, f64(x).var(ax), rtol)
    mk, vk = lnjax.moments(x, axis, keepdims=True)
    assert mk.shape == vk.shape == f64(x).mean(ax, keepdims=True).shape
    assert_close(mk, f64(x).mean(ax, keepdims=True), rtol)
    # One pass agrees with two passes on benign data.
    _, vf = lnjax.moments(x, axis, fast_variance=True)
    assert_close(vf, f64(x).var(ax), 1e-10 if dtype == jnp.float64 else 1e-4)


def test_moments_mask():
    x = np.random.default_rng(15).normal(size=(5, 7))
    mask = np.array([True, False, True, True, False, False, True])
    mean, var = lnjax.moments(x, -1, mask=jnp.asarray(mask))
    assert_close(mean, x[:, mask].mean(-1), 1e-12)
    assert_close(var, x[:, mask].var(-1), 1e-12)
    mean0, var0 = lnjax.moments(x, -1, mask=jnp.zeros(7, bool))  # documented: all masked -> 0, 0
    assert np.all(f64(mean0) == 0) and np.all(f64(var0) == 0)


def test_moments_axis_name_under_vmap():
    x = np.random.default_rng(16).normal(size=(4, 3, 5))
    mean, var = jax.vmap(lambda x: lnjax.moments(x, 0, axis_name="b"), axis_name="b")(x)
    for i in range(4):  # every replica sees the statistics over the global batch of 12
        assert_close(mean[i], x.reshape(12, 5).mean(0), 1e-12)
        assert_close(var[i], x.reshape(12, 5).var(0), 1e-12)


# ----------------------------------------------------------------------------------------------
# batch_norm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 1, (1, 2)], ids=str)
def test_batch_norm_training_statistics(axis):
    x, s, b = make_inputs(SHAPE, axis, jnp.float64, seed=17)
    state = BatchNormState(jnp.zeros(pshape(SHAPE, axis)), jnp.ones(pshape(SHAPE, axis)))
    y, new = jbn(x, s, b, state, training=True, axis=axis, momentum=0.0)
    ry, mu, var, m = ref_batch_norm(x, s, b, axis)
    assert_close(y, ry, 1e-12)
    # momentum 0: the running values are the batch statistics, the variance unbiased.
    assert_close(new.mean, mu, 1e-12)
    assert_close(new.var, var * m / (m - 1), 1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("state_dtype", [jnp.float64, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 3)], ids=["NC", "NHWC"])
def test_batch_norm_running_averages_first_three_steps(shape, state_dtype, unbiased):
    """new = momentum * old + (1 - momentum) * batch; var uses m / (m - 1) * biased var (the
    biased var itself with `unbiased_running_var=False`, Flax's convention).

    Starting from mean 0 and var 1 (not debiased as if they started at 0)."""
    rng = np.random.default_rng(18)
    momentum = 0.9
    m = int(np.prod(shape[:-1]))
    correction = m / (m - 1) if unbiased else 1.0
    state = batch_norm_state(3, state_dtype)
    assert np.all(f64(state.mean) == 0) and np.all(f64(state.var) == 1)
    hand_mean, hand_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = 2.0 + 3.0 * rng.normal(size=shape)
        red = tuple(range(len(shape) - 1))
        bm, bv = x.mean(red), x.var(red)
        hand_mean = momentum * hand_mean + (1 - momentum) * bm
        hand_var = momentum * hand_var + (1 - momentum) * bv * correction
        for implementation in ("xla", None):  # the fused path updates the state on its own
            _, new = jbn(x, None, None, state, training=True, momentum=momentum,
                         unbiased_running_var=unbiased, implementation=implementation)  # fmt: skip
            assert_close(new.var, hand_var, 1e-12 if state_dtype == jnp.float64 else 1e-6)
        state = new
        assert state.mean.dtype == state_dtype and state.var.dtype == state_dtype
        rtol = 1e-12 if state_dtype == jnp.float64 else 1e-6
        assert_close(state.mean, hand_mean, rtol)
        assert_close(state.var, hand_var, rtol)
        if step == 0:  # spelled out: 0.1 * batch mean; 0.9 + 0.1 * unbiased variance
            assert_close(state.mean, 0.1 * bm, rtol)
            assert_close(state.var, 0.9 + 0.1 * bv * correction, rtol)
    with pytest.raises(TypeError, match="`unbiased_running_var` must be a Python bool"):
        jbn(x, None, None, state, training=True, unbiased_running_var=1)


def test_batch_norm_momentum_one_keeps_state_values():
    x, _, _ = make_inputs((6, 8), -1, jnp.float64, seed=19)
    state = BatchNormState(jnp.arange(8.0), jnp.arange(1.0, 9.0))
    _, new = jbn(x, None, None, state, training=True, momentum=1.0)
    np.testing.assert_array_equal(f64(new.mean), f64(state.mean))
    np.testing.assert_array_equal(f64(new.var), f64(state.var))


@pytest.mark.parametrize("axis", [-1, 1], ids=str)
def test_batch_norm_eval_uses_running_stats_and_returns_same_state(axis):
    x, s, b = make_inputs(SHAPE, axis, jnp.float64, seed=20)
    rng = np.random.default_rng(21)
    ps = pshape(SHAPE, axis)
    state = BatchNormState(jnp.asarray(rng.normal(size=ps)), jnp.asarray(rng.uniform(0.5, 2.0, size=ps)))
    y, new = batch_norm(x, s, b, state, training=False, axis=axis, eps=1e-3)
    assert new is state
    ax = norm_axes(axis, 3)
    expected = affine((f64(x) - at_axes(state.mean, ax, 3)) / np.sqrt(at_axes(state.var, ax, 3) + 1e-3), s, b, ax)
    assert_close(y, expected, 1e-12)
    # Per example: does not depend on the rest of the batch.
    y0, _ = batch_norm(x[:1], s, b, state, training=False, axis=axis, eps=1e-3)
    assert_close(y0, f64(y)[:1], 1e-12)
    # bfloat16 input with float32 running statistics.
    yb, _ = batch_norm(x.astype(jnp.bfloat16), s, b, state, training=False, axis=axis, eps=1e-3)
    assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape,mask_shape", [((7, 5), (7,)), ((3, 4, 2, 5), (3, 4, 2))], ids=["NC", "NHWC"])
def test_batch_norm_mask_equals_unmasked_subset(shape, mask_shape):
    rng = np.random.default_rng(22)
    x = rng.normal(size=shape)
    mask = rng.uniform(size=mask_shape) < 0.6
    mask.reshape(-1)[:2] = [True, False]
    x[~mask] = 1e6  # padding far from the data: any leak into the statistics would show
    s, b = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    state = BatchNormState(jnp.asarray(rng.normal(size=shape[-1])), jnp.asarray(rng.uniform(1, 2, shape[-1])))
    y, new = jbn(x, s, b, state, training=True, momentum=0.8, mask=jnp.asarray(mask))
    y_sub, new_sub = jbn(x[mask], s, b, state, training=True, momentum=0.8)
    assert_close(f64(y)[mask], y_sub, 1e-12)
    assert_close(new.mean, new_sub.mean, 1e-12)
    assert_close(new.var, new_sub.var, 1e-12)
    assert_close(f64(y)[mask], ref_batch_norm(x, s, b, mask=mask)[0][mask], 1e-12)
    # Gradients w.r.t. the real rows match too; the padded rows get no gradient through the stats.
    ct = rng.normal(size=shape) * mask[..., None]
    gx = jax.grad(lambda x: jnp.sum(jbn(x, s, b, state, training=True, mask=jnp.asarray(mask))[0] * ct))(x)
    gsub = jax.grad(lambda x: jnp.sum(jbn(x, s, b, state, training=True)[0] * ct[mask]))(x[mask])
    assert_close(f64(gx)[mask], gsub, 1e-10)
    np.testing.assert_array_equal(f64(gx)[~mask], 0.0)


def test_batch_norm_axis_name_under_vmap_equals_full_batch():
    rng = np.random.default_rng(23)
    x = rng.normal(size=(4, 3, 5))  # 4 "devices" x 3 examples x 5 features
    s, b = rng.normal(size=5), rng.normal(size=5)
    state = batch_norm_state(5, jnp.float64)

    def per_device(x):
        return jbn(x, s, b, state, training=True, momentum=0.7, axis_name="batch")

    y, new = jax.vmap(per_device, axis_name="batch")(x)
    y_full, new_full = jbn(x.reshape(12, 5), s, b, state, training=True, momentum=0.7)
    assert_close(f64(y).reshape(12, 5), y_full, 1e-12)
    for i in range(4):  # every replica holds the same, global, running statistics (m = 12)
        assert_close(new.mean[i], new_full.mean, 1e-12)
        assert_close(new.var[i], new_full.var, 1e-12)


def test_batch_norm_axis_name_one_example_per_replica_with_mask():
    """vmap over single examples (no batch axis left inside): the batch is the named axis."""
    rng = np.random.default_rng(24)
    x = rng.normal(size=(6, 5))
    mask = np.array([True, True, False, True, False, True])
    state = batch_norm_state(5, jnp.float64)

    def per_example(x, m):
        return jbn(x, None, None, state, training=True, momentum=0.5, axis_name="i", mask=m)

    y, new = jax.vmap(per_example, axis_name="i")(x, jnp.asarray(mask))
    y_sub, new_sub = jbn(x[mask], None, None, state, training=True, momentum=0.5)
    assert_close(f64(y)[mask], y_sub, 1e-12)
    assert_close(new.var[0], new_sub.var, 1e-12)
    assert_close(new.mean[-1], new_sub.mean, 1e-12)


def test_batch_norm_nchw_equals_nhwc():
    x, s, b = make_inputs((4, 3, 5, 6), -1, jnp.float64, seed=25)
    state = batch_norm_state(6, jnp.float64)
    y, st = jbn(x, s, b, state, training=True)
    yc, stc = jbn(jnp.transpose(x, (0, 3, 1, 2)), s, b, state, training=True, axis=1)
    assert_close(jnp.transpose(yc, (0, 2, 3, 1)), y, 1e-12)
    assert_close(stc.var, st.var, 1e-12)


# ----------------------------------------------------------------------------------------------
# group_norm, instance_norm
# ----------------------------------------------------------------------------------------------


def test_group_norm_one_group_is_layer_norm_over_space_and_channels():
    x, s, b = make_inputs((2, 3, 5, 8), -1, jnp.float64, seed=26)
    y = jgn(x, 1, s, b)
    tile = lambda p: jnp.broadcast_to(p, (3, 5, 8))  # noqa: E731
    assert_close(y, jln(x, tile(s), tile(b), axis=(1, 2, 3)), 1e-12)
    assert_close(y, ref_layer_norm(x, tile(s), tile(b), axis=(1, 2, 3)), 1e-12)


def test_group_norm_channel_groups_is_instance_norm():
    x, s, b = make_inputs((2, 3, 5, 8), -1, jnp.float64, seed=27)
    y = jgn(x, 8, s, b)
    assert_close(y, jin(x, s, b), 1e-12)
    assert_close(y, ref_instance_norm(x, s, b), 1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_norm_nchw_equals_nhwc(groups):
    x, s, b = make_inputs((2, 3, 5, 8), -1, jnp.float32, seed=28)
    y = jgn(x, groups, s, b)
    yc = jgn(jnp.transpose(x, (0, 3, 1, 2)), groups, s, b, axis=1)
    assert_close(jnp.transpose(yc, (0, 2, 3, 1)), y, 1e-5)
    assert_close(y, ref_group_norm(x, groups, s, b), 1e-5)


def test_group_norm_groups_are_contiguous_channels():
    """Channels 0..3 form group 0: changing channel 5 leaves channels 0..3 unchanged."""
    x, _, _ = make_inputs((2, 8), -1, jnp.float64, seed=29)
    x2 = x.at[:, 5].add(10.0)
    y, y2 = f64(jgn(x, 2)), f64(jgn(x2, 2))
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert np.abs(y[:, 4:] - y2[:, 4:]).max() > 0.1
    assert_close(y, ref_group_norm(x, 2), 1e-12)


# ----------------------------------------------------------------------------------------------
# weight_norm
# ----------------------------------------------------------------------------------------------

WN_CASES = [((5, 3), -1), ((3, 5), 0), ((2, 2, 4, 3), -1), ((2, 2, 4, 3), (2, 3))]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,axis", WN_CASES, ids=[f"{s}-{a}" for s, a in WN_CASES])
def test_weight_norm_unit_norms_equal_g(shape, axis, dtype):
    rng = np.random.default_rng(30)
    v = jnp.asarray(rng.normal(size=shape), dtype)
    g = jnp.asarray(rng.uniform(0.5, 3.0, size=pshape(shape, axis)), dtype)
    w = lnjax.weight_norm(v, g, axis=axis)
    assert w.dtype == jnp.dtype(dtype) and w.shape == v.shape
    keep = norm_axes(axis, len(shape))
    red = tuple(a for a in range(len(shape)) if a not in keep)
    rtol = RTOL[jnp.dtype(dtype)] * (4 if dtype == jnp.bfloat16 else 1)  # norm of rounded entries
    assert_close(np.sqrt((f64(w) ** 2).sum(red)), g, rtol)
    assert_close(w, ref_weight_norm(v, g, axis), RTOL[jnp.dtype(dtype)])
    # Invariant to the scale of v (Salimans & Kingma): only its direction matters.
    if dtype != jnp.bfloat16:
        assert_close(lnjax.weight_norm(v * 7.5, g, axis=axis), w, RTOL[jnp.dtype(dtype)])


# ----------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad, checkpoint, scan give the eager values
# ----------------------------------------------------------------------------------------------


def _transform_ops():
    x, s, b = make_inputs(SHAPE, -1, jnp.float32, seed=31)
    rng = np.random.default_rng(32)
    st = BatchNormState(jnp.asarray(rng.normal(size=8), jnp.float32), jnp.asarray(rng.uniform(1, 2, 8), jnp.float32))
    return {
        "layer_norm": lambda x: lnjax.layer_norm(x, s, b, axis=-1),
        "layer_norm_tuple": lambda x: lnjax.layer_norm(x, None, None, axis=(-3, -1)),
        "rms_norm": lambda x: lnjax.rms_norm(x, s, b),
        "batch_norm_train": lambda x: batch_norm(x, s, b, st, training=True, momentum=0.9),
        "batch_norm_eval": lambda x: batch_norm(x, s, b, st, training=False)[0],
        "group_norm": lambda x: lnjax.group_norm(x, 4, s, b),
        "instance_norm": lambda x: lnjax.instance_norm(x, s, b),
        "weight_norm": lambda x: lnjax.weight_norm(x, s),
        "moments": lambda x: lnjax.moments(x, axis=(-3, -1)),
    }


TRANSFORM_OPS = _transform_ops()


def _tree_close(a, b, rtol=1e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for u, v in zip(la, lb):
        assert u.shape == v.shape and u.dtype == v.dtype
        assert_close(u, v, rtol)


@pytest.mark.parametrize("name", sorted(TRANSFORM_OPS))
def test_transformations_agree_with_eager(name):
    f = TRANSFORM_OPS[name]
    rng = np.random.default_rng(33)
    xs = jnp.asarray(1.0 + rng.normal(size=(3,) + SHAPE), jnp.float32)
    x = xs[0]

    def loss(x, f=f):
        # A fixed random cotangent per output leaf (built from NumPy, so a constant under tracing).
        leaves = jax.tree.leaves(f(x))
        cts = [np.random.default_rng(i).normal(size=leaf.shape).astype(leaf.dtype) for i, leaf in enumerate(leaves)]
        return sum(jnp.sum(leaf * ct) for leaf, ct in zip(leaves, cts))

    # Eager: values on each slice, and the gradient.
    eager = f(x)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[f(xi) for xi in xs])
    g = jax.grad(loss)(x)
    gs = jnp.stack([g] + [jax.grad(loss)(xi) for xi in xs[1:]])
    assert np.all(np.isfinite(f64(g))) and np.abs(f64(g)).max() > 0

    @jax.jit  # one compilation for all the transformed versions (each is traced separately inside)
    def transformed(x, xs):
        return {
            "jit": f(x),
            "checkpoint": jax.checkpoint(f)(x),
            "vmap": jax.vmap(f)(xs),
            "scan": lax.scan(lambda c, xi: (c, f(xi)), 0, xs)[1],
            "grad": jax.grad(loss)(x),
            "grad_checkpoint": jax.grad(lambda x: loss(x, jax.checkpoint(f)))(x),
            "vmap_grad": jax.vmap(jax.grad(loss))(xs),
            "scan_grad": lax.scan(lambda c, xi: (c, jax.grad(loss)(xi)), 0, xs)[1],
        }

    out = transformed(x, xs)
    for key, expected in [("jit", eager), ("checkpoint", eager), ("vmap", stacked), ("scan", stacked),
                          ("grad", g), ("grad_checkpoint", g), ("vmap_grad", gs), ("scan_grad", gs)]:
        _tree_close(out[key], expected)
    _tree_close(jax.checkpoint(f)(x), eager)  # checkpoint outside jit too


# ----------------------------------------------------------------------------------------------
# Bad inputs: the documented error, naming the argument
# ----------------------------------------------------------------------------------------------

XB = np.zeros(SHAPE, np.float32)
P8 = np.ones(8, np.float32)


def _bn(x=XB, scale=None, bias=None, state=None, **kw):
    kw.setdefault("training", True)
    if state is None:
        state = batch_norm_state(8)
    return batch_norm(x, scale, bias, state, **kw)


ALL_X_OPS = {
    "moments": lambda x, **kw: lnjax.moments(x, **kw),
    "layer_norm": lambda x, **kw: lnjax.layer_norm(x, **kw),
    "rms_norm": lambda x, **kw: lnjax.rms_norm(x, **kw),
    "batch_norm": lambda x, **kw: _bn(x, **kw),
    "group_norm": lambda x, **kw: lnjax.group_norm(x, 2, **kw),
    "instance_norm": lambda x, **kw: lnjax.instance_norm(x, **kw),
    "weight_norm": lambda x, **kw: lnjax.weight_norm(x, P8, **kw),
}
PARAM_OPS = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]

BAD = [
    # (id, thunk, documented exception, message that names the argument)
    *[(f"{op}-axis-out-of-range", lambda f=f: f(XB, axis=3), ValueError, r"`axis`=3 is out of range")
      for op, f in ALL_X_OPS.items()],
    *[(f"{op}-axis-negative-out-of-range", lambda f=f: f(XB, axis=-4), ValueError, r"`axis`=-4 is out of range")
      for op, f in ALL_X_OPS.items()],
    ("layer_norm-axis-repeated", lambda: lnjax.layer_norm(XB, axis=(1, 1)), ValueError, r"`axis`.*repeats"),
    ("layer_norm-axis-repeated-negative", lambda: lnjax.layer_norm(XB, axis=(2, -1)), ValueError, r"`axis`.*repeats"),
    ("moments-axis-repeated", lambda: lnjax.moments(XB, axis=(0, -3)), ValueError, r"`axis`.*repeats"),
    ("batch_norm-axis-repeated", lambda: _bn(axis=(-1, 2)), ValueError, r"`axis`.*repeats"),
    ("weight_norm-axis-repeated", lambda: lnjax.weight_norm(XB, P8, axis=(2, 2)), ValueError, r"`axis`.*repeats"),
    ("layer_norm-axis-empty", lambda: lnjax.layer_norm(XB, axis=()), ValueError, r"`axis` must name"),
    ("layer_norm-axis-float", lambda: lnjax.layer_norm(XB, axis=1.0), TypeError, r"`axis` must be an int"),
    ("layer_norm-axis-str", lambda: lnjax.layer_norm(XB, axis="1"), TypeError, r"`axis` must be an int"),
    ("layer_norm-axis-bool", lambda: lnjax.layer_norm(XB, axis=True), TypeError, r"`axis` must be an int"),
    ("rms_norm-axis-tuple-of-float", lambda: lnjax.rms_norm(XB, axis=(1, 2.0)), TypeError, r"`axis` must be an int"),
    ("batch_norm-axis-none", lambda: _bn(axis=None), TypeError, r"`axis` must be an int"),
    ("group_norm-axis-0", lambda: lnjax.group_norm(XB, 2, axis=0), ValueError, r"`axis`=0 is the batch axis"),
    ("group_norm-axis-neg-batch", lambda: lnjax.group_norm(XB, 2, axis=-3), ValueError, r"`axis`=-3 is the batch"),
    ("instance_norm-axis-0", lambda: lnjax.instance_norm(XB, axis=0), ValueError, r"`axis`=0 is the batch axis"),
    ("batch_norm-no-batch-axis", lambda: _bn(np.zeros(8, np.float32)), ValueError, r"`axis`=-1 keeps every axis"),
    *[(f"{op}-scale-{shp}", lambda f=f, shp=shp: f(XB, scale=np.ones(shp, np.float32)), ValueError, r"`scale` has shape")
      for op in PARAM_OPS for f in [ALL_X_OPS[op]] for shp in [(1,), (7,), (1, 8), ()]],
    *[(f"{op}-bias-{shp}", lambda f=f, shp=shp: f(XB, bias=np.ones(shp, np.float32)), ValueError, r"`bias` has shape")
      for op in PARAM_OPS for f in [ALL_X_OPS[op]] for shp in [(1,), (6,)]],
    ("layer_norm-scale-for-other-axis", lambda: lnjax.layer_norm(XB, np.ones(6, np.float32)), ValueError, r"`scale`"),
    ("layer_norm-scale-tuple-axis", lambda: lnjax.layer_norm(XB, P8, axis=(1, 2)), ValueError, r"`scale` has shape"),
    ("layer_norm-scale-int", lambda: lnjax.layer_norm(XB, np.ones(8, np.int32)), TypeError, r"`scale` must be a real"),
    ("rms_norm-bias-bool", lambda: lnjax.rms_norm(XB, None, np.ones(8, bool)), TypeError, r"`bias` must be a real"),
    ("weight_norm-g-shape-1", lambda: lnjax.weight_norm(XB, np.ones(1, np.float32)), ValueError, r"`g` has shape"),
    ("weight_norm-g-int", lambda: lnjax.weight_norm(XB, np.ones(8, np.int32)), TypeError, r"`g` must be a real"),
    *[(f"{op}-x-{dt.__name__}", lambda f=f, dt=dt: f(np.zeros(SHAPE, dt)), TypeError,
       r"`v` must be a real" if op == "weight_norm" else r"`x` must be a real")
      for op, f in ALL_X_OPS.items() for dt in [np.int32, np.bool_, np.complex64]],
    ("group_norm-groups-not-dividing", lambda: lnjax.group_norm(XB, 3), ValueError, r"`num_groups`=3 does not divide"),
    ("group_norm-groups-too-many", lambda: lnjax.group_norm(XB, 16), ValueError, r"`num_groups`=16 does not divide"),
    ("group_norm-groups-0", lambda: lnjax.group_norm(XB, 0), ValueError, r"`num_groups` must be a positive int"),
    ("group_norm-groups-negative", lambda: lnjax.group_norm(XB, -2), ValueError, r"`num_groups` must be a positive"),
    ("group_norm-groups-float", lambda: lnjax.group_norm(XB, 2.0), ValueError, r"`num_groups` must be a positive"),
    ("group_norm-groups-bool", lambda: lnjax.group_norm(XB, True), ValueError, r"`num_groups` must be a positive"),
    ("group_norm-no-channel-axis", lambda: lnjax.group_norm(np.zeros(8, np.float32), 2), ValueError, r"`x` must have"),
    ("instance_norm-no-spatial", lambda: lnjax.instance_norm(np.zeros((4, 8), np.float32)), ValueError,
     r"`x` must be \[batch, \*spatial, channels\]"),
    # A reduction over one value centres everything to exactly 0: an error, never silent zeros.
    ("group_norm-one-value-per-group", lambda: lnjax.group_norm(np.arange(10.0).reshape(1, 10, 1), 10, axis=1),
     ValueError, r"`x` of shape \(1, 10, 1\) gives each group statistic .* one value"),
    ("layer_norm-size-1-axis", lambda: lnjax.layer_norm(np.ones((3, 1), np.float32)), ValueError,
     r"`x` of shape \(3, 1\) gives each layer statistic .* one value"),
    ("layer_norm-xla-size-1-axis", lambda: lnjax.layer_norm(np.ones((3, 1, 1)), axis=(1, 2), implementation="xla"),
     ValueError, r"gives each layer statistic .* one value"),
    ("batch_norm-batch-of-one", lambda: _bn(np.ones((1, 8), np.float32)), ValueError,
     r"`x` of shape \(1, 8\) gives each batch statistic .* one value"),
    *[(f"{op}-fast-variance-{v!r}", lambda f=f, v=v: f(XB, fast_variance=v), TypeError,
       r"`fast_variance` must be a Python bool")
      for op, f in ALL_X_OPS.items() if op in ("layer_norm", "batch_norm", "group_norm", "instance_norm", "moments")
      for v in ["yes", 1, None]],
    ("moments-mask-shape", lambda: lnjax.moments(XB, mask=np.ones(7, bool)), ValueError, r"`mask` has shape"),
    ("moments-mask-full-shape", lambda: lnjax.moments(XB, mask=np.ones(SHAPE, bool)), ValueError, r"`mask` has shape"),
    ("batch_norm-mask-shape", lambda: _bn(mask=np.ones(4, bool)), ValueError, r"`mask` has shape"),
    ("batch_norm-mask-broadcastable", lambda: _bn(mask=np.ones((4, 1), bool)), ValueError, r"`mask` has shape"),
    ("moments-mask-float", lambda: lnjax.moments(XB, mask=np.ones(8, np.float32)), TypeError, r"`mask` must be boolean"),
    ("batch_norm-mask-int", lambda: _bn(mask=np.ones((4, 6), np.int32)), TypeError, r"`mask` must be boolean"),
    *[(f"{op}-eps-negative", lambda f=f: f(XB, eps=-1e-5), ValueError, r"`eps` must be >= 0")
      for op, f in ALL_X_OPS.items() if op != "moments"],
    ("layer_norm-eps-nan", lambda: lnjax.layer_norm(XB, eps=float("nan")), ValueError, r"`eps` must be >= 0"),
    ("batch_norm-momentum-negative", lambda: _bn(momentum=-0.1), ValueError, r"`momentum` must be in \[0, 1\]"),
    ("batch_norm-momentum-above-1", lambda: _bn(momentum=1.01), ValueError, r"`momentum` must be in \[0, 1\]"),
    ("batch_norm-momentum-nan", lambda: _bn(momentum=float("nan")), ValueError, r"`momentum` must be in"),
    ("batch_norm-state-other-size", lambda: _bn(state=batch_norm_state(6)), ValueError, r"`state.mean` has shape"),
    ("batch_norm-state-var-size", lambda: _bn(state=BatchNormState(jnp.zeros(8), jnp.ones(1))), ValueError,
     r"`state.var` has shape"),
    ("batch_norm-state-tuple", lambda: _bn(state=(jnp.zeros(8), jnp.ones(8))), TypeError, r"`state` must be a Batch"),
    ("batch_norm-training-int", lambda: _bn(training=1), TypeError, r"`training` must be a Python bool"),
    ("batch_norm-training-array", lambda: _bn(training=jnp.asarray(True)), TypeError, r"`training` must be a Python"),
    ("batch_norm-training-none", lambda: _bn(training=None), TypeError, r"`training` must be a Python bool"),
    ("batch_norm_state-0", lambda: batch_norm_state(0), ValueError, r"`num_features` must be a positive int"),
    ("batch_norm_state-tuple-with-0", lambda: batch_norm_state((3, 0)), ValueError, r"`num_features` must be"),
]


@pytest.mark.parametrize("thunk,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(thunk, exc, match):
    # Every check runs at trace time, so the op's ordinary (possibly jitted) call raises it.
    with pytest.raises(exc, match=match):
        thunk()


def test_errors_are_raised_under_jit_too():
    with pytest.raises(ValueError, match=r"`scale` has shape"):
        jax.jit(lambda x, s: lnjax.layer_norm(x, s))(XB, np.ones(1, np.float32))
    with pytest.raises(TypeError, match=r"`x` must be a real"):
        jax.jit(lambda x: lnjax.rms_norm(x))(np.zeros(SHAPE, np.int32))
    with pytest.raises(ValueError, match=r"`num_groups`=3"):
        jax.jit(lambda x: lnjax.group_norm(x, 3))(XB)


def test_traced_eps_and_momentum_are_accepted():
    """Traced hyper-parameters in range compute what concrete ones do."""
    x, _, _ = make_inputs(SHAPE, -1, jnp.float32, seed=34)
    y = jax.jit(lambda x, eps: lnjax.layer_norm(x, eps=eps))(x, jnp.float32(1e-5))
    assert_close(y, ref_layer_norm(x), 1e-5)
    _, st = jax.jit(lambda x, m: _bn(x, momentum=m))(x, jnp.float32(0.5))
    assert_close(st.mean, 0.5 * f64(x).mean((0, 1)), 1e-5)


@pytest.mark.parametrize("op", [op for op in ALL_X_OPS if op != "moments"])
def test_traced_eps_out_of_range_makes_the_output_nan(op):
    """Under jit a traced `eps` < 0 cannot raise (eagerly it is a ValueError): every output
    it reaches is NaN, never a finite wrong value."""
    x, _, _ = make_inputs(SHAPE, -1, jnp.float32, seed=35)
    f = ALL_X_OPS[op]
    for bad in (-1e-5, float("nan")):
        out = jax.jit(lambda x, eps: f(x, eps=eps))(x, jnp.float32(bad))
        y = out[0] if isinstance(out, tuple) else out
        assert np.all(np.isnan(y)), (op, bad)
    ok = jax.jit(lambda x, eps: f(x, eps=eps))(x, jnp.float32(1e-5))
    assert np.all(np.isfinite(jax.tree.leaves(ok)[0]))


def test_traced_momentum_out_of_range_makes_the_running_statistics_nan():
    x, _, _ = make_inputs(SHAPE, -1, jnp.float32, seed=36)
    y_ref, _ = _bn(x, momentum=0.9)
    for bad in (-0.1, 1.5, float("nan")):
        y, st = jax.jit(lambda x, m: _bn(x, momentum=m))(x, jnp.float32(bad))
        assert np.all(np.isnan(st.mean)) and np.all(np.isnan(st.var)), bad
        assert_close(y, y_ref, 1e-6)  # the training output does not use the momentum


# ----------------------------------------------------------------------------------------
# implementation="fused": the closed-form derivatives behind the public ops (the default).


def _fused_pair(op):
    """(xla, fused) versions of a public op as functions of (x, scale, bias) -> outputs."""
    if op == "batch_norm":
        def f(impl):
            def run(x, s, b):
                y, st = lnjax.batch_norm(x, s, b, batch_norm_state(x.shape[-1], x.dtype), training=True,
                                         momentum=0.9, implementation=impl)
                return y, st.mean, st.var
            return run
    else:
        fn = getattr(lnjax, op)
        def f(impl):
            return lambda x, s, b: fn(x, s, b, implementation=impl)
    return f("xla"), f("fused")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fused_implementation_matches_default_values_and_vjp(op, dtype):
    rng = np.random.default_rng(40)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 2 + 1, dtype)
    s, b = jnp.asarray(1 + 0.2 * rng.normal(size=16), dtype), jnp.asarray(0.3 * rng.normal(size=16), dtype)
    plain, fused = _fused_pair(op)
    out_p, vjp_p = jax.vjp(plain, x, s, b)
    out_f, vjp_f = jax.vjp(jax.jit(fused), x, s, b)
    cts = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype), out_p)
    if op == "batch_norm":  # running statistics carry no gradient in either implementation
        cts = (cts[0], jnp.zeros_like(cts[1]), jnp.zeros_like(cts[2]))
    tol = 2e-5 if dtype == jnp.float32 else 1e-11
    for got, want in zip(jax.tree.leaves((out_f, vjp_f(cts))), jax.tree.leaves((out_p, vjp_p(cts)))):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_fused_implementation_keeps_the_corrected_two_pass_precision(op):
    x = (1e4 + np.random.default_rng(41).normal(0.0, 1e-2, size=(64, 32))).astype(np.float32)
    plain, fused = _fused_pair(op)
    one = jnp.ones(32, jnp.float32)
    got, want = fused(x, one, None), plain(x, one, None)
    got, want = (got[0], want[0]) if op == "batch_norm" else (got, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_fused_implementation_check_grads_forward_and_reverse_second_order(op, monkeypatch):
    # A custom_jvp: forward mode, reverse mode and their compositions all work; 16 rows in
    # blocks of 4 also exercise the blocked (lax.scan) tangent.
    monkeypatch.setattr(lnjax.heuristics, "block_bytes", lambda: 4 * 8 * 4)
    rng = np.random.default_rng(42)
    x = jnp.asarray(rng.normal(size=(16, 8)) + 1)
    s, b = jnp.linspace(0.5, 1.5, 8), jnp.asarray(0.1 * rng.normal(size=8))
    _, fused = _fused_pair(op)
    # (batch_norm's running statistics are stop_gradient'ed: check y alone.)
    fn = (lambda *a: fused(*a)[0]) if op == "batch_norm" else fused
    check_grads(fn, (x, s, b), order=2, modes=["fwd", "rev"])


def _primitives(fn, *args):
    """The primitives of `fn`'s jaxpr, those of its sub-jaxprs (cond branches, custom_jvp
    calls) included."""
    def walk(jaxpr):
        yield from (str(e.primitive) for e in jaxpr.eqns)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            yield from walk(sub)
    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_default_implementation_is_native_or_fused_where_it_applies(op):
    x, s = jnp.ones((4, 8)), jnp.ones(8)
    xla, fused = _fused_pair(op)
    assert "custom_jvp_call" in _primitives(fused, x, s, None)
    assert "custom_jvp_call" not in _primitives(xla, x, s, None)
    default = (lambda x, s: lnjax.batch_norm(x, s, None, batch_norm_state(8), training=True)[0]) \
        if op == "batch_norm" else (lambda x, s: getattr(lnjax, op)(x, s))
    used = _primitives(default, x, s)
    assert "custom_jvp_call" in used
    # The native kernels (primitives lnjax_native_*) on CPU, the fused path on other platforms.
    native = any(name.startswith("lnjax_native_") for name in used)
    assert (native and "platform_index" in used) == lnjax.native.available()
    # Where it cannot apply, the default quietly uses the formula (no error).
    other_axis = (lambda x, s: lnjax.batch_norm(x, s, None, batch_norm_state(8), training=True,
                                                mask=jnp.ones(4, bool))[0]) \
        if op == "batch_norm" else (lambda x, s: getattr(lnjax, op)(x, None, axis=0))
    for fn, args in ((other_axis, (x, s)), (lambda x, e: lnjax.layer_norm(x, eps=e), (x, 1e-5))):
        used = _primitives(fn, *args)
        assert "custom_jvp_call" not in used and not any(name.startswith("lnjax_native_") for name in used)


FUSED_BAD = [
    ("name", lambda: lnjax.layer_norm(XB, implementation="triton"), ValueError, r"`implementation` must be None"),
    ("name-inference", lambda: _bn(training=False, implementation="cuda"), ValueError, r"`implementation` must be"),
    ("axis", lambda: lnjax.layer_norm(XB, axis=(1, 2), implementation="fused"), ValueError, r"last axis only"),
    ("rms-axis", lambda: lnjax.rms_norm(XB, axis=1, implementation="fused"), ValueError, r"last axis only"),
    ("fast-variance", lambda: lnjax.layer_norm(XB, fast_variance=True, implementation="fused"), ValueError,
     r"does not support fast variance"),
    ("bn-mask", lambda: _bn(mask=np.ones(SHAPE[:-1], bool), implementation="fused"), ValueError,
     r"does not support mask"),
    ("bn-axis", lambda: _bn(axis=1, state=batch_norm_state(6), implementation="fused"), ValueError,
     r"last axis only"),
    ("traced-eps", lambda: jax.jit(lambda e: lnjax.layer_norm(XB, eps=e, implementation="fused"))(1e-5),
     TypeError, r"Python-number `eps`"),
]


@pytest.mark.parametrize("thunk,exc,match", [b[1:] for b in FUSED_BAD], ids=[b[0] for b in FUSED_BAD])
def test_fused_implementation_bad_configuration(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


# --------------------------------------------------------------------------------------------
# batches without data, masked values, states that would truncate
# --------------------------------------------------------------------------------------------


def _no_data_cases():
    """(name, run(state) -> new_state) for every op that keeps running batch statistics, each
    given a batch with no data (empty, or every position masked)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 8)), jnp.float32)
    none = jnp.zeros((4, 3), bool)
    return [
        ("empty/default", lambda s: batch_norm(jnp.zeros((0, 8), jnp.float32), None, None, s, training=True)[1]),
        ("empty/xla", lambda s: batch_norm(jnp.zeros((0, 8), jnp.float32), None, None, s, training=True,
                                           implementation="xla")[1]),
        ("all-masked", lambda s: batch_norm(x, None, None, s, training=True, mask=none)[1]),
        ("all-masked/fast-variance", lambda s: batch_norm(x, None, None, s, training=True, mask=none,
                                                          fast_variance=True)[1]),
        ("domain-agnostic/no-source", lambda s: lnjax.domain_agnostic_batch_norm(
            x[:, 0], None, None, s, source_mask=jnp.zeros(4, bool), training=True)[1]),
        ("graph-batch/no-node", lambda s: lnjax.graph_batch_norm(
            x[:, 0], None, None, s, training=True, node_mask=jnp.zeros(4, bool))[1]),
        ("empty/vmapped", lambda s: jax.vmap(
            lambda v: batch_norm(v, None, None, s, training=True, axis_name="b")[1], axis_name="b",
            out_axes=None)(jnp.zeros((0, 8), jnp.float32))),
    ]  # fmt: skip


@pytest.mark.parametrize("name,run", _no_data_cases(), ids=[c[0] for c in _no_data_cases()])
def test_a_batch_without_data_leaves_the_running_statistics_unchanged(name, run):
    state = BatchNormState(jnp.linspace(-1, 1, 8, dtype=jnp.float32), jnp.linspace(0.5, 2, 8, dtype=jnp.float32))
    new = jax.jit(run)(state)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)


def test_a_batch_without_data_is_normalized_with_the_running_statistics():
    """Not with mean 0 and variance 0 (`x / sqrt(eps)`): as in evaluation."""
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, size=(4, 8)), jnp.float32)
    state = BatchNormState(jnp.linspace(-1, 1, 8, dtype=jnp.float32), jnp.linspace(0.5, 2, 8, dtype=jnp.float32))
    scale, bias = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32), jnp.linspace(-1, 1, 8, dtype=jnp.float32)
    want = (np.asarray(x) - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var) + 1e-5) * np.asarray(scale) + np.asarray(bias)
    none = jnp.zeros(4, bool)
    runs = {
        "all-masked": lambda: batch_norm(x, scale, bias, state, training=True, mask=none),
        "all-masked/fast-variance": lambda: batch_norm(x, scale, bias, state, training=True, mask=none,
                                                       fast_variance=True),
        "domain-agnostic/no-source": lambda: lnjax.domain_agnostic_batch_norm(
            x, scale, bias, state, source_mask=none, training=True),
        "graph-batch/no-node": lambda: lnjax.graph_batch_norm(x, scale, bias, state, training=True, node_mask=none),
    }  # fmt: skip
    for name, run in runs.items():
        y, new = jax.jit(run)()
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(new.var, state.var)
    # a partly masked batch still uses its own statistics
    y, _ = batch_norm(x, None, None, state, training=True, mask=none.at[:2].set(True))
    xv = np.asarray(x[:2], np.float64)
    np.testing.assert_allclose(y[:2], (xv - xv.mean(0)) / np.sqrt(xv.var(0) + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_masked_values_reach_no_gradient_even_nan(implementation):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float64)
    mask = jnp.asarray([True, True, False, True, False, True])
    scale, bias = jnp.asarray(1 + 0.3 * rng.normal(size=5)), jnp.asarray(rng.normal(size=5))
    w = jnp.asarray(rng.normal(size=(6, 5)))

    def loss(x, scale, bias):
        y, _ = batch_norm(x, scale, bias, batch_norm_state(5, jnp.float64), training=True, mask=mask)
        return jnp.sum(jnp.where(mask[:, None], y, 0) * w), y

    (value, y), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)
    for poison in (jnp.nan, jnp.inf, 1e30):
        bad = jnp.where(mask[:, None], x, poison)
        (v2, y2), g2 = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(bad, scale, bias)
        np.testing.assert_array_equal(v2, value)
        np.testing.assert_array_equal(y2[np.asarray(mask)], y[np.asarray(mask)])
        for a, b in zip(g2, grads):
            assert np.all(np.isfinite(a))
            np.testing.assert_array_equal(a, b)
    # masked positions are still normalized with the statistics of the others
    mu, var = x[np.asarray(mask)].mean(0), x[np.asarray(mask)].var(0)
    np.testing.assert_allclose(y[2], scale * (x[2] - mu) / np.sqrt(var + 1e-5) + bias, rtol=1e-12)


def test_integer_running_statistics_are_rejected():
    with pytest.raises(TypeError, match="floating dtype"):
        batch_norm_state(8, jnp.int32)
    for bad in (8.0, True, "8"):
        with pytest.raises(TypeError, match="`num_features` must be an int"):
            batch_norm_state(bad)
    state = BatchNormState(jnp.zeros(8, jnp.int32), jnp.ones(8, jnp.int32))
    with pytest.raises(TypeError, match="state.mean"):
        batch_norm(jnp.ones((4, 8), jnp.float32), None, None, state, training=True)


@pytest.mark.parametrize("eps", [jnp.full(8, 1e-5), -jnp.ones(8), True, "1e-5", 1e-5j], ids=repr)
@pytest.mark.parametrize("op", ["layer", "rms", "batch", "group", "weight"])
def test_eps_must_be_one_real_number(op, eps):
    x = jnp.ones((4, 8), jnp.float32)
    call = {
        "layer": lambda: lnjax.layer_norm(x, eps=eps),
        "rms": lambda: lnjax.rms_norm(x, eps=eps),
        "batch": lambda: batch_norm(x, None, None, batch_norm_state(8), training=True, eps=eps),
        "group": lambda: lnjax.group_norm(x, 2, eps=eps),
        "weight": lambda: lnjax.weight_norm(x, jnp.ones(8, jnp.float32), eps=eps),
    }[op]
    with pytest.raises(TypeError, match="`eps` must be a real number"):
        call()
    with pytest.raises(TypeError, match="`eps` must be a real number"):
        jax.jit(call)()


def test_reductions_over_a_single_value_are_errors():
    with pytest.raises(ValueError, match="no axis is left"):
        lnjax.weight_norm(jnp.ones(4, jnp.float32), jnp.ones(4, jnp.float32), axis=0)
    with pytest.raises(ValueError, match="one spatial position"):
        lnjax.instance_norm(jnp.ones((2, 1, 1, 3), jnp.float32))
    with pytest.raises(TypeError, match="`momentum` must be a real number"):
        batch_norm(jnp.ones((4, 8), jnp.float32), None, None, batch_norm_state(8), training=True, momentum=jnp.ones(8))


def test_an_unbound_axis_name_is_a_clear_error():
    from jax.sharding import PartitionSpec as P

    x = jnp.ones((4, 8), jnp.float32)
    bn = lambda v: _bn(v, axis_name="x")[0]  # noqa: E731
    mesh = jax.make_mesh((1,), ("data",))
    runs = {
        "outside any mapping": lambda: bn(x),
        "vmap over another name": lambda: jax.vmap(bn, axis_name="b")(x[:, None]),
        "shard_map over a mesh without it": lambda: jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=P("data"),
                                                                          out_specs=P("data")))(
            jax.device_put(x, jax.NamedSharding(mesh, P("data")))),
        "moments": lambda: jax.vmap(lambda v: lnjax.moments(v, axis_name=("b", "x")), axis_name="b")(x),
    }
    for what, run in runs.items():
        with pytest.raises(ValueError, match=r"`axis_name`=.*no axis 'x' is bound here"):
            run()
    jax.vmap(bn, axis_name="x")(x[:, None])  # bound: fine


@pytest.mark.parametrize("implementation", ["fused", "xla"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_batch_size_and_jit_change_a_row_by_at_most_two_ulp_on_the_xla_path(op, implementation):
    # XLA:CPU picks a reduction's order from the whole array's shape, so a row's result is not
    # bitwise independent of the batch (Flax's LayerNorm measured the same here; README says
    # so). What must hold is the float32 bound: a couple of ulps of the row's largest output.
    # (The native kernels are bitwise invariant: tests/test_native.py.)
    f = partial(getattr(lnjax, op), implementation=implementation)
    rng = np.random.default_rng(3)
    for rows, h in [(256, 100), (8, 1024), (32, 1024), (256, 64), (32, 7)]:
        z = np.asarray(rng.normal(1.0, 3.0, (rows, h)), np.float32)
        full = np.asarray(jax.jit(f)(z))
        for got in (np.asarray(jax.jit(f)(z[:1])), np.asarray(jax.jit(f)(z[:3]))[:1], np.asarray(f(z))[:1]):
            scale = np.finfo(np.float32).eps * np.max(np.abs(full[:1]))
            assert np.max(np.abs(got - full[:1])) <= 2 * scale, (rows, h)
