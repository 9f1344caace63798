"""lnjax against the normalization layers of Flax (Linen and NNX) and PyTorch.

Same inputs, same parameters, same epsilon; both the outputs and the gradients (w.r.t. the input
and the parameters, for a fixed random cotangent) must agree. Conventions that differ:

* Flax `use_fast_variance` defaults to True (one-pass E[x^2] - E[x]^2); it is set to False here,
  the exact two-pass form that lnjax uses.
* Flax `epsilon` defaults to 1e-6 for LayerNorm/GroupNorm (lnjax: 1e-5); it is set explicitly.
* Flax GroupNorm is channels-last and normalizes over every axis but the batch axis 0 (as
  `lnjax.group_norm(x, G, axis=-1)`); PyTorch's `F.group_norm` is NCHW, compared via transposes.
* Running variance: Flax's BatchNorm averages the *biased* batch variance; lnjax and PyTorch the
  unbiased `m / (m - 1) * var`. The running means agree; the variances are compared after that
  conversion.
* Momentum: Flax and lnjax weight the old value, `new = momentum * old + (1 - momentum) * batch`;
  PyTorch weights the new one, `new = (1 - p) * old + p * batch`, so torch `momentum=p` is lnjax
  `momentum=1 - p`.

Flax's layers are called under `jax.numpy_dtype_promotion("standard")` (`flax_promotion`):
their statistics code calls `jnp.promote_types(dtype, jnp.float32)`
(`force_float32_reductions`), which the strict promotion set in conftest.py refuses for float64
inputs. lnjax itself always runs under strict promotion.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import lnjax

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def f64(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()
    return np.asarray(a).astype(np.float64)


def close(actual, expected, dtype):
    """allclose with the absolute tolerance scaled to the magnitude of `expected`."""
    a, e = f64(actual), f64(expected)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(np.abs(e).max(), 1.0))


def inputs(shape, pshape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (1.5 + 2.0 * rng.normal(size=shape)).astype(dtype)
    s = (1.0 + 0.5 * rng.normal(size=pshape)).astype(dtype)
    b = rng.normal(size=pshape).astype(dtype)
    ct = rng.normal(size=shape).astype(dtype)
    return x, s, b, ct


def jax_vjp(f, args, ct, has_aux=False):
    """Output of f(*args) and the gradients of <f(*args), ct> w.r.t. every arg (and f's aux).

    Jitted: one compilation per call site instead of one per primitive in eager mode."""

    @jax.jit
    def run(args, ct):
        if has_aux:
            y, vjp, aux = jax.vjp(f, *args, has_aux=True)
            return y, list(vjp(ct)), aux
        y, vjp = jax.vjp(f, *args)
        return y, list(vjp(ct))

    return run(jax.tree.map(jnp.asarray, tuple(args)), jnp.asarray(ct))


def torch_vjp(f, args, ct):
    ts = [torch.tensor(a, requires_grad=True) for a in args]
    y = f(*ts)
    y.backward(torch.tensor(ct))
    return y.detach().numpy(), [t.grad.numpy() for t in ts]


def assert_same(got, expected, dtype):
    (y1, g1), (y2, g2) = got, expected
    close(y1, y2, dtype)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert np.shape(a) == np.shape(b)
        close(a, b, dtype)


def nnx_fn(module):
    """A pure function (x, params, rest) -> (y, updated batch stats) of an NNX module."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def f(x, params, rest):
        m = nnx.merge(graphdef, params, rest)
        y = m(x)
        return y, nnx.state(m, nnx.BatchStat)

    return f, params, rest


def set_params(module, **values):
    for k, v in values.items():
        getattr(module, k).set_value(jnp.asarray(v))  # replaces (dtype included)


def flax_promotion():
    """Standard promotion for Flax's internals (see the module docstring)."""
    return jax.numpy_dtype_promotion("standard")


def nnx_vjp(module, x, ct, names, with_stats=False):
    """Output of an NNX module and the gradients w.r.t. x and the named parameters
    (and, with_stats, the module's batch statistics after the call)."""
    f, params, rest = nnx_fn(module)
    with flax_promotion():
        y, (gx, gp, _), stats = jax_vjp(f, (x, params, rest), ct, has_aux=True)
    out = y, [gx] + [gp[n][...] for n in names]
    return (out, stats) if with_stats else out


def linen_vjp(f, args, ct):
    with flax_promotion():
        return jax_vjp(f, args, ct)


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis", [-1, (1, 2)], ids=["last", "last-two"])
def test_layer_norm_vs_flax_and_torch(axis, dtype):
    ax = (axis,) if isinstance(axis, int) else axis
    shape = (4, 6, 8)
    pshape = tuple(shape[a] for a in ax)
    x, s, b, ct = inputs(shape, pshape, dtype)
    ours = jax_vjp(lambda x, s, b: lnjax.layer_norm(x, s, b, axis=axis, eps=1e-5), (x, s, b), ct)

    linen = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, reduction_axes=axis, feature_axes=axis,
                         param_dtype=dtype)
    got = linen_vjp(lambda x, s, b: linen.apply({"params": {"scale": s, "bias": b}}, x), (x, s, b), ct)
    assert_same(got, ours, dtype)

    if axis == -1:  # NNX LayerNorm takes num_features for the last axis
        m = nnx.LayerNorm(8, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=nnx.Rngs(0))
        set_params(m, scale=s, bias=b)
        assert_same(nnx_vjp(m, x, ct, ["scale", "bias"]), ours, dtype)

    # torch normalizes over the trailing `normalized_shape` dimensions.
    got = torch_vjp(lambda x, s, b: F.layer_norm(x, pshape, s, b, eps=1e-5), (x, s, b), ct)
    assert_same(got, ours, dtype)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rms_norm_vs_flax_and_torch(dtype):
    x, s, _, ct = inputs((4, 6, 8), (8,), dtype, seed=1)
    ours = jax_vjp(lambda x, s: lnjax.rms_norm(x, s, eps=1e-6), (x, s), ct)

    linen = nn.RMSNorm(epsilon=1e-6, use_fast_variance=False, param_dtype=dtype)
    assert_same(linen_vjp(lambda x, s: linen.apply({"params": {"scale": s}}, x), (x, s), ct), ours, dtype)

    m = nnx.RMSNorm(8, epsilon=1e-6, use_fast_variance=False, param_dtype=dtype, rngs=nnx.Rngs(0))
    set_params(m, scale=s)
    assert_same(nnx_vjp(m, x, ct, ["scale"]), ours, dtype)

    assert_same(torch_vjp(lambda x, s: F.rms_norm(x, (8,), s, eps=1e-6), (x, s), ct), ours, dtype)


