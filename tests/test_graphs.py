"""Tests of the graph experiment: the "denser colour" graphs (experiments/data.py), their
fixed-shape batching and its padding invariants and the GIN classifier with every graph
normalization (experiments/models.py), and its config trained by `experiments.train`.

The model and training code run under JAX's defaults (float32, standard promotion) while
tests/conftest.py turns on x64 and strict promotion, so they run inside `jax_defaults`, the
fixture pattern of tests/test_experiments.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax
from configs import gin_graphs
from experiments import data as data_lib
from experiments import models, tasks, train
from lnjax import norms

GRAPH_NORMS = ("none", "graph_node", "graph_adjacency", "graph", "graph_batch", "graph_learned")
FORWARD_NORMS = ("none", "graph_node", "graph_adjacency", "graph")  # no cross-graph statistics


@pytest.fixture
def jax_defaults():
    """JAX's default numerics (no x64, standard promotion), as the training code expects."""
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(scope="module")
def data():
    return data_lib.colour_graphs(40, seed=7)


def _edges(graphs, i):
    e = graphs.edges[i]
    return e[:, e[0] >= 0]


def _counts(graphs, labels, i):
    n = graphs.num_nodes[i]
    red = graphs.nodes[i, :n, 0].astype(bool)
    s, r = _edges(graphs, i)
    return n, red, s, r, int(np.sum(red[s] & red[r]) // 2), int(np.sum(~red[s] & ~red[r]) // 2)


def _pack(graphs, indices, *, max_nodes, max_edges, max_graphs):
    """A NumPy reference of another layout than `graph_batch`'s: the graphs `indices` packed
    contiguously into `max_nodes` node and `max_edges` edge slots and `max_graphs` graph slots,
    then padding, as a `GraphBatch` (with the same conventions: dummy segment `max_graphs`,
    padding edges on the last node)."""
    nodes = np.zeros((max_nodes, graphs.nodes.shape[2]), np.float32)
    seg = np.full((max_nodes,), max_graphs, np.int32)
    edges = np.full((2, max_edges), max_nodes - 1, np.int32)
    n0 = e0 = 0
    for g, i in enumerate(indices):
        n, e = graphs.num_nodes[i], _edges(graphs, i)
        nodes[n0:n0 + n], seg[n0:n0 + n] = graphs.nodes[i, :n], g
        edges[:, e0:e0 + e.shape[1]] = e + n0
        n0, e0 = n0 + n, e0 + e.shape[1]
    assert n0 < max_nodes and e0 <= max_edges
    return models.GraphBatch(nodes, edges, seg, seg < max_graphs, np.arange(max_graphs) < len(indices))


def _garbage_padding(batch, seed=0):
    """The batch with random features on its padding nodes (must not change any real output)."""
    noise = np.random.default_rng(seed).normal(size=batch.nodes.shape).astype(np.float32) * 100
    pad = ~np.asarray(batch.node_mask)
    return batch._replace(nodes=np.where(pad[:, None], noise, np.asarray(batch.nodes)))


def _subset(graphs, idx):
    return jax.tree.map(lambda a: a[np.asarray(idx)], graphs)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def test_dataset_is_deterministic(data):
    again = data_lib.colour_graphs(40, seed=7)
    for a, b in zip(jax.tree.leaves(data), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    other, _ = data_lib.colour_graphs(40, seed=8)
    assert not np.array_equal(other.nodes, data[0].nodes)
    ds = data_lib.colour_graph_data(0, num_train=30, num_test=20)
    assert ds.x_train.edges.shape[1:] == ds.x_test.edges.shape[1:]  # one padding: same batch shapes
    assert not np.array_equal(ds.x_train.nodes[:20], ds.x_test.nodes)  # independent streams
    assert ds.num_classes == 2 and ds.y_train.shape == (30,) and ds.y_test.shape == (20,)


def test_dataset_definition_and_balance(data):
    graphs, labels = data
    assert labels.sum() == 20  # exactly balanced
    ds = data_lib.colour_graph_data(0, num_train=300, num_test=101)
    assert ds.y_train.sum() == 150 and ds.y_test.sum() in (50, 51)
    assert graphs.nodes.dtype == np.float32 and labels.dtype == np.int32 and graphs.edges.dtype == np.int32
    for i in range(len(labels)):
        n, red, s, r, rr, bb = _counts(graphs, labels, i)
        assert n % 2 == 0 and 8 <= n <= 20
        assert red.sum() == n // 2  # same colours in every graph: features alone are at chance
        np.testing.assert_array_equal(graphs.nodes[i, :n, 1], 1 - graphs.nodes[i, :n, 0])
        assert not np.any(graphs.nodes[i, n:])  # padding rows are zero
        assert np.all(graphs.edges[i, :, s.size:] == -1)  # real edges first, then padding
        # Undirected, simple, both directions stored.
        assert np.all(s != r) and np.all((s >= 0) & (s < n) & (r >= 0) & (r < n))
        pairs = set(zip(s.tolist(), r.tolist()))
        assert len(pairs) == len(s) and all((b, a) in pairs for a, b in pairs)
        assert rr != bb and labels[i] == int(rr > bb)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_graphs": 0}, "num_graphs"),
    ({"num_graphs": 4, "min_nodes": 9, "max_nodes": 9}, "even"),
    ({"num_graphs": 4, "edge_prob": (0.5, 0.2)}, "edge_prob"),
    ({"num_graphs": 4, "noise_features": -1}, "noise_features"),
])  # fmt: skip
def test_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data_lib.colour_graphs(**kwargs)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_graph_batch_layout(data, jax_defaults):
    graphs, _ = data
    idx = [4, 2, 9]
    sub = _subset(graphs, idx)._replace(num_nodes=graphs.num_nodes[idx] * np.array([1, 1, 0]))  # an empty graph
    b = jax.jit(models.graph_batch)(sub)
    n_max, e_max = graphs.nodes.shape[1], graphs.edges.shape[2]
    assert b.nodes.shape == (3 * n_max + 1, 4) and b.edges.shape == (2, 3 * e_max)
    seg, mask = np.asarray(b.segment_ids), np.asarray(b.node_mask)
    assert np.bincount(seg, minlength=4)[:3].tolist() == [graphs.num_nodes[4], graphs.num_nodes[2], 0]
    np.testing.assert_array_equal(mask, seg < 3)
    assert seg[-1] == 3 and not mask[-1]
    np.testing.assert_array_equal(b.nodes[:graphs.num_nodes[4]], graphs.nodes[4, :graphs.num_nodes[4]])
    assert not np.any(np.asarray(b.nodes)[~mask])
    # Slot g's edges: the graph's own, shifted to its node slots, then padding edges from the
    # last node to itself.
    edges = np.asarray(b.edges)
    for g, i in enumerate(idx):
        own, cols = _edges(graphs, i), edges[:, g * e_max:(g + 1) * e_max]
        np.testing.assert_array_equal(cols[:, :own.shape[1]], own + g * n_max)
        assert np.all(cols[:, own.shape[1]:] == 3 * n_max)
    # The emptied graph's edges only join padding nodes; every other edge stays in its graph.
    assert not mask[edges[:, 2 * e_max:]].any()
    inside = mask[edges[0]]
    np.testing.assert_array_equal(seg[edges[0, inside]], seg[edges[1, inside]])
    np.testing.assert_array_equal(b.graph_mask, [True, True, True])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _model(norm, **kw):
    norm_args = {"momentum": 0.9} if norm in ("graph_batch", "graph_learned") else None
    model = models.gin((4, 16, 16), norm=norm, norm_args=kw.pop("norm_args", norm_args), **kw)
    params, state = model.init(jax.random.PRNGKey(0))
    return model, params, state


