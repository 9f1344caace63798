"""The native CPU kernels (`lnjax.native`, `csrc/row_norms.cc`) for layer and RMS norm.

* Against float64 NumPy references at every dtype, adversarial rows included (a large mean
  over a small spread, 1e20 and 1e30 scales, 1e-30 with `eps=0`, constant rows, an outlier).
* Against the XLA path within the float32 bound, with gradients, over shapes (hypothesis).
* Derivatives: `check_grads` to second order in both modes; `vmap` of the parameters too.
* Bitwise: a row's output does not depend on the batch, on jit vs eager, or on the threads.
* The fallback: with the kernels hidden, the ops take the fused path, after one warning.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import lnjax
from lnjax import native

OPS = {"layer_norm": True, "rms_norm": False}  # name: centred
DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16]


def test_the_kernels_are_built_here():
    # CI and `tasks.py` build the package with a C++ compiler: a missing library is a build bug.
    assert native.available()


def _ref(x, scale, bias, eps, center):
    # In extended precision (x86's 80-bit long double): float64 alone loses 1e-10 of the
    # spread of 1e4 + N(0, 1e-2) when it subtracts the mean.
    x = np.asarray(x, np.longdouble)
    mean = x.mean(-1, keepdims=True) if center else 0.0
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.longdouble(eps)) * np.asarray(scale, np.longdouble) + bias
    return y.astype(np.float64)


def _rows(kind, h=256, seed=0):
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(4, h))
    return {
        "normal": n,
        "large-mean": 1e4 + 1e-2 * n,
        "1e6-mean": 1e6 + n,
        "1e20": 1e20 * n,
        "1e30": 1e30 * n,
        "1e-30": 1e-30 * n,
        "constant-plus-one": np.where(np.arange(h) == 7, 2.0, 1.0) * np.ones((4, 1)),
        "outlier": np.where(np.arange(h) == 0, 1e3, n),
    }[kind]


ROWS = ["normal", "large-mean", "1e6-mean", "1e20", "1e30", "1e-30", "constant-plus-one", "outlier"]
# Max error relative to max|y|: the output rounding of the dtype plus float32 statistics.
TOL = {jnp.float64: 1e-12, jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("kind", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", sorted(OPS))
def test_matches_float64_reference_on_adversarial_rows(op, dtype, kind, eps):
    x64 = _rows(kind)
    finfo = jnp.finfo(dtype)
    if np.max(np.abs(x64)) > float(finfo.max) / 4 or np.max(np.abs(x64)) < float(finfo.tiny):
        pytest.skip(f"{kind} is not representable in {jnp.dtype(dtype).name}")
    if kind in ("large-mean", "1e6-mean") and jnp.finfo(dtype).bits < 32:
        pytest.skip("the spread is below the dtype's resolution at that mean")
    x = jnp.asarray(x64, dtype)
    rng = np.random.default_rng(1)
    scale, bias = rng.normal(1, 0.1, 256), rng.normal(0, 0.1, 256)
    pdtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    y = jax.jit(lambda x, s, b: getattr(lnjax, op)(x, s, b, eps=eps, implementation="native"))(
        x, jnp.asarray(scale, pdtype), jnp.asarray(bias, pdtype))
    assert y.dtype == dtype
    want = _ref(np.asarray(x, np.float64), scale, bias, eps, OPS[op])
    assert np.all(np.isfinite(np.asarray(y, np.float64)))
    err = np.max(np.abs(np.asarray(y, np.float64) - want)) / np.max(np.abs(want))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("op", sorted(OPS))
def test_huge_and_tiny_rows_are_correct_where_the_xla_path_is_not(op):
    # The known limit of the XLA path (README): squares overflow at 1e20 over 256 features,
    # and with eps=0 the variance of 1e-30 rows underflows. Native: finite and correct.
    for kind, eps in (("1e20", 1e-5), ("1e30", 1e-5), ("1e-30", 0.0)):
        x = jnp.asarray(_rows(kind), jnp.float32)
        want = _ref(np.asarray(x, np.float64), 1.0, 0.0, eps, OPS[op])
        y = getattr(lnjax, op)(x, eps=eps, implementation="native")
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
        g = jax.grad(lambda x: jnp.sum(jnp.sin(getattr(lnjax, op)(x, eps=eps, implementation="native"))))(x)
        assert np.all(np.isfinite(g)), kind


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 9), h=st.integers(2, 300), data=st.data())
def test_native_agrees_with_xla_values_and_gradients(rows, h, data):
    op = data.draw(st.sampled_from(sorted(OPS)))
    x = data.draw(hnp.arrays(np.float32, (rows, h), elements=st.floats(-1e3, 1e3, width=32)))
    x = x + np.random.default_rng(rows * h).normal(size=x.shape).astype(np.float32)  # no constant rows
    s = np.random.default_rng(h).normal(1, 0.2, h).astype(np.float32)
    f = {impl: (lambda impl: lambda x, s: getattr(lnjax, op)(x, s, s, implementation=impl))(impl)
         for impl in ("native", "xla")}  # fmt: skip
    ys = {k: np.asarray(jax.jit(fn)(x, s)) for k, fn in f.items()}
    # atol: the scale of the terms (xhat * s ~ 1), not of y, which can cancel to ~0 against the bias.
    np.testing.assert_allclose(ys["native"], ys["xla"], rtol=2e-5, atol=2e-5 * max(1.0, np.max(np.abs(ys["xla"]))))
    gs = {k: jax.jit(jax.grad(lambda x, s, fn=fn: jnp.sum(jnp.tanh(fn(x, s))), argnums=(0, 1)))(x, s)
          for k, fn in f.items()}  # fmt: skip
    for a, b in zip(gs["native"], gs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("op", sorted(OPS))
def test_check_grads_forward_and_reverse_to_second_order(op):
    rng = np.random.default_rng(2)
    x, s, b = (jnp.asarray(rng.normal(size=shape), jnp.float64) for shape in ((3, 2, 7), (7,), (7,)))
    fn = lambda x, s, b: getattr(lnjax, op)(x, s, b, implementation="native")  # noqa: E731
    check_grads(fn, (x, s, b), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("op", sorted(OPS))
def test_vmap_over_inputs_and_parameters_with_gradients(op):
    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    S = jnp.asarray(rng.normal(1, 0.1, (3, 16)), jnp.float32)
    loss = {impl: (lambda impl: lambda x, s: jnp.sum(jnp.sin(getattr(lnjax, op)(x, s, s, implementation=impl))))(impl)
            for impl in ("native", "xla")}  # fmt: skip
    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    cases = [  # (transform, args): per-member parameters, grad of a vmap, shared parameters
        (lambda f: jax.vmap(grad(f)), (X, S)),
        (lambda f: grad(lambda X, S: jnp.sum(jax.vmap(f)(X, S))), (X, S)),
        (lambda f: jax.vmap(grad(f), in_axes=(0, None)), (X, S[0])),
    ]
    for transform, args in cases:
        got, want = jax.jit(transform(loss["native"]))(*args), transform(loss["xla"])(*args)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_rows_output_is_bitwise_independent_of_the_batch_and_of_jit(op, dtype):
    rng = np.random.default_rng(4)
    f = getattr(lnjax, op)
    for rows, h in [(256, 100), (8, 1024), (700, 64), (32, 7)]:
        z = jnp.asarray(rng.normal(1.0, 3.0, (rows, h)), dtype)
        full = np.asarray(jax.jit(f)(z))
        for k in (1, 3, rows // 2):
            np.testing.assert_array_equal(np.asarray(jax.jit(f)(z[:k])), full[:k])
        np.testing.assert_array_equal(np.asarray(f(z)), full)  # eager
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(z[None]))[0], full)  # leading axes


@pytest.mark.skipif(shutil.which("taskset") is None or os.cpu_count() < 2, reason="needs taskset and 2 CPUs")
def test_results_do_not_depend_on_the_number_of_threads(tmp_path):
    # XLA's intra-op pool with one thread vs the default: outputs, batch statistics and gradients.
    script = textwrap.dedent("""
        import sys, jax, jax.numpy as jnp, numpy as np, lnjax
        x = jnp.asarray(np.random.default_rng(5).normal(1, 3, (4096, 300)), jnp.float32)
        s = jnp.asarray(np.random.default_rng(6).normal(1, 0.1, 300), jnp.float32)
        out = {}
        for op in ("layer_norm", "rms_norm"):
            f = lambda x, s: jnp.sum(jnp.sin(getattr(lnjax, op)(x, s, s)))
            out[op] = np.asarray(getattr(lnjax, op)(x, s, s))
            for i, g in enumerate(jax.jit(jax.grad(f, argnums=(0, 1)))(x, s)):
                out[f"{op}-grad{i}"] = np.asarray(g)
        bn = lambda x, s: lnjax.batch_norm(x, s, s, lnjax.batch_norm_state(300), training=True)
        out["batch_norm"], state = bn(x, s)
        out["batch_norm-mean"], out["batch_norm-var"] = state
        grads = jax.jit(jax.grad(lambda x, s: jnp.sum(jnp.sin(bn(x, s)[0])), argnums=(0, 1)))(x, s)
        out["batch_norm-grad0"], out["batch_norm-grad1"] = grads
        np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})
    """)
    results = []
    # One CPU (XLA sizes its intra-op pool by the CPUs the process may use), then all of them.
    for prefix in (["taskset", "-c", "0"], []):
        path = tmp_path / f"out{len(results)}.npz"
        subprocess.run([*prefix, sys.executable, "-c", script, str(path)], check=True, timeout=300)
        results.append(np.load(path))
    for k in results[0].files:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)


def test_without_the_kernels_the_ops_warn_once_and_use_the_fused_path(monkeypatch):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 32)), jnp.float32)
    want = lnjax.layer_norm(x, implementation="fused")
    monkeypatch.setattr(native, "_library_path", lambda: None)
    native.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernels were not built"):
            assert not native.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the answer is cached
            y = jax.jit(lnjax.layer_norm)(x)
            assert not native.available()
        np.testing.assert_array_equal(y, want)
        with pytest.raises(ValueError, match='implementation="native": the native kernels were not built'):
            lnjax.layer_norm(x, implementation="native")
    finally:
        monkeypatch.undo()
        native.available.cache_clear()
        assert native.available()


def test_native_is_refused_where_it_cannot_apply():
    x = jnp.ones((4, 6, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"implementation='native' normalizes over the last axis only"):
        lnjax.layer_norm(x, axis=1, implementation="native")
    with pytest.raises(ValueError, match=r"implementation='native' does not support mask"):
        lnjax.batch_norm(x, None, None, lnjax.batch_norm_state(8), training=True, mask=jnp.ones((4, 6), bool),
                         implementation="native")
    with pytest.raises(ValueError, match=r"does not support fast variance"):
        lnjax.layer_norm(x, fast_variance=True, implementation="native")


# --- batch norm --------------------------------------------------------------------------------


def _bn(x, s=None, b=None, implementation="native", **kw):
    state = lnjax.batch_norm_state(x.shape[-1], jnp.float64 if x.dtype == jnp.float64 else jnp.float32)
    return lnjax.batch_norm(x, s, b, state, training=True, implementation=implementation, **kw)


@pytest.mark.parametrize("kind", ["normal", "large-mean", "1e6-mean", "outlier"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_batch_norm_matches_float64_reference(dtype, kind):
    if kind in ("large-mean", "1e6-mean") and jnp.finfo(dtype).bits < 32:
        pytest.skip("the spread is below the dtype's resolution at that mean")
    if kind == "1e6-mean" and dtype == jnp.float16:
        pytest.skip("not representable")
    x = jnp.asarray(_rows(kind, h=700).T.reshape(7, 100, 4), dtype)  # statistics over 700 rows
    y, state = jax.jit(_bn)(x)
    xf = np.asarray(x, np.longdouble).reshape(-1, 4)
    mean, var = xf.mean(0), xf.var(0)
    want = ((xf - mean) / np.sqrt(var + 1e-5)).astype(np.float64).reshape(x.shape)
    err = np.max(np.abs(np.asarray(y, np.float64) - want)) / np.max(np.abs(want))
    assert err <= TOL[dtype], err
    np.testing.assert_allclose(state.mean, 0.01 * mean.astype(np.float64), rtol=1e-5, atol=1e-7 * np.sqrt(float(var.max())))
    np.testing.assert_allclose(state.var, 0.99 + 0.01 * var.astype(np.float64) * 700 / 699, rtol=1e-5)


def test_batch_norm_check_grads_and_vmap_of_parameters():
    rng = np.random.default_rng(8)
    x, s, b = (jnp.asarray(rng.normal(size=shape), jnp.float64) for shape in ((6, 3, 5), (5,), (5,)))
    check_grads(lambda x, s, b: _bn(x, s, b)[0], (x, s, b), order=2, modes=["fwd", "rev"])
    X, S = jnp.asarray(rng.normal(size=(3, 20, 5)), jnp.float32), jnp.asarray(rng.normal(1, 0.1, (3, 5)), jnp.float32)
    loss = {impl: (lambda impl: lambda x, s: jnp.sum(jnp.sin(_bn(x, s, s, impl)[0])))(impl) for impl in ("native", "xla")}
    got = jax.jit(jax.vmap(jax.grad(loss["native"], argnums=(0, 1))))(X, S)
    want = jax.vmap(jax.grad(loss["xla"], argnums=(0, 1)))(X, S)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)


# --- the fused LSTM step -----------------------------------------------------------------------

TERMS = {"layer": "layer", "rms": "rms", "none": None}


def _run(cell, params, xs, native, **kw):
    """`rnn` with the native kernels, or with them hidden (every op and step then in XLA; the
    check is made while tracing, so the call is traced here, not reused from a cache)."""
    if native:
        return lnjax.rnn(cell, params, xs, **kw)
    with mock.patch.object(lnjax.native, "available", lambda: False):
        return jax.jit(lambda p, x: lnjax.rnn(cell, p, x, **kw))(params, xs)


@pytest.mark.parametrize("cell_norm", sorted(TERMS))
@pytest.mark.parametrize("recurrent_norm", sorted(TERMS))
def test_lstm_step_matches_xla_values_and_gradients(recurrent_norm, cell_norm):
    cell = lnjax.LSTMCell(16, None, TERMS[recurrent_norm], TERMS[cell_norm])
    assert cell._native_kinds is not None
    params = cell.init(jax.random.key(0), 12)
    xs = jax.random.normal(jax.random.key(1), (5, 9, 12))
    lengths = jnp.asarray([9, 4, 0, 9, 1], jnp.int32)
    assert "lnjax_native_lstm_step" in str(jax.make_jaxpr(lambda p: _run(cell, p, xs, True))(params))
    assert "lnjax_native_lstm_step" not in str(jax.make_jaxpr(lambda p: _run(cell, p, xs, False))(params))
    for kw in ({}, {"lengths": lengths, "reverse": True}, {"precompute_inputs": True}):
        got = jax.jit(lambda p, x: _run(cell, p, x, True, **kw))(params, xs)
        want = _run(cell, params, xs, False, **kw)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        loss = lambda native: lambda p, x: jnp.sum(jnp.sin(_run(cell, p, x, native, **kw)[0]))  # noqa: E731
        g = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(params, xs)
        w = jax.grad(loss(False), argnums=(0, 1))(params, xs)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):  # sums over batch and time: atol by size
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("terms", [("layer", "rms"), ("layer", "layer")])
def test_lstm_step_derivatives_to_second_order_and_vmap_of_parameters(terms):
    cell = lnjax.LSTMCell(4, None, *terms)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(2), 3))
    xs = jax.random.normal(jax.random.key(3), (2, 3, 3), jnp.float64)
    check_grads(lambda p, x: lnjax.rnn(cell, p, x)[0], (params, xs), order=1, modes=["fwd", "rev"])
    # Second order against the XLA cell in float64 (finite differences of this small LSTM are
    # too coarse there, for the XLA cell as well).
    loss = lambda native: lambda p, x: jnp.sum(jnp.sin(_run(cell, p, x, native)[0]))  # noqa: E731
    for second in (lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f, argnums=1)(params, x) ** 2)),  # reverse
                   lambda f: jax.jacfwd(lambda x: jax.grad(f, argnums=1)(params, x))):  # forward over reverse
        np.testing.assert_allclose(second(loss(True))(xs), second(loss(False))(xs), rtol=1e-9, atol=1e-11)
    members = jax.vmap(lambda k: cell.init(k, 3))(jax.random.split(jax.random.key(4), 3))
    loss = lambda native: lambda p: jnp.sum(jnp.sin(_run(cell, p, xs.astype(jnp.float32), native)[0]))  # noqa: E731
    got, want = jax.jit(jax.vmap(jax.grad(loss(True))))(members), jax.vmap(jax.grad(loss(False)))(members)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("candidate", sorted(TERMS))
@pytest.mark.parametrize("gates", sorted(TERMS))
def test_gru_step_matches_xla_values_and_gradients(gates, candidate):
    cell = lnjax.GRUCell(16, None, (TERMS[gates], TERMS[candidate]))
    params = cell.init(jax.random.key(0), 12)
    xs = jax.random.normal(jax.random.key(1), (5, 9, 12))
    kw = {"lengths": jnp.asarray([9, 4, 0, 9, 1], jnp.int32), "reverse": True}
    for a, b in zip(jax.tree.leaves(jax.jit(lambda p, x: _run(cell, p, x, True, **kw))(params, xs)),
                    jax.tree.leaves(_run(cell, params, xs, False, **kw))):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    loss = lambda native: lambda p, x: jnp.sum(jnp.sin(_run(cell, p, x, native, **kw)[0]))  # noqa: E731
    got = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(params, xs)
    want = jax.grad(loss(False), argnums=(0, 1))(params, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))
    assert "lnjax_native_gru_step" in str(jax.make_jaxpr(lambda p: _run(cell, p, xs, True))(params))
    assert "lnjax_native_gru_step" not in str(jax.make_jaxpr(lambda p: _run(cell, p, xs, False))(params))


def test_lstm_cells_the_step_does_not_cover_keep_the_xla_path():
    for cell in (lnjax.LSTMCell(8, recurrent_norm=lnjax.norms.layer(groups=4)),
                 lnjax.LSTMCell(8, carry_normalized_cell=True),
                 lnjax.LSTMCell(8, recurrent_norm=lnjax.norms.divisive(2)),
                 lnjax.LSTMCell(8, recurrent_norm=lnjax.norms.layer(implementation="xla"))):  # fmt: skip
        assert cell._native_kinds is None


def test_kernels_inside_shard_map_with_gradients_of_replicated_parameters():
    # A replicated gain meets sharded data; its gradient sums over the mesh, as on the XLA path.
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(jax.random.normal(jax.random.key(5), (8, 5, 16), jnp.float32), jax.NamedSharding(mesh, P("data")))
    s = jnp.linspace(0.5, 1.5, 16, dtype=jnp.float32)

    def grads(impl):
        cell = lnjax.LSTMCell(16, None, lnjax.norms.layer(implementation=impl))

        def loss(s, x):
            bn = lnjax.batch_norm(x, s, s, lnjax.batch_norm_state(16), training=True, implementation=impl)[0]
            rnn = lnjax.rnn(cell, cell.init(jax.random.key(6), 16), x)[0]
            return jnp.sum(jnp.sin(lnjax.layer_norm(x, s, s, implementation=impl))) + jnp.sum(bn**2) + jnp.sum(rnn)

        per_shard = lambda s, x: jax.lax.psum(jax.grad(loss)(s, x), "data")  # noqa: E731
        return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(s, x)

    np.testing.assert_allclose(grads("native"), grads("xla"), rtol=1e-4, atol=1e-5)
