"""The relatives of layer norm (`lnjax.relatives`) against float64 NumPy transcriptions.

Each reference below is written from the paper's / authors' equations with explicit loops or
plain NumPy reductions, not by calling lnjax. Besides the references: the special cases that
reduce to lnjax's core ops (switchable norm with one-hot control, divisive norm over the whole
layer, a learned graph mix with one-hot weights, domain-agnostic BN on an all-source batch),
gradients (`check_grads`), low precision, jit/vmap, running statistics and the errors.
"""

import itertools
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import lnjax


def _rand(shape, seed=0, loc=0.0, scale=1.0, dtype=np.float64):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(dtype)


def _jit(fn, *args, **kw):
    """`fn(*args, **kw)` under jit: one compilation is cheaper than eager dispatch of every op.
    Keyword arguments (graph structure included) are closed over, so they stay concrete."""
    return jax.jit(lambda *a: fn(*a, **kw))(*args)


def _close(got, want, tol=1e-10):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def _softmax(a, axis=0):
    e = np.exp(a - np.max(a, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _f64_state(shape):
    return lnjax.batch_norm_state(shape, jnp.float64)


# --- switchable normalization -------------------------------------------------------------------


def ref_switchable(x, scale, bias, lm, lv, state, *, training, axis, momentum, eps):
    """Luo et al. 2018, eq. 2-5, channels moved last, spatial axes flattened."""
    xc = np.moveaxis(x, axis, -1)
    n, c = xc.shape[0], xc.shape[-1]
    flat = xc.reshape(n, -1, c)
    mu_in, var_in = flat.mean(1), flat.var(1)  # [n, c]
    mu_ln, var_ln = flat.mean((1, 2)), flat.var((1, 2))  # [n]
    if training:
        mu_bn, var_bn = flat.mean((0, 1)), flat.var((0, 1))  # [c]
        m = flat.shape[0] * flat.shape[1]
        new = (momentum * state[0] + (1 - momentum) * mu_bn,
               momentum * state[1] + (1 - momentum) * var_bn * m / (m - 1))  # fmt: skip
    else:
        mu_bn, var_bn = state
        new = state
    wm, wv = _softmax(lm), _softmax(lv)
    mu = wm[0] * mu_in + wm[1] * mu_ln[:, None] + wm[2] * mu_bn[None]
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None]
    y = (flat - mu[:, None]) / np.sqrt(var[:, None] + eps) * scale + bias
    return np.moveaxis(y.reshape(xc.shape), -1, axis), new


@pytest.mark.parametrize("axis,shape", [(-1, (3, 4, 5, 2)), (1, (2, 3, 6))])
def test_switchable_norm_matches_reference(axis, shape):
    c = shape[axis]
    x = _rand(shape, loc=0.5)
    scale, bias = _rand((c,), 1, loc=1.0, scale=0.2), _rand((c,), 2, scale=0.2)
    control = lnjax.SwitchableControl(jnp.asarray([0.3, -0.5, 0.9]), jnp.asarray([-0.2, 0.4, 0.1]))
    state = lnjax.switchable_norm_state(c, jnp.float64)
    ref_state = (np.zeros(c), np.ones(c))
    step = jax.jit(lnjax.switchable_norm, static_argnames=("training", "axis", "momentum"))
    for i in range(2):  # two training steps: the running statistics from a hand computation
        xi = _rand(shape, seed=10 + i, loc=i, scale=1 + i)
        y, state = step(x=xi, scale=scale, bias=bias, control=control, state=state,
                        training=True, axis=axis, momentum=0.9)  # fmt: skip
        want, ref_state = ref_switchable(xi, scale, bias, *map(np.asarray, control), ref_state,
                                         training=True, axis=axis, momentum=0.9, eps=1e-5)  # fmt: skip
        _close(y, want)
        _close(state.mean, ref_state[0])
        _close(state.var, ref_state[1])
    y, same = step(x=x, scale=scale, bias=bias, control=control, state=state, training=False,
                   axis=axis, momentum=0.9)  # fmt: skip
    want, _ = ref_switchable(x, scale, bias, *map(np.asarray, control), ref_state,
                             training=False, axis=axis, momentum=0.9, eps=1e-5)  # fmt: skip
    _close(y, want)
    _close(same.mean, state.mean, 0)
    _close(same.var, state.var, 0)


def _one_hot_control(k):
    logits = jnp.where(jnp.arange(3) == k, 0.0, -jnp.inf)
    return lnjax.SwitchableControl(logits, logits)


def test_switchable_norm_one_hot_is_in_ln_bn():
    x = jnp.asarray(_rand((4, 3, 5, 6), loc=2.0))
    scale, bias = jnp.asarray(_rand((6,), 1, loc=1.0)), jnp.asarray(_rand((6,), 2))
    kw = dict(momentum=0.8, eps=1e-3)

    @jax.jit  # one compilation for all the cases
    def pairs(x, st):
        def sn(k, st, training):
            return lnjax.switchable_norm(x, scale, bias, _one_hot_control(k), st, training=training, **kw)

        bn_y, bn_st = lnjax.batch_norm(x, scale, bias, st, training=True, **kw)
        sn_y, sn_st = sn(2, st, True)
        inorm = lnjax.instance_norm(x, scale, bias, eps=1e-3)
        return [
            (sn(0, st, True)[0], inorm),
            (sn(1, st, True)[0], lnjax.group_norm(x, 1, scale, bias, eps=1e-3)),  # LN, per-channel affine
            (sn_y, bn_y), (sn_st.mean, bn_st.mean), (sn_st.var, bn_st.var),
            # inference: the BN branch uses the running statistics, IN/LN the example's own
            (sn(2, bn_st, False)[0], lnjax.batch_norm(x, scale, bias, bn_st, training=False, **kw)[0]),
            (sn(0, bn_st, False)[0], inorm),
        ]

    for got, want in pairs(x, lnjax.switchable_norm_state(6, jnp.float64)):
        _close(got, want)


def test_switchable_norm_large_mean_float32():
    # 1e4 + N(0, 1e-2): a float32 mixture of rounded means would be off by ~10% of the std
    x64 = _rand((4, 8, 8, 3), 3, loc=1e4, scale=1e-2)
    x = jnp.asarray(x64, jnp.float32)
    ctrl = lnjax.switchable_control()
    y, _ = _jit(lnjax.switchable_norm, x, None, None, ctrl, lnjax.switchable_norm_state(3), training=True)
    want, _ = ref_switchable(np.asarray(x, np.float64), 1.0, 0.0, np.zeros(3), np.zeros(3),
                             (np.zeros(3), np.ones(3)), training=True, axis=-1, momentum=0.99,
                             eps=1e-5)  # fmt: skip
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, atol=2e-3)


