"""The Flax modules over `lnjax.norms` normalizers (`lnjax.nnx.Norm`, `lnjax.linen.Norm`: the
relatives of layer norm) and `ProxyNorm`, against the pure ops.

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
from lnjax import norms


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
    """name -> (normalizer, x shape, call kwargs, pure op, parameter shapes).

    The pure op takes `(x, params, state, training)` and returns `(y, state)`; every parameter
    gets non-trivial values so that a swapped one would show.
    """
    st = dict(momentum=0.8)
    return {
        "switchable": (
            norms.switchable(**st), (4, 3, 2, 3), {},
            lambda x, p, s, t: lnjax.switchable_norm(x, p["scale"], p["bias"], p["control"], s, training=t, **st),
            {"scale": (3,), "bias": (3,), "control": lnjax.SwitchableControl((3,), (3,))}),
        "switchable-1d": (  # no spatial axes: the LN/BN mix of SwitchNorm1d
            norms.switchable(**st), (6, 3), {},
            lambda x, p, s, t: (lambda y, s: (y[:, 0], s))(*lnjax.switchable_norm(
                x[:, None], p["scale"], p["bias"],
                lnjax.SwitchableControl(*(v.at[0].set(-jnp.inf) for v in p["control"])), s, training=t, **st)),
            {"scale": (3,), "bias": (3,), "control": lnjax.SwitchableControl((3,), (3,))}),
        "batch_layer": (
            norms.batch_layer(batch_size=5, **st), (5, 4), {},
            lambda x, p, s, t: lnjax.batch_layer_norm(x, p["scale"], p["bias"], s, training=t, batch_size=5, **st),
            {"scale": (4,), "bias": (4,)}),
        "domain_agnostic_batch": (
            norms.domain_agnostic_batch(**st), (6, 4), {"source_mask": SRC},
            lambda x, p, s, t: lnjax.domain_agnostic_batch_norm(x, p["scale"], p["bias"], s, source_mask=SRC,
                                                                training=t, **st),
            {"scale": (4,), "bias": (4,)}),
        "graph_learned": (  # two kinds keep the eager run short; the pure op is tested with four
            norms.graph_learned(kinds=KINDS, **st), (8, 5), GRAPH_KW,
            lambda x, p, s, t: lnjax.graph_learned_norm(x, p["scale"], p["bias"], p["weights"], s,
                                                        training=t, kinds=KINDS, **GRAPH_KW, **st),
            {"scale": (5,), "bias": (5,), "weights": (2, 5)}),
        "graph_batch": (
            norms.graph_batch(**st), (8, 5), {},
            lambda x, p, s, t: lnjax.graph_batch_norm(x, p["scale"], p["bias"], s, training=t, **st),
            {"scale": (5,), "bias": (5,)}),
    }  # fmt: skip


CASES = _cases()


def _params(pshapes, seed=1):
    leaves, tree = jax.tree.flatten(pshapes, is_leaf=lambda v: isinstance(v, tuple) and not hasattr(v, "_fields"))
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(
        pshapes, is_leaf=lambda v: isinstance(v, tuple) and not hasattr(v, "_fields"))[0]]
    values = [_rand(shape, seed + i, loc=1.0 if "scale" in n else 0.0, scale=0.3)
              for i, (n, shape) in enumerate(zip(names, leaves))]  # fmt: skip
    return jax.tree.unflatten(tree, values)


@pytest.mark.parametrize("name", list(CASES))
def test_stateful_modules_train_and_eval(name):
    norm, shape, call_kw, pure, pshapes = CASES[name]
    m = lnjax.nnx.Norm(norm, shape[-1])
    lm = lnjax.linen.Norm(norm)
    params = _params(pshapes)
    _load(m, params)
    state = norm.init_state(shape[-1])
    variables = {"params": params, "batch_stats": {"stats": state}}
    for step in range(2):  # training: outputs and running statistics, step by step
        x = _rand(shape, 10 + step, loc=step, scale=1 + step)
        want, state = pure(x, params, state, True)
        _equal(m(x, **call_kw), want)
        y, upd = lm.apply(variables, x, **call_kw, use_running_average=False, mutable=["batch_stats"])
        _equal(y, want)
        variables = {**variables, **upd}
        for got in (_values(m.stats), variables["batch_stats"]["stats"]):
            jax.tree.map(_equal, got, state)
    assert np.all(np.asarray(state.mean) != 0)
    x = _rand(shape, 30)
    want, _ = pure(x, params, state, False)
    m.eval()
    _equal(m(x, **call_kw), want)
    _equal(lm.apply(variables, x, **call_kw, use_running_average=True), want)
    jax.tree.map(_equal, _values(m.stats), state)  # evaluation leaves the statistics alone
    # linen's init makes the same parameters and statistics (and does not update the latter)
    init = lm.init(jax.random.key(0), x, **call_kw, use_running_average=False)
    assert jax.tree.map(jnp.shape, init["params"]) == jax.tree.map(jnp.shape, params)
    _equal(init["batch_stats"]["stats"].var, jnp.ones_like(state.var))


def _values(tree):
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _load(m, params):
    """Pure parameters into the module's attributes of the same names (`m.params` reads them)."""
    for k, v in params.items():
        jax.tree.map(lambda var, val: var.__setitem__(..., val), getattr(m, k), v,
                     is_leaf=lambda a: isinstance(a, nnx.Variable))  # fmt: skip
    if isinstance(m, lnjax.nnx.Norm):
        jax.tree.map(_equal, m.params, params)


