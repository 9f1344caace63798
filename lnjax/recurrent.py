"""Normalized recurrent networks as pure functions: cells, and layers that run them on `lax.scan`.

A cell is a frozen dataclass of static settings with pure methods (Haiku's core protocol,
without the hidden state):

* `init(key, input_size) -> params`, a dict of arrays;
* `initial_carry(batch_shape=(), dtype=float32) -> carry`, zeros;
* `__call__(params, carry, x_t) -> (carry, y_t)`, one step;
* split for speed into `project_inputs(params, x)`, the part that does not depend on the
  carry (`N(W_x x)`, computable for every step before the scan), and
  `step(params, carry, u_t)`, the recurrent part: `cell(p, c, x) == cell.step(p, c,
  cell.project_inputs(p, x))`.

Every cell takes `norm` in {"layer" (default), "rms", "none"}: "none" is the unnormalized
baseline. Layers (`rnn`, `bidirectional_rnn`, `stacked_rnn`) run any cell over a sequence,
with per-sequence `lengths`. Gate orders follow PyTorch and Flax: LSTM `(i, f, g, o)`,
GRU `(r, z, n)`, so that weights map across libraries by slicing.
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lnjax import _checks
from lnjax.normalization import BatchNormState, batch_norm, layer_norm, rms_norm
from lnjax.relatives import divisive_norm

__all__ = [
    "BNLSTMCell",
    "BNLSTMState",
    "GRUCell",
    "LSTMCarry",
    "LSTMCell",
    "RNNCell",
    "bidirectional_rnn",
    "bn_lstm_rnn",
    "rnn",
    "stacked_rnn",
]

NORMS = ("layer", "rms", "divisive", "none")
# LN(W_x x) keeps only the direction of x (Table 1, single-case re-scaling); with this many
# input features or fewer, that is a large part of what the input carries.
FEW_INPUT_FEATURES = 8


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")


def _norm_params(norm, size, gain_init, dtype, *, bias=True):
    """Parameters of one normalized term `N(z) = g * norm(z) + b` (just `z + b` for "none")."""
    p = {}
    if norm != "none":
        p["scale"] = jnp.full((size,), gain_init, dtype)
    if bias:
        p["bias"] = jnp.zeros((size,), dtype)
    return p


def _lead(v, ndim):
    """Adds leading size-1 axes so that a per-unit vector broadcasts explicitly."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _apply_norm(norm, z, p, eps, groups=1, *, implementation=None, divisive=None):
    """`g * norm(z) + b` over the last axis; with `groups` > 1, statistics per group.
    `divisive`: `(radius, sigma)` of `divisive_norm` (`norm="divisive"`)."""
    if norm == "none":
        return z + _lead(p["bias"], z.ndim) if "bias" in p else z
    if norm == "divisive":
        radius, sigma = divisive
        fn = functools.partial(divisive_norm, radius=radius, sigma=sigma)
    else:
        fn = functools.partial(layer_norm if norm == "layer" else rms_norm, eps=eps, implementation=implementation)
    if groups == 1:
        return fn(z, p["scale"], p.get("bias"))
    y = fn(z.reshape(z.shape[:-1] + (groups, -1))).reshape(z.shape)
    y = y * _lead(p["scale"], y.ndim)
    return y + _lead(p["bias"], y.ndim) if "bias" in p else y


def _orthogonal_blocks(key, size, blocks, dtype):
    """`[size, blocks * size]`: one orthogonal matrix per gate, as Flax initializes LSTMs."""
    keys = jax.random.split(key, blocks)
    init = jax.nn.initializers.orthogonal()
    # QR runs in float32 (XLA:CPU has none for bf16/f16), then the result is cast.
    work = dtype if jnp.finfo(dtype).bits > 32 else jnp.float32
    return jnp.concatenate([init(k, (size, size), work) for k in keys], axis=-1).astype(dtype)


def _check_input(x, w_x, name="x"):
    x = _checks.floating(x, name)
    if x.ndim < 1 or x.shape[-1] != w_x.shape[0]:
        raise ValueError(
            f"`{name}` has shape {x.shape}; its last axis must be the cell's input size "
            f"{w_x.shape[0]} (the input_size given to `init`)."
        )
    return x.astype(w_x.dtype)