# --- batch layer normalization ------------------------------------------------------------------


def ref_bln(x, scale, bias, state, *, training, m, momentum, eps):
    """Ziaee & Cano's `bn_training` / `bln_inference` (feature stats per example and position)."""
    fm, fv = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x_f = (x - fm) / np.sqrt(fv + eps)
    if training:
        bm, bv = x.mean(0), x.var(0)
        n = x.shape[0]
        new = (momentum * state[0] + (1 - momentum) * bm,
               momentum * state[1] + (1 - momentum) * bv * n / max(n - 1, 1))  # fmt: skip
    else:
        (bm, bv), new = state, state
    x_b = (x - bm) / np.sqrt(bv + eps)
    d = x.shape[-1]
    y = ((1 / m - 1e-4) * x_f + (1 - (1 / m + 1e-4)) * x_b) / np.sqrt(d)
    return y * scale + bias, new


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)])
def test_batch_layer_norm_matches_reference(shape):
    scale, bias = _rand(shape[-1:], 1, loc=1.0), _rand(shape[-1:], 2)
    state = lnjax.batch_layer_norm_state(shape[1:], jnp.float64)
    ref = (np.zeros(shape[1:]), np.ones(shape[1:]))
    train = jax.jit(lambda x, st: lnjax.batch_layer_norm(x, scale, bias, st, training=True, momentum=0.7))
    for i in range(2):
        x = _rand(shape, 10 + i, loc=i)
        y, state = train(x, state)
        want, ref = ref_bln(x, scale, bias, ref, training=True, m=shape[0], momentum=0.7, eps=1e-3)
        _close(y, want)
        _close(state.mean, ref[0])
        _close(state.var, ref[1])
    x = _rand((1,) + shape[1:], 20)  # inference on one example, weights of the training size
    y, same = _jit(lnjax.batch_layer_norm, x, scale, bias, state, training=False, batch_size=shape[0])
    want, _ = ref_bln(x, scale, bias, ref, training=False, m=shape[0], momentum=0.7, eps=1e-3)
    _close(y, want)
    _close(same.mean, state.mean, 0)


# --- divisive normalization ---------------------------------------------------------------------