# ----------------------------------------------------------------------------------------------
# GroupNorm
# ----------------------------------------------------------------------------------------------

NCHW, NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


GN_CASES = [(1, np.float64), (4, np.float64), (8, np.float64), (4, np.float32)]


@pytest.mark.parametrize("groups,dtype", GN_CASES, ids=[f"{g}-{np.dtype(d).name}" for g, d in GN_CASES])
def test_group_norm_vs_flax_and_torch(groups, dtype):
    x, s, b, ct = inputs((2, 3, 5, 8), (8,), dtype, seed=2)  # NHWC
    ours = jax_vjp(lambda x, s, b: lnjax.group_norm(x, groups, s, b, eps=1e-5), (x, s, b), ct)

    linen = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype)
    got = linen_vjp(lambda x, s, b: linen.apply({"params": {"scale": s, "bias": b}}, x), (x, s, b), ct)
    assert_same(got, ours, dtype)

    m = nnx.GroupNorm(8, groups, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=nnx.Rngs(0))
    set_params(m, scale=s, bias=b)
    assert_same(nnx_vjp(m, x, ct, ["scale", "bias"]), ours, dtype)

    # PyTorch: NCHW in, NCHW out; transposed back to NHWC for the comparison.
    y_t, (gx_t, gs_t, gb_t) = torch_vjp(
        lambda x, s, b: F.group_norm(x, groups, s, b, eps=1e-5), (x.transpose(NCHW), s, b), ct.transpose(NCHW)
    )
    assert_same((y_t.transpose(NHWC), [gx_t.transpose(NHWC), gs_t, gb_t]), ours, dtype)
    # and lnjax on NCHW directly (axis=1) gives the same as PyTorch without any transpose
    y_c = jax.jit(lambda x: lnjax.group_norm(x, groups, s, b, axis=1, eps=1e-5))(x.transpose(NCHW))
    close(y_c, y_t, dtype)


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------

BN_SHAPES = [(16, 6), (4, 3, 5, 6)]  # [N, C] and NHWC


