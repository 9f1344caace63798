"""lnjax._fused: the closed-form derivatives agree with autodiff of the plain formulas.

Each private op is checked, forward, VJP and JVP, against `jax.vjp`/`jax.jvp` of the textbook
formula written out here (not against lnjax's public ops, which use these), in float32 and
float64, on the single-block path, the blocked `lax.scan` path (block size dividing the rows)
and the unblocked fallback (no block size divides the rows); and with `check_grads` in
float64, forward and reverse mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lnjax import _fused, heuristics


def _stats_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _affine(y, scale, bias):
    lead = (1,) * (y.ndim - 1)
    if scale is not None:
        y = y * scale.astype(y.dtype).reshape(lead + (-1,))
    if bias is not None:
        y = y + bias.astype(y.dtype).reshape(lead + (-1,))
    return y


def plain_layer_norm(x, scale, bias, eps):
    xf = x.astype(_stats_dtype(x))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean((xf - mean) ** 2, axis=-1, keepdims=True)
    y = (xf - mean) / jnp.sqrt(var + eps)
    return _affine(y, scale, bias).astype(x.dtype)


def plain_rms_norm(x, scale, bias, eps):
    xf = x.astype(_stats_dtype(x))
    y = xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return _affine(y, scale, bias).astype(x.dtype)


def plain_batch_norm(x, scale, bias, eps):
    xf = x.astype(_stats_dtype(x))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean((xf - mean) ** 2, axis=axes, keepdims=True)
    y = (xf - mean) / jnp.sqrt(var + eps)
    return _affine(y, scale, bias).astype(x.dtype)


def fused_bn_y(x, scale, bias, eps):
    return _fused.batch_norm_train_2d(x, scale, bias, eps)[0]


OPS = {
    "layer": (plain_layer_norm, _fused.layer_norm_2d, 1e-5),
    "rms": (plain_rms_norm, _fused.rms_norm_2d, 1e-6),
    "batch": (plain_batch_norm, fused_bn_y, 1e-5),
}

# (shape, block bytes): one block; scan over 8 blocks of 8 rows; 37 rows (prime: evaluated
# whole); leading axes flattened.
LAYOUTS = [((6, 16), 1 << 18), ((64, 16), 512), ((37, 16), 512), ((3, 5, 16), 256)]


def _inputs(shape, dtype, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    h = shape[-1]
    x = jnp.asarray(rng.normal(size=shape) * 2 + offset, dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=h), dtype)
    bias = jnp.asarray(0.3 * rng.normal(size=h), dtype)
    return x, g, scale, bias


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-{l[1]}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("params", ["scale+bias", "none"])
def test_matches_autodiff_of_plain_formula(op, layout, dtype, params, monkeypatch):
    shape, block_bytes = layout
    monkeypatch.setattr(heuristics, "block_bytes", lambda: block_bytes)
    plain, fused, eps = OPS[op]
    x, g, scale, bias = _inputs(shape, dtype)
    scale = scale if params != "none" else None
    bias = bias if params == "scale+bias" else None

    def args(fn):
        return lambda x, s, b: fn(x, s, b, eps)

    y_ref, vjp_ref = jax.vjp(args(plain), x, scale, bias)
    y, vjp = jax.vjp(jax.jit(args(fused)), x, scale, bias)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=1e-11, atol=1e-11)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, **tol)
    for got, want in zip(vjp(g), vjp_ref(g)):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, **tol)
    tangents = (g, scale, bias)  # any values of the right shapes
    _, t_ref = jax.jvp(args(plain), (x, scale, bias), tangents)
    _, t = jax.jvp(jax.jit(args(fused)), (x, scale, bias), tangents)
    assert t.dtype == x.dtype
    np.testing.assert_allclose(t, t_ref, **tol)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout", LAYOUTS[1:3], ids=lambda l: f"{l[0]}-{l[1]}")
def test_check_grads_float64(op, layout, monkeypatch):
    shape, block_bytes = layout
    monkeypatch.setattr(heuristics, "block_bytes", lambda: block_bytes)
    _, fused, eps = OPS[op]
    x, _, scale, bias = _inputs(shape, jnp.float64, seed=1)
    # Second order on the scan path: the hand-written backward is itself differentiable.
    order = 2 if layout is LAYOUTS[1] else 1
    check_grads(lambda x, s, b: fused(x, s, b, eps), (x, scale, bias), order=order, modes=["fwd", "rev"])


def test_batch_norm_statistics_and_their_gradients():
    x, _, scale, bias = _inputs((4, 3, 8), jnp.float64, seed=2)
    y, mean, var = _fused.batch_norm_train_2d(x, scale, bias, 1e-5)
    flat = np.asarray(x).reshape(-1, 8)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, flat.var(0), rtol=1e-12)
    # Gradients through the returned statistics are exact too (not dropped).
    check_grads(lambda x: _fused.batch_norm_train_2d(x, scale, bias, 1e-5), (x,), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout", [((32, 64), 1 << 20), ((32, 64), 1024), ((37, 64), 1024)],
                         ids=["one-block", "scan", "whole"])
def test_bfloat16_close_to_float32(op, layout, monkeypatch):
    shape, block_bytes = layout
    monkeypatch.setattr(heuristics, "block_bytes", lambda: block_bytes)
    plain, fused, eps = OPS[op]
    x, g, scale, bias = _inputs(shape, jnp.float32, seed=3)
    xb, gb, sb, bb = (a.astype(jnp.bfloat16) for a in (x, g, scale, bias))
    y, vjp = jax.vjp(lambda x, s, b: fused(x, s, b, eps), xb, sb, bb)
    assert y.dtype == jnp.bfloat16
    y32, vjp32 = jax.vjp(lambda x, s, b: plain(x, s, b, eps), *(a.astype(jnp.float32) for a in (xb, sb, bb)))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=2e-2, atol=2e-2)
    for got, want in zip(vjp(gb), vjp32(gb.astype(jnp.float32))):
        assert got.dtype == jnp.bfloat16
        w = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float32), w, rtol=3e-2, atol=3e-2 * np.abs(w).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("params", ["scale+bias", "scale", "none"])
def test_narrow_rms_forward_rounds_the_float64_result(dtype, params):
    # Undifferentiated, narrow floats take their own order of products (the gain folded into
    # 1/rms); it and the primal under jvp each round the float64 result to the output dtype.
    x, g, scale, bias = (a.astype(dtype) for a in _inputs((37, 64), jnp.float32, seed=5))
    scale = None if params == "none" else scale
    bias = bias if params == "scale+bias" else None
    f64 = lambda a: None if a is None else np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    ref = plain_rms_norm(f64(x), f64(scale), f64(bias), 1e-6)
    ulp = float(jnp.finfo(dtype).eps) * np.maximum(np.abs(ref), 1e-3)
    y = jax.jit(_fused.rms_norm_2d)(x, scale, bias)
    y_jvp = jax.jvp(_fused.rms_norm_2d, (x, scale, bias), (g, scale, bias))[0]
    for got in (y, y_jvp):
        assert got.dtype == dtype
        assert np.all(np.abs(np.asarray(got.astype(jnp.float32), np.float64) - ref) <= ulp)


def test_large_mean_keeps_exact_variance():
    # 1e4 +- 0.01: the one-pass variance cancels to 0 in float32; the two-pass one does not.
    x = (1e4 + 0.01 * jnp.asarray(np.random.default_rng(4).normal(size=(8, 64)))).astype(jnp.float32)
    y = _fused.layer_norm_2d(x, None, None, 1e-12)
    np.testing.assert_allclose(np.std(np.asarray(y, np.float64), axis=-1), 1.0, rtol=1e-2)


def test_vmap_and_grad_compose():
    x, g, scale, bias = _inputs((4, 6, 16), jnp.float32, seed=5)

    def loss(fn, x):
        return jnp.sum(fn(x, scale, bias, 1e-5) * g[0])

    got = jax.vmap(jax.grad(lambda x: loss(_fused.layer_norm_2d, x)))(x)
    want = jax.vmap(jax.grad(lambda x: loss(plain_layer_norm, x)))(x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_block_size_is_the_l2_cache_the_os_reports(tmp_path):
    """No constant tuned to one CPU: a block is the per-core L2 size sysfs reports."""
    assert [heuristics.parse_cache_size(t) for t in ("1024K\n", "2M", "512", "1G")] == [1 << 20, 2 << 20, 512, 1 << 30]

    def cache_dir(name, levels):
        for i, (level, size) in enumerate(levels):
            d = tmp_path / name / f"index{i}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "size").write_text(f"{size}\n")
        return str(tmp_path / name)

    assert heuristics.l2_bytes(cache_dir("epyc", [(1, "32K"), (1, "32K"), (2, "1024K"), (3, "32768K")])) == 1 << 20
    assert heuristics.l2_bytes(cache_dir("xeon", [(1, "48K"), (2, "2048K"), (3, "105M")])) == 2 << 20
    assert heuristics.l2_bytes(cache_dir("no-l2", [(1, "32K")])) == heuristics._DEFAULT_BLOCK_BYTES
    assert heuristics.l2_bytes(str(tmp_path / "absent")) == heuristics._DEFAULT_BLOCK_BYTES
    assert heuristics.block_bytes() == heuristics.l2_bytes()


def test_blocks_only_on_cpu(monkeypatch):
    """On an accelerator the tangent is one program (a scan over blocks would serialize it)."""
    x, g, scale, bias = _inputs((64, 8), jnp.float32)
    monkeypatch.setattr(heuristics, "block_bytes", lambda: 4 * 8 * 4)

    def scans():
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(_fused.layer_norm_2d(x, scale, bias, 1e-5) * g)))(x)
        return "scan" in str(jaxpr)

    assert scans()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not scans()
