"""The paper's models as pure functions over lnjax ops: an MLP (§6.6), a small ConvNet (§6.7),
a recurrent sequence model (§6.2/§6.5 analogues) and a message-passing graph classifier (for
the graph normalizations of Chen et al. 2020).

A `Model` is a pair of pure functions:
  init(key) -> (params, state)             state: running statistics (empty if none)
  apply(params, state, x, *, training, axis_name=None) -> (outputs, new_state)

`axis_name` names the mapped axis (`shard_map`/`pmap`/`vmap`) the batch is split over in
data-parallel training: batch norm then reduces its statistics across it, so every shard
normalizes with the statistics of the global batch. Models without batch norm ignore it.

Every normalization is a `lnjax.norms.Normalizer`: each builder takes `norm`, a Normalizer or a
name of the registry (`lnjax.norms.names()`, "none" for no normalization), and `norm_args`, the
factory options a name is built with (`lnjax.norms.get(norm, **norm_args)`: e.g. `{"eps": 1e-6}`,
`{"radius": 16}` for "divisive", `{"momentum": 0.9}`, `{"scale_init": 0.1}`). The builders add
no option of their own: the defaults are lnjax's, and the experiments' settings (the momentum
0.9 of their batch statistics, divisive norm's radius) come from their configs
(`configs/base.py`, `model.norm_defaults`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import lnjax
from lnjax import norms

CELLS = ("lstm", "gru", "rnn", "bn_lstm")

# The options of BNLSTMCell's default normalizers (Cooijmans et al.: gains 0.1, and the single
# bias b in the input term), to which `norm_args` is added for cell="bn_lstm".
# tests/test_experiments.py checks that they build exactly the cell's defaults.
BN_LSTM_TERMS = {
    "input_norm": {"scale_init": 0.1},
    "recurrent_norm": {"scale_init": 0.1, "bias": False},
    "cell_norm": {"scale_init": 0.1},
}


class Model(NamedTuple):
    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any]]


def normalizer(norm, norm_args=None, *, what="norm") -> norms.Normalizer | None:
    """`norm` as a Normalizer (None for "none"): a name is built by `lnjax.norms.get` with the
    options `norm_args`; a Normalizer value is used as it is (it takes no `norm_args`).

    Raises ValueError for an unknown name and TypeError for an option the normalizer does not
    take, naming `what` (the argument).
    """
    args = dict(norm_args or {})
    if isinstance(norm, norms.Normalizer):
        if args:
            raise TypeError(f"`{what}` is a Normalizer value ({norm!r}); `norm_args` {args} only apply "
                            "to a normalizer given by name.")  # fmt: skip
        return norm
    if not isinstance(norm, str):
        raise TypeError(f"`{what}` must be a name from {norms.names()} or a lnjax.norms.Normalizer, got {norm!r}.")
    try:
        return norms.get(norm, **args)
    except (TypeError, ValueError) as e:
        shown = f" with norm_args {args}" if args else ""
        raise type(e)(f"`{what}`={norm!r}{shown}: {e}") from None


def _kind(norm):
    """The factory a Normalizer was built by ("batch", "layer", ...), or "none"."""
    return "none" if norm is None else norm.name.partition("(")[0]


def _dense(key, n_in, n_out):
    return {"w": jax.nn.initializers.he_normal()(key, (n_in, n_out), jnp.float32), "b": jnp.zeros((n_out,), jnp.float32)}


def _norm_init(norm, size):
    """`(params, state)` of one normalized layer of `size` units: the normalizer's parameters
    and its running statistics (None if it has none)."""
    if norm is None:
        return {}, None
    return norm.init(size), (norm.init_state(size) if norm.stateful else None)


def mlp(sizes, norm="layer", *, norm_args=None, batch_size=None):
    """Permutation-invariant MLP `sizes[0] -> ... -> sizes[-1]` with ReLU (§6.6).

    Batch norm normalizes every layer, the output included (as the paper's BN baseline); every
    other normalizer (layer, RMS, switchable, batch-layer, divisive, ...) normalizes the hidden
    layers only, as the paper's LN. A layer's linear bias is dropped where its normalizer has a
    bias (the normalizer's replaces it), and otherwise added after the normalization.
    Switchable norm on these `[batch, features]` layers mixes LN and BN statistics only (no
    spatial axes: no instance statistics).

    Args:
      sizes: layer widths, input first.
      norm, norm_args: the normalizer (see the module docstring), e.g. `mlp(s, "divisive",
        norm_args={"radius": 16})`.
      batch_size: batch-layer norm's `m` (the training batch size, also at evaluation, as its
        authors), given to a normalizer built from the name "batch_layer" unless `norm_args`
        sets it.
    """
    args = dict(norm_args or {})
    if norm == "batch_layer" and batch_size is not None:
        args.setdefault("batch_size", batch_size)
    nrm = normalizer(norm, args)
    n_layers = len(sizes) - 1

    def normed(i):
        return nrm is not None and (i < n_layers - 1 or _kind(nrm) == "batch")

    def init(key):
        params, state = [], []
        for i, k in enumerate(jax.random.split(key, n_layers)):
            layer = _dense(k, sizes[i], sizes[i + 1])
            s = None
            if normed(i):
                layer["norm"], s = _norm_init(nrm, sizes[i + 1])
                if "bias" in layer["norm"]:
                    del layer["b"]
            params.append(layer)
            state.append(s)
        return params, state

    def apply(params, state, x, *, training, axis_name=None):
        new_state = []
        for i, (p, s) in enumerate(zip(params, state)):
            a = x @ p["w"]
            if normed(i):
                a, s = norms.run(nrm, p["norm"], a, s, training=training, axis_name=axis_name)
            if "b" in p:
                a = a + p["b"][None]
            new_state.append(s)
            x = jax.nn.relu(a) if i < n_layers - 1 else a
        return x, new_state

    return Model(init, apply)


def conv_normalizer(norm, norm_args=None) -> norms.Normalizer | None:
    """The normalizer of `convnet`'s `[batch, H, W, C]` activations. The name "layer" is the
    paper's ConvNet LN (§6.7): statistics over each example's channels and positions with one
    gain and bias per channel, i.e. `lnjax.norms.group(1, **norm_args)` (group norm with one
    group). Every other name, and any Normalizer value, is as `normalizer` builds it: a
    stateless one over the channels at each position (`norms.layer()` as a value is that),
    batch statistics over the batch and positions."""
    if norm == "layer":
        args = dict(norm_args or {})
        try:
            return norms.group(1, **args)
        except TypeError as e:
            shown = f" with norm_args {args}" if args else ""
            raise TypeError(f"`norm`='layer' (the ConvNet LN, lnjax.norms.group(1)){shown}: {e}") from None
    return normalizer(norm, norm_args)


def convnet(num_classes, channels=(32, 64), norm="layer", in_channels=1, *, norm_args=None):
    """Small ConvNet for `[batch, H, W, C]` images (§6.7): 3x3 convs (the second and later with
    stride 2), each followed by the normalization and ReLU, global average pooling, a linear
    softmax layer. `norm`, `norm_args`: as `conv_normalizer` builds them ("layer" is the
    paper's ConvNet LN over each example's channels and positions; switchable norm mixes IN,
    LN and BN statistics per channel). The convolutions have a bias only where the
    normalizer has none (added after it)."""
    nrm = conv_normalizer(norm, norm_args)

    def init(key):
        keys = jax.random.split(key, len(channels) + 1)
        params, state, c_in = [], [], in_channels
        for k, c in zip(keys, channels):
            layer = {"w": jax.nn.initializers.he_normal()(k, (3, 3, c_in, c), jnp.float32)}
            layer["norm"], s = _norm_init(nrm, c)
            if "bias" not in layer["norm"]:
                layer["b"] = jnp.zeros((c,), jnp.float32)
            params.append(layer)
            state.append(s)
            c_in = c
        params.append(_dense(keys[-1], c_in, num_classes))
        return params, state

    def apply(params, state, x, *, training, axis_name=None):
        new_state = []
        for i, (p, s) in enumerate(zip(params[:-1], state)):
            stride = 1 if i == 0 else 2
            a = jax.lax.conv_general_dilated(
                x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            a, s = norms.run(nrm, p["norm"], a, s, training=training, axis_name=axis_name)
            if "b" in p:
                a = a + p["b"][None, None, None]
            new_state.append(s)
            x = jax.nn.relu(a)
        x = jnp.mean(x, axis=(1, 2))
        return x @ params[-1]["w"] + params[-1]["b"][None], new_state

    return Model(init, apply)


def _bn_lstm_terms(norm_args):
    """The BN-LSTM's three normalizers: the cell's defaults, with `norm_args` as options of each."""
    if not norm_args:
        return {}  # exactly the cell's defaults
    return {term: normalizer("batch", {**opts, **norm_args}, what=f"bn_lstm {term}")
            for term, opts in BN_LSTM_TERMS.items()}  # fmt: skip


def sequence_model(input_size, num_outputs, hidden_size, cell="lstm", norm="layer", *, norm_args=None,
                   input_norm=None, max_steps=None, forget_bias=None, tokens=False, readout="last"):  # fmt: skip
    """A recurrent network read out linearly from its hidden states.

    Args:
      input_size: features per step, or the vocabulary size with `tokens=True`.
      cell: "lstm", "gru" or "rnn" (the lnjax cells), or "bn_lstm" (Cooijmans et al.,
        `BNLSTMCell`; needs `max_steps`).
      norm, norm_args: the normalizer of every term of the cell (the shortcut: an LSTM's
        input, recurrent and cell terms, a GRU's four, the tanh RNN's summed input), a name
        built with the options `norm_args` or a Normalizer value (module docstring); "none" is
        the unnormalized cell (`z + b`, and `c_t` itself). E.g. `norm_args={"scale_init": 0.1}`
        for initial gains 0.1, `norm="divisive", norm_args={"radius": 30, "sigma": 1.0}`.
        For cell="bn_lstm", `norm` is ignored: the cell's own batch normalizers are used,
        `norm_args` added to the options of each (e.g. `{"momentum": 0.9}`).
      input_norm: the normalizer of the input term(s) `W_x x_t` of an LSTM or GRU, as `norm`
        (a name other than "none" is built with `norm_args` too); None: the same as `norm`;
        "none": unnormalized (`W_x x_t + b`, the recurrent-only form). Ignored by the tanh RNN
        (it normalizes the summed input) and by cell="bn_lstm". Every term goes to the cell as
        a Normalizer value, an explicit choice: the cell's error/warning for a named input
        norm over very few input features does not apply.
      max_steps: the BN-LSTM's number of per-step statistics (the longest training length).
      forget_bias: the initial forget-gate bias of an LSTM; None: the cell's default (0 for
        `LSTMCell` as the paper, 1 for `BNLSTMCell` as Cooijmans et al.).
      tokens: inputs are int tokens `[batch, T]`, fed one-hot.
      readout: "last" (outputs `[batch, num_outputs]` from the last hidden state) or "all"
        (`[batch, T, num_outputs]`, one prediction per step: copying, language modelling).
    """
    if readout not in ("last", "all"):
        raise ValueError(f'`readout` must be "last" or "all", got {readout!r}.')
    if cell not in CELLS:
        raise ValueError(f"`cell` must be one of {CELLS}, got {cell!r}.")
    kw = {} if forget_bias is None or cell not in ("lstm", "bn_lstm") else {"forget_bias": forget_bias}
    if cell == "bn_lstm":
        if max_steps is None:
            raise ValueError("`max_steps` is required for cell='bn_lstm'.")
        core = lnjax.BNLSTMCell(hidden_size, max_steps=max_steps, **_bn_lstm_terms(norm_args), **kw)
    else:
        term = normalizer(norm, norm_args)
        if cell == "rnn":
            cls, terms = lnjax.RNNCell, {"norm": term}
        else:
            if input_norm is None:
                x_term = term
            elif input_norm == "none" or isinstance(input_norm, norms.Normalizer):
                x_term = normalizer(input_norm, what="input_norm")  # takes no `norm_args`
            else:
                x_term = normalizer(input_norm, norm_args, what="input_norm")
            cls, terms = (lnjax.LSTMCell, {"cell_norm": term}) if cell == "lstm" else (lnjax.GRUCell, {})
            terms.update(input_norm=x_term, recurrent_norm=term)
        try:
            core = cls(hidden_size, **terms, **kw)
        except TypeError as e:  # a stateful normalizer: batch statistics per step are the BN-LSTM's
            raise ValueError(f"`norm`={norm!r} for cell={cell!r}: {e}") from None

    def init(key):
        k1, k2 = jax.random.split(key)
        params = {"rnn": core.init(k1, input_size), "out": _dense(k2, hidden_size, num_outputs)}
        return params, (core.init_state() if cell == "bn_lstm" else None)

    def apply(params, state, x, *, training, axis_name=None):
        if tokens:
            x = jax.nn.one_hot(x, input_size, dtype=jnp.float32)
        if cell == "bn_lstm":
            ys, carry, state = lnjax.bn_lstm_rnn(core, params["rnn"], state, x, training=training,
                                                 axis_name=axis_name)
        else:
            ys, carry = lnjax.rnn(core, params["rnn"], x)
        h = carry.h if isinstance(carry, lnjax.LSTMCarry) else carry
        w, b = params["out"]["w"], params["out"]["b"]
        if readout == "all":
            return ys @ w + b[None, None], state
        return h @ w + b[None], state

    return Model(init, apply)


class GraphBatch(NamedTuple):
    """`G` graphs flattened into one graph of fixed shapes (`graph_batch`).

    nodes `[N, F]`; edges `[2, E]` int32 (senders, receivers); segment_ids `[N]` int32, the
    graph of each node (the `jax.ops.segment_sum` convention), `G` for padding nodes, one
    extra *dummy segment*, so that graph-wise statistics (`num_segments = G + 1`) of a real
    graph never see padding; node_mask `[N]` bool, False for padding nodes (left out of batch
    statistics and of the readout); graph_mask `[G]` bool, False for unused graph slots (no
    node: readout 0). Padding edges point from the last node, always a padding node, to
    itself, so messages and neighbourhoods of real nodes never see padding.
    """

    nodes: jax.Array
    edges: jax.Array
    segment_ids: jax.Array
    node_mask: jax.Array
    graph_mask: jax.Array


def graph_batch(graphs) -> GraphBatch:
    """The `GraphBatch` of every graph of `graphs` (`experiments.data.Graphs` of `G` graphs,
    padded to `n_max` nodes and `e_max` edges), by reshapes and `where`s only (jit-friendly):
    graph `g` owns node slots `[g n_max, (g + 1) n_max)` and edge slots `[g e_max, (g + 1)
    e_max)`, unused ones padding, and one final padding node receives the padding edges."""
    x, num_nodes, e = (jnp.asarray(a) for a in graphs)
    g, n_max, nf = x.shape
    total = g * n_max + 1
    real = jnp.arange(n_max)[None, :] < num_nodes[:, None]
    nodes = jnp.where(real[..., None], x, 0).reshape(g * n_max, nf)
    nodes = jnp.concatenate([nodes, jnp.zeros((1, nf), nodes.dtype)])
    seg = jnp.where(real, jnp.arange(g, dtype=jnp.int32)[:, None], g).reshape(-1)
    seg = jnp.concatenate([seg, jnp.full((1,), g, jnp.int32)])
    offset = (jnp.arange(g, dtype=jnp.int32) * n_max)[:, None, None]
    e = jnp.where(e >= 0, e + offset, total - 1)
    edges = jnp.transpose(e, (1, 0, 2)).reshape(2, -1)
    return GraphBatch(nodes, edges, seg, seg < g, jnp.ones((g,), bool))


def gin(sizes, num_classes=2, norm="graph", *, readout="mean", norm_args=None):
    """A GIN-style graph classifier: per layer `i`

        h <- relu(norm(MLP_i(h + sum_{j -> i} h_j))),   MLP_i = Dense -> relu -> Dense,

    then a per-graph mean (or sum) readout over real nodes and a linear head to `num_classes`
    logits. `sizes`: node feature width first, then each layer's width. `norm`, `norm_args`: the
    normalizer (module docstring), one of the graph normalizations (`graph_node`,
    `graph_adjacency`, `graph`, `graph_batch`, `graph_learned`) or any other; it gets the
    batch's edges, segments and node mask (each takes what it needs: `lnjax.norms.run`).

    `apply(params, state, graphs, *, training, axis_name=None)` takes `Graphs` of `G` graphs
    (or a `GraphBatch` of `G` graph slots) and returns logits `[G, num_classes]`.
    """
    nrm = normalizer(norm, norm_args)
    if readout not in ("mean", "sum"):
        raise ValueError(f'`readout` must be "mean" or "sum", got {readout!r}.')

    def init(key):
        keys = jax.random.split(key, 2 * len(sizes) - 1)
        params, state = {"layers": []}, []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer = {"mlp1": _dense(keys[2 * i], n_in, n_out), "mlp2": _dense(keys[2 * i + 1], n_out, n_out)}
            layer["norm"], s = _norm_init(nrm, n_out)
            params["layers"].append(layer)
            state.append(s)
        params["head"] = _dense(keys[-1], sizes[-1], num_classes)
        return params, state

    def apply(params, state, graphs, *, training, axis_name=None):
        batch = graphs if isinstance(graphs, GraphBatch) else graph_batch(graphs)
        g, n = batch.graph_mask.shape[0], batch.nodes.shape[0]
        send, recv = batch.edges
        context = {"edges": batch.edges, "segment_ids": batch.segment_ids, "num_segments": g + 1,
                   "node_mask": batch.node_mask, "mask": batch.node_mask, "axis_name": axis_name}  # fmt: skip
        h, new_state = batch.nodes, []
        for p, s in zip(params["layers"], state):
            a = h + jax.ops.segment_sum(h[send], recv, num_segments=n)
            z = jax.nn.relu(a @ p["mlp1"]["w"] + p["mlp1"]["b"]) @ p["mlp2"]["w"] + p["mlp2"]["b"]
            z, s = norms.run(nrm, p["norm"], z, s, training=training, **context)
            new_state.append(s)
            h = jax.nn.relu(z)
        mask = batch.node_mask.astype(h.dtype)[:, None]
        pooled = jax.ops.segment_sum(h * mask, batch.segment_ids, num_segments=g + 1)[:g]
        if readout == "mean":
            pooled = pooled / jnp.maximum(jax.ops.segment_sum(mask, batch.segment_ids, num_segments=g + 1)[:g], 1)
        return pooled @ params["head"]["w"] + params["head"]["b"], new_state

    return Model(init, apply)