def ref_window_mean(a, axes, radii, edges):
    """Mean over the window around each position along `axes`, by explicit slicing."""
    out = np.empty_like(a)
    sizes = [a.shape[ax] for ax in axes]
    for pos in itertools.product(*map(range, sizes)):
        win, full = [slice(None)] * a.ndim, 1
        for ax, p, r, n in zip(axes, pos, radii, sizes):
            r = n if r is None else r
            win[ax] = slice(max(p - r, 0), min(p + r + 1, n))
            full *= n if radii[axes.index(ax)] is None else 2 * r + 1
        block = a[tuple(win)]
        s = block.sum(axis=tuple(axes), keepdims=True)
        count = math.prod(block.shape[ax] for ax in axes) if edges == "mean" else full
        at = [slice(None)] * a.ndim
        for ax, p in zip(axes, pos):
            at[ax] = slice(p, p + 1)
        out[tuple(at)] = s / count
    return out


def ref_divisive(x, axes, r_a, r_b, sigma, edges="mean", summation=True):
    v = x - ref_window_mean(x, axes, r_a, edges) if summation else x
    return v / np.sqrt(sigma**2 + ref_window_mean(v * v, axes, r_b, edges)), np.mean(np.abs(v))


@pytest.mark.parametrize(
    "shape,axis,radius,supp,edges",
    [
        ((3, 11), -1, 2, ..., "mean"),
        ((3, 11), -1, 3, 1, "zero"),
        ((2, 5, 7), (1, 2), (1, 2), (2, None), "mean"),
        ((2, 5, 7), (1, 2), (1, 0), ..., "zero"),
        ((4, 6), -1, 20, ..., "mean"),  # a window wider than the layer
    ],
)
def test_divisive_norm_matches_reference(shape, axis, radius, supp, edges):
    x = _rand(shape, loc=3.0)
    axes = list(lnjax._checks.axes(axis, x.ndim))
    per_axis = lambda r: list(r) if isinstance(r, tuple) else [r] * len(axes)  # noqa: E731
    r_a = per_axis(radius)
    r_b = r_a if supp is ... else per_axis(supp)
    y, l1 = _jit(lnjax.divisive_norm, x, radius=radius, suppression_radius=supp, sigma=0.5, axis=axis,
                                edges=edges, return_l1=True)  # fmt: skip
    want, want_l1 = ref_divisive(x, axes, r_a, r_b, 0.5, edges)
    _close(y, want)
    _close(l1, want_l1)


def test_divisive_norm_special_cases():
    x = jnp.asarray(_rand((4, 3, 8), loc=1.0))
    scale, bias = jnp.asarray(_rand((8,), 1)), jnp.asarray(_rand((8,), 2))
    dn = lnjax.divisive_norm

    @jax.jit  # one compilation for all the cases
    def pairs(x):
        bn, _ = lnjax.batch_norm(x, None, None, _f64_state((3, 8)), training=True, axis=(1, 2), eps=0.04)
        return [
            # the whole layer as both fields, sigma^2 = eps: layer norm (sigma 0: eps 0)
            (dn(x, radius=None, sigma=0.0), lnjax.layer_norm(x, eps=0.0)),
            (dn(x, radius=None, sigma=0.1, axis=(1, 2)), lnjax.layer_norm(x, axis=(1, 2), eps=0.01)),
            # a radius covering the layer is the whole layer too (edges="mean")
            (dn(x, radius=7, sigma=0.0), lnjax.layer_norm(x, eps=0.0)),
            # no summation field: RMS norm
            (dn(x, radius=None, sigma=0.1, summation=False), lnjax.rms_norm(x, eps=0.01)),
            # the batch variant: A, B over the batch axis are BN's training statistics
            (dn(x, radius=None, sigma=0.2, axis=0), bn),
            (dn(x, scale, bias, radius=2), dn(x, radius=2) * scale[None, None] + bias[None, None]),
        ]

    for got, want in pairs(x):
        _close(got, want)


def test_divisive_norm_large_mean_float32():
    x64 = _rand((2, 64), 4, loc=1e4, scale=1e-2)
    y = _jit(lnjax.divisive_norm, jnp.asarray(x64, jnp.float32), radius=5, sigma=0.0)
    want, _ = ref_divisive(np.asarray(jnp.asarray(x64, jnp.float32), np.float64), [1], [5], [5], 0.0)
    np.testing.assert_allclose(y, want, atol=5e-3)


# --- graph normalizations -----------------------------------------------------------------------

IDS = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3])  # graph 2 is empty
NUM_GRAPHS = 4
EDGES = np.array([[0, 1, 2, 2, 3, 5, 6, 7, 8, 8],
                  [1, 2, 0, 1, 4, 6, 7, 8, 5, 8]])  # fmt: skip  (node 3 has no in-edge; 8 a loop)


def ref_node(x, eps):
    return (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps)


