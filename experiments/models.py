"""The paper's models as pure functions over lnjax ops: an MLP (§6.6), a small ConvNet (§6.7)
and a recurrent sequence model (§6.2/§6.5 analogues).

A `Model` is a pair of pure functions:
  init(key) -> (params, state)             state: running statistics (empty if none)
  apply(params, state, x, *, training) -> (outputs, new_state)
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import lnjax

NORMS = ("none", "batch", "layer", "rms")


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
    return p, (lnjax.batch_norm_state(shape) if norm == "batch" else None)


def _norm_apply(norm, p, s, a, *, training, axis=-1, momentum=0.9):
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
        return lnjax.batch_norm(a, p["scale"], p["bias"], s, training=training, axis=axis, momentum=momentum)
    return a, s


def mlp(sizes, norm="layer"):
    """Permutation-invariant MLP `sizes[0] -> ... -> sizes[-1]` with ReLU (§6.6).

    LN and RMS normalize the hidden layers, not the softmax layer (as the paper); BN normalizes
    every layer, the output included (as the paper's BN baseline). Linear biases are dropped
    where a normalization's bias replaces them.
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

    def apply(params, state, x, *, training):
        new_state = []
        for i, (p, s) in enumerate(zip(params, state)):
            a = x @ p["w"]
            if normed(i):
                a, s = _norm_apply(norm, p["norm"], s, a, training=training)
            else:
                a = a + p["b"][None]
            new_state.append(s)
            x = jax.nn.relu(a) if i < n_layers - 1 else a
        return x, new_state

    return Model(init, apply)


def convnet(num_classes, channels=(32, 64), norm="layer", in_channels=1):
    """Small ConvNet for `[batch, H, W, C]` images (§6.7): 3x3 convs (the second and later with
    stride 2), each followed by the normalization and ReLU, global average pooling, a linear
    softmax layer. LN is over each example's channels and positions (group norm, 1 group)."""
    _check_norm(norm)

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

    def apply(params, state, x, *, training):
        new_state = []
        for i, (p, s) in enumerate(zip(params[:-1], state)):
            stride = 1 if i == 0 else 2
            a = jax.lax.conv_general_dilated(
                x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            if norm == "none":
                a = a + p["b"][None, None, None]
            a, s = _norm_apply(norm, p["norm"], s, a, training=training)
            new_state.append(s)
            x = jax.nn.relu(a)
        x = jnp.mean(x, axis=(1, 2))
        return x @ params[-1]["w"] + params[-1]["b"][None], new_state

    return Model(init, apply)


def sequence_model(input_size, num_outputs, hidden_size, cell="lstm", norm="layer", *,
                   gain_init=None, norm_input=None, max_steps=None, forget_bias=None):
    """A recurrent network read out linearly from its last hidden state.

    Args:
      cell: "lstm", "gru" or "rnn" (lnjax cells with `norm` in none/layer/rms), or
        "bn_lstm" (Cooijmans et al., needs `max_steps`; `norm` is ignored).
      gain_init, norm_input, forget_bias: passed to the cell when given.
    """
    kw = {k: v for k, v in dict(gain_init=gain_init, forget_bias=forget_bias).items() if v is not None}
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

    def apply(params, state, x, *, training):
        if cell == "bn_lstm":
            _, carry, state = lnjax.bn_lstm_rnn(core, params["rnn"], state, x, training=training)
        else:
            _, carry = lnjax.rnn(core, params["rnn"], x)
        h = carry.h if isinstance(carry, lnjax.LSTMCarry) else carry
        return h @ params["out"]["w"] + params["out"]["b"][None], state

    return Model(init, apply)
