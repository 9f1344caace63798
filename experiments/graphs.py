"""Graph classification with lnjax's graph normalizations (Chen et al. 2020): data, model, training.

Task ("denser colour"). Every graph has an even number `n` of nodes, uniform in
`[min_nodes, max_nodes]`; exactly `n / 2` are red and `n / 2` blue, at random positions. Edges
are Erdos-Renyi, each of the `n (n - 1) / 2` pairs independently with probability `p`, drawn per
graph uniformly from `edge_prob`. With `RR` and `BB` the numbers of red-red and blue-blue
edges, the label is

    label = 1 if RR > BB, 0 if RR < BB        (graphs with RR == BB are redrawn).

Node features are `[is_red, is_blue, noise_1, ..., noise_k]` with i.i.d. N(0, 1) noise, so they
do not reveal the label: every graph has the same multiset of colours (a model that ignores the
edges is at chance), and swapping the colours flips the label without changing the graph (a
model that ignores the colours is at chance). Message passing solves it: the sum over red nodes
of their number of red neighbours is `2 RR`. Classes are exactly balanced (each graph gets a
target label in a balanced random order; a graph drawn with the other label has its colours
swapped, which keeps the distribution of graphs), and everything is NumPy, seeded, offline.

Storage (`GraphDataset`): one row per graph, padded to `max_nodes` nodes and `max_edges`
directed edges (each undirected edge is stored in both directions; padding edges are -1).

Batches (`GraphBatch`), fixed shapes so a training loop compiles once:
  nodes `[N, F]`, edges `[2, E]` (senders, receivers), segment_ids `[N]` (the
  `jax.ops.segment_sum` convention), node_mask `[N]`, labels `[G]`, graph_mask `[G]`.
  * Real graphs have ids `0 .. G - 1`; padding nodes have id `G`, one extra *dummy segment*, so
    `graph_norm` runs with `num_segments = G + 1` and its statistics for a real graph never see
    padding. Padding nodes have zero features and `node_mask` False (left out of
    `graph_batch_norm`'s statistics and of the readout).
  * Padding edges point from the last node to itself; the last node is always a padding node
    (`N` exceeds the number of real nodes), so messages and `graph_adjacency_norm`'s
    neighbourhoods of real nodes never see padding.
  * Unused graph slots (`graph_mask` False) have no node: an empty segment, readout 0, masked
    out of the loss and metrics.
  `pack` builds such a batch from any list of graphs (NumPy, contiguous layout); `slot_batch`
  builds one inside `jit` from a gather of graph indices (every graph gets `max_nodes` node
  slots and `max_edges` edge slots, plus one final padding node).

Model (`make_model`): GIN-style message passing, per layer

    h <- relu(norm(MLP(h + sum_{j -> i} h_j))),   MLP = Dense -> relu -> Dense,

then a per-graph mean (or sum) readout over real nodes and a linear head to 2 logits. `norm` is
one of `NORMS`, each a normalizer of the `lnjax.norms` registry (`NORM_NAMES`): none, node
(`norms.graph_node`), adjacency (`norms.graph_adjacency`), graph (`norms.graph`), batch
(`norms.graph_batch`, running statistics in `state`), learned (`norms.graph_learned` over the
four kinds, softmax weights, running statistics in `state`); the stateful two get the
momentum of `GraphConfig`.

Training (`train_graph`, `compare`): Adam on the mean cross-entropy, batches of random training
graphs, the whole run one jitted `lax.scan` (vmapped over seeds in `compare`). Test accuracy is
measured in inference mode (running statistics for batch/learned). Training runs under JAX's
defaults (float32, standard promotion).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.models import Model
from lnjax import norms

__all__ = [
    "NORMS",
    "NORM_NAMES",
    "GraphBatch",
    "GraphConfig",
    "GraphDataset",
    "colour_graphs",
    "compare",
    "format_table",
    "graph_data",
    "make_model",
    "normalizer",
    "pack",
    "slot_batch",
    "train_graph",
]

# The experiment's names of the normalizations, and the lnjax.norms registry names they stand for.
NORM_NAMES = {"none": "none", "node": "graph_node", "adjacency": "graph_adjacency", "graph": "graph",
              "batch": "graph_batch", "learned": "graph_learned"}  # fmt: skip
NORMS = tuple(NORM_NAMES)
_RUNNING_STATISTICS = ("batch", "learned")  # the normalizations that take a `momentum`
# What each needs of a batch at `apply`: the edges (neighbourhoods), the graph of each node
# (graph-wise statistics) and the node mask (batch statistics over the real nodes only).
_CONTEXT = {"none": (), "node": (), "adjacency": ("edges",), "graph": ("segment_ids", "num_segments"),
            "batch": ("node_mask",), "learned": ("segment_ids", "num_segments", "edges", "node_mask")}  # fmt: skip


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")


def normalizer(norm, options=None, *, momentum=0.9) -> norms.Normalizer | None:
    """The `lnjax.norms` normalizer `norm` (one of `NORMS`) stands for, built with the factory
    options `options` (a dict) and, for those with running statistics, `momentum` (unless
    `options` sets it); None for "none"."""
    _check_norm(norm)
    options = dict(options or {})
    if norm in _RUNNING_STATISTICS:
        options = {"momentum": momentum, **options}
    return norms.get(NORM_NAMES[norm], **options)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class GraphDataset(NamedTuple):
    """Graphs padded to a common size, one row per graph (NumPy or JAX arrays).

    Attributes:
      nodes: float32 `[num_graphs, max_nodes, F]`, zero beyond a graph's `num_nodes`.
      num_nodes: int32 `[num_graphs]`.
      edges: int32 `[num_graphs, 2, max_edges]`, local (sender, receiver) node indices, both
        directions of every undirected edge; -1 for padding.
      num_edges: int32 `[num_graphs]`, directed edges (twice the undirected ones).
      labels: int32 `[num_graphs]`.
    """

    nodes: np.ndarray
    num_nodes: np.ndarray
    edges: np.ndarray
    num_edges: np.ndarray
    labels: np.ndarray


class GraphBatch(NamedTuple):
    """A fixed-shape batch of graphs; see the module docstring for the padding convention."""

    nodes: jax.Array  # [N, F]
    edges: jax.Array  # [2, E] int32 (senders, receivers)
    segment_ids: jax.Array  # [N] int32: graph of each node, G for padding nodes
    node_mask: jax.Array  # [N] bool
    labels: jax.Array  # [G] int32
    graph_mask: jax.Array  # [G] bool

    @property
    def num_graphs(self) -> int:
        return self.labels.shape[0]


def _colour_graph(rng, n, p_range):
    """One graph: colours (1 = red) and an upper-triangular edge list with RR != BB."""
    colour = rng.permutation(np.repeat(np.array([1, 0], np.int8), n // 2))
    iu, ju = np.triu_indices(n, k=1)
    while True:
        p = rng.uniform(*p_range)
        keep = rng.random(iu.size) < p
        s, r = iu[keep], ju[keep]
        rr = int(np.sum((colour[s] == 1) & (colour[r] == 1)))
        bb = int(np.sum((colour[s] == 0) & (colour[r] == 0)))
        if rr != bb:
            return colour, s, r, int(rr > bb)


def colour_graphs(num_graphs, *, seed=0, min_nodes=8, max_nodes=20, edge_prob=(0.15, 0.35),
                  noise_features=2) -> GraphDataset:  # fmt: skip
    """The "denser colour" dataset (module docstring): label 1 iff red-red edges > blue-blue.

    Args:
      num_graphs: number of graphs; labels are balanced (exactly, for an even number).
      seed: int seed (or a sequence of ints) of `np.random.default_rng`.
      min_nodes, max_nodes: node counts are the even numbers in `[min_nodes, max_nodes]`, uniform.
      edge_prob: `(low, high)`, the range of the per-graph edge probability.
      noise_features: number of N(0, 1) node features besides the two colour indicators.

    Returns:
      A `GraphDataset` padded to `max_nodes` (rounded down to even) nodes and to the largest
      number of directed edges drawn.
    """
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 1:
        raise ValueError(f"`num_graphs` must be a positive int, got {num_graphs!r}.")
    sizes = [n for n in range(min_nodes, max_nodes + 1) if n % 2 == 0 and n >= 2]
    if not sizes:
        raise ValueError(
            f"[min_nodes, max_nodes] = [{min_nodes}, {max_nodes}] holds no even size >= 2."
        )
    lo, hi = edge_prob
    if not 0 < lo <= hi <= 1:
        raise ValueError(
            f"`edge_prob` must be (low, high) with 0 < low <= high <= 1, got {edge_prob!r}."
        )
    nf = noise_features
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 0:
        raise ValueError(f"`noise_features` must be an int >= 0, got {noise_features!r}.")

    rng = np.random.default_rng(seed)
    targets = rng.permutation(np.arange(num_graphs) % 2)
    n_max = sizes[-1]
    feats = 2 + noise_features
    graphs = []
    for t in targets:
        n = int(rng.choice(sizes))
        colour, s, r, label = _colour_graph(rng, n, (lo, hi))
        if label != t:  # swapping the colours swaps RR and BB
            colour = 1 - colour
        x = np.zeros((n, feats), np.float32)
        x[:, 0] = colour
        x[:, 1] = 1 - colour
        x[:, 2:] = rng.standard_normal((n, noise_features))
        e = np.stack([np.concatenate([s, r]), np.concatenate([r, s])]).astype(np.int32)
        graphs.append((x, e))
    e_max = max(1, max(e.shape[1] for _, e in graphs))
    nodes = np.zeros((num_graphs, n_max, feats), np.float32)
    edges = np.full((num_graphs, 2, e_max), -1, np.int32)
    num_nodes = np.zeros((num_graphs,), np.int32)
    num_edges = np.zeros((num_graphs,), np.int32)
    for i, (x, e) in enumerate(graphs):
        nodes[i, : len(x)] = x
        edges[i, :, : e.shape[1]] = e
        num_nodes[i], num_edges[i] = len(x), e.shape[1]
    return GraphDataset(nodes, num_nodes, edges, num_edges, targets.astype(np.int32))


def graph_data(seed=0, *, num_train=2000, num_test=1000, **kwargs):
    """`(train, test)` "denser colour" datasets from independent streams of `seed`."""
    train = colour_graphs(num_train, seed=(seed, 0), **kwargs)
    test = colour_graphs(num_test, seed=(seed, 1), **kwargs)
    # One edge padding for both, so that batches of either have the same shapes.
    e_max = max(train.edges.shape[2], test.edges.shape[2])
    pad = lambda d: d._replace(
        edges=np.pad(d.edges, ((0, 0), (0, 0), (0, e_max - d.edges.shape[2])), constant_values=-1)
    )
    return pad(train), pad(test)


def pack(data: GraphDataset, indices, *, max_nodes, max_edges, max_graphs) -> GraphBatch:
    """Packs graphs `data[indices]` contiguously into a `GraphBatch` of fixed shapes (NumPy).

    Real nodes come first, graph after graph (sorted `segment_ids`), then padding nodes (id
    `max_graphs`); real edges first, then padding edges `(max_nodes - 1, max_nodes - 1)`.

    Args:
      data: a `GraphDataset`.
      indices: the graphs to pack, in order.
      max_nodes: total node slots; must exceed the number of real nodes (at least one padding
        node receives the padding edges).
      max_edges: total directed-edge slots, at least the number of real edges.
      max_graphs: graph slots `G`, at least `len(indices)`.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    n = data.num_nodes[idx].astype(np.int64)
    m = data.num_edges[idx].astype(np.int64)
    if len(idx) > max_graphs:
        raise ValueError(f"{len(idx)} graphs do not fit in `max_graphs`={max_graphs}.")
    if n.sum() >= max_nodes:
        raise ValueError(
            f"{int(n.sum())} real nodes need `max_nodes` >= {int(n.sum()) + 1} (one padding node "
            f"receives the padding edges), got {max_nodes}."
        )
    if m.sum() > max_edges:
        raise ValueError(f"{int(m.sum())} real edges do not fit in `max_edges`={max_edges}.")
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    nodes = np.zeros((max_nodes, data.nodes.shape[2]), np.float32)
    seg = np.full((max_nodes,), max_graphs, np.int32)
    edges = np.full((2, max_edges), max_nodes - 1, np.int32)
    e0 = 0
    for g, (i, off) in enumerate(zip(idx, offsets)):
        nodes[off : off + n[g]] = data.nodes[i, : n[g]]
        seg[off : off + n[g]] = g
        edges[:, e0 : e0 + m[g]] = data.edges[i, :, : m[g]] + off
        e0 += m[g]
    labels = np.zeros((max_graphs,), np.int32)
    labels[: len(idx)] = data.labels[idx]
    graph_mask = np.arange(max_graphs) < len(idx)
    return GraphBatch(nodes, edges, seg, seg < max_graphs, labels, graph_mask)