def ref_adjacency(x, edges, eps):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        rows = [x[i]] + [x[s] for s, r in edges.T if r == i]
        pool = np.stack(rows)
        out[i] = (x[i] - pool.mean()) / np.sqrt(pool.var() + eps)
    return out


def ref_graph(x, ids, eps):
    out = np.empty_like(x)
    for g in np.unique(ids):
        nodes = x[ids == g]
        out[ids == g] = (nodes - nodes.mean(0)) / np.sqrt(nodes.var(0) + eps)
    return out


def ref_batch(x, eps):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def _graph_inputs(seed=0, nf=5):
    return _rand((IDS.size, nf), seed, loc=1.0), jnp.asarray(IDS), jnp.asarray(EDGES)


def test_graph_single_norms_match_reference():
    x, ids, edges = _graph_inputs()
    scale, bias = _rand((5,), 1, loc=1.0), _rand((5,), 2)
    eps = 1e-3

    @jax.jit
    def ops(x):
        kw = dict(segment_ids=ids, num_segments=NUM_GRAPHS, eps=eps)
        return (lnjax.graph_node_norm(x, scale, bias, eps=eps),
                lnjax.graph_adjacency_norm(x, scale, bias, edges=edges, eps=eps),
                lnjax.graph_norm(x, scale, bias, **kw),
                lnjax.graph_norm(x, scale, bias, **kw, indices_are_sorted=True),
                lnjax.graph_batch_norm(x, scale, bias, _f64_state(5), training=True, eps=eps))  # fmt: skip

    node, adj, graph, graph_sorted, (batch, st) = ops(x)
    _close(node, ref_node(x, eps) * scale + bias)
    _close(adj, ref_adjacency(x, EDGES, eps) * scale + bias)
    _close(graph, ref_graph(x, IDS, eps) * scale + bias)
    _close(graph_sorted, ref_graph(x, IDS, eps) * scale + bias)
    _close(batch, ref_batch(x, eps) * scale + bias)
    _close(st.mean, 0.01 * x.mean(0))


def test_graph_learned_norm_weights():
    x, ids, edges = _graph_inputs(3)
    scale, bias = _rand((5,), 1, loc=1.0), _rand((5,), 2)
    st = _f64_state(5)
    kw = dict(segment_ids=ids, num_segments=NUM_GRAPHS, edges=edges, training=True, eps=1e-4)
    mix = {w: jax.jit(lambda lam, w=w: lnjax.graph_learned_norm(x, scale, bias, lam, st, weighting=w, **kw))
           for w in ("softmax", "sum")}  # fmt: skip
    refs = [ref_node(x, 1e-4), ref_adjacency(x, EDGES, 1e-4), ref_graph(x, IDS, 1e-4),
            ref_batch(x, 1e-4)]  # fmt: skip
    for k in range(4):  # one-hot weights: each single normalization, for both weightings
        onehot = np.where(np.arange(4)[:, None] == k, 0.0, -np.inf) * np.ones((1, 5))
        _close(mix["softmax"](jnp.asarray(onehot))[0], refs[k] * scale + bias)
        _close(mix["sum"](jnp.asarray(np.isfinite(onehot) * 1.0))[0], refs[k] * scale + bias)
    # random per-feature weights, normalized over the kinds by softmax or by their sum
    w = _rand((4, 5), 7)
    y, new = mix["softmax"](jnp.asarray(w))
    lam = _softmax(w, axis=0)
    _close(y, sum(lam[k] * refs[k] for k in range(4)) * scale + bias)
    _close(new.var, 0.99 + 0.01 * x.var(0) * 9 / 8)
    w = np.abs(w) + 0.1
    lam = w / w.sum(0)
    _close(mix["sum"](jnp.asarray(w))[0], sum(lam[k] * refs[k] for k in range(4)) * scale + bias)
    # initial weights are equal after normalization
    for weighting in ("softmax", "sum"):
        w0 = lnjax.graph_learned_weights(5, weighting=weighting, dtype=jnp.float64)
        _close(mix[weighting](w0)[0], sum(refs) / 4 * scale + bias)
    # a subset of kinds needs only its own inputs; no "batch": no state
    y, none = _jit(lnjax.graph_learned_norm, x, None, None, jnp.zeros((2, 5)), None,
                   kinds=("node", "graph"), segment_ids=ids, num_segments=NUM_GRAPHS,
                   training=False)  # fmt: skip
    assert none is None
    _close(y, 0.5 * (ref_node(x, 1e-5) + ref_graph(x, IDS, 1e-5)))


