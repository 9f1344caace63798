"""Relatives of layer normalization named in the survey, as pure functions.

Switchable normalization, batch layer normalization, divisive normalization, the graph
normalizations of Chen et al., domain-agnostic batch normalization and proxy normalization.
They follow the numerical contract of `lnjax.normalization`: statistics in at least float32,
output in the input's dtype, the exact (corrected two-pass) biased variance, `eps` inside the
square root, parameters of exactly the shape they apply to. Where an author's code differs from
that contract (an unbiased variance, `eps` outside the root), the docstring says so.

Ops with running statistics take and return a NamedTuple state, as `batch_norm` does.
"""

import functools
import math
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lnjax import _checks, _stats
from lnjax.normalization import BatchNormState, batch_norm, batch_norm_state, layer_norm

__all__ = [
    "GRAPH_NORM_KINDS",
    "SwitchableControl",
    "batch_layer_norm",
    "batch_layer_norm_state",
    "divisive_norm",
    "domain_agnostic_batch_norm",
    "graph_adjacency_norm",
    "graph_batch_norm",
    "graph_learned_norm",
    "graph_learned_weights",
    "graph_node_norm",
    "graph_norm",
    "proxy_norm",
    "proxy_quantiles",
    "switchable_control",
    "switchable_norm",
    "switchable_norm_state",
]


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


# --- switchable normalization -------------------------------------------------------------------


class SwitchableControl(NamedTuple):
    """The six control parameters of switchable normalization (Luo et al. 2018).

    Attributes:
      mean_logits: shape `[3]`, logits of the weights of the (IN, LN, BN) means.
      var_logits: shape `[3]`, logits of the weights of the (IN, LN, BN) variances.
    """

    mean_logits: jax.Array
    var_logits: jax.Array


def switchable_control(dtype=jnp.float32) -> SwitchableControl:
    """Equal weights (logits 0), as the authors' `torch.ones(3)` under softmax."""
    return SwitchableControl(jnp.zeros((3,), dtype), jnp.zeros((3,), dtype))


def switchable_norm_state(num_channels, dtype=jnp.float32) -> BatchNormState:
    """Running statistics of the BN branch: `batch_norm_state(num_channels)` (mean 0, var 1)."""
    return batch_norm_state(num_channels, dtype)


def switchable_norm(x, scale, bias, control: SwitchableControl, state: BatchNormState, *, training: bool,
                    axis=-1, momentum=0.99, eps=1e-5, axis_name=None):  # fmt: skip
    """Switchable normalization (Luo et al. 2018): a learned mix of IN, LN and BN statistics.

    With `mu_k`, `var_k` the instance (per example and channel, over space), layer (per example,
    over space and channels) and batch (per channel, over examples and space) statistics,
    `mu = sum_k softmax(mean_logits)_k mu_k`, `var = sum_k softmax(var_logits)_k var_k` and
    `y = scale * (x - mu) / sqrt(var + eps) + bias`. The paper derives LN and BN statistics
    from IN ones (`var_ln = mean_c(var_in + mu_in^2) - mu_ln^2`); that identity holds for the
    exact biased variances computed here, without its cancellation. Only the BN branch keeps
    running statistics (`batch_norm`'s update and conventions); inference uses them for BN and
    the example's own IN/LN statistics.

    Differences from the authors' PyTorch code (switchablenorms/Switchable-Normalization):
    the instance variance is biased (theirs is `torch.var`'s unbiased one), and the running
    variance is the unbiased batch variance, initialized to 1 (theirs stores `var_bn`, from 0).

    Args:
      x: floating array `[batch, *spatial, channels]`, at least one spatial axis.
      scale, bias: per-channel, shape `[channels]`, or None.
      control: a `SwitchableControl` (see `switchable_control`); weight order (IN, LN, BN).
      state: a `BatchNormState` of shape `[channels]` (see `switchable_norm_state`).
      training: batch statistics (and a state update) if True, running ones if False.
      axis: the channel axis; not 0.
      momentum: weight of the old running value, in [0, 1] (Flax convention).
      eps: inside the square root.
      axis_name: named axis across which the BN statistics are synchronized.

    Returns:
      `(y, new_state)`, `y` with `x`'s shape and dtype.
    """
    x = _checks.spatial(_checks.floating(x))
    c = _checks.channel_axis(axis, x.ndim, batch_first=True)
    _checks.python_bool(training)
    scale, bias, eps = _checks.param_check(x, (c,), scale, bias, eps)
    momentum = _checks.in_unit_interval(momentum, "momentum")
    if not isinstance(control, SwitchableControl):
        raise TypeError(
            "`control` must be a SwitchableControl (see `switchable_control`), got "
            f"{type(control).__name__}."
        )
    for name, logits in zip(("control.mean_logits", "control.var_logits"), control):
        _checks.floating(_checks.shape(logits, (3,), name, " (one logit per IN, LN, BN)"), name)
    _checks.batch_norm_state_check(state, (x.shape[c],), x.shape)

    space = tuple(a for a in range(1, x.ndim) if a != c)
    xf = _stats.upcast(x)
    m_in, r_in, v_in, _ = _stats.moments(xf, space)
    m_ln, r_ln, v_ln, _ = _stats.moments(xf, space + (c,))
    m_bn, r_bn, v_bn, new_state = _stats.batch_moments(
        xf, (0,) + space, state, training=training, momentum=momentum, axis_name=axis_name
    )
    wm = jax.nn.softmax(control.mean_logits.astype(m_in.dtype))
    wv = jax.nn.softmax(control.var_logits.astype(m_in.dtype))
    # Centring on the instance mean and mixing only the (small) differences keeps the mixture
    # from adding a rounding error of the data's magnitude: 1e4 + N(0, 1e-2) stays exact.
    # As the weights sum to 1 this is `x - sum_k w_k mu_k`, gradients included.
    residual = wm[0] * r_in + wm[1] * ((m_ln - m_in) + r_ln) + wm[2] * ((m_bn - m_in) + r_bn)
    var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
    y = _stats.normalize(xf, m_in, residual, var, eps)
    return _stats.scale_shift(y, scale, bias, (c,), x.ndim).astype(x.dtype), new_state