def slot_batch(data: GraphDataset, indices, graph_mask=None) -> GraphBatch:
    """A `GraphBatch` of graphs `data[indices]` by gathers only (jit- and vmap-friendly).

    Graph `g` owns node slots `[g * max_nodes, (g + 1) * max_nodes)` and edge slots
    `[g * max_edges, (g + 1) * max_edges)` (unused ones are padding); one extra padding node
    at the end receives the padding edges. `graph_mask` (bool `[len(indices)]`, default all
    True) marks filler entries of `indices`: their nodes become padding too.
    """
    data = GraphDataset(*map(jnp.asarray, data))
    idx = jnp.asarray(indices)
    b = idx.shape[0]
    _, n_max, nf = data.nodes.shape
    e_max = data.edges.shape[2]
    total = b * n_max + 1
    gmask = jnp.ones((b,), bool) if graph_mask is None else jnp.asarray(graph_mask, bool)
    real = (jnp.arange(n_max)[None, :] < data.num_nodes[idx][:, None]) & gmask[:, None]
    nodes = jnp.where(real[..., None], data.nodes[idx], 0).reshape(b * n_max, nf)
    nodes = jnp.concatenate([nodes, jnp.zeros((1, nf), nodes.dtype)])
    seg = jnp.where(real, jnp.arange(b, dtype=jnp.int32)[:, None], b).reshape(-1)
    seg = jnp.concatenate([seg, jnp.full((1,), b, jnp.int32)]).astype(jnp.int32)
    e = data.edges[idx]  # [b, 2, e_max]
    valid = (e >= 0) & gmask[:, None, None]
    offset = (jnp.arange(b, dtype=jnp.int32) * n_max)[:, None, None]
    e = jnp.where(valid, e + offset, total - 1).astype(jnp.int32)
    edges = jnp.transpose(e, (1, 0, 2)).reshape(2, b * e_max)
    labels = jnp.where(gmask, data.labels[idx], 0).astype(jnp.int32)
    return GraphBatch(nodes, edges, seg, seg < b, labels, gmask)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _dense(key, n_in, n_out):
    w = jax.nn.initializers.he_normal()(key, (n_in, n_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def make_model(norm="graph", *, in_features=4, hidden=32, num_layers=3, num_classes=2,
               readout="mean", momentum=0.9, norm_args=None) -> Model:  # fmt: skip
    """The GIN-style classifier of the module docstring, as `Model(init, apply)`.

    `init(key) -> (params, state)`; each layer's parameters hold its normalizer's under
    "norm"; `state` is a tuple with one entry per layer: a `BatchNormState` for
    "batch"/"learned", else None.
    `apply(params, state, batch: GraphBatch, *, training) -> (logits [G, num_classes], state)`;
    `training` picks batch or running statistics for "batch"/"learned" (others ignore it).
    `momentum` is that of the running statistics; `norm_args`, further options of the
    normalizer's factory (e.g. `{"eps": 1e-6}`; see `normalizer`).
    """
    nrm = normalizer(norm, norm_args, momentum=momentum)
    if readout not in ("mean", "sum"):
        raise ValueError(f'`readout` must be "mean" or "sum", got {readout!r}.')
    for name, v in (("in_features", in_features), ("hidden", hidden), ("num_layers", num_layers),
                    ("num_classes", num_classes)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}.")

    def init(key):
        keys = jax.random.split(key, 2 * num_layers + 1)
        layers, states = [], []
        n_in = in_features
        for i in range(num_layers):
            p = {"mlp1": _dense(keys[2 * i], n_in, hidden),
                 "mlp2": _dense(keys[2 * i + 1], hidden, hidden)}  # fmt: skip
            s = None
            if nrm is not None:
                p["norm"] = nrm.init(hidden)
                s = nrm.init_state(hidden) if nrm.stateful else None
            layers.append(p)
            states.append(s)
            n_in = hidden
        params = {"layers": layers, "head": _dense(keys[-1], hidden, num_classes)}
        return params, tuple(states)

    def apply(params, state, batch: GraphBatch, *, training: bool):
        if not isinstance(training, bool):
            raise TypeError(f"`training` must be a Python bool, got {training!r}.")
        g = batch.num_graphs
        n = batch.nodes.shape[0]
        send, recv = batch.edges[0], batch.edges[1]
        h = batch.nodes
        new_states = []
        for p, s in zip(params["layers"], state):
            a = h + jax.ops.segment_sum(h[send], recv, num_segments=n)
            z = jax.nn.relu(a @ p["mlp1"]["w"] + p["mlp1"]["b"]) @ p["mlp2"]["w"] + p["mlp2"]["b"]
            z, s = norms.run(nrm, p.get("norm"), z, s, training=training, **_context(norm, batch))
            new_states.append(s)
            h = jax.nn.relu(z)
        mask = batch.node_mask.astype(h.dtype)[:, None]
        pooled = jax.ops.segment_sum(h * mask, batch.segment_ids, num_segments=g + 1)[:g]
        if readout == "mean":
            count = jax.ops.segment_sum(mask, batch.segment_ids, num_segments=g + 1)[:g]
            pooled = pooled / jnp.maximum(count, 1)
        logits = pooled @ params["head"]["w"] + params["head"]["b"]
        return logits, tuple(new_states)

    return Model(init, apply)


def _context(norm, batch: GraphBatch) -> dict:
    """What normalization `norm` needs of the batch at `apply` (`_CONTEXT`)."""
    # The padding nodes' dummy segment is the extra one.
    have = {"edges": batch.edges, "segment_ids": batch.segment_ids, "num_segments": batch.num_graphs + 1,
            "node_mask": batch.node_mask}  # fmt: skip
    return {k: have[k] for k in _CONTEXT[norm]}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Everything but the norm, the seed and the number of steps (hashable: one compile each)."""

    batch_graphs: int = 64
    lr: float = 1e-2
    hidden: int = 32
    num_layers: int = 3
    readout: str = "mean"
    momentum: float = 0.9
    eval_batch: int = 100
    data_seed: int = 0
    num_train: int = 2000
    num_test: int = 1000


def _loss_acc(logits, batch):
    w = batch.graph_mask.astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    hit = (jnp.argmax(logits, -1) == batch.labels).astype(logits.dtype)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1), jnp.sum(hit * w), jnp.sum(w)


def _evaluate(model, params, state, data, eval_batch):
    """Per-graph cross-entropy and hit (0/1) over every graph of `data`, in inference mode."""
    total = data.labels.shape[0]
    nb = math.ceil(total / eval_batch)
    pad = nb * eval_batch - total
    idx = jnp.concatenate([jnp.arange(total), jnp.zeros((pad,), jnp.int32)]).reshape(nb, eval_batch)
    gmask = (jnp.arange(nb * eval_batch) < total).reshape(nb, eval_batch)

    def one(args):
        batch = slot_batch(data, *args)
        logits, _ = model.apply(params, state, batch, training=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        return ce, (jnp.argmax(logits, -1) == batch.labels).astype(logits.dtype)

    ce, hit = jax.lax.map(one, (idx, gmask))
    return ce.reshape(-1)[:total], hit.reshape(-1)[:total]


@functools.lru_cache(maxsize=32)
def _runner(norm, steps, cfg: GraphConfig, in_features):
    """A jitted `(keys [S], train, test) -> metrics` training `S` seeds at once (vmapped)."""
    model = make_model(norm, in_features=in_features, hidden=cfg.hidden, num_layers=cfg.num_layers,
                       readout=cfg.readout, momentum=cfg.momentum)  # fmt: skip
    opt = optax.adam(cfg.lr)

    def run(key, train, test):
        k_init, k_data = jax.random.split(key)
        params, state = model.init(k_init)
        opt_state = opt.init(params)
        num_train = train.labels.shape[0]

        def step(carry, k):
            params, state, opt_state = carry
            idx = jax.random.choice(k, num_train, (cfg.batch_graphs,), replace=False)
            batch = slot_batch(train, idx)

            def loss_fn(p):
                logits, new_state = model.apply(p, state, batch, training=True)
                loss, hits, count = _loss_acc(logits, batch)
                return loss, (new_state, hits / count)

            (loss, (state, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            gnorm = optax.tree.norm(grads)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, state, opt_state), (loss, acc, gnorm)

        (params, state, _), (loss, acc, gnorm) = jax.lax.scan(
            step, (params, state, opt_state), jax.random.split(k_data, steps)
        )
        # One evaluation program for both splits (half the compilation of two).
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), train, test)
        ce, hit = _evaluate(model, params, state, both, cfg.eval_batch)
        train_loss, train_acc = jnp.mean(ce[:num_train]), jnp.mean(hit[:num_train])
        test_loss, test_acc = jnp.mean(ce[num_train:]), jnp.mean(hit[num_train:])
        finite = jnp.all(jnp.isfinite(loss)) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])
        )
        return {
            "loss": loss, "batch_acc": acc, "grad_norm": gnorm,
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "finite": finite,
        }  # fmt: skip

    return jax.jit(jax.vmap(run, in_axes=(0, None, None)))


@functools.lru_cache(maxsize=4)
def _data(data_seed, num_train, num_test):
    return graph_data(data_seed, num_train=num_train, num_test=num_test)


def _run(norm, seeds, steps, cfg):
    _check_norm(norm)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    seeds = [int(s) for s in seeds]
    train, test = _data(cfg.data_seed, cfg.num_train, cfg.num_test)
    runner = _runner(norm, steps, cfg, train.nodes.shape[2])
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    t0 = time.perf_counter()
    out = jax.device_get(runner(keys, train, test))
    return out, time.perf_counter() - t0


def _summary(out, i, loss_tail):
    loss = np.asarray(out["loss"][i])
    return {
        "train_loss_last": float(np.mean(loss[-loss_tail:])),
        "train_loss": float(out["train_loss"][i]),
        "train_acc": float(out["train_acc"][i]),
        "test_loss": float(out["test_loss"][i]),
        "test_acc": float(out["test_acc"][i]),
        "max_grad_norm": float(np.max(out["grad_norm"][i])),
        "finite": bool(out["finite"][i]),
    }


def train_graph(norm, seed=0, steps=1000, *, config: GraphConfig | None = None,
                **overrides) -> dict:  # fmt: skip
    """Trains one model on the "denser colour" task and returns its metrics.

    Args:
      norm: one of `NORMS`.
      seed: model initialization and batch order (the data come from `config.data_seed`).
      steps: Adam steps of `config.batch_graphs` random training graphs each.
      config: a `GraphConfig`; keyword `overrides` replace its fields.

    Returns:
      A dict: norm, seed, steps, seconds (wall time including compilation), train_loss_last
      (mean batch loss of the last 10% of steps), train_loss/train_acc/test_loss/test_acc (full
      splits, inference mode), max_grad_norm, finite, and loss (the per-step batch losses).
    """
    cfg = dataclasses.replace(config or GraphConfig(), **overrides)
    out, seconds = _run(norm, [seed], steps, cfg)
    return {"norm": norm, "seed": int(seed), "steps": steps, "seconds": seconds,
            **_summary(out, 0, max(1, steps // 10)),
            "loss": np.asarray(out["loss"][0]).tolist()}  # fmt: skip


def compare(norms=NORMS, seeds=(0, 1, 2), steps=1000, *, config: GraphConfig | None = None,
            **overrides) -> dict:  # fmt: skip
    """Test accuracy per norm, every norm trained on the same data with the same seeds.

    Seeds run together (one vmapped, jitted program per norm).

    Returns:
      `{norm: {"test_acc": [per seed], "mean": float, "std": float, "train_acc": [per seed],
      "finite": [per seed], "seconds": float}}`.
    """
    cfg = dataclasses.replace(config or GraphConfig(), **overrides)
    for norm in norms:
        _check_norm(norm)
    results = {}
    for norm in norms:
        out, seconds = _run(norm, seeds, steps, cfg)
        rows = [_summary(out, i, max(1, steps // 10)) for i in range(len(seeds))]
        acc = np.array([r["test_acc"] for r in rows])
        results[norm] = {
            "test_acc": acc.tolist(), "mean": float(acc.mean()), "std": float(acc.std()),
            "train_acc": [r["train_acc"] for r in rows],
            "finite": [r["finite"] for r in rows], "seconds": seconds,
        }  # fmt: skip
    return results


def format_table(results: dict) -> str:
    """A Markdown table of `compare`'s results."""
    lines = ["| norm | test accuracy (mean ± std) | per seed |", "|---|---|---|"]
    for norm, r in results.items():
        per = ", ".join(f"{a:.3f}" for a in r["test_acc"])
        lines.append(f"| {norm} | {r['mean']:.3f} ± {r['std']:.3f} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=list(NORMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    res = compare(args.norms, args.seeds, args.steps)
    print(format_table(res))
    print(f"({time.perf_counter() - t0:.1f} s)")