def _varying_like(carry, inputs):
    """`carry` marked as varying over every `shard_map` axis that some input varies over.

    Inside `shard_map`, a scan carry must keep its type; the zeros of a default carry vary over
    no mesh axis, but one step mixes in sharded inputs or parameters and makes the carry vary
    over their axes. Outside `shard_map` this is the identity.
    """
    def varying(x):
        aval = jax.typeof(x)
        mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; `vma` before
        return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))

    axes = set().union(*(varying(leaf) for leaf in jax.tree.leaves(inputs)))

    def cast(c):
        missing = tuple(sorted(axes - varying(c)))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(cast, carry) if axes else carry


def _matmul(a, w):
    return jnp.matmul(a, w, precision=lax.Precision.HIGHEST)


class LSTMCarry(NamedTuple):
    """LSTM carry: the cell `c` and the hidden state `h`, each `[*batch, hidden]`."""

    c: jax.Array
    h: jax.Array


@dataclasses.dataclass(frozen=True)
class _Cell:
    hidden_size: int
    norm: str = "layer"
    gain_init: float = 1.0
    eps: float = 1e-5
    implementation: str | None = None  # of the layer/RMS norms: see `layer_norm`
    dn_radius: int | None = 30  # norm="divisive": summation/suppression field radius (None: all)
    dn_sigma: float = 1.0  # norm="divisive": the smoothing term sigma

    def __post_init__(self):
        _checks.positive_int(self.hidden_size, "hidden_size")
        _check_norm(self.norm)
        _checks.nonnegative(self.eps, "eps")
        if self.implementation not in (None, "xla", "fused"):
            raise ValueError(f'`implementation` must be None, "xla" or "fused", got {self.implementation!r}.')

    def __call__(self, params, carry, x):
        return self.step(params, carry, self.project_inputs(params, x))

    def _norm(self, norm, z, p, groups=1):
        return _apply_norm(norm, z, p, self.eps, groups, implementation=self.implementation,
                           divisive=(self.dn_radius, self.dn_sigma))

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)


@dataclasses.dataclass(frozen=True)
class LSTMCell(_Cell):
    """LN-LSTM (Ba et al. 2016, supplement eq. 20-22) and its unnormalized baseline.

        [i, f, g, o] = N_h(W_h h_{t-1}) + N_x(W_x x_t)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(N_c(c_t))

    `N_h`, `N_x` normalize the whole 4H vector (one mean and variance for all gates), each
    with its own gain and bias (the paper's extra bias `b` is absorbed in them); `N_c` has
    its own gain and bias. The carry holds the raw `c_t`. With `norm="none"` this is the
    standard LSTM (biases `b_x`, `b_h` as in PyTorch; no normalization of `c_t`).

    Attributes:
      hidden_size: H.
      norm: "layer" (default), "rms", "divisive" or "none".
      gain_init: initial gains; the paper finds 1.0 clearly better than 0.1.
      eps: inside the square root of every normalization.
      implementation: of the layer/RMS norms: None (closed-form derivatives, the default),
        "xla" or "fused" (see `layer_norm`). GRUCell and RNNCell take it too.
      dn_radius, dn_sigma: with `norm="divisive"` (every cell), `divisive_norm`'s window
        radius over neighbouring units and its sigma (Ren et al. 2017: a window of 60 units,
        i.e. radius 30, for a tanh RNN; sigma 1 for their best runs).
      per_gate: statistics per gate (H units each) instead of over all 4H (old TF contrib).
      norm_input: normalize `W_x x_t` (the paper). None means True, with a warning at
        `init` when `input_size <= 8`: LN(W_x x) discards the norm of x_t, so a
        1-feature input keeps only its sign. False normalizes only the recurrent term.
      carry_normalized_cell: carry `N_c(c_t)` instead of `c_t` (TF-Addons LayerNormLSTMCell,
        PyTorch's fastrnns benchmark).
      forget_bias: initial bias of the forget gate (0 in the paper; 1 in Cooijmans et al.).
    """

    per_gate: bool = False
    norm_input: bool | None = None
    carry_normalized_cell: bool = False
    forget_bias: float = 0.0

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        if self.norm != "none" and self.norm_input is None and input_size <= FEW_INPUT_FEATURES:
            warnings.warn(
                f"LSTMCell(norm={self.norm!r}) normalizes W_x x_t, which discards the norm of each "
                f"input vector (single-case re-scaling invariance); with input_size={input_size} "
                "much of the input is lost (with 1 feature, all but its sign). Pass "
                "norm_input=False to normalize only the recurrent term, or norm_input=True to "
                "keep the paper's formulation and silence this warning.",
                stacklevel=2,
            )
        H = self.hidden_size
        kx, kh = jax.random.split(key)
        bx = _norm_params(self.norm if self._norm_x else "none", 4 * H, self.gain_init, dtype)
        bx["bias"] = bx["bias"].at[H : 2 * H].set(self.forget_bias)
        params = {
            "w_x": jax.nn.initializers.lecun_normal()(kx, (input_size, 4 * H), dtype),
            "w_h": _orthogonal_blocks(kh, H, 4, dtype),
            "n_x": bx,
            "n_h": _norm_params(self.norm, 4 * H, self.gain_init, dtype),
        }
        if self.norm != "none":
            params["n_c"] = _norm_params(self.norm, H, self.gain_init, dtype)
        return params

    @property
    def _norm_x(self):
        return self.norm_input is not False

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        z = super().initial_carry(batch_shape, dtype)
        return LSTMCarry(z, z)

    def project_inputs(self, params, x):
        """`N_x(W_x x)`, shape `[..., 4H]`; independent of the carry."""
        x = _check_input(x, params["w_x"])
        norm = self.norm if self._norm_x else "none"
        return self._norm(norm, _matmul(x, params["w_x"]), params["n_x"], self._groups)

    @property
    def _groups(self):
        return 4 if self.per_gate else 1

    def step(self, params, carry, u):
        c, h = carry
        gates = u + self._norm(self.norm, _matmul(h, params["w_h"]), params["n_h"], self._groups)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        c_out = c if self.norm == "none" else self._norm(self.norm, c, params["n_c"])
        h = jax.nn.sigmoid(o) * jnp.tanh(c_out)
        return LSTMCarry(c_out if self.carry_normalized_cell else c, h), h