# --- batch layer normalization ------------------------------------------------------------------


def batch_layer_norm_state(shape, dtype=jnp.float32) -> BatchNormState:
    """Running batch statistics of `batch_layer_norm`, of shape `x.shape[1:]` (mean 0, var 1)."""
    return batch_norm_state(shape, dtype)


def batch_layer_norm(
    x,
    scale,
    bias,
    state: BatchNormState,
    *,
    training: bool,
    axis=-1,
    momentum=0.99,
    eps=1e-3,
    batch_size=None,
    axis_name=None,
):
    """Batch layer normalization (Ziaee & Cano 2022, arXiv 2209.08898), from the authors' code.

    `x_f` is `x` normalized by its feature statistics (per example and position, over `axis`),
    `x_b` by its batch statistics (per position and feature, over the batch axis 0 only: the
    authors' `tf.nn.moments(inputs, axes=[0])` keeps spatial/time positions apart), and

        y = scale * ((1/m - 1e-4) x_f + (1 - 1/m - 1e-4) x_b) / sqrt(d) + bias

    with `m` the batch size and `d` the number of features. The division by `sqrt(d)` shrinks the
    output's variance to about `1/d`; it is odd but it is the authors' (A2Amir/
    Batch-Layer-Normalization, `helpers/bln_layer.py`), so it is kept: `scale` absorbs it.

    Inference uses running averages of the batch statistics and, as the authors' default
    (`feature_moving_mean=False`), each example's own feature statistics. The authors average
    the batch statistics of the last epoch; here they are exponential running averages as in
    `batch_norm` (unbiased variance), which needs no epoch callback.

    Args:
      x: floating array `[batch, *positions, *features]`.
      scale, bias: shape `x.shape[axis]`, or None.
      state: a `BatchNormState` of shape `x.shape[1:]` (see `batch_layer_norm_state`).
      training: batch statistics (and a state update) if True, running ones if False.
      axis: int or tuple of ints, the feature axes (not 0); `d` is their total size.
      momentum: weight of the old running value, in [0, 1].
      eps: inside the square roots; 1e-3 as in the authors' code.
      batch_size: the `m` of the weights; defaults to `x.shape[0]`. The authors fix it to the
        training batch size, also at inference: pass it when evaluating with another size.
      axis_name: named axis across which the batch statistics are synchronized.

    Returns:
      `(y, new_state)`, `y` with `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    if x.ndim < 2:
        raise ValueError(f"`x` must be [batch, ..., features], got shape {x.shape}.")
    feat = _checks.axes(axis, x.ndim)
    if 0 in feat:
        raise ValueError(f"`axis`={axis!r} includes the batch axis 0; expected feature axes.")
    _checks.python_bool(training)
    scale, bias, eps = _checks.param_check(x, feat, scale, bias, eps)
    momentum = _checks.in_unit_interval(momentum, "momentum")
    _checks.batch_norm_state_check(state, x.shape[1:], x.shape, what="x.shape[1:]")
    m = x.shape[0] if batch_size is None else _checks.positive_int(batch_size, "batch_size")
    d = math.prod(x.shape[a] for a in feat)

    xf = _stats.upcast(x)
    f_mean, f_res, f_var, _ = _stats.moments(xf, feat)
    x_f = _stats.normalize(xf, f_mean, f_res, f_var, eps)
    b_mean, b_res, b_var, new_state = _stats.batch_moments(
        xf, (0,), state, training=training, momentum=momentum, axis_name=axis_name
    )
    x_b = _stats.normalize(xf, b_mean, b_res, b_var, eps)
    y = ((1 / m - 1e-4) * x_f + (1 - 1 / m - 1e-4) * x_b) / math.sqrt(d)
    return _stats.scale_shift(y, scale, bias, feat, x.ndim).astype(x.dtype), new_state


# --- divisive normalization ---------------------------------------------------------------------


def _radii(radius, ax, name):
    """One radius (int >= 0, or None for the whole axis) per axis of `ax`."""
    raw = radius if isinstance(radius, (tuple, list)) else (radius,) * len(ax)
    if len(raw) != len(ax):
        raise ValueError(
            f"`{name}`={radius!r} has {len(raw)} entries but `axis` names {len(ax)} axes; give one "
            "radius per axis, or a single one for all."
        )
    out = []
    for r in raw:
        if r is None:
            out.append(None)
            continue
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"`{name}` must be None or an int >= 0 (per axis), got {radius!r}.")
        out.append(int(r))
    return tuple(out)


def _window_mean(v, ax, radii, edges):
    """Mean of `v` over a window of `radii` around each position along `ax` (None: whole axis).

    A window sum is `lax.reduce_window` with `add` (exact to rounding, unlike differences of
    cumulative sums). `edges="mean"` divides by the number of positions inside the array,
    `edges="zero"` by the full window size, as a zero-padded convolution would.
    """
    win = [1] * v.ndim
    pad = [(0, 0)] * v.ndim
    whole = []
    for a, r in zip(ax, radii):
        if r is None:
            whole.append(a)
        else:
            win[a], pad[a] = 2 * r + 1, (r, r)
    s = v
    if any(w > 1 for w in win):
        # A concrete zero init makes this the differentiable `reduce_window_sum`, also under jit.
        s = lax.reduce_window(v, np.zeros((), v.dtype), lax.add, tuple(win), (1,) * v.ndim, pad)
    if whole:
        s = jnp.sum(s, axis=tuple(whole), keepdims=True)
    n_whole = math.prod(v.shape[a] for a in whole)
    if edges == "zero":
        return s / (n_whole * math.prod(win))
    # Positions inside the array per window: the same window sum over ones of the axes' shape.
    oshape = tuple(v.shape[a] if win[a] > 1 else 1 for a in range(v.ndim))
    ones = jnp.ones(oshape, v.dtype)
    count = lax.reduce_window(ones, np.zeros((), v.dtype), lax.add, tuple(win), (1,) * v.ndim, pad)
    return s / (count * n_whole)


def divisive_norm(
    x,
    scale=None,
    bias=None,
    *,
    radius,
    sigma=1.0,
    axis=-1,
    suppression_radius=...,
    summation=True,
    edges="mean",
    return_l1=False,
):
    """Divisive normalization (Ren, Liao et al. 2017, "Normalizing the Normalizers").

        v = z - E_A[z],    y = scale * v / sqrt(sigma^2 + E_B[v^2]) + bias

    with `A` (summation field) and `B` (suppression field) the units within `radius` and
    `suppression_radius` of each unit along `axis`, i.e. windows of `2R + 1` units. `radius=None`
    is the whole axis: with `sigma = 0` (and all of `x.shape[axis]` as one window) this is
    `layer_norm(x, eps=0)`; `sigma = sqrt(eps)` gives `layer_norm(x, eps=eps)`. Including the
    batch axis 0 in `axis` gives the batch variant (A, B over the batch, as BN's training
    statistics). `summation=False` skips the subtraction (`v = z`; with `radius=None` that is
    `rms_norm`).

    Edges: with `edges="mean"` (default) a window that overhangs the array averages over the
    units that exist. The authors' code (renmengye/div-norm, `divnorm.py`) uses a zero-padded
    convolution (`padding='SAME'`) divided by the full window size, which shrinks the statistics
    near the edges: `edges="zero"` reproduces that. Their `dn_window` of 60 (tanh RNN) / 30 (LSTM),
    called a radius in the paper, is a window *size*: about `radius=30` / `15` here.

    Args:
      x: floating array.
      scale, bias: shape `x.shape[axis]`, or None.
      radius: the summation field: None (whole axis) or an int >= 0, or a tuple, one per axis.
      sigma: the smoothing term (>= 0); 1 as the authors' `eps=1.0` default and their DN* runs.
      axis: int or tuple of ints, the axes the windows slide along.
      suppression_radius: the suppression field, as `radius`; `...` (default) means `radius`.
      summation: subtract `E_A[z]` (True) or not.
      edges: "mean" or "zero", see above.
      return_l1: also return `mean(|v|)`, the authors' L1 penalty on the centred activity
        (their loss adds `alpha * mean(|v|)`, alpha e.g. 1e-2).

    Returns:
      `y` with `x`'s shape and dtype, or `(y, l1)` if `return_l1`, `l1` a scalar in the
      statistics dtype (at least float32).
    """
    x = _checks.floating(x)
    ax = _checks.axes(axis, x.ndim)
    scale, bias, _ = _checks.param_check(x, ax, scale, bias, 0.0)
    if suppression_radius is ...:
        suppression_radius = radius
    r_a = _radii(radius, ax, "radius")
    r_b = _radii(suppression_radius, ax, "suppression_radius")
    sigma = _checks.nonnegative(sigma, "sigma")
    if edges not in ("mean", "zero"):
        raise ValueError(f'`edges` must be "mean" or "zero", got {edges!r}.')
    if not isinstance(summation, bool):
        raise TypeError(f"`summation` must be a Python bool, got {summation!r}.")

    dtype = _checks.stats_dtype(x.dtype)
    z = x.astype(dtype)
    if summation:
        # Shift by the mean over the window axes first (any constant leaves v unchanged), so
        # that windowed means of large-mean data keep the precision of the deviations.
        c = lax.stop_gradient(jnp.mean(z, axis=ax, keepdims=True))
        zc = z - c
        v = zc - _window_mean(zc, ax, r_a, edges)
        if edges == "zero":  # the zero padding does not see the shift: put it back
            v = v + c * (1 - _window_mean(jnp.ones_like(zc), ax, r_a, "zero"))
    else:
        v = z
    e_b = _window_mean(v * v, ax, r_b, edges)
    y = v * lax.rsqrt(jnp.asarray(sigma, dtype) ** 2 + e_b)
    y = _stats.scale_shift(y, scale, bias, ax, x.ndim).astype(x.dtype)
    if return_l1:
        return y, jnp.mean(jnp.abs(v))
    return y


# --- graph normalizations -----------------------------------------------------------------------

GRAPH_NORM_KINDS = ("node", "adjacency", "graph", "batch")


def _nodes(x):
    x = jnp.asarray(_checks.floating(x))
    if x.ndim != 2:
        raise ValueError(
            f"`x` must be node features [num_nodes, features], got shape {x.shape}; for several "
            "batches of graphs use `jax.vmap`."
        )
    return x


def _check_segments(segment_ids, num_nodes, num_segments, indices_are_sorted):
    if segment_ids is None or num_segments is None:
        raise ValueError(
            "graph-wise normalization needs `segment_ids` (the graph of each node, shape "
            "[num_nodes]) and `num_segments` (a static int, the number of graphs)."
        )
    num_segments = _checks.positive_int(num_segments, "num_segments")
    hint = " (one graph id per node)"
    segment_ids = _checks.shape(segment_ids, (num_nodes,), "segment_ids", hint)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"`segment_ids` must be integers, got dtype {segment_ids.dtype}.")
    if _is_concrete(segment_ids):
        ids = np.asarray(segment_ids)
        bad = (ids < 0) | (ids >= num_segments)
        if bad.any():
            raise ValueError(
                f"`segment_ids` has {int(bad.sum())} ids outside [0, num_segments={num_segments}), "
                f"e.g. {int(ids[bad][0])} at node {int(np.flatnonzero(bad)[0])}."
            )
        if indices_are_sorted and ids.size > 1 and (np.diff(ids) < 0).any():
            i = int(np.flatnonzero(np.diff(ids) < 0)[0])
            raise ValueError(
                f"`segment_ids` are not sorted (node {i + 1} has id {int(ids[i + 1])} after "
                f"{int(ids[i])}) but `indices_are_sorted=True`; sort the nodes or pass False."
            )
    return segment_ids, num_segments


def _check_edges(edges, num_nodes):
    if edges is None:
        raise ValueError(
            "adjacency-wise normalization needs `edges`, an int array [2, num_edges] of "
            "(senders, receivers)."
        )
    if not hasattr(edges, "shape"):
        edges = jnp.asarray(edges)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise ValueError(
            f"`edges` has shape {tuple(edges.shape)}, expected (2, num_edges): row 0 the senders, "
            "row 1 the receivers."
        )
    if not jnp.issubdtype(edges.dtype, jnp.integer):
        raise TypeError(f"`edges` must be integers, got dtype {edges.dtype}.")
    if _is_concrete(edges):
        e = np.asarray(edges)
        bad = (e < 0) | (e >= num_nodes)
        if bad.any():
            j = int(np.flatnonzero(bad.any(axis=0))[0])
            raise ValueError(
                f"`edges` has node indices outside [0, num_nodes={num_nodes}), e.g. edge {j}: "
                f"({int(e[0, j])}, {int(e[1, j])})."
            )
    return edges


def _segment_moments(values, seg, num_segments, *, sorted_ids, over_features):
    """Corrected two-pass (mean, residual, var) of `values` rows grouped by `seg`.

    With `over_features` the statistics also pool the feature axis (one per segment). Counts
    are clamped at 1, so an empty segment has mean 0 and variance 0 (no NaN, also in gradients).
    """
    nf = values.shape[1] if over_features else 1

    def seg_sum(a):
        if over_features:
            a = jnp.sum(a, axis=1, keepdims=True)
        return jax.ops.segment_sum(a, seg, num_segments, indices_are_sorted=sorted_ids)

    rows = jax.ops.segment_sum(jnp.ones(values.shape[:1], values.dtype), seg, num_segments,
                               indices_are_sorted=sorted_ids)  # fmt: skip
    count = jnp.maximum(rows * nf, 1)[:, None]
    expand = lambda s: s.at[seg].get(mode="fill", fill_value=0)  # noqa: E731
    return _stats.two_pass(values, count, seg_sum, expand=expand)


def _gather_normalize(xf, ids, mean, residual, var, eps):
    # Out-of-range ids under jit (checked eagerly otherwise) gather NaN: a visible error.
    g = lambda s: s.at[ids].get(mode="fill", fill_value=jnp.nan)  # noqa: E731
    return _stats.normalize(xf, g(mean), g(residual), g(var), eps)


def graph_node_norm(x, scale=None, bias=None, *, eps=1e-5):
    """Node-wise normalization (Chen et al. 2020): layer norm over each node's features.

    Args:
      x: node features `[num_nodes, features]`.
      scale, bias: shape `[features]`, or None.
      eps: inside the square root (the authors use `nn.LayerNorm`, eps 1e-5).

    Returns:
      Array of `x`'s shape and dtype.
    """
    return layer_norm(_nodes(x), scale, bias, axis=-1, eps=eps)


def graph_adjacency_norm(x, scale=None, bias=None, *, edges, eps=1e-5):
    """Adjacency-wise normalization (Chen et al. 2020): statistics over a node's neighbourhood.

    Node `i` is normalized by the mean and variance of the features of `i` and of every sender
    of an edge into `i`, pooled over nodes *and* features (one mean and variance per node), as
    in the authors' `AdjaNodeNorm` (cyh1112/GraphNormalization, `norm/adjance_norm.py`).
    A node without incoming edges uses its own features (node-wise normalization); a self-loop
    in `edges` counts the node once more; parallel edges count once each.

    Differences from the authors' code: the biased variance with `eps` inside the square root
    (theirs divides by `std + eps`, unbiased), and nodes without incoming edges (theirs divide
    by `eps`).

    Args:
      x: node features `[num_nodes, features]`.
      scale, bias: shape `[features]`, or None.
      edges: int array `[2, num_edges]`, (senders, receivers), indices in `[0, num_nodes)`;
        checked when concrete; under jit, an edge out of range makes every output NaN (which
        node it was meant for is unknown, so no output can be trusted).
      eps: inside the square root.

    Returns:
      Array of `x`'s shape and dtype.
    """
    x = _nodes(x)
    scale, bias, eps = _checks.param_check(x, (1,), scale, bias, eps)
    n = x.shape[0]
    edges = _check_edges(edges, n)
    xf = x.astype(_checks.stats_dtype(x.dtype))
    send, recv = edges[0], edges[1]
    rows = jnp.concatenate([xf, xf.at[send].get(mode="fill", fill_value=0)], axis=0)
    seg = jnp.concatenate([jnp.arange(n, dtype=recv.dtype), recv])
    mean, residual, var = _segment_moments(rows, seg, n, sorted_ids=False, over_features=True)
    valid = jnp.all((send >= 0) & (send < n) & (recv >= 0) & (recv < n))
    y = jnp.where(valid, _stats.normalize(xf, mean, residual, var, eps), jnp.nan)
    return _stats.scale_shift(y, scale, bias, (1,), 2).astype(x.dtype)


def graph_norm(x, scale=None, bias=None, *, segment_ids, num_segments, eps=1e-5,
               indices_are_sorted=False):  # fmt: skip
    """Graph-wise normalization (Chen et al. 2020): per graph and feature, over the graph's nodes.

    For a batch of graphs given by `segment_ids` (the `jax.ops.segment_sum` convention), node
    `i` of graph `g` becomes `scale * (x_i - mu_g) / sqrt(var_g + eps) + bias` with `mu_g`,
    `var_g` the per-feature mean and biased variance over the nodes of `g`. Not the GraphNorm
    of Cai et al. (2021), which learns a mean shift.

    A graph with one node has variance 0 (its output is `bias`); a graph with no node (an unused
    id) has no output and gives no NaN, also in gradients. Differences from the authors' code
    (`norm/graph_norm.py`): the biased variance, `eps` inside the square root (theirs divides by
    `std + eps`, unbiased: NaN for one-node graphs).

    Args:
      x: node features `[num_nodes, features]`.
      scale, bias: shape `[features]`, or None.
      segment_ids: int array `[num_nodes]`, the graph of each node, in `[0, num_segments)`.
        Checked when concrete (also sortedness if `indices_are_sorted`); under jit, nodes with
        an id out of range are left out of the statistics and their output is NaN.
      num_segments: static int, the number of graphs.
      eps: inside the square root.
      indices_are_sorted: promise that `segment_ids` are sorted (faster segment sums on some
        backends); results are undefined if they are not.

    Returns:
      Array of `x`'s shape and dtype.
    """
    x = _nodes(x)
    scale, bias, eps = _checks.param_check(x, (1,), scale, bias, eps)
    ids, g = _check_segments(segment_ids, x.shape[0], num_segments, indices_are_sorted)
    xf = x.astype(_checks.stats_dtype(x.dtype))
    stats = _segment_moments(xf, ids, g, sorted_ids=indices_are_sorted, over_features=False)
    y = _gather_normalize(xf, ids, *stats, eps)
    return _stats.scale_shift(y, scale, bias, (1,), 2).astype(x.dtype)


def graph_batch_norm(x, scale, bias, state: BatchNormState, *, training: bool, momentum=0.99,
                     eps=1e-5, node_mask=None, axis_name=None):  # fmt: skip
    """Batch-wise normalization (Chen et al. 2020): `batch_norm` over all nodes of the batch.

    Args:
      x: node features `[num_nodes, features]`.
      scale, bias, state, training, momentum, eps, axis_name: as for `batch_norm`.
      node_mask: optional boolean `[num_nodes]`; False nodes (padding) are left out of the
        statistics.

    Returns:
      `(y, new_state)`.
    """
    return batch_norm(_nodes(x), scale, bias, state, training=training, axis=-1,
                      momentum=momentum, eps=eps, axis_name=axis_name, mask=node_mask)  # fmt: skip


def graph_learned_weights(num_features, kinds=GRAPH_NORM_KINDS, weighting="softmax",
                          dtype=jnp.float32):  # fmt: skip
    """Initial combination weights `[len(kinds), num_features]`, all equal after normalization:
    zeros for `weighting="softmax"`, ones for `"sum"` (the authors' `torch.ones`)."""
    kinds = _check_kinds(kinds)
    _check_weighting(weighting)
    init = jnp.zeros if weighting == "softmax" else jnp.ones
    return init((len(kinds), _checks.positive_int(num_features, "num_features")), dtype)


def _check_kinds(kinds):
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in GRAPH_NORM_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"`kinds` must be distinct names from {GRAPH_NORM_KINDS}, at least one; got {kinds!r}."
        )
    return kinds