def _running(seed, dtype):
    rng = np.random.default_rng(seed)
    return rng.normal(size=6).astype(dtype), rng.uniform(0.5, 2.0, size=6).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["NC", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_vs_flax(training, shape, dtype):
    x, s, b, ct = inputs(shape, (6,), dtype, seed=3)
    rm, rv = _running(4, dtype)
    momentum = 0.9
    state = lnjax.BatchNormState(jnp.asarray(rm), jnp.asarray(rv))
    y, grads, new = jax_vjp(
        lambda x, s, b: lnjax.batch_norm(x, s, b, state, training=training, momentum=momentum, eps=1e-5),
        (x, s, b),
        ct,
        has_aux=True,
    )
    ours = y, grads
    m = int(np.prod(shape[:-1]))

    def expected_flax_var(lnjax_var):
        # Flax averages the biased variance: undo lnjax's m / (m - 1) on the batch part.
        if not training:
            return lnjax_var
        batch_unbiased = (f64(lnjax_var) - momentum * f64(rv)) / (1 - momentum)
        return momentum * f64(rv) + (1 - momentum) * batch_unbiased * (m - 1) / m

    linen = nn.BatchNorm(use_running_average=not training, momentum=momentum, epsilon=1e-5,
                         use_fast_variance=False, param_dtype=dtype)

    def linen_apply(x, s, b):
        v = {"params": {"scale": s, "bias": b}, "batch_stats": {"mean": rm, "var": rv}}
        return linen.apply(v, x, mutable=["batch_stats"])

    with flax_promotion():
        y, grads, updated = jax_vjp(linen_apply, (x, s, b), ct, has_aux=True)
    assert_same((y, grads), ours, dtype)
    close(updated["batch_stats"]["mean"], new.mean, dtype)
    close(updated["batch_stats"]["var"], expected_flax_var(new.var), dtype)

    mod = nnx.BatchNorm(6, momentum=momentum, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype,
                        use_running_average=not training, rngs=nnx.Rngs(0))
    set_params(mod, scale=s, bias=b, mean=rm, var=rv)
    got, stats = nnx_vjp(mod, x, ct, ["scale", "bias"], with_stats=True)
    assert_same(got, ours, dtype)
    close(stats["mean"][...], new.mean, dtype)
    close(stats["var"][...], expected_flax_var(new.var), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["NC", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_vs_torch(training, shape, dtype):
    """torch `momentum=p` is lnjax `momentum=1 - p`; both keep the unbiased running variance."""
    x, s, b, ct = inputs(shape, (6,), dtype, seed=5)
    rm, rv = _running(6, dtype)
    p = 0.1
    state = lnjax.BatchNormState(jnp.asarray(rm), jnp.asarray(rv))
    y, grads, new = jax_vjp(
        lambda x, s, b: lnjax.batch_norm(x, s, b, state, training=training, momentum=1 - p, eps=1e-5),
        (x, s, b),
        ct,
        has_aux=True,
    )
    ours = y, grads

    to_torch = NCHW if len(shape) == 4 else (0, 1)
    back = NHWC if len(shape) == 4 else (0, 1)
    t_mean, t_var = torch.tensor(rm), torch.tensor(rv)  # updated in place by F.batch_norm
    y_t, (gx_t, gs_t, gb_t) = torch_vjp(
        lambda x, s, b: F.batch_norm(x, t_mean, t_var, s, b, training=training, momentum=p, eps=1e-5),
        (x.transpose(to_torch), s, b),
        ct.transpose(to_torch),
    )
    assert_same((y_t.transpose(back), [gx_t.transpose(back), gs_t, gb_t]), ours, dtype)
    close(t_mean, new.mean, dtype)
    close(t_var, new.var, dtype)
    if not training:  # eval: neither library touches the running statistics
        assert np.array_equal(f64(t_mean), f64(rm)) and np.array_equal(f64(new.var), f64(rv))


def test_batch_norm_running_stats_track_torch_over_steps():
    """Several training steps in a row, then eval: lnjax's state follows torch's buffers."""
    rng = np.random.default_rng(7)
    state = lnjax.batch_norm_state(6, jnp.float64)
    t_mean, t_var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    for _ in range(4):
        x = 3.0 + 2.0 * rng.normal(size=(8, 6))
        _, state = lnjax.batch_norm(x, None, None, state, training=True, momentum=0.8)
        F.batch_norm(torch.tensor(x), t_mean, t_var, training=True, momentum=0.2, eps=1e-5)
        close(state.mean, t_mean, np.float64)
        close(state.var, t_var, np.float64)
    x = rng.normal(size=(5, 6))
    y, _ = lnjax.batch_norm(x, None, None, state, training=False)
    close(y, F.batch_norm(torch.tensor(x), t_mean, t_var, training=False, eps=1e-5), np.float64)