@pytest.mark.parametrize("norm", FORWARD_NORMS)
def test_padding_does_not_change_a_graphs_logits(data, norm, jax_defaults):
    """A graph's logits are the same batched with others and padding, or alone, for the norms
    without cross-graph statistics; padding nodes carry garbage features."""
    graphs, _ = data
    model, params, state = _model(norm)
    many, _ = model.apply(params, state, _subset(graphs, np.arange(12)), training=False)
    e_max = graphs.edges.shape[2]
    for max_nodes, max_edges, max_graphs in ((21, e_max, 1), (45, e_max + 50, 3)):
        for i in (0, 5, 11):
            alone = _garbage_padding(_pack(graphs, [i], max_nodes=max_nodes, max_edges=max_edges,
                                           max_graphs=max_graphs), i)  # fmt: skip
            one, _ = model.apply(params, state, alone, training=False)
            np.testing.assert_allclose(one[0], many[i], rtol=1e-5, atol=1e-5)
            assert np.all(np.isfinite(one))


@pytest.mark.parametrize("norm", ["graph_batch", "graph_learned"])
def test_batch_statistics_ignore_padding(data, norm, jax_defaults):
    graphs, _ = data
    model, params, state = _model(norm)
    idx = [1, 2, 3, 4, 6]
    n, m = int(graphs.num_nodes[idx].sum()), sum(_edges(graphs, i).shape[1] for i in idx)
    tight = _pack(graphs, idx, max_nodes=n + 1, max_edges=m, max_graphs=5)
    loose = _garbage_padding(_pack(graphs, idx, max_nodes=n + 64, max_edges=m + 99, max_graphs=8))
    ref, ref_state = model.apply(params, state, tight, training=True)
    out, new_state = model.apply(params, state, loose, training=True)
    np.testing.assert_allclose(out[:5], ref[:5], rtol=1e-5, atol=1e-5)
    slots, slot_state = model.apply(params, state, _subset(graphs, idx), training=True)
    np.testing.assert_allclose(slots, ref[:5], rtol=1e-5, atol=1e-5)
    for got in (new_state, slot_state):
        for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    # The running statistics did move (so the comparison above is not vacuous) ...
    assert not np.allclose(ref_state[0].mean, state[0].mean)
    # ... and equal an EMA of the statistics of the real nodes only.
    z = np.asarray(tight.nodes[:n], np.float64)
    h = z + np.asarray(jax.ops.segment_sum(z[tight.edges[0, :m]], tight.edges[1, :m], n))
    p = params["layers"][0]
    a = np.maximum(h @ p["mlp1"]["w"] + p["mlp1"]["b"], 0) @ p["mlp2"]["w"] + p["mlp2"]["b"]
    np.testing.assert_allclose(ref_state[0].mean, 0.1 * a.mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", GRAPH_NORMS)
def test_forward_backward_every_norm(data, norm, jax_defaults):
    graphs, labels = data
    model, params, state = _model(norm)
    x, y = _subset(graphs, np.arange(8)), labels[:8]

    @jax.jit
    def loss_fn(params, state):
        logits, new_state = model.apply(params, state, x, training=True)
        return tasks.classification_loss(logits, y)[0], (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
    assert logits.shape == (8, 2) and logits.dtype == jnp.float32 and np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads["head"]))
    assert np.any(grads["layers"][0]["mlp1"]["w"] != 0)  # gradient reaches the first layer
    if norm == "graph_learned":
        assert np.any(grads["layers"][0]["norm"]["weights"] != 0)
    if norm in ("graph_batch", "graph_learned"):
        assert isinstance(new_state[0], lnjax.BatchNormState)
        _, eval_state = model.apply(params, state, x, training=False)
        assert np.array_equal(eval_state[0].mean, state[0].mean)
    else:
        assert new_state == [None, None]