def _check_weighting(weighting):
    if weighting not in ("softmax", "sum"):
        raise ValueError(f'`weighting` must be "softmax" or "sum", got {weighting!r}.')


def graph_learned_norm(
    x,
    scale,
    bias,
    weights,
    state: BatchNormState | None,
    *,
    training: bool,
    segment_ids=None,
    num_segments=None,
    edges=None,
    kinds=GRAPH_NORM_KINDS,
    weighting="softmax",
    momentum=0.99,
    eps=1e-5,
    node_mask=None,
    indices_are_sorted=False,
    axis_name=None,
):
    """Learned graph normalization (Chen et al. 2020): a per-feature mix of graph normalizations.

        y = scale * sum_k lambda^_k * norm_k(x) + bias

    over `k` in `kinds` (default: node-, adjacency-, graph- and batch-wise, the four ops above
    without their affine part), with per-feature weights `lambda^` normalized to sum to 1 over
    `k`: `softmax(weights, axis=0)` (default) or `weights / sum(weights)` (`weighting="sum"`).
    The authors' code has both: `UnifiedNorm` divides by the sum (weights init 1), and
    `UnitedNormSoftmax` uses a softmax; the sum can cross zero and blow up, so softmax is the
    default here. Initial weights: `graph_learned_weights`.

    Args:
      x: node features `[num_nodes, features]`.
      scale, bias: shape `[features]`, or None.
      weights: `[len(kinds), features]`, one row per entry of `kinds`, in that order.
      state: a `BatchNormState` `[features]` if "batch" is in `kinds`, else None.
      training: for the batch-wise part: batch statistics and a state update, or running ones.
      segment_ids, num_segments, indices_are_sorted: for "graph" (see `graph_norm`).
      edges: for "adjacency" (see `graph_adjacency_norm`).
      kinds: which normalizations to mix, names from `GRAPH_NORM_KINDS`.
      weighting: "softmax" or "sum".
      momentum, node_mask, axis_name: for "batch" (see `graph_batch_norm`).
      eps: inside every square root.

    Returns:
      `(y, new_state)`; `new_state` is None when "batch" is not in `kinds`.
    """
    x = _nodes(x)
    kinds = _check_kinds(kinds)
    _check_weighting(weighting)
    _checks.python_bool(training)
    scale, bias, eps = _checks.param_check(x, (1,), scale, bias, eps)
    nf = x.shape[1]
    weights = _checks.shape(weights, (len(kinds), nf), "weights",
                            f" (one row per kind of {kinds}, one column per feature)")  # fmt: skip
    _checks.floating(weights, "weights")
    if "batch" not in kinds and state is not None:
        raise ValueError('`state` must be None when "batch" is not in `kinds`.')
    xs = x.astype(_checks.stats_dtype(x.dtype))
    parts, new_state = [], None
    for k in kinds:
        if k == "node":
            parts.append(graph_node_norm(xs, eps=eps))
        elif k == "adjacency":
            parts.append(graph_adjacency_norm(xs, edges=edges, eps=eps))
        elif k == "graph":
            parts.append(graph_norm(xs, segment_ids=segment_ids, num_segments=num_segments,
                                    eps=eps, indices_are_sorted=indices_are_sorted))  # fmt: skip
        else:
            y_b, new_state = graph_batch_norm(xs, None, None, state, training=training,
                                              momentum=momentum, eps=eps, node_mask=node_mask,
                                              axis_name=axis_name)  # fmt: skip
            parts.append(y_b)
    w = weights.astype(parts[0].dtype)
    if weighting == "softmax":
        w = jax.nn.softmax(w, axis=0)
    else:
        w = w / jnp.sum(w, axis=0, keepdims=True)
    y = sum(w[i][None, :] * p for i, p in enumerate(parts))
    return _stats.scale_shift(y, scale, bias, (1,), 2).astype(x.dtype), new_state