def test_initial_values():
    m = lnjax.nnx.Norm(norms.switchable(), 3)
    _equal(m.control.mean_logits[...], jnp.zeros(3, jnp.float32))
    _equal(m.scale[...], jnp.ones(3, jnp.float32))
    x = _rand((4, 3, 2, 3))
    lv = lnjax.linen.Norm("switchable", use_running_average=False).init(jax.random.key(0), x)
    _equal(lv["params"]["control"].var_logits, jnp.zeros(3, jnp.float32))
    g = lnjax.nnx.Norm(norms.graph_learned(weighting="sum"), 5)
    _equal(g.weights[...], jnp.ones((4, 5), jnp.float32))
    assert lnjax.nnx.Norm(norms.graph_learned(kinds=("node", "graph")), 5).weights[...].shape == (2, 5)
    assert not hasattr(lnjax.nnx.Norm(norms.graph_learned(kinds=("node",)), 5), "stats")  # no batch part
    small = lnjax.nnx.Norm(norms.batch_layer(scale_init=0.1, bias=False), 4)
    _equal(small.scale[...], jnp.full(4, 0.1, jnp.float32))
    assert not hasattr(small, "bias")
    p = lnjax.nnx.ProxyNorm(3)
    for k, v in (("scale", 1), ("bias", 0), ("proxy_scale", 0), ("proxy_bias", 0)):
        _equal(getattr(p, k)[...], jnp.full(3, v, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stateless_modules_equal_pure_ops(dtype):
    x = _rand((4, 3, 6), dtype=dtype)
    xg = _rand((8, 5), 1, dtype=dtype)
    s6, b6 = _rand((6,), 2, loc=1.0), _rand((6,), 3)
    s5, b5 = _rand((5,), 4, loc=1.0), _rand((5,), 5)
    pt, pb = _rand((6,), 6, scale=0.2), _rand((6,), 7, scale=0.2)
    dn_kw = dict(sigma=0.5, suppression_radius=2, edges="zero")
    n6, n5 = {"scale": s6, "bias": b6}, {"scale": s5, "bias": b5}
    proxy = dict(activation=jax.nn.swish, num_samples=32)
    cases = [
        (lnjax.nnx.Norm(norms.divisive(1, **dn_kw), 6), lnjax.linen.Norm(norms.divisive(1, **dn_kw)), x, {}, n6,
         lnjax.divisive_norm(x, s6, b6, radius=1, **dn_kw)),
        (lnjax.nnx.ProxyNorm(6, **proxy), lnjax.linen.ProxyNorm(**proxy), x, {},
         {**n6, "proxy_scale": pt, "proxy_bias": pb}, lnjax.proxy_norm(x, s6, b6, pt, pb, **proxy)),
        (lnjax.nnx.Norm("graph", 5), lnjax.linen.Norm("graph"), xg, dict(segment_ids=IDS, num_segments=3), n5,
         lnjax.graph_norm(xg, s5, b5, segment_ids=IDS, num_segments=3)),
        (lnjax.nnx.Norm("graph_adjacency", 5), lnjax.linen.Norm("graph_adjacency"), xg, {"edges": EDGES}, n5,
         lnjax.graph_adjacency_norm(xg, s5, b5, edges=EDGES)),
        (lnjax.nnx.Norm("graph_node", 5), lnjax.linen.Norm("graph_node"), xg, {}, n5, lnjax.graph_node_norm(xg, s5, b5)),
        (lnjax.nnx.Norm(norms.layer(groups=2), 6), lnjax.linen.Norm(norms.layer(groups=2)), x, {}, n6,
         (lnjax.layer_norm(x.reshape(4, 3, 2, 3)).reshape(4, 3, 6) * s6.astype(dtype).reshape(1, 1, 6)
          + b6.astype(dtype).reshape(1, 1, 6))),
    ]  # fmt: skip
    for m, lm, xi, kw, params, want in cases:
        _load(m, params)
        assert want.dtype == dtype
        _equal(m(xi, **kw), want)
        _equal(lm.apply({"params": params}, xi, **kw), want)
        got = jax.eval_shape(functools.partial(lm.init, **kw), jax.random.key(0), xi)["params"]
        assert jax.tree.map(lambda a: a.shape, got) == {k: v.shape for k, v in params.items()}


def test_modes_and_errors():
    # the mode handling shared by the stateful wrappers, on the cheapest of them
    x = _rand((6, 3))
    m = lnjax.nnx.Norm("graph_batch", 3, use_running_average=None)
    with pytest.raises(ValueError, match=r"(?s)lnjax.nnx.Norm does not know.*model\.eval"):
        m(x)
    m(x, use_running_average=True)  # evaluation through the call argument: no update
    _equal(m.stats.mean[...], jnp.zeros(3, jnp.float32))
    view = nnx.view(m, use_running_average=False)
    view(x)
    assert np.all(np.asarray(m.stats.mean[...]) != 0)  # a view shares the statistics
    with pytest.raises(ValueError, match=r"(?s)lnjax.linen.Norm does not know"):
        lnjax.linen.Norm("domain_agnostic_batch").init(jax.random.key(0), x, source_mask=SRC)
    lm = lnjax.linen.Norm("graph_batch", use_running_average=False)
    v = lm.init(jax.random.key(0), x)
    with pytest.raises(Exception, match="batch_stats"):  # training needs a mutable collection
        lm.apply(v, x)
    # stateless normalizers need no mode at all
    lnjax.nnx.Norm("graph_node", 3, use_running_average=None)(x)
    with pytest.raises(ValueError, match="unknown normalizer 'edge'"):
        lnjax.nnx.Norm("edge", 3)
    with pytest.raises(ValueError, match="unknown normalizer 'edge'"):
        lnjax.linen.Norm("edge").init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="a normalizer, got None"):
        lnjax.nnx.Norm(None, 3)
    with pytest.raises(ValueError, match=r"`scale` has shape \(3,\), expected \(4,\)"):
        lnjax.nnx.Norm("batch_layer", 3)(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="needs `segment_ids`"):
        lnjax.nnx.Norm("graph_learned", 3)(x, edges=EDGES[:, :2])


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
    sn = lnjax.nnx.Norm("switchable", 3)
    nnx.jit(lambda m, x: m(x))(sn, x)
    _, st = lnjax.switchable_norm(x, jnp.ones(3), jnp.zeros(3), lnjax.switchable_control(),
                                  lnjax.switchable_norm_state(3), training=True)  # fmt: skip
    np.testing.assert_allclose(sn.stats.var[...], st.var, rtol=1e-6)