@dataclasses.dataclass(frozen=True)
class GRUCell(_Cell):
    """LN-GRU (Ba et al. 2016, supplement eq. 26-28) and its unnormalized baseline.

        [r, z] = N_1(W_h h_{t-1}) + N_2(W_x x_t)
        n_t    = tanh(N_3(W x_t) + sigmoid(r) * N_4(U h_{t-1}))
        h_t    = sigmoid(z) * h_{t-1} + (1 - sigmoid(z)) * n_t

    Four separate normalizations, each with its own gain and bias; `N_1`, `N_2` normalize
    the 2H gate vector jointly. The update is written as in the authors' code, PyTorch and
    Flax (`z` gates the old state); the paper's eq. 28 is the same cell with `z -> -z`.
    With `norm="none"` this is PyTorch's `nn.GRU` cell (the bias of `U h` inside the reset).

    Attributes:
      hidden_size, norm, gain_init, eps: as for `LSTMCell`.
      norm_input: as for `LSTMCell` (applies to `N_2` and `N_3`).
    """

    norm_input: bool | None = None

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        if self.norm != "none" and self.norm_input is None and input_size <= FEW_INPUT_FEATURES:
            warnings.warn(
                f"GRUCell(norm={self.norm!r}) normalizes W_x x_t, which discards the norm of each "
                f"input vector; with input_size={input_size} much of the input is lost. Pass "
                "norm_input=False to normalize only the recurrent terms, or True to silence this.",
                stacklevel=2,
            )
        H = self.hidden_size
        kx, kh = jax.random.split(key)
        nx = self.norm if self.norm_input is not False else "none"
        return {
            "w_x": jax.nn.initializers.lecun_normal()(kx, (input_size, 3 * H), dtype),
            "w_h": _orthogonal_blocks(kh, H, 3, dtype),
            "n_x_gates": _norm_params(nx, 2 * H, self.gain_init, dtype),
            "n_x_cand": _norm_params(nx, H, self.gain_init, dtype),
            "n_h_gates": _norm_params(self.norm, 2 * H, self.gain_init, dtype),
            "n_h_cand": _norm_params(self.norm, H, self.gain_init, dtype),
        }

    def project_inputs(self, params, x):
        """`[N_2(W_x x), N_3(W x)]`, shape `[..., 3H]`."""
        x = _check_input(x, params["w_x"])
        nx = self.norm if self.norm_input is not False else "none"
        a = _matmul(x, params["w_x"])
        H = self.hidden_size
        return jnp.concatenate(
            [
                self._norm(nx, a[..., : 2 * H], params["n_x_gates"]),
                self._norm(nx, a[..., 2 * H :], params["n_x_cand"]),
            ],
            axis=-1,
        )

    def step(self, params, carry, u):
        H = self.hidden_size
        a = _matmul(carry, params["w_h"])
        gates = u[..., : 2 * H] + self._norm(self.norm, a[..., : 2 * H], params["n_h_gates"])
        r, z = jnp.split(jax.nn.sigmoid(gates), 2, axis=-1)
        hn = self._norm(self.norm, a[..., 2 * H :], params["n_h_cand"])
        n = jnp.tanh(u[..., 2 * H :] + r * hn)
        h = z * carry + (1 - z) * n
        return h, h