# --- domain-agnostic batch normalization --------------------------------------------------------


def domain_agnostic_batch_norm(
    x,
    scale,
    bias,
    state: BatchNormState,
    *,
    source_mask,
    training: bool,
    axis=-1,
    momentum=0.99,
    eps=1e-5,
    axis_name=None,
):
    """Domain-agnostic batch normalization (Romijnders et al. 2018, arXiv 1809.05298).

    Batch normalization whose training statistics come from the source-domain examples only;
    every example, source or target, is normalized with them. Target examples do not enter the
    statistics at all, so no gradient reaches a target input through them (the statistics are
    differentiated through the source inputs only). The running averages are updated from the
    source statistics, and inference uses them for every domain. It is `batch_norm` with the
    source rows as its `mask`; with every example from the source it is exactly `batch_norm`.

    A training batch without any source example has no statistics: its outputs use mean 0 and
    variance 0 (as `batch_norm` with everything masked) and the running averages are left
    unchanged. Use `training=False` for target-only batches.

    Args:
      x: floating array `[batch, ..., features]`, the batch on axis 0.
      scale, bias: shape `x.shape[axis]`, or None.
      state: a `BatchNormState` of shape `x.shape[axis]`.
      source_mask: boolean `[batch]`, True for source-domain examples.
      training: source batch statistics (and a state update) if True, running ones if False.
      axis: int or tuple of ints, the feature axes (not 0).
      momentum: weight of the old running value, in [0, 1].
      eps: inside the square root.
      axis_name: named axis across which the statistics are synchronized.

    Returns:
      `(y, new_state)`, `y` with `x`'s shape and dtype.
    """
    x = _checks.floating(x)
    feat = _checks.axes(axis, x.ndim)
    if 0 in feat:
        raise ValueError(f"`axis`={axis!r} includes the batch axis 0; expected feature axes.")
    source_mask = _checks.shape(source_mask, x.shape[:1], "source_mask", " (one flag per example)")
    if source_mask.dtype != jnp.bool_:
        raise TypeError(f"`source_mask` must be boolean, got dtype {source_mask.dtype}.")
    red = tuple(a for a in range(x.ndim) if a not in feat)
    mshape = tuple(x.shape[a] for a in red)
    mask = jnp.broadcast_to(source_mask.reshape((-1,) + (1,) * (len(red) - 1)), mshape)
    _checks.python_bool(training)
    scale, bias, eps = _checks.param_check(x, feat, scale, bias, eps)
    momentum = _checks.in_unit_interval(momentum, "momentum")
    _checks.batch_norm_state_check(state, tuple(x.shape[a] for a in feat), x.shape)
    # Not `batch_norm(mask=...)`: the target examples are data here, normalized *and*
    # differentiated with the source statistics (batch_norm keeps masked padding out of every
    # gradient). A batch without source examples keeps the running averages (`ema_update`).
    xf = _stats.upcast(x)
    mean, residual, var, new_state = _stats.batch_moments(
        xf, red, state, training=training, momentum=momentum, mask=_stats.expand_mask(mask, x, red),
        axis_name=axis_name,
    )
    y = _stats.normalize(xf, mean, residual, var, eps)
    return _stats.scale_shift(y, scale, bias, feat, x.ndim).astype(x.dtype), new_state


