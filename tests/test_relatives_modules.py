"""The Flax wrappers of `lnjax.relatives` (`lnjax.nnx`, `lnjax.linen`) against the pure ops.

A wrapper is a shell: with the same parameters its output must equal the pure op's bitwise, its
running statistics must follow the pure op's state through training steps, evaluation must use
them, and NNX must equal Linen.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lnjax
import lnjax.linen
import lnjax.nnx


def _rand(shape, seed=0, loc=0.0, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, size=shape), dtype)


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


IDS = jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2])
EDGES = jnp.asarray([[0, 1, 2, 3, 5, 6, 7], [1, 2, 0, 4, 6, 7, 5]])
GRAPH_KW = dict(segment_ids=IDS, num_segments=3, edges=EDGES)
SRC = jnp.asarray([True, False, True, True, False, True])
KINDS = ("graph", "batch")


def _cases():
    """name -> (nnx constructor, linen module, x shape, call kwargs, pure op, parameter shapes).

    The pure op takes `(x, params, state, training)` and returns `(y, state)`; the parameter
    shapes (beyond scale and bias) get non-trivial values so that a swapped one would show.
    """
    st = dict(momentum=0.8)
    return {
        "SwitchableNorm": (
            lambda: lnjax.nnx.SwitchableNorm(3, **st), lnjax.linen.SwitchableNorm(**st), (4, 3, 2, 3), {},
            lambda x, p, s, t: lnjax.switchable_norm(
                x, p["scale"], p["bias"], lnjax.SwitchableControl(p["mean_logits"], p["var_logits"]),
                s, training=t, **st),
            {"scale": (3,), "bias": (3,), "mean_logits": (3,), "var_logits": (3,)}),
        "BatchLayerNorm": (
            lambda: lnjax.nnx.BatchLayerNorm((3, 4), batch_size=5, **st),
            lnjax.linen.BatchLayerNorm(batch_size=5, **st), (5, 3, 4), {},
            lambda x, p, s, t: lnjax.batch_layer_norm(x, p["scale"], p["bias"], s, training=t,
                                                      batch_size=5, **st),
            {"scale": (4,), "bias": (4,)}),
        "DomainAgnosticBatchNorm": (
            lambda: lnjax.nnx.DomainAgnosticBatchNorm(4, **st),
            lnjax.linen.DomainAgnosticBatchNorm(**st), (6, 2, 4), {"source_mask": SRC},
            lambda x, p, s, t: lnjax.domain_agnostic_batch_norm(
                x, p["scale"], p["bias"], s, source_mask=SRC, training=t, **st),
            {"scale": (4,), "bias": (4,)}),
        "GraphNorm": (  # two kinds keep the eager run short; the pure op is tested with four
            lambda: lnjax.nnx.GraphNorm(5, kinds=KINDS, **st), lnjax.linen.GraphNorm(kinds=KINDS, **st),
            (8, 5), GRAPH_KW,
            lambda x, p, s, t: lnjax.graph_learned_norm(x, p["scale"], p["bias"], p["weights"], s,
                                                        training=t, kinds=KINDS, **GRAPH_KW, **st),
            {"scale": (5,), "bias": (5,), "weights": (2, 5)}),
        "GraphNorm-batch": (
            lambda: lnjax.nnx.GraphNorm(5, kind="batch", **st),
            lnjax.linen.GraphNorm(kind="batch", **st), (8, 5), {},
            lambda x, p, s, t: lnjax.graph_batch_norm(x, p["scale"], p["bias"], s, training=t, **st),
            {"scale": (5,), "bias": (5,)}),
    }  # fmt: skip


CASES = _cases()


def _params(pshapes, seed=1):
    return {k: _rand(shape, seed + i, loc=1.0 if k == "scale" else 0.0, scale=0.3)
            for i, (k, shape) in enumerate(pshapes.items())}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_stateful_modules_train_and_eval(name):
    make, lm, shape, call_kw, pure, pshapes = CASES[name]
    m = make()
    params = _params(pshapes)
    for k, v in params.items():  # load the same non-trivial parameters into the nnx module
        getattr(m, k)[...] = v
    state = lnjax.batch_norm_state(m.mean[...].shape)
    variables = {"params": params, "batch_stats": {"mean": state.mean, "var": state.var}}
    for step in range(2):  # training: outputs and running statistics, step by step
        x = _rand(shape, 10 + step, loc=step, scale=1 + step)
        want, state = pure(x, params, state, True)
        _equal(m(x, **call_kw), want)
        y, upd = lm.apply(variables, x, **call_kw, use_running_average=False, mutable=["batch_stats"])
        _equal(y, want)
        variables = {**variables, **upd}
        for got in (m.mean[...], variables["batch_stats"]["mean"]):
            _equal(got, state.mean)
        for got in (m.var[...], variables["batch_stats"]["var"]):
            _equal(got, state.var)
    assert np.all(np.asarray(state.mean) != 0)
    x = _rand(shape, 30)
    want, _ = pure(x, params, state, False)
    m.eval()
    _equal(m(x, **call_kw), want)
    _equal(lm.apply(variables, x, **call_kw, use_running_average=True), want)
    _equal(m.mean[...], state.mean)  # evaluation leaves the statistics alone
    # linen's init makes the same parameters and statistics (and does not update the latter)
    init = lm.init(jax.random.key(0), x, **call_kw, use_running_average=False)
    assert jax.tree.map(jnp.shape, init["params"]) == {k: tuple(s) for k, s in pshapes.items()}
    _equal(init["batch_stats"]["var"], jnp.ones_like(state.var))


def test_initial_values():
    x = _rand((4, 3, 2, 3))
    m = lnjax.nnx.SwitchableNorm(3)
    _equal(m.mean_logits[...], jnp.zeros(3, jnp.float32))
    _equal(m.scale[...], jnp.ones(3, jnp.float32))
    lv = lnjax.linen.SwitchableNorm(use_running_average=False).init(jax.random.key(0), x)
    _equal(lv["params"]["var_logits"], jnp.zeros(3, jnp.float32))
    g = lnjax.nnx.GraphNorm(5, weighting="sum")
    _equal(g.weights[...], jnp.ones((4, 5), jnp.float32))
    assert lnjax.nnx.GraphNorm(5, kinds=("node", "graph")).weights[...].shape == (2, 5)
    assert not hasattr(lnjax.nnx.GraphNorm(5, kinds=("node",)), "mean")  # no batch part: no stats
    p = lnjax.nnx.ProxyNorm(3)
    for k, v in (("scale", 1), ("bias", 0), ("proxy_scale", 0), ("proxy_bias", 0)):
        _equal(getattr(p, k)[...], jnp.full(3, v, jnp.float32))
    assert lnjax.nnx.BatchLayerNorm((3, 4), axis=(1, 2)).scale[...].shape == (3, 4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stateless_modules_equal_pure_ops(dtype):
    x = _rand((4, 3, 6), dtype=dtype)
    xg = _rand((8, 5), 1, dtype=dtype)
    s6, b6 = _rand((6,), 2, loc=1.0), _rand((6,), 3)
    s5, b5 = _rand((5,), 4, loc=1.0), _rand((5,), 5)
    pt, pb = _rand((6,), 6, scale=0.2), _rand((6,), 7, scale=0.2)
    dn_kw = dict(radius=1, sigma=0.5, suppression_radius=2, edges="zero")
    cases = [
        (lnjax.nnx.DivisiveNorm(6, **dn_kw), lnjax.linen.DivisiveNorm(**dn_kw), x, {},
         {"scale": s6, "bias": b6}, lnjax.divisive_norm(x, s6, b6, **dn_kw)),
        (lnjax.nnx.ProxyNorm(6, activation=jax.nn.swish, num_samples=32),
         lnjax.linen.ProxyNorm(activation=jax.nn.swish, num_samples=32), x, {},
         {"scale": s6, "bias": b6, "proxy_scale": pt, "proxy_bias": pb},
         lnjax.proxy_norm(x, s6, b6, pt, pb, activation=jax.nn.swish, num_samples=32)),
        (lnjax.nnx.GraphNorm(5, kind="graph"), lnjax.linen.GraphNorm(kind="graph"), xg, GRAPH_KW,
         {"scale": s5, "bias": b5}, lnjax.graph_norm(xg, s5, b5, segment_ids=IDS, num_segments=3)),
        (lnjax.nnx.GraphNorm(5, kind="adjacency"), lnjax.linen.GraphNorm(kind="adjacency"), xg,
         GRAPH_KW, {"scale": s5, "bias": b5}, lnjax.graph_adjacency_norm(xg, s5, b5, edges=EDGES)),
        (lnjax.nnx.GraphNorm(5, kind="node"), lnjax.linen.GraphNorm(kind="node"), xg, {},
         {"scale": s5, "bias": b5}, lnjax.graph_node_norm(xg, s5, b5)),
    ]  # fmt: skip
    for m, lm, xi, kw, params, want in cases:
        for k, v in params.items():
            getattr(m, k)[...] = v
        assert want.dtype == dtype
        _equal(m(xi, **kw), want)
        _equal(lm.apply({"params": params}, xi, **kw), want)
        got = jax.eval_shape(functools.partial(lm.init, **kw), jax.random.key(0), xi)["params"]
        assert jax.tree.map(lambda a: a.shape, got) == {k: v.shape for k, v in params.items()}
    y, l1 = cases[0][0](x, return_l1=True)
    _equal(y, cases[0][-1])
    _equal(l1, lnjax.divisive_norm(x, s6, b6, **dn_kw, return_l1=True)[1])


def test_modes_and_errors():
    # the mode handling shared by the stateful wrappers, on the cheapest of them
    x = _rand((6, 3))
    m = lnjax.nnx.GraphNorm(3, kind="batch", use_running_average=None)
    with pytest.raises(ValueError, match=r"(?s)lnjax.nnx.GraphNorm does not know.*model\.eval"):
        m(x)
    m(x, use_running_average=True)  # evaluation through the call argument: no update
    _equal(m.mean[...], jnp.zeros(3, jnp.float32))
    view = nnx.view(m, use_running_average=False)
    view(x)
    assert np.all(np.asarray(m.mean[...]) != 0)  # a view shares the statistics
    with pytest.raises(ValueError, match=r"(?s)lnjax.linen.DomainAgnosticBatchNorm does not know"):
        lnjax.linen.DomainAgnosticBatchNorm().init(jax.random.key(0), x, source_mask=SRC)
    lm = lnjax.linen.GraphNorm(kind="batch", use_running_average=False)
    v = lm.init(jax.random.key(0), x)
    with pytest.raises(Exception, match="batch_stats"):  # training needs a mutable collection
        lm.apply(v, x)
    # stateless graph kinds need no mode at all
    lnjax.nnx.GraphNorm(3, kind="node", use_running_average=None)(x)
    with pytest.raises(ValueError, match='`kind` must be "learned" or one of'):
        lnjax.nnx.GraphNorm(3, kind="edge")
    with pytest.raises(ValueError, match='`kind` must be "learned" or one of'):
        lnjax.linen.GraphNorm(kind="edge").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="includes the batch axis 0"):
        lnjax.nnx.BatchLayerNorm((3, 4), axis=0)
    with pytest.raises(ValueError, match=r"`state.mean` has shape \(3, 4\), expected \(5, 4\)"):
        lnjax.nnx.BatchLayerNorm((3, 4))(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="needs `segment_ids`"):
        lnjax.nnx.GraphNorm(3)(x, edges=EDGES[:, :2])


def test_nnx_jit_and_grad_equal_pure():
    x = _rand((4, 3, 2, 3), loc=1.0)
    m = lnjax.nnx.ProxyNorm(3, activation=jnp.tanh, num_samples=16)
    target = _rand((4, 3, 2, 3), 9)

    def loss(y):
        return jnp.sum((y - target) ** 2)

    grads = nnx.jit(nnx.grad(lambda m, x: loss(m(x))))(m, x)
    p = {k: getattr(m, k)[...] for k in ("scale", "bias", "proxy_scale", "proxy_bias")}
    want = jax.jit(jax.grad(lambda p: loss(lnjax.proxy_norm(
        x, p["scale"], p["bias"], p["proxy_scale"], p["proxy_bias"], activation=jnp.tanh,
        num_samples=16))))(p)  # fmt: skip
    for k, v in want.items():
        _equal(grads[k][...], v)
        assert np.any(np.asarray(v) != 0)
    # running statistics update through nnx.jit
    sn = lnjax.nnx.SwitchableNorm(3)
    nnx.jit(lambda m, x: m(x))(sn, x)
    _, st = lnjax.switchable_norm(x, jnp.ones(3), jnp.zeros(3), lnjax.switchable_control(),
                                  lnjax.switchable_norm_state(3), training=True)  # fmt: skip
    np.testing.assert_allclose(sn.var[...], st.var, rtol=1e-6)