def test_graph_norm_edge_cases_give_no_nan():
    x, ids, edges = _graph_inputs(5)
    # one-node graphs: variance 0, output `bias`; the empty graph 2 gives no NaN, also in grads
    one = jnp.asarray([0, 1, 1, 1, 1, 1, 1, 1, 1])
    bias = jnp.asarray(_rand((5,), 2))
    y = _jit(lnjax.graph_norm, x, None, bias, segment_ids=one, num_segments=NUM_GRAPHS)
    _close(y[0], np.asarray(bias))

    def loss(x):
        y = lnjax.graph_norm(x, None, None, segment_ids=ids, num_segments=NUM_GRAPHS)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(lnjax.graph_adjacency_norm(x, edges=edges)))

    g = jax.jit(jax.grad(loss))(jnp.asarray(x))
    assert np.all(np.isfinite(g))
    # under jit (ids and edges traced, so unchecked): an out-of-range edge makes every output
    # NaN (its node is unknown), nodes with an out-of-range graph id get NaN
    adj = jax.jit(lambda x, e: lnjax.graph_adjacency_norm(x, edges=e))
    _close(adj(x, edges), ref_adjacency(x, EDGES, 1e-5))
    for bad in ([[99], [1]], [[0], [-1]]):
        assert np.all(np.isnan(adj(x, jnp.concatenate([edges, jnp.asarray(bad)], axis=1))))
    gn = jax.jit(lambda x, i: lnjax.graph_norm(x, segment_ids=i, num_segments=NUM_GRAPHS))
    bad_ids = ids.at[0].set(7)
    y = np.asarray(gn(x, bad_ids))
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1:]))
    keep = np.arange(IDS.size) > 0
    _close(y[1:], ref_graph(x[keep], IDS[keep], 1e-5))


def test_graph_errors():
    x, ids, edges = _graph_inputs()
    with pytest.raises(ValueError, match=r"`segment_ids` has 1 ids outside \[0, num_segments=4\)"):
        _jit(lnjax.graph_norm, x, segment_ids=ids.at[2].set(4), num_segments=4)
    with pytest.raises(ValueError, match="not sorted.*indices_are_sorted=True"):
        _jit(lnjax.graph_norm, x, segment_ids=ids[::-1], num_segments=4, indices_are_sorted=True)
    _jit(lnjax.graph_norm, x, segment_ids=ids[::-1], num_segments=4)  # unsorted is fine otherwise
    with pytest.raises(ValueError, match=r"`segment_ids` has shape \(3,\), expected \(9,\)"):
        _jit(lnjax.graph_norm, x, segment_ids=ids[:3], num_segments=4)
    with pytest.raises(TypeError, match="`segment_ids` must be integers"):
        _jit(lnjax.graph_norm, x, segment_ids=ids.astype(jnp.float32), num_segments=4)
    with pytest.raises(ValueError, match="num_segments"):
        _jit(lnjax.graph_norm, x, segment_ids=ids, num_segments=0)
    with pytest.raises(ValueError, match=r"outside \[0, num_nodes=9\), e.g. edge 10: \(9, 0\)"):
        _jit(lnjax.graph_adjacency_norm, x, edges=jnp.concatenate([edges, jnp.asarray([[9], [0]])], 1))
    with pytest.raises(ValueError, match=r"`edges` has shape \(10, 2\), expected \(2, num_edges\)"):
        _jit(lnjax.graph_adjacency_norm, x, edges=edges.T)
    with pytest.raises(ValueError, match=r"node features \[num_nodes, features\], got shape \(2, 9, 5\)"):
        _jit(lnjax.graph_node_norm, jnp.stack([x, x]))
    with pytest.raises(ValueError, match="needs `edges`"):
        _jit(lnjax.graph_learned_norm, x, None, None, jnp.zeros((4, 5)), _f64_state(5), training=True,
                                 segment_ids=ids, num_segments=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"`weights` has shape \(4, 5\), expected \(2, 5\)"):
        _jit(lnjax.graph_learned_norm, x, None, None, jnp.zeros((4, 5)), None, training=True,
                                 kinds=("node", "graph"), segment_ids=ids, num_segments=4)  # fmt: skip
    with pytest.raises(ValueError, match="`kinds` must be distinct names"):
        lnjax.graph_learned_weights(5, kinds=("node", "node"))
    with pytest.raises(ValueError, match='`weighting` must be "softmax" or "sum"'):
        lnjax.graph_learned_weights(5, weighting="abs")
    with pytest.raises(ValueError, match="`state` must be None"):
        _jit(lnjax.graph_learned_norm, x, None, None, jnp.zeros((1, 5)), _f64_state(5), training=True,
                                 kinds="node")  # fmt: skip


# --- domain-agnostic batch normalization --------------------------------------------------------