# --- proxy normalization ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _normal_quantiles(n: int) -> np.ndarray:
    # float64 constants from the standard library, computed once per n: no ndtri in the graph.
    return np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])


def proxy_quantiles(num_samples=200, dtype=jnp.float32):
    """The standard-normal quantiles at `(i + 0.5) / n`, `i < n`: the Gaussian proxy's points.

    As the authors' `get_rand`: `sqrt(2) * erfinv(2 * (i + 0.5) / n - 1)`, 200 points.
    """
    return jnp.asarray(_normal_quantiles(_checks.positive_int(num_samples, "num_samples")), dtype)


def proxy_norm(
    y,
    scale=None,
    bias=None,
    proxy_scale=None,
    proxy_bias=None,
    *,
    activation=jax.nn.relu,
    axis=-1,
    eps=0.03,
    num_samples=200,
):
    """Proxy normalization (Labatie et al. 2021, arXiv 2106.03743): a proxy-normalized activation.

    Applied to the output `y` of a batch-independent normalization (LN or GN, without its own
    affine part) in place of the activation step:

        out = (phi(z) - E[phi(z~)]) / sqrt(Var[phi(z~)] + eps),
        z = scale * y + bias,   z~ = scale * Y~ + bias

    per channel, with the Gaussian proxy `Y~ ~ N(proxy_bias, (1 + proxy_scale)^2)`. The
    expectations are over `num_samples` fixed quantile points of the proxy (`proxy_quantiles`,
    `Y~_i = proxy_bias + (1 + proxy_scale) q_i`), the variance is the biased one over them.
    As in the authors' TensorFlow code (graphcore/examples,
    `applications/tensorflow/cnns/training/Models/proxy_norm.py`): 200 points, `eps = 0.03`,
    `proxy_scale`, `proxy_bias` initialized to 0, gradients through the proxy statistics into
    all four parameters (their optimizer back-propagates through the same proxy computation).

    Args:
      y: normalized floating array `[..., channels, ...]`, channels on `axis`.
      scale, bias: `gamma`, `beta` of the activation's input, shape `[channels]`, or None (1, 0).
      proxy_scale, proxy_bias: `gamma~`, `beta~` of the proxy, shape `[channels]`, or None (0).
      activation: the elementwise activation `phi` (e.g. `jax.nn.relu`, `jax.nn.swish`).
      axis: the channel axis.
      eps: inside the square root; 0.03 as the authors' `--proxy-epsilon`.
      num_samples: number of proxy points.

    Returns:
      Array of `y`'s shape and dtype.
    """
    y = _checks.floating(y, "y")
    c = _checks.channel_axis(axis, y.ndim)
    if not callable(activation):
        raise TypeError(f"`activation` must be a callable, e.g. jax.nn.relu; got {activation!r}.")
    _checks.positive_int(num_samples, "num_samples")
    pshape = (y.shape[c],)
    hint = f" (y.shape[axis] for y of shape {y.shape} and axis {c})"
    params = [_checks.param(p, pshape, n, hint) for n, p in (("scale", scale), ("bias", bias),
              ("proxy_scale", proxy_scale), ("proxy_bias", proxy_bias))]  # fmt: skip
    eps = _checks.nonnegative(eps, "eps")

    dtype = _checks.stats_dtype(y.dtype)
    gamma, beta, g_t, b_t = (
        jnp.full(pshape, default, dtype) if p is None else p.astype(dtype)
        for p, default in zip(params, (1, 0, 0, 0))
    )
    q = proxy_quantiles(num_samples, dtype)
    proxy = activation(gamma[None] * (b_t[None] + (1 + g_t[None]) * q[:, None]) + beta[None])
    mean, residual, var, _ = _stats.moments(proxy, (0,))
    shape = tuple(pshape[0] if a == c else 1 for a in range(y.ndim))
    b = lambda a: a.reshape(shape)  # noqa: E731
    z = activation(y.astype(dtype) * b(gamma) + b(beta))
    return _stats.normalize(z, b(mean), b(residual), b(var), eps).astype(y.dtype)