@dataclasses.dataclass(frozen=True)
class RNNCell(_Cell):
    """LN tanh-RNN (Ba et al. 2016, eq. 4): `h_t = tanh(N(W_h h_{t-1} + W_x x_t))`.

    The normalization (gain and bias) is over the summed input `a_t`, statistics recomputed
    at every step. With `norm="none"`: `tanh(W_h h + W_x x + b)`.
    """

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        return {
            "w_x": jax.nn.initializers.lecun_normal()(kx, (input_size, self.hidden_size), dtype),
            "w_h": _orthogonal_blocks(kh, self.hidden_size, 1, dtype),
            "n": _norm_params(self.norm, self.hidden_size, self.gain_init, dtype),
        }

    def project_inputs(self, params, x):
        """`W_x x`, shape `[..., H]` (normalized after the recurrent term is added)."""
        return _matmul(_check_input(x, params["w_x"]), params["w_x"])

    def step(self, params, carry, u):
        h = jnp.tanh(self._norm(self.norm, u + _matmul(carry, params["w_h"]), params["n"]))
        return h, h


# ----------------------------------------------------------------------------------------
# Sequence layers.


def default_precompute_inputs(batch_size: int | None = None) -> bool:
    """Whether `rnn` hoists `project_inputs` out of the scan by default.

    On accelerators, one large matmul before the scan wins. On CPU (BENCHMARKS.md, "projection
    form") the hoisted form measured faster or equal for batches of 1 to 8 sequences and the
    per-step form faster for 16 and 32, so it depends on `batch_size` (the number of sequences
    per batch; None counts as large).
    """
    if jax.default_backend() != "cpu":
        return True
    return batch_size is not None and batch_size <= 8


def _to_time_major(xs, time_major):
    return xs if time_major else jnp.moveaxis(xs, -2, 0)


def _from_time_major(ys, time_major):
    return ys if time_major else jax.tree.map(lambda y: jnp.moveaxis(y, 0, -2), ys)


def _zero_padding(xs, mask):
    """Padded steps as zeros: their values (even NaN) then reach no output and no gradient
    (a NaN times the zero cotangent of a discarded step would still be NaN)."""
    return xs if mask is None else jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))