def test_domain_agnostic_all_source_is_batch_norm():
    x = jnp.asarray(_rand((6, 3, 4), loc=1.0))
    scale, bias = jnp.asarray(_rand((4,), 1)), jnp.asarray(_rand((4,), 2))
    st = _f64_state(4)

    @jax.jit
    def pairs(x):
        out = []
        for training in (True, False):
            kw = dict(training=training, momentum=0.9)
            y, s = lnjax.domain_agnostic_batch_norm(x, scale, bias, st, source_mask=jnp.ones(6, bool), **kw)
            # Bitwise against batch norm's XLA path, which computes the same formula (its native
            # kernel, the default on CPU, sums in another order).
            want, ws = lnjax.batch_norm(x, scale, bias, st, implementation="xla", **kw)
            out += [(y, want), (s.mean, ws.mean), (s.var, ws.var)]
        return out

    for got, want in pairs(x):
        _close(got, want, 0)


def test_domain_agnostic_uses_source_statistics_only():
    x = _rand((6, 3, 4), loc=1.0)
    src = np.array([True, False, True, True, False, True])
    y, s = _jit(lnjax.domain_agnostic_batch_norm, x, None, None, _f64_state(4), source_mask=jnp.asarray(src),
                                            training=True, momentum=0.5, axis=-1)  # fmt: skip
    xs = x[src].reshape(-1, 4)
    _close(y, (x - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5))
    _close(s.mean, 0.5 * xs.mean(0))
    _close(s.var, 0.5 + 0.5 * xs.var(0) * 12 / 11)
    # target inputs reach no statistic: d y / d x_target is only the direct, diagonal term
    jac = jax.jacobian(lambda x: _jit(lnjax.domain_agnostic_batch_norm,
        x, None, None, _f64_state(4), source_mask=jnp.asarray(src), training=True)[0])(jnp.asarray(x))  # fmt: skip
    jac = np.asarray(jac).reshape(x.size, x.size)
    tgt = np.broadcast_to(~src[:, None, None], x.shape).ravel()
    inv = 1 / np.sqrt(xs.var(0) + 1e-5)
    np.testing.assert_allclose(jac[:, tgt], np.diag(np.tile(inv, x.size // 4))[:, tgt], atol=1e-12)
    assert np.abs(jac[np.ix_(tgt, ~tgt)]).max() > 1e-3  # ... while source inputs do
    # a batch without source examples leaves the running statistics alone
    st = lnjax.batch_norm_state(4)
    _, same = _jit(lnjax.domain_agnostic_batch_norm, x.astype(np.float32), None, None, st,
                                               source_mask=jnp.zeros(6, bool), training=True)  # fmt: skip
    _close(same.mean, np.zeros(4), 0)
    _close(same.var, np.ones(4), 0)


def test_domain_agnostic_errors():
    x = jnp.ones((4, 3))
    st = lnjax.batch_norm_state(3)
    with pytest.raises(ValueError, match=r"`source_mask` has shape \(3,\), expected \(4,\)"):
        _jit(lnjax.domain_agnostic_batch_norm, x, None, None, st, source_mask=jnp.ones(3, bool), training=True)
    with pytest.raises(TypeError, match="`source_mask` must be boolean"):
        _jit(lnjax.domain_agnostic_batch_norm, x, None, None, st, source_mask=jnp.ones(4), training=True)
    with pytest.raises(ValueError, match="includes the batch axis 0"):
        _jit(lnjax.domain_agnostic_batch_norm, x, None, None, st, source_mask=jnp.ones(4, bool),
                                         training=True, axis=0)  # fmt: skip


# --- proxy normalization ------------------------------------------------------------------------


def ref_quantiles(n):
    return np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])


def ref_proxy(y, gamma, beta, g_t, b_t, act, eps, n, axis=-1):
    yc = np.moveaxis(y, axis, -1)
    q = ref_quantiles(n)[:, None]
    proxy = act(gamma * (b_t + (1 + g_t) * q) + beta)  # [n, channels]
    out = (act(gamma * yc + beta) - proxy.mean(0)) / np.sqrt(proxy.var(0) + eps)
    return np.moveaxis(out, -1, axis)


ACTS = {"relu": (jax.nn.relu, lambda a: np.maximum(a, 0)),
        "swish": (jax.nn.swish, lambda a: a / (1 + np.exp(-a)))}  # fmt: skip


@pytest.mark.parametrize("act,axis", [("relu", -1), ("swish", 1)])
def test_proxy_norm_matches_reference(act, axis):
    y = _rand((3, 4, 5), loc=0.2)
    c = y.shape[axis]
    p = [_rand((c,), 1, loc=1.0, scale=0.3), _rand((c,), 2, scale=0.3), _rand((c,), 3, scale=0.2),
         _rand((c,), 4, scale=0.2)]  # fmt: skip
    jact, nact = ACTS[act]
    got = _jit(lnjax.proxy_norm, y, *p, activation=jact, axis=axis, num_samples=50)
    _close(got, ref_proxy(y, *p, nact, 0.03, 50, axis))
    q = np.asarray(lnjax.proxy_quantiles(7, jnp.float64))
    _close([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in q], (np.arange(7) + 0.5) / 7, 1e-14)
    # defaults: scale 1, bias 0, proxy 0; 200 points, eps 0.03
    _close(_jit(lnjax.proxy_norm, y, activation=jact, axis=axis),
           ref_proxy(y, 1.0, 0.0, 0.0, 0.0, nact, 0.03, 200, axis))  # fmt: skip


def test_proxy_norm_normalizes_the_proxy_itself():
    # fed with the proxy's own points, the output has mean 0 and variance var / (var + eps)
    q = lnjax.proxy_quantiles(64, jnp.float64)
    y = jnp.stack([q, 2 * q + 1], axis=-1)  # channel 1's proxy: beta~ = 1, gamma~ = 1
    out = _jit(lnjax.proxy_norm, y, None, None, jnp.asarray([0.0, 1.0]), jnp.asarray([0.0, 1.0]),
                           num_samples=64, eps=0.0)  # fmt: skip
    _close(np.mean(out, 0), np.zeros(2))
    _close(np.var(out, 0), np.ones(2))


# --- gradients, precision, transformations, errors ----------------------------------------------


def _ops():
    """(name, f(x, p) -> y, x, p): each op with its differentiable parameters."""
    x4 = jnp.asarray(_rand((2, 3, 2, 3), 1, loc=0.5))
    x2 = jnp.asarray(_rand((IDS.size, 3), 2))
    c3 = jnp.asarray(_rand((3,), 3, loc=1.0))
    st = _f64_state(3)
    ids, edges = jnp.asarray(IDS), jnp.asarray(EDGES)
    ctrl = (jnp.asarray([0.1, -0.2, 0.3]), jnp.asarray([0.2, 0.0, -0.1]))
    return [
        ("switchable", lambda x, p: lnjax.switchable_norm(
            x, p[0], None, lnjax.SwitchableControl(*p[1:]), st, training=True)[0], x4, (c3, *ctrl)),
        ("batch_layer", lambda x, p: lnjax.batch_layer_norm(
            x, p[0], None, _f64_state((3, 2, 3)), training=True)[0], x4, (c3,)),
        ("divisive", lambda x, p: lnjax.divisive_norm(x, p[0], radius=1, axis=-1), x4, (c3,)),
        ("adjacency", lambda x, p: lnjax.graph_adjacency_norm(x, p[0], edges=edges), x2, (c3,)),
        ("graph", lambda x, p: lnjax.graph_norm(x, p[0], segment_ids=ids, num_segments=4), x2, (c3,)),
        ("learned", lambda x, p: lnjax.graph_learned_norm(
            x, p[0], None, p[1], st, training=True, segment_ids=ids, num_segments=4,
            edges=edges)[0], x2, (c3, jnp.asarray(_rand((4, 3), 4)))),
        ("domain_agnostic", lambda x, p: lnjax.domain_agnostic_batch_norm(
            x, p[0], None, st, source_mask=jnp.asarray([True, False]), training=True)[0], x4, (c3,)),
        ("proxy", lambda x, p: lnjax.proxy_norm(x, *p, activation=jax.nn.swish, num_samples=16),
         x4, (c3, c3 - 1, 0.1 * c3, -0.1 * c3)),
    ]  # fmt: skip


@pytest.mark.parametrize("name,f,x,p", _ops(), ids=[o[0] for o in _ops()])
def test_gradients(name, f, x, p):
    order = 2 if name == "domain_agnostic" else 1
    check_grads(jax.jit(f), (x, p), order=order, modes=["rev"], atol=1e-5, rtol=1e-5)


LOW = [o for o in _ops() if o[0] != "learned"]  # the learned mix: its parts are here


@pytest.mark.parametrize("name,f,x,p", LOW, ids=[o[0] for o in LOW])
def test_low_precision(name, f, x, p):
    # bf16 input: bf16 output, equal to the float32 computation rounded once (statistics in f32)
    xb = x.astype(jnp.bfloat16)
    pf = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    y = jax.jit(f)(xb, pf)
    assert y.dtype == jnp.bfloat16
    want = jax.jit(f)(xb.astype(jnp.float32), pf)
    assert want.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_vmap():
    x = jnp.asarray(_rand((3, 4, 6), 5))
    dn = jax.vmap(lambda x: _jit(lnjax.divisive_norm, x, radius=1))(x)
    _close(dn, np.stack([_jit(lnjax.divisive_norm, x[i], radius=1) for i in range(3)]))
    gn = jax.vmap(lambda x: _jit(lnjax.graph_norm, x, segment_ids=jnp.asarray([0, 0, 1, 1]), num_segments=2))(x)
    _close(gn, np.stack([ref_graph(np.asarray(x[i]), np.array([0, 0, 1, 1]), 1e-5) for i in range(3)]))
    pn = jax.vmap(lambda y: _jit(lnjax.proxy_norm, y, num_samples=8))(x)
    _close(pn, _jit(lnjax.proxy_norm, x, num_samples=8))
    # batch statistics synchronized over a vmapped batch axis
    x2 = x.reshape(12, 6)
    sn = jax.vmap(lambda x: _jit(lnjax.batch_layer_norm, x[None], None, None, _f64_state((6,)), training=True,
                                                   axis_name="b", batch_size=12)[0][0],
                  axis_name="b")(x2)  # fmt: skip
    _close(sn, _jit(lnjax.batch_layer_norm, x2, None, None, _f64_state((6,)), training=True)[0])


def test_argument_errors():
    x4, st = jnp.ones((2, 3, 3, 4)), lnjax.batch_norm_state(4)
    ctrl = lnjax.switchable_control()
    with pytest.raises(ValueError, match="at least one spatial axis, got shape"):
        _jit(lnjax.switchable_norm, jnp.ones((2, 4)), None, None, ctrl, st, training=True)
    with pytest.raises(ValueError, match="is the batch axis 0"):
        _jit(lnjax.switchable_norm, x4, None, None, ctrl, lnjax.batch_norm_state(2), training=True, axis=0)
    with pytest.raises(ValueError, match=r"`control.var_logits` has shape \(2,\), expected \(3,\)"):
        _jit(lnjax.switchable_norm, x4, None, None, ctrl._replace(var_logits=jnp.zeros(2)), st, training=True)
    with pytest.raises(TypeError, match="`control` must be a SwitchableControl"):
        _jit(lnjax.switchable_norm, x4, None, None, jnp.zeros((2, 3)), st, training=True)
    with pytest.raises(ValueError, match=r"`state.mean` has shape \(3,\), expected \(4,\)"):
        _jit(lnjax.switchable_norm, x4, None, None, ctrl, lnjax.batch_norm_state(3), training=True)
    with pytest.raises(TypeError, match="`training` must be a Python bool"):
        _jit(lnjax.switchable_norm, x4, None, None, ctrl, st, training=1)
    with pytest.raises(ValueError, match=r"`scale` has shape \(3,\), expected \(4,\)"):
        _jit(lnjax.switchable_norm, x4, jnp.ones(3), None, ctrl, st, training=True)
    with pytest.raises(ValueError, match=r"`state.mean` has shape \(4,\), expected \(3, 3, 4\)"):
        _jit(lnjax.batch_layer_norm, x4, None, None, st, training=True)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        _jit(lnjax.batch_layer_norm, x4, None, None, lnjax.batch_layer_norm_state((3, 3, 4)),
                               training=True, batch_size=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"`radius` must be None or an int >= 0 \(per axis\), got -1"):
        _jit(lnjax.divisive_norm, x4, radius=-1)
    with pytest.raises(ValueError, match="has 2 entries but `axis` names 1 axes"):
        _jit(lnjax.divisive_norm, x4, radius=(1, 2))
    with pytest.raises(ValueError, match=r"`sigma` must be >= 0, got -1.0"):
        _jit(lnjax.divisive_norm, x4, radius=1, sigma=-1.0)
    with pytest.raises(ValueError, match='`edges` must be "mean" or "zero"'):
        _jit(lnjax.divisive_norm, x4, radius=1, edges="reflect")
    with pytest.raises(TypeError, match="`x` must be a real floating-point array"):
        _jit(lnjax.divisive_norm, jnp.ones((2, 3), jnp.int32), radius=1)
    with pytest.raises(ValueError, match=r"`proxy_scale` has shape \(3,\), expected \(4,\)"):
        _jit(lnjax.proxy_norm, x4, proxy_scale=jnp.zeros(3))
    with pytest.raises(TypeError, match="`activation` must be a callable"):
        _jit(lnjax.proxy_norm, x4, activation="relu")
    with pytest.raises(ValueError, match="`num_samples` must be a positive int"):
        _jit(lnjax.proxy_norm, x4, num_samples=0)