def test_config_builds_the_registrys_normalizers_with_the_experiments_momentum():
    """configs/gin_graphs.py: every graph norm is the lnjax.norms normalizer of that name, the
    stateful ones with configs/base.py's batch momentum; `norm_args` reach them all."""
    cfg = gin_graphs.get_config()
    for norm in GRAPH_NORMS[1:]:
        cfg.model.norm = norm
        momentum = {"momentum": 0.9} if norm in ("graph_batch", "graph_learned") else {}
        assert tasks.norm_options(cfg.model) == momentum
        cfg.model.norm_args.eps = 1e-3
        assert tasks.norm_options(cfg.model) == {**momentum, "eps": 1e-3}
        assert models.normalizer(norm, tasks.norm_options(cfg.model)) is norms.get(norm, eps=1e-3, **momentum)
        cfg.model.norm_args.eps = None
    cfg.model.norm, cfg.model.norm_args.momentum = "graph", 0.5
    with pytest.raises(ValueError, match="`momentum` is not an option"):
        tasks.build_task(cfg)


def test_bad_arguments(data, jax_defaults):
    with pytest.raises(ValueError, match="`norm`"):
        models.gin((4, 8), norm="bogus")
    with pytest.raises(ValueError, match="readout"):
        models.gin((4, 8), readout="max")
    cfg = gin_graphs.get_config()
    cfg.model.kind = "mlp"
    with pytest.raises(ValueError, match="needs `model.kind`='gin'"):
        tasks.build_task(cfg)


# --------------------------------------------------------------------------------------------
# Training (experiments.train: resume, sweeps and metrics as every experiment)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_graph_norm_training_beats_chance(tmp_path, jax_defaults):
    """Two seeds of graph-norm training as one sweep: both clearly above chance (0.5) on the
    test split. Measured after 300 steps on 600 graphs: at least 0.8 over seeds 0-7; without
    edges (no message passing) the task stays at chance."""
    cfg = gin_graphs.get_config()
    cfg.task.train_size, cfg.task.test_size = 600, 400
    cfg.num_steps, cfg.checkpoint_every, cfg.sweep.seed = 300, 300, (0, 1)
    _, rows, members = train.fit(cfg, tmp_path, progress=False)
    final = [r for r in rows if r["step"] == 300]
    assert len(final) == 2 and all(r["diverged_at"] == -1 for r in final)
    assert max(r["test_error"] for r in final) < 0.25, final