def _lengths_mask(lengths, num_steps, batch_shape):
    """Checks `lengths` and returns the `[T, *batch]` mask of valid steps (or None)."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths) if not hasattr(lengths, "dtype") else lengths
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"`lengths` must be an integer array, got dtype {lengths.dtype}.")
    _checks.shape(lengths, batch_shape, "lengths", " (the batch shape of the inputs)")
    lengths = lengths.astype(jnp.int32)
    try:
        lo, hi = int(jnp.min(lengths, initial=0)), int(jnp.max(lengths, initial=0))
    except jax.errors.ConcretizationTypeError:
        lo, hi = 0, 0  # traced: documented to be clipped to [0, T]
    if lo < 0 or hi > num_steps:
        raise ValueError(
            f"`lengths` must lie in [0, {num_steps}] (the number of time steps), got values in "
            f"[{lo}, {hi}]."
        )
    t = jnp.arange(num_steps, dtype=lengths.dtype).reshape((num_steps,) + (1,) * len(batch_shape))
    return t < lengths[None]


def _reverse_within(xs, lengths):
    """Reverses each sequence (time-major) within its own length; padding stays at the end."""
    if lengths is None:
        return jax.tree.map(lambda x: jnp.flip(x, 0), xs)
    T = jax.tree.leaves(xs)[0].shape[0]
    t = jnp.arange(T, dtype=lengths.dtype).reshape((T,) + (1,) * lengths.ndim)
    idx = jnp.where(t < lengths[None], lengths[None] - 1 - t, t)
    return jax.tree.map(
        lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim)), 0), xs
    )


def _masked_scan(step, carry, xs, mask, unroll):
    """`lax.scan` of `step(carry, x_t) -> (carry, y_t)`; at masked steps the carry is frozen
    and the outputs are zeros (so padding receives zero gradient)."""

    def body(carry, inp):
        x_t, m_t = inp
        new_carry, y = step(carry, x_t)
        if m_t is not None:
            keep = lambda new, old: jnp.where(m_t[..., None], new, old)  # noqa: E731
            new_carry = jax.tree.map(keep, new_carry, carry)
            y = jax.tree.map(lambda v: jnp.where(m_t[..., None], v, jnp.zeros_like(v)), y)
        return new_carry, y

    return lax.scan(body, carry, (xs, mask), unroll=unroll)


def rnn(
    cell,
    params,
    xs,
    *,
    lengths=None,
    initial_carry=None,
    reverse=False,
    time_major=False,
    precompute_inputs=None,
    unroll=1,
):
    """Runs `cell` over a sequence with `lax.scan`.

    Args:
      cell: a cell (`LSTMCell`, `GRUCell`, `RNNCell`, or anything with the cell protocol).
      params: the cell's parameters.
      xs: inputs `[*batch, T, features]`, or `[T, *batch, features]` if `time_major`. Any
        number of batch axes, including none.
      lengths: optional int array of the batch shape, each in [0, T]. Steps at or beyond a
        sequence's length leave its carry unchanged and output zeros, so the final carry is
        the carry after each sequence's own last step.
      initial_carry: defaults to `cell.initial_carry(batch_shape)`.
      reverse: run each sequence backwards within its own length (outputs are returned in
        the original time order; padding stays at the end).
      time_major: layout of `xs` and of the outputs.
      precompute_inputs: compute `cell.project_inputs` for all steps before the scan (one
        large matmul) instead of inside it. None picks the faster form for the backend
        (`default_precompute_inputs`). Both forms compute the same function.
      unroll: passed to `lax.scan`.

    Returns:
      `(ys, final_carry)`: outputs `[*batch, T, hidden]` (or time-major) and the carry.
    """
    xs = _checks.floating(xs, "xs")
    if xs.ndim < 2:
        raise ValueError(f"`xs` must be [*batch, time, features], got shape {xs.shape}.")
    xs = _to_time_major(xs, time_major)
    T, batch_shape = xs.shape[0], xs.shape[1:-1]
    mask = _lengths_mask(lengths, T, batch_shape)
    if lengths is not None:
        lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, T)
    if initial_carry is None:
        initial_carry = cell.initial_carry(batch_shape, params["w_h"].dtype)
    initial_carry = _varying_like(initial_carry, (params, xs, lengths))
    if reverse:
        xs = _reverse_within(xs, lengths)
    xs = _zero_padding(xs, mask)
    if precompute_inputs is None:
        precompute_inputs = default_precompute_inputs(math.prod(batch_shape))
    if precompute_inputs:
        us = cell.project_inputs(params, xs)
        carry, ys = _masked_scan(lambda c, u: cell.step(params, c, u), initial_carry, us, mask, unroll)
    else:
        _check_input(xs, params["w_x"], "xs")
        carry, ys = _masked_scan(lambda c, x: cell(params, c, x), initial_carry, xs, mask, unroll)
    if reverse:
        ys = _reverse_within(ys, lengths)
    return _from_time_major(ys, time_major), carry


def bidirectional_rnn(cells, params, xs, *, lengths=None, time_major=False, **kwargs):
    """Forward and backward `rnn`s over the same inputs, outputs concatenated.

    Args:
      cells: `(forward_cell, backward_cell)`.
      params: `(forward_params, backward_params)`.
      xs, lengths, time_major, **kwargs: as for `rnn` (the backward pass reverses each
        sequence within its own length).

    Returns:
      `(ys, (forward_carry, backward_carry))`, `ys` of width `H_forward + H_backward`.
    """
    if len(cells) != 2 or len(params) != 2:
        raise ValueError("`cells` and `params` must each be a (forward, backward) pair.")
    yf, cf = rnn(cells[0], params[0], xs, lengths=lengths, time_major=time_major, **kwargs)
    yb, cb = rnn(cells[1], params[1], xs, lengths=lengths, time_major=time_major, reverse=True, **kwargs)
    return jnp.concatenate([yf, yb], axis=-1), (cf, cb)


def stacked_rnn(layers: Sequence[Any], params: Sequence[Any], xs, *, lengths=None, **kwargs):
    """Runs layers one after another, each on the previous layer's outputs.

    Args:
      layers: per layer, a cell, or a `(forward_cell, backward_cell)` pair for a
        bidirectional layer.
      params: per layer, the matching params (a pair for bidirectional layers).
      xs, lengths, **kwargs: as for `rnn`.

    Returns:
      `(ys, carries)` with the last layer's outputs and the list of final carries.
    """
    if len(layers) != len(params):
        raise ValueError(f"got {len(layers)} layers but {len(params)} parameter sets.")
    carries = []
    for layer, p in zip(layers, params):
        run = bidirectional_rnn if isinstance(layer, (tuple, list)) else rnn
        xs, carry = run(layer, p, xs, lengths=lengths, **kwargs)
        carries.append(carry)
    return xs, carries


# ----------------------------------------------------------------------------------------
# Batch-normalized LSTM: the comparator the paper argues against.


class BNLSTMState(NamedTuple):
    """Per-time-step population statistics of a BN-LSTM.

    Attributes:
      x, h: `BatchNormState`s of shape `[max_steps, 4H]` for `BN(W_x x_t)` and `BN(W_h h)`.
      c: `BatchNormState` of shape `[max_steps, H]` for `BN(c_t)`.
      steps_seen: the longest sequence length trained on; at inference, steps beyond it
        reuse its last step's statistics.
    """

    x: BatchNormState
    h: BatchNormState
    c: BatchNormState
    steps_seen: jax.Array


@dataclasses.dataclass(frozen=True)
class BNLSTMCell:
    """Recurrent batch normalization (Cooijmans et al. 2016), the paper's batch-norm baseline.

        [i, f, g, o] = BN_h(W_h h_{t-1}; g_h) + BN_x(W_x x_t; g_x) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t; g_c, b_c))

    Statistics are batch statistics, kept separately for every time step; inference uses the
    per-step population statistics. Run it with `bn_lstm_rnn`.

    Attributes:
      hidden_size: H.
      max_steps: number of per-step statistics kept (the longest training length).
      gain_init: 0.1 as recommended by Cooijmans et al.
      forget_bias: 1.0 as in Cooijmans et al.
      momentum, eps: of the batch normalizations (Flax convention for `momentum`).
    """

    hidden_size: int
    max_steps: int
    gain_init: float = 0.1
    forget_bias: float = 1.0
    momentum: float = 0.99
    eps: float = 1e-5

    def __post_init__(self):
        _checks.positive_int(self.hidden_size, "hidden_size")
        _checks.positive_int(self.max_steps, "max_steps")

    def init(self, key, input_size, dtype=jnp.float32):
        H = _checks.positive_int(self.hidden_size, "hidden_size")
        input_size = _checks.positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        return {
            "w_x": jax.nn.initializers.lecun_normal()(kx, (input_size, 4 * H), dtype),
            "w_h": _orthogonal_blocks(kh, H, 4, dtype),
            "bias": jnp.zeros((4 * H,), dtype).at[H : 2 * H].set(self.forget_bias),
            "g_x": jnp.full((4 * H,), self.gain_init, dtype),
            "g_h": jnp.full((4 * H,), self.gain_init, dtype),
            "n_c": _norm_params("layer", H, self.gain_init, dtype),
        }

    def init_state(self, dtype=jnp.float32) -> BNLSTMState:
        def stats(n):
            return BatchNormState(jnp.zeros((self.max_steps, n), dtype), jnp.ones((self.max_steps, n), dtype))

        H = self.hidden_size
        return BNLSTMState(stats(4 * H), stats(4 * H), stats(H), jnp.zeros((), jnp.int32))

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        z = jnp.zeros((*batch_shape, self.hidden_size), dtype)
        return LSTMCarry(z, z)


def bn_lstm_rnn(cell: BNLSTMCell, params, state: BNLSTMState, xs, *, training, lengths=None,
                initial_carry=None, time_major=False, axis_name=None, unroll=1):
    """Runs a `BNLSTMCell` over a sequence; statistics over the batch axes at each step.

    Args:
      cell, params, state: the cell, its parameters and its `BNLSTMState`.
      xs: `[*batch, T, features]` (or time-major) with at least one batch axis.
      training: batch statistics per step, and update `state` (requires T <= max_steps);
        otherwise per-step population statistics, step t using those of
        `min(t, steps_seen - 1)`.
      lengths: as for `rnn`; at each step only the sequences still running contribute.
      axis_name: named axis to synchronize batch statistics across (data parallelism).

    Returns:
      `(ys, final_carry, new_state)`.
    """
    if not isinstance(training, bool):
        raise TypeError(f"`training` must be a Python bool, got {training!r}.")
    xs = _to_time_major(_checks.floating(xs, "xs"), time_major)
    if xs.ndim < 3 and axis_name is None:
        raise ValueError(f"`xs` must have a batch axis for batch statistics, got shape {xs.shape}.")
    T, batch_shape = xs.shape[0], xs.shape[1:-1]
    if training and T > cell.max_steps:
        raise ValueError(
            f"`xs` has {T} time steps but the cell keeps statistics for max_steps={cell.max_steps}; "
            "train on sequences no longer than max_steps (or raise it)."
        )
    mask = _lengths_mask(lengths, T, batch_shape)
    steps_mask = jnp.ones((T,) + batch_shape, bool) if mask is None else mask
    if initial_carry is None:
        initial_carry = cell.initial_carry(batch_shape, params["w_h"].dtype)
    initial_carry = _varying_like(initial_carry, (params, state, xs, lengths))
    _check_input(xs, params["w_x"], "xs")
    xs = _zero_padding(xs, mask)
    if training:
        idx = jnp.arange(T)
    else:
        last = jnp.where(state.steps_seen > 0, state.steps_seen, cell.max_steps) - 1
        idx = jnp.minimum(jnp.arange(T, dtype=last.dtype), last)
    per_step = jax.tree.map(lambda s: s[idx], (state.x, state.h, state.c))
    bn = dict(training=training, momentum=cell.momentum, eps=cell.eps, axis_name=axis_name)

    def step(carry, inp):
        x_t, (sx, sh, sc), m_t = inp
        c, h = carry
        m = m_t  # shape batch_shape; () when the batch is a named (vmapped) axis
        ax, sx = batch_norm(_matmul(x_t.astype(params["w_x"].dtype), params["w_x"]), params["g_x"], None, sx, mask=m, **bn)
        ah, sh = batch_norm(_matmul(h, params["w_h"]), params["g_h"], None, sh, mask=m, **bn)
        i, f, g, o = jnp.split(ax + ah + _lead(params["bias"], ax.ndim), 4, axis=-1)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        cn, sc = batch_norm(c_new, params["n_c"]["scale"], params["n_c"]["bias"], sc, mask=m, **bn)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(cn)
        keep = m_t[..., None]
        new_carry = LSTMCarry(jnp.where(keep, c_new, c), jnp.where(keep, h_new, h))
        return new_carry, (jnp.where(keep, h_new, 0), (sx, sh, sc))

    carry, (ys, stats) = lax.scan(step, initial_carry, (xs, per_step, steps_mask), unroll=unroll)
    if training:
        # Steps no sequence reached keep their old statistics.
        active = jnp.any(steps_mask.reshape(T, -1), axis=1)
        if axis_name is not None:  # a step is active if any shard's sequence reached it
            active = lax.pmax(active.astype(jnp.int32), axis_name) > 0
        active = active[:, None]
        merge = lambda new, old: old.at[:T].set(jnp.where(active, new, old[:T]))  # noqa: E731
        x_s, h_s, c_s = jax.tree.map(merge, stats, (state.x, state.h, state.c))
        seen = jnp.maximum(state.steps_seen, jnp.sum(active, dtype=jnp.int32))
        state = BNLSTMState(x_s, h_s, c_s, seen)
    return _from_time_major(ys, time_major), carry, state
