"""The paper's models as pure functions over lnjax ops: an MLP (§6.6), a small ConvNet (§6.7)
and a recurrent sequence model (§6.2/§6.5 analogues).

A `Model` is a pair of pure functions:
  init(key) -> (params, state)             state: running statistics (empty if none)
  apply(params, state, x, *, training, axis_name=None) -> (outputs, new_state)

`axis_name` names the mapped axis (`shard_map`/`pmap`/`vmap`) the batch is split over in
data-parallel training: batch norm then reduces its statistics across it, so every shard
normalizes with the statistics of the global batch. Models without batch norm ignore it.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import lnjax

NORMS = ("none", "batch", "layer", "rms", "switchable", "batch_layer", "divisive")
CONV_NORMS = ("none", "batch", "layer", "rms", "switchable")
DIVISIVE_RADIUS = 16  # divisive norm's window radius over hidden units (MLP)


class Model(NamedTuple):
    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any]]


def _check_norm(norm, allowed=NORMS):
    if norm not in allowed:
        raise ValueError(f"`norm` must be one of {allowed}, got {norm!r}.")


def _dense(key, n_in, n_out):
    return {"w": jax.nn.initializers.he_normal()(key, (n_in, n_out), jnp.float32), "b": jnp.zeros((n_out,), jnp.float32)}


def _norm_init(norm, shape):
    if norm == "none":
        return {}, None
    p = {"scale": jnp.ones(shape, jnp.float32), "bias": jnp.zeros(shape, jnp.float32)}
    if norm == "switchable":
        p["control"] = lnjax.switchable_control()
    stateful = norm in ("batch", "switchable", "batch_layer")
    return p, (lnjax.batch_norm_state(shape) if stateful else None)


def _norm_apply(norm, p, s, a, *, training, axis=-1, momentum=0.9, axis_name=None, batch_size=None):
    """Normalizes pre-activations `a` (gain and bias after normalizing, as eq. 5)."""
    if norm == "layer":
        # Over every non-batch axis (per example), with one gain and bias per channel: for
        # images this is group norm with one group, as the paper's ConvNet LN.
        if a.ndim == 2:
            return lnjax.layer_norm(a, p["scale"], p["bias"]), s
        return lnjax.group_norm(a, 1, p["scale"], p["bias"], axis=axis), s
    if norm == "rms":
        return lnjax.rms_norm(a, p["scale"], p["bias"]), s
    if norm == "batch":
        return lnjax.batch_norm(a, p["scale"], p["bias"], s, training=training, axis=axis, momentum=momentum,
                                axis_name=axis_name)
    if norm == "switchable":
        if a.ndim == 2:
            # No spatial axes, so no instance statistics: the IN weight is pinned at 0, leaving
            # the LN/BN mix of the authors' SwitchNorm1d.
            no_in = lambda l: l.at[0].set(-jnp.inf)  # noqa: E731
            control = lnjax.SwitchableControl(*(no_in(l) for l in p["control"]))
            y, s = lnjax.switchable_norm(a[:, None], p["scale"], p["bias"], control, s, training=training,
                                         momentum=momentum, axis_name=axis_name)
            return y[:, 0], s
        return lnjax.switchable_norm(a, p["scale"], p["bias"], p["control"], s, training=training, axis=axis,
                                     momentum=momentum, axis_name=axis_name)
    if norm == "batch_layer":
        return lnjax.batch_layer_norm(a, p["scale"], p["bias"], s, training=training, momentum=momentum,
                                      batch_size=batch_size, axis_name=axis_name)
    if norm == "divisive":
        return lnjax.divisive_norm(a, p["scale"], p["bias"], radius=DIVISIVE_RADIUS), s
    return a, s


def mlp(sizes, norm="layer", *, batch_size=None):
    """Permutation-invariant MLP `sizes[0] -> ... -> sizes[-1]` with ReLU (§6.6).

    BN normalizes every layer, the output included (as the paper's BN baseline); every other
    norm (layer, RMS, switchable, batch-layer, divisive with radius `DIVISIVE_RADIUS`)
    normalizes the hidden layers only, as the paper's LN. Linear biases are dropped where a
    normalization's bias replaces them. `batch_size` is batch-layer norm's `m` (the training
    batch size, also at evaluation, as its authors).
    """
    _check_norm(norm)
    n_layers = len(sizes) - 1

    def normed(i):
        return norm != "none" and (i < n_layers - 1 or norm == "batch")

    def init(key):
        params, state = [], []
        for i, k in enumerate(jax.random.split(key, n_layers)):
            layer = _dense(k, sizes[i], sizes[i + 1])
            s = None
            if normed(i):
                del layer["b"]
                layer["norm"], s = _norm_init(norm, (sizes[i + 1],))
            params.append(layer)
            state.append(s)
        return params, state

    def apply(params, state, x, *, training, axis_name=None):
        new_state = []
        for i, (p, s) in enumerate(zip(params, state)):
            a = x @ p["w"]
            if normed(i):
                a, s = _norm_apply(norm, p["norm"], s, a, training=training, axis_name=axis_name,
                                   batch_size=batch_size)
            else:
                a = a + p["b"][None]
            new_state.append(s)
            x = jax.nn.relu(a) if i < n_layers - 1 else a
        return x, new_state

    return Model(init, apply)


def convnet(num_classes, channels=(32, 64), norm="layer", in_channels=1):
    """Small ConvNet for `[batch, H, W, C]` images (§6.7): 3x3 convs (the second and later with
    stride 2), each followed by the normalization and ReLU, global average pooling, a linear
    softmax layer. LN is over each example's channels and positions (group norm, 1 group);
    switchable norm mixes IN, LN and BN statistics per channel."""
    _check_norm(norm, CONV_NORMS)

    def init(key):
        keys = jax.random.split(key, len(channels) + 1)
        params, state, c_in = [], [], in_channels
        for k, c in zip(keys, channels):
            layer = {"w": jax.nn.initializers.he_normal()(k, (3, 3, c_in, c), jnp.float32)}
            layer["norm"], s = _norm_init(norm, (c,))
            if norm == "none":
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
            if norm == "none":
                a = a + p["b"][None, None, None]
            a, s = _norm_apply(norm, p["norm"], s, a, training=training, axis_name=axis_name)
            new_state.append(s)
            x = jax.nn.relu(a)
        x = jnp.mean(x, axis=(1, 2))
        return x @ params[-1]["w"] + params[-1]["b"][None], new_state

    return Model(init, apply)


def sequence_model(input_size, num_outputs, hidden_size, cell="lstm", norm="layer", *,
                   gain_init=None, norm_input=None, max_steps=None, forget_bias=None,
                   tokens=False, readout="last", dn_radius=None, dn_sigma=None):
    """A recurrent network read out linearly from its hidden states.

    Args:
      input_size: features per step, or the vocabulary size with `tokens=True`.
      cell: "lstm", "gru" or "rnn" (lnjax cells with `norm` in none/layer/rms), or
        "bn_lstm" (Cooijmans et al., needs `max_steps`; `norm` is ignored).
      gain_init, norm_input, forget_bias, dn_radius, dn_sigma: passed to the cell when given
        (`dn_*`: `norm="divisive"`'s window radius and sigma).
      tokens: inputs are int tokens `[batch, T]`, fed one-hot.
      readout: "last" (outputs `[batch, num_outputs]` from the last hidden state) or "all"
        (`[batch, T, num_outputs]`, one prediction per step: copying, language modelling).
    """
    if readout not in ("last", "all"):
        raise ValueError(f'`readout` must be "last" or "all", got {readout!r}.')
    if tokens and norm_input is None:
        norm_input = True  # one-hot inputs all have norm 1: LN(W_x x) loses nothing
    kw = {k: v for k, v in dict(gain_init=gain_init, forget_bias=forget_bias).items() if v is not None}
    if norm == "divisive":
        kw.update({k: v for k, v in dict(dn_radius=dn_radius, dn_sigma=dn_sigma).items() if v is not None})
    if cell == "bn_lstm":
        if max_steps is None:
            raise ValueError("`max_steps` is required for cell='bn_lstm'.")
        core = lnjax.BNLSTMCell(hidden_size, max_steps, **kw)
    elif cell in ("lstm", "gru", "rnn"):
        cls = {"lstm": lnjax.LSTMCell, "gru": lnjax.GRUCell, "rnn": lnjax.RNNCell}[cell]
        if cell != "rnn" and norm_input is not None:
            kw["norm_input"] = norm_input
        if cell != "lstm":
            kw.pop("forget_bias", None)
        core = cls(hidden_size, norm=norm, **kw)
    else:
        raise ValueError(f"`cell` must be one of ('lstm', 'gru', 'rnn', 'bn_lstm'), got {cell!r}.")

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
