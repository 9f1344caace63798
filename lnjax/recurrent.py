"""Normalized recurrent networks as pure functions: cells, and layers that run them on `lax.scan`.

The cell protocol (Haiku's core, without hidden state), all that `rnn`, `bidirectional_rnn` and
`stacked_rnn` use:

* `initial_carry(batch_shape=(), dtype=float32) -> carry`, zeros;
* `__call__(params, carry, x_t) -> (carry, y_t)`, one step, `x_t` `[*batch, features]`;
* optionally, for speed, `project_inputs(params, xs)`: the part of a step that does not depend
  on the carry (`N_x(W_x x)`), computed for every step before the scan, and `step(params,
  carry, u_t)`, the rest: `cell(p, c, x) == cell.step(p, c, cell.project_inputs(p, x))`;
* optionally, for a cell whose step depends on which sequences are still running (batch
  statistics), `masked(params, carry, x_t, valid) -> (carry, y_t)`, with `valid` the `[*batch]`
  bool mask of running sequences (None without `lengths`); `rnn` then leaves masking to it.

The cells here are frozen dataclasses of static settings that also have `init(key,
input_size, dtype) -> params`. Each normalized term takes a normalizer (`lnjax.norms`, or a
string shortcut such as "layer"); None leaves the term unnormalized (`z + b`, or `c_t` as it
is), so one cell gives the paper's form, recurrent-only, cell-only (DRAW) and the standard
unnormalized cell. Gate orders follow PyTorch and Flax: LSTM `(i, f, g, o)`, GRU `(r, z, n)`,
so that weights map across libraries by slicing.
"""

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lnjax import _checks, _sharding, heuristics, normalization, norms
from lnjax import native as lnjax_native
from lnjax.norms import Normalizer

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

# LN(W_x x) keeps only the direction of x (Table 1, single-case re-scaling): with one input
# feature only its sign, and with few features much of what the input carries.
FEW_INPUT_FEATURES = 8


def _orthogonal_blocks(key, size, blocks, dtype):
    """`[size, blocks * size]`: one orthogonal matrix per gate, as Flax initializes LSTMs (each
    block is `jax.nn.initializers.orthogonal()` of its own key)."""
    keys = jax.random.split(key, blocks)
    # QR runs in float32 (XLA:CPU has none for bf16/f16), then the result is cast.
    work = dtype if jnp.finfo(dtype).bits > 32 else jnp.float32
    a = jax.vmap(lambda k: jax.random.normal(k, (size, size), work))(keys)
    # One batched QR for all the blocks, where the initializer would make one per block: with
    # two batched QRs in one program, XLA:CPU's LAPACK kernels deadlock its thread pool (jax
    # 0.10.2, seen on 2 cores when the init of a sweep's members is vmapped).
    q, r = jnp.linalg.qr(a)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    return jnp.concatenate(list(q), axis=-1).astype(dtype)


def _per_block(init, name, key, shape, blocks, dtype):
    """`init(k_i, shape, dtype)` for each block (gate) `i`, keys `jax.random.split(key, blocks)`,
    concatenated along the last axis (as Flax's cells, whose gates each have their own kernel)."""
    if not callable(init):
        raise TypeError(f"`{name}` must be an initializer `(key, shape, dtype) -> array`, got {init!r}.")
    out = [jnp.asarray(init(k, shape, dtype)) for k in jax.random.split(key, blocks)]
    for w in out:
        if w.shape != tuple(shape):
            raise ValueError(f"`{name}` returned shape {w.shape} for shape {tuple(shape)} (one gate).")
    return jnp.concatenate(out, axis=-1).astype(dtype)


def _weights(key, input_size, hidden, blocks, dtype, kernel_init=None, recurrent_kernel_init=None):
    """`w_x` `[input_size, blocks * H]` and `w_h` `[H, blocks * H]`.

    By default LeCun normal (one draw for the whole matrix) and orthogonal per block: Flax's
    default distributions, with lnjax's draws. An initializer given is called per gate (block),
    `(input_size, H)` and `(H, H)`, as in Flax's `LSTMCell`, see `_per_block`."""
    kx, kh = jax.random.split(key)
    if kernel_init is None:
        w_x = jax.nn.initializers.lecun_normal()(kx, (input_size, blocks * hidden), dtype)
    else:
        w_x = _per_block(kernel_init, "kernel_init", kx, (input_size, hidden), blocks, dtype)
    if recurrent_kernel_init is None:
        w_h = _orthogonal_blocks(kh, hidden, blocks, dtype)
    else:
        w_h = _per_block(recurrent_kernel_init, "recurrent_kernel_init", kh, (hidden, hidden), blocks, dtype)
    return {"w_x": w_x, "w_h": w_h}


def _init_biases(params, bias_init, key, hidden, dtype, *terms):
    """`params` with `bias_init` written into one bias per pre-activation: `terms` are
    `(keys, blocks)`, the input-side term first; the first of `keys` whose normalizer has a bias
    gets `bias_init` per gate (`(H,)` each, as Flax), the others keep theirs (0): the terms are
    summed, so the initial total bias is `bias_init`'s. None leaves `params` as they are."""
    if bias_init is None:
        return params
    for i, (keys, blocks) in enumerate(terms):
        k = next((k for k in keys if "bias" in params.get(k, {})), None)
        if k is None:
            raise ValueError(f"`bias_init` needs a bias in one of the terms {keys}, but none of their "
                             "normalizers has one.")  # fmt: skip
        bias = _per_block(bias_init, "bias_init", jax.random.fold_in(key, i), (hidden,), blocks, dtype)
        params = {**params, k: {**params[k], "bias": bias}}
    return params


def _check_input(x, w_x, name="x"):
    x = _checks.floating(x, name)
    if x.ndim < 1 or x.shape[-1] != w_x.shape[0]:
        raise ValueError(
            f"`{name}` has shape {x.shape}; its last axis must be the cell's input size "
            f"{w_x.shape[0]} (the input_size given to `init`)."
        )
    return x.astype(w_x.dtype)


def _term(spec, field, role, stateful=False):
    """The normalizer of one term; None is the unnormalized form of its role: `z + b` for a
    gate/candidate pre-activation, the identity for the LSTM's `c_t`."""
    norm = norms.resolve(spec, field)
    if norm is None:
        return norms.bias() if role == "pre-activation" else norms.identity()
    if norm.stateful != stateful:
        raise TypeError(
            f"`{field}`={norm!r} is {'' if norm.stateful else 'not '}stateful; "
            + ("use BNLSTMCell for batch statistics per time step." if norm.stateful
               else "BNLSTMCell needs stateful normalizers (lnjax.norms.batch).")
        )
    return norm


def _unnormalized(norm) -> bool:
    return norm is None or norm in (norms.bias(), norms.identity())


def _native_kind(norm, role):
    """`(kind, eps)` of a term that the native LSTM step computes (kind 0: only a bias for a
    pre-activation, nothing for the cell; 1: layer norm; 2: RMS norm, each over the whole term
    with a Python `eps`), or None where the step stays in XLA."""
    kind, args, options = norm.spec
    if (kind, role) in (("bias", "pre-activation"), ("identity", "cell")):
        return 0, 0.0
    options = dict(options)
    ops = {"layer": normalization.layer_norm, "rms": normalization.rms_norm}
    if kind not in ops or args or set(options) - {"eps", "scale_init", "bias", "implementation", "groups"} \
            or options.get("groups", 1) != 1 or options.get("implementation") not in (None, "native"):  # fmt: skip
        return None
    eps = options.get("eps", inspect.signature(ops[kind]).parameters["eps"].default)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    return (1 if kind == "layer" else 2), float(eps)


def _native_kinds(*terms):
    """`((kinds...), (eps...))` of `(normalizer, role)` terms a native step computes, or None."""
    found = [_native_kind(norm, role) for norm, role in terms]
    return None if None in found else (tuple(k for k, _ in found), tuple(e for _, e in found))


def _native_applies(kinds, u, carry) -> bool:
    """Whether a step with these terms' `kinds` runs natively for these operands."""
    return (kinds is not None and u.size > 0 and carry.dtype in (jnp.float32, jnp.float64) and u.dtype == carry.dtype
            and lnjax_native.available())  # fmt: skip


def _check_forget_bias(value):
    """`forget_bias` as one finite real number (it is written into a bias array at `init`)."""
    _checks.real_scalar(value, "forget_bias")
    if not math.isfinite(float(value)):
        raise ValueError(f"`forget_bias` must be finite, got {value!r}.")


def _check_input_norm(cell, spec, input_size):
    """`N(W_x x_t)` keeps only the direction of `x_t`: an error with one input feature, a
    warning with a few, unless the normalizer was passed explicitly as a value."""
    # A string that names no normalization ("none", "bias", "identity") keeps all of x_t.
    if not isinstance(spec, str) or input_size > FEW_INPUT_FEATURES or _unnormalized(norms.resolve(spec)):
        return
    name = type(cell).__name__
    what = (f"{name}(input_norm={spec!r}) normalizes W_x x_t, which keeps only the direction of "
            f"each input vector (single-case re-scaling invariance, Table 1)")  # fmt: skip
    fixes = ("Pass input_norm=None to normalize only the recurrent terms, or "
             f"input_norm=lnjax.norms.{spec}() to keep the paper's form explicitly.")  # fmt: skip
    if input_size == 1:
        raise ValueError(f"{what}: with input_size=1 that is only the sign of x_t, and the model "
                         f"cannot learn from its input. {fixes}")  # fmt: skip
    warnings.warn(f"{what}: with input_size={input_size} much of the input is lost and the model "
                  f"may fail to learn. {fixes}", stacklevel=3)  # fmt: skip


def _lstm_update(gates, c):
    """`(c_t, sigmoid(o))` from the pre-activations `[i, f, g, o]` (eq. 21)."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    return jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g), jax.nn.sigmoid(o)


def _term_params(params, keys, forget_bias, hidden):
    """`params` without the entries of parameterless terms (`{}`: nnx and linen keep no empty
    collections; the cells read them back as `{}`), the forget gate's initial bias written into
    the first of `keys` whose term has a bias."""
    params = {k: v for k, v in params.items() if not (isinstance(v, dict) and not v)}
    if forget_bias == 0:
        return params
    for k in keys:
        if "bias" in params.get(k, {}):
            params[k]["bias"] = params[k]["bias"].at[hidden : 2 * hidden].set(forget_bias)
            return params
    raise ValueError(f"`forget_bias`={forget_bias!r} needs a bias in the input or recurrent term, "
                     "but neither normalizer has one.")  # fmt: skip


class LSTMCarry(NamedTuple):
    """LSTM carry: the cell `c` and the hidden state `h`, each `[*batch, hidden]`."""

    c: jax.Array
    h: jax.Array


@dataclasses.dataclass(frozen=True)
class _Cell:
    """Settings every cell shares.

    Attributes:
      hidden_size: H.
      precision (keyword-only): of the matmuls (`jax.lax.Precision`); None is the backend's
        default (TF32 on recent GPUs, bfloat16 passes on TPU); pass `Precision.HIGHEST` for
        float32 accuracy there.
      dtype (keyword-only): dtype of the matmul operands (e.g. bfloat16); None keeps the
        parameters'. The products, normalizations and gate arithmetic are in the parameters'
        dtype.
    """

    hidden_size: int
    precision: Any = dataclasses.field(default=None, kw_only=True)
    dtype: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        _checks.positive_int(self.hidden_size, "hidden_size")
        # An integer matmul dtype would truncate every product (and the gates then read 0).
        if self.dtype is not None and not jnp.issubdtype(self.dtype, jnp.floating):
            shown = jnp.dtype(self.dtype).name if isinstance(self.dtype, type) else repr(self.dtype)
            raise TypeError(f"`dtype` (of the matmul operands) must be a floating dtype or None, got {shown}.")

    def _matmul(self, a, w):
        dt = w.dtype if self.dtype is None else self.dtype
        return jnp.matmul(a.astype(dt), w.astype(dt), precision=self.precision).astype(w.dtype)

    def _set_terms(self, **terms):
        """Resolves each `field: role` once, so the cell holds Normalizer values."""
        for field, role in terms.items():
            object.__setattr__(self, f"_{field}", _term(getattr(self, field), field, role))

    def __call__(self, params, carry, x):
        return self.step(params, carry, self.project_inputs(params, x))

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)


_TermSpec = Normalizer | str | None


@dataclasses.dataclass(frozen=True)
class LSTMCell(_Cell):
    """LN-LSTM (Ba et al. 2016, supplement eq. 20-22), and every per-term variant of it.

        [i, f, g, o] = N_h(W_h h_{t-1}) + N_x(W_x x_t)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(N_c(c_t))

    Each `N` is a normalizer with its own gain and bias (the paper's extra bias `b` is absorbed
    in them); by default layer norm over the whole 4H vector (one mean and variance for all
    gates; `norms.layer(groups=4)` gives per-gate statistics). The carry holds the raw `c_t`.

        LSTMCell(H)                                           # the paper's LN-LSTM
        LSTMCell(H, input_norm=None)                          # recurrent terms only
        LSTMCell(H, input_norm=None, recurrent_norm=None)     # DRAW's (§6.4): LN on c_t only
        LSTMCell(H, None, None, None)                         # the standard LSTM (PyTorch's)

    Attributes:
      hidden_size, precision, dtype: see `_Cell`.
      input_norm, recurrent_norm: `N_x`, `N_h`, each a `lnjax.norms` value, a name, or None
        for `z + b`. A named (string) `input_norm` with `input_size=1` is an error at `init`,
        and with up to 8 features a warning (see `FEW_INPUT_FEATURES`).
      cell_norm: `N_c`; None for `c_t` itself.
      forget_bias: initial bias of the forget gate, in `N_x`'s bias (else `N_h`'s); 0 in the
        paper, 1 in Cooijmans et al.
      carry_normalized_cell: carry `N_c(c_t)` instead of `c_t` (TF-Addons LayerNormLSTMCell).
      kernel_init, recurrent_kernel_init, bias_init (keyword-only): Flax's cell initializers,
        `(key, shape, dtype) -> array`, called per gate as Flax's `LSTMCell` (`(input_size, H)`,
        `(H, H)`, `(H,)`); `bias_init` sets the input term's bias (else the recurrent one's; the
        terms are summed). None: LeCun normal, orthogonal per gate and 0, Flax's defaults
        (drawn as lnjax always has; see `_weights`).
        `forget_bias` is written over the forget gate's part of that bias.
    """

    input_norm: _TermSpec = "layer"
    recurrent_norm: _TermSpec = "layer"
    cell_norm: _TermSpec = "layer"
    forget_bias: float = 0.0
    carry_normalized_cell: bool = False
    kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    recurrent_kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    bias_init: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        _check_forget_bias(self.forget_bias)
        _checks.python_bool(self.carry_normalized_cell, "carry_normalized_cell")
        self._set_terms(input_norm="pre-activation", recurrent_norm="pre-activation", cell_norm="cell")
        kinds = _native_kinds((self._recurrent_norm, "pre-activation"), (self._cell_norm, "cell"))
        object.__setattr__(self, "_native_kinds", None if self.carry_normalized_cell else kinds)

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        _check_input_norm(self, self.input_norm, input_size)
        H = self.hidden_size
        params = _weights(key, input_size, H, 4, dtype, self.kernel_init, self.recurrent_kernel_init)
        params.update(n_x=self._input_norm.init(4 * H, dtype), n_h=self._recurrent_norm.init(4 * H, dtype),
                      n_c=self._cell_norm.init(H, dtype))  # fmt: skip
        params = _init_biases(params, self.bias_init, key, H, dtype, (("n_x", "n_h"), 4))
        return _term_params(params, ("n_x", "n_h"), self.forget_bias, H)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        z = super().initial_carry(batch_shape, dtype)
        return LSTMCarry(z, z)

    def project_inputs(self, params, x):
        """`N_x(W_x x)`, shape `[..., 4H]`; independent of the carry."""
        x = _check_input(x, params["w_x"])
        return self._input_norm.apply(params.get("n_x", {}), self._matmul(x, params["w_x"]))

    def step(self, params, carry, u):
        c, h = carry
        ah = self._matmul(h, params["w_h"])

        def xla(u, ah, c):
            c_new, o = _lstm_update(u + self._recurrent_norm.apply(params.get("n_h", {}), ah), c)
            c_out = self._cell_norm.apply(params.get("n_c", {}), c_new)
            h = o * jnp.tanh(c_out)
            return c_out if self.carry_normalized_cell else c_new, h

        kinds = self._native_kinds
        if not _native_applies(kinds, u, c):
            c, h = xla(u, ah, c)
            return LSTMCarry(c, h), h
        # The fused native step on CPU, the same step in XLA on other platforms.
        terms = [(p.get("scale"), p.get("bias")) for p in (params.get("n_h", {}), params.get("n_c", {}))]
        native = lambda u, ah, c: lnjax_native.lstm_step(u, ah, c, *terms, kinds=kinds[0], eps=kinds[1])  # noqa: E731
        c, h = lax.platform_dependent(u, ah, c, cpu=native, default=xla)
        return LSTMCarry(c, h), h


@dataclasses.dataclass(frozen=True)
class GRUCell(_Cell):
    """LN-GRU (Ba et al. 2016, supplement eq. 26-28), and its per-term variants.

        [r, z] = N_1(W_h h_{t-1}) + N_2(W_x x_t)
        n_t    = tanh(N_3(W x_t) + sigmoid(r) * N_4(U h_{t-1}))
        h_t    = sigmoid(z) * h_{t-1} + (1 - sigmoid(z)) * n_t

    Four separate normalizations, each with its own gain and bias; `N_1`, `N_2` normalize the
    2H gate vector jointly. The update is written as in the authors' code, PyTorch and Flax
    (`z` gates the old state); the paper's eq. 28 is the same cell with `z -> -z`. With every
    term None this is PyTorch's `nn.GRU` cell (the bias of `U h` inside the reset).

    Attributes:
      hidden_size, precision, dtype: see `_Cell`.
      input_norm: `(N_2, N_3)`, or one normalizer (or name, or None) for both; as
        `LSTMCell.input_norm`.
      recurrent_norm: `(N_1, N_4)`, or one for both.
      kernel_init, recurrent_kernel_init, bias_init (keyword-only): Flax's cell initializers,
        `(key, shape, dtype) -> array`, called per gate as Flax's `LSTMCell` (`(input_size, H)`,
        `(H, H)`, `(H,)`); `bias_init` sets the input term's bias (else the recurrent one's; the
        terms are summed). None: LeCun normal, orthogonal per gate and 0, Flax's defaults
        (drawn as lnjax always has; see `_weights`).
    """

    input_norm: _TermSpec | tuple = "layer"
    recurrent_norm: _TermSpec | tuple = "layer"
    kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    recurrent_kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    bias_init: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        for field in ("input_norm", "recurrent_norm"):
            spec = getattr(self, field)
            is_pair = isinstance(spec, (tuple, list)) and not isinstance(spec, Normalizer)
            pair = tuple(spec) if is_pair else (spec, spec)
            if len(pair) != 2:
                raise ValueError(f"`{field}` must be one normalizer or a (gates, candidate) pair, got {spec!r}.")
            object.__setattr__(self, field, pair if is_pair else spec)
            object.__setattr__(self, f"_{field}", tuple(_term(s, field, "pre-activation") for s in pair))

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        pair = isinstance(self.input_norm, tuple) and not isinstance(self.input_norm, Normalizer)
        for spec in dict.fromkeys(self.input_norm if pair else (self.input_norm,)):  # each once
            _check_input_norm(self, spec, input_size)
        H = self.hidden_size
        (n2, n3), (n1, n4) = self._input_norm, self._recurrent_norm
        params = {**_weights(key, input_size, H, 3, dtype, self.kernel_init, self.recurrent_kernel_init),
                  "n_x_gates": n2.init(2 * H, dtype), "n_x_cand": n3.init(H, dtype),
                  "n_h_gates": n1.init(2 * H, dtype), "n_h_cand": n4.init(H, dtype)}  # fmt: skip
        params = _init_biases(params, self.bias_init, key, H, dtype, (("n_x_gates", "n_h_gates"), 2),
                              (("n_x_cand", "n_h_cand"), 1))  # fmt: skip
        return _term_params(params, (), 0, H)

    def project_inputs(self, params, x):
        """`[N_2(W_x x), N_3(W x)]`, shape `[..., 3H]`."""
        a = self._matmul(_check_input(x, params["w_x"]), params["w_x"])
        H, (n2, n3) = self.hidden_size, self._input_norm
        return jnp.concatenate([n2.apply(params.get("n_x_gates", {}), a[..., : 2 * H]),
                                n3.apply(params.get("n_x_cand", {}), a[..., 2 * H :])], axis=-1)  # fmt: skip

    def step(self, params, carry, u):
        H, (n1, n4) = self.hidden_size, self._recurrent_norm
        a = self._matmul(carry, params["w_h"])

        def xla(u, a, carry):
            gates = u[..., : 2 * H] + n1.apply(params.get("n_h_gates", {}), a[..., : 2 * H])
            r, z = jnp.split(jax.nn.sigmoid(gates), 2, axis=-1)
            n = jnp.tanh(u[..., 2 * H :] + r * n4.apply(params.get("n_h_cand", {}), a[..., 2 * H :]))
            return z * carry + (1 - z) * n

        kinds = _native_kinds((n1, "pre-activation"), (n4, "pre-activation"))
        if not _native_applies(kinds, u, carry):
            h = xla(u, a, carry)
            return h, h
        # The fused native step on CPU, the same step in XLA on other platforms.
        terms = [(p.get("scale"), p.get("bias")) for p in (params.get("n_h_gates", {}), params.get("n_h_cand", {}))]
        native = lambda u, a, h: lnjax_native.gru_step(u, a, h, *terms, kinds=kinds[0], eps=kinds[1])  # noqa: E731
        h = lax.platform_dependent(u, a, carry, cpu=native, default=xla)
        return h, h


@dataclasses.dataclass(frozen=True)
class RNNCell(_Cell):
    """LN tanh-RNN (Ba et al. 2016, eq. 4): `h_t = tanh(N(W_h h_{t-1} + W_x x_t))`.

    `norm` (gain and bias) is over the summed input `a_t`, its statistics recomputed at every
    step; None gives `tanh(W_h h + W_x x + b)`.

    Attributes:
      hidden_size, precision, dtype: see `_Cell`.
      norm: `N`, a `lnjax.norms` value, a name, or None.
      kernel_init, recurrent_kernel_init, bias_init (keyword-only): Flax's cell initializers,
        `(key, shape, dtype) -> array`, called per gate as Flax's `LSTMCell` (`(input_size, H)`,
        `(H, H)`, `(H,)`); `bias_init` sets `N`'s bias. None: LeCun normal, orthogonal and 0,
        Flax's defaults (drawn as lnjax always has; see `_weights`).
    """

    norm: _TermSpec = "layer"
    kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    recurrent_kernel_init: Any = dataclasses.field(default=None, kw_only=True)
    bias_init: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        self._set_terms(norm="pre-activation")

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        H = self.hidden_size
        params = {**_weights(key, input_size, H, 1, dtype, self.kernel_init, self.recurrent_kernel_init),
                  "n": self._norm.init(H, dtype)}  # fmt: skip
        return _term_params(_init_biases(params, self.bias_init, key, H, dtype, (("n",), 1)), (), 0, H)

    def project_inputs(self, params, x):
        """`W_x x`, shape `[..., H]` (normalized after the recurrent term is added)."""
        return self._matmul(_check_input(x, params["w_x"]), params["w_x"])

    def step(self, params, carry, u):
        h = jnp.tanh(self._norm.apply(params.get("n", {}), u + self._matmul(carry, params["w_h"])))
        return h, h


# ----------------------------------------------------------------------------------------
# Sequence layers.


def _to_time_major(xs, time_major):
    return xs if time_major else jnp.moveaxis(xs, -2, 0)


def _from_time_major(ys, time_major, num_batch_axes):
    """`[T, *batch, ...]` outputs as `[*batch, T, ...]`: time goes after the batch axes, so a
    per-sequence scalar output (`[T, *batch]`) comes back `[*batch, T]` too."""
    return ys if time_major else jax.tree.map(lambda y: jnp.moveaxis(y, 0, num_batch_axes), ys)


def _per_sequence(flags, shape, what):
    """`flags` (`[*batch]`) shaped to broadcast against a `[*batch, ...]` leaf (of `shape`) of a
    carry or output; a leaf without the batch axes in front cannot be masked per sequence."""
    if tuple(shape[:flags.ndim]) != flags.shape:
        raise ValueError(f"a {what} leaf has shape {tuple(shape)}, but with `lengths` every {what} leaf must "
                         f"start with the batch axes {flags.shape} (one value per sequence).")  # fmt: skip
    return flags.reshape(flags.shape + (1,) * (len(shape) - flags.ndim))


def _zero_padding(xs, mask):
    """Padded steps as zeros: their values (even NaN) then reach no output and no gradient
    (a NaN times the zero cotangent of a discarded step would still be NaN)."""
    return xs if mask is None else jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))


def _lengths_mask(lengths, num_steps, batch_shape):
    """Checks `lengths`; returns the `[T, *batch]` mask of valid steps and, for traced
    `lengths` (which cannot raise), the bool `[*batch]` of those outside [0, T] (else None).
    Both are None without `lengths`."""
    if lengths is None:
        return None, None
    lengths = jnp.asarray(lengths) if not hasattr(lengths, "dtype") else lengths
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"`lengths` must be an integer array, got dtype {lengths.dtype}.")
    _checks.shape(lengths, batch_shape, "lengths", " (the batch shape of the inputs)")
    lengths = lengths.astype(jnp.int32)
    t = jnp.arange(num_steps, dtype=lengths.dtype).reshape((num_steps,) + (1,) * len(batch_shape))
    try:
        lo, hi = int(jnp.min(lengths, initial=0)), int(jnp.max(lengths, initial=0))
    except jax.errors.ConcretizationTypeError:
        return t < lengths[None], (lengths < 0) | (lengths > num_steps)
    if lo < 0 or hi > num_steps:
        raise ValueError(
            f"`lengths` must lie in [0, {num_steps}] (the number of time steps), got values in "
            f"[{lo}, {hi}]."
        )
    return t < lengths[None], None


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
            keep = lambda new, old: jnp.where(_per_sequence(m_t, new.shape, "carry"), new, old)  # noqa: E731
            new_carry = jax.tree.map(keep, new_carry, carry)
            y = jax.tree.map(lambda v: jnp.where(_per_sequence(m_t, v.shape, "output"), v, jnp.zeros_like(v)), y)
        return new_carry, y

    return lax.scan(body, carry, (xs, mask), unroll=unroll)


def _carry_dtype(params, xs):
    """The widest floating dtype of the parameters (the cell computes in it), else `xs`'s."""
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)
              if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)}  # fmt: skip
    return functools.reduce(jnp.promote_types, sorted(dtypes, key=str)) if dtypes else xs.dtype


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
      cell: a cell (`LSTMCell`, `GRUCell`, `RNNCell`, or anything with the cell protocol of
        the module docstring).
      params: the cell's parameters.
      xs: inputs `[*batch, T, features]`, or `[T, *batch, features]` if `time_major`. Any
        number of batch axes, including none.
      lengths: optional int array of the batch shape, each in [0, T]. Steps at or beyond a
        sequence's length leave its carry unchanged and output zeros, so the final carry is
        the carry after each sequence's own last step.
      initial_carry: defaults to `cell.initial_carry(batch_shape, dtype)`, `dtype` the widest
        floating dtype of `params`.
      reverse: run each sequence backwards within its own length (outputs are returned in
        the original time order; padding stays at the end).
      time_major: layout of `xs` and of the outputs.
      precompute_inputs: for a cell with `project_inputs`, compute it for all steps before
        the scan (one large matmul) instead of inside it. None picks the faster form for the backend
        (`lnjax.heuristics.default_precompute_inputs`). Both forms compute the same function.
      unroll: passed to `lax.scan`.

    Returns:
      `(ys, final_carry)`: outputs `[*batch, T, hidden]` (or time-major) and the carry.
    """
    xs = _checks.floating(xs, "xs")
    if xs.ndim < 2:
        raise ValueError(f"`xs` must be [*batch, time, features], got shape {xs.shape}.")
    xs = _to_time_major(xs, time_major)
    ys, carry, out_of_range = _run(cell, params, xs, lengths=lengths, initial_carry=initial_carry, reverse=reverse,
                                   precompute_inputs=precompute_inputs, unroll=unroll)  # fmt: skip
    if out_of_range is not None:
        # Their sequences' outputs and carries become NaN, not silently those of a clipped length.
        ys = jax.tree.map(lambda a: _poison(a, out_of_range, 1), ys)
        carry = jax.tree.map(lambda a: _poison(a, out_of_range, 0), carry)
    return _from_time_major(ys, time_major, xs.ndim - 2), carry


def _poison(a, bad, lead):
    """`a` (`[..lead axes, *batch, ...]`) NaN for the sequences flagged in `bad` (`[*batch]`);
    a leaf without float values is left as it is."""
    if not jnp.issubdtype(a.dtype, jnp.floating):
        return a
    return jnp.where(_per_sequence(bad, a.shape[lead:], "carry or output"), jnp.nan, a)


def _checked_initial_carry(initial_carry, default, batch_shape):
    """`initial_carry`, checked against the shapes and dtypes of `default()` (or it)."""
    if initial_carry is None:
        return default()
    want = jax.eval_shape(default)  # shapes only: nothing computed
    shapes = lambda t: jax.tree.map(lambda a: tuple(jnp.shape(a)), t)  # noqa: E731
    if jax.tree.structure(initial_carry) != jax.tree.structure(want) or shapes(initial_carry) != shapes(want):
        raise ValueError(f"`initial_carry` has shapes {shapes(initial_carry)}, expected those of "
                         f"`cell.initial_carry(batch_shape={batch_shape})`: {shapes(want)}.")
    # The step's carry comes out in the parameters' dtype; scan needs it to go in so too.
    dtypes = lambda t: jax.tree.map(lambda a: jnp.result_type(a).name, t)  # noqa: E731
    if dtypes(initial_carry) != dtypes(want):
        raise TypeError(f"`initial_carry` has dtypes {dtypes(initial_carry)}, expected those of the "
                        f"parameters' computation: {dtypes(want)}.")
    return initial_carry


def _run(cell, params, xs, *, lengths, initial_carry, reverse, precompute_inputs, unroll):
    """The scan of `rnn` over time-major `xs`: `(ys, carry, out_of_range)`, the last the
    `[*batch]` flags of traced `lengths` outside [0, T] (None if none can be), left for the
    caller to apply."""
    T, batch_shape = xs.shape[0], xs.shape[1:-1]
    mask, out_of_range = _lengths_mask(lengths, T, batch_shape)
    if lengths is not None:
        lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, T)
    default = functools.partial(cell.initial_carry, batch_shape, _carry_dtype(params, xs))
    initial_carry = _checked_initial_carry(initial_carry, default, batch_shape)
    initial_carry = _sharding.varying_like(initial_carry, (params, xs, lengths))
    if reverse:
        xs = _reverse_within(xs, lengths)
    xs = _zero_padding(xs, mask)
    if hasattr(cell, "masked"):  # the cell masks its own steps (batch statistics)
        carry, ys = lax.scan(lambda c, inp: cell.masked(params, c, *inp), initial_carry, (xs, mask), unroll=unroll)
    else:
        if precompute_inputs is None:
            precompute_inputs = heuristics.default_precompute_inputs(math.prod(batch_shape))
        if precompute_inputs and hasattr(cell, "project_inputs"):
            xs, step = cell.project_inputs(params, xs), cell.step
        else:
            step = cell
        carry, ys = _masked_scan(lambda c, x: step(params, c, x), initial_carry, xs, mask, unroll)
    if reverse:
        ys = _reverse_within(ys, lengths)
    return ys, carry, out_of_range


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
      x, h: the states of `N_x`, `N_h` for every step (`BatchNormState`s `[max_steps, 4H]`).
      c: the state of `N_c` (`[max_steps, H]`).
      steps_seen: the longest sequence length trained on; at inference, steps beyond it
        reuse its last step's statistics.
    """

    x: Any
    h: Any
    c: Any
    steps_seen: jax.Array


# Cooijmans et al.: gains 0.1, and a single bias b (in N_x; N_h has none).
_BN_GAIN = 0.1


@dataclasses.dataclass(frozen=True)
class BNLSTMCell(_Cell):
    """Recurrent batch normalization (Cooijmans et al. 2016), the paper's batch-norm baseline.

        [i, f, g, o] = BN_h(W_h h_{t-1}; g_h) + BN_x(W_x x_t; g_x) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t; g_c, b_c))

    The LSTM of `LSTMCell` with stateful normalizers: statistics are batch statistics, kept
    separately for every time step, and inference uses the per-step population statistics.
    Run it with `bn_lstm_rnn`.

    Attributes:
      hidden_size, precision, dtype: see `_Cell`.
      max_steps: number of per-step statistics kept (the longest training length).
      input_norm, recurrent_norm, cell_norm: stateful normalizers; by default `norms.batch`
        with gains 0.1 as recommended by Cooijmans et al., the bias `b` in `input_norm`.
      forget_bias: 1.0 as in Cooijmans et al.
    """

    max_steps: int
    input_norm: Normalizer = norms.batch(scale_init=_BN_GAIN)
    recurrent_norm: Normalizer = norms.batch(scale_init=_BN_GAIN, bias=False)
    cell_norm: Normalizer = norms.batch(scale_init=_BN_GAIN)
    forget_bias: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _checks.positive_int(self.max_steps, "max_steps")
        _check_forget_bias(self.forget_bias)
        for field in ("input_norm", "recurrent_norm", "cell_norm"):
            if getattr(self, field) is None:
                raise TypeError(f"`{field}` must be a stateful normalizer (lnjax.norms.batch), got None.")
            object.__setattr__(self, f"_{field}", _term(getattr(self, field), field, None, stateful=True))

    def init(self, key, input_size, dtype=jnp.float32):
        input_size = _checks.positive_int(input_size, "input_size")
        H = self.hidden_size
        params = _weights(key, input_size, H, 4, dtype)
        params.update(n_x=self._input_norm.init(4 * H, dtype), n_h=self._recurrent_norm.init(4 * H, dtype),
                      n_c=self._cell_norm.init(H, dtype))  # fmt: skip
        return _term_params(params, ("n_x", "n_h"), self.forget_bias, H)

    def init_state(self, dtype=jnp.float32) -> BNLSTMState:
        H, T = self.hidden_size, self.max_steps
        per_step = lambda norm, n: jax.tree.map(lambda a: jnp.broadcast_to(a, (T, *a.shape)),  # noqa: E731
                                                norm.init_state(n, dtype))  # fmt: skip
        return BNLSTMState(per_step(self._input_norm, 4 * H), per_step(self._recurrent_norm, 4 * H),
                           per_step(self._cell_norm, H), jnp.zeros((), jnp.int32))  # fmt: skip

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        z = super().initial_carry(batch_shape, dtype)
        return LSTMCarry(z, z)


@dataclasses.dataclass(frozen=True)
class _BNSteps:
    """A `BNLSTMCell` as a cell of the protocol for `rnn`: the carry is `(LSTMCarry, t)`, and
    step `t` normalizes with the statistics of step `t` of `state` (in training, the batch's),
    returning its new statistics with its output."""

    cell: BNLSTMCell
    state: BNLSTMState
    training: bool
    axis_name: Any

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return self.cell.initial_carry(batch_shape, dtype), jnp.zeros((), jnp.int32)

    def masked(self, params, carry, x, valid):
        ((c, h), t), cell, state = carry, self.cell, self.state
        kw = dict(training=self.training, mask=valid, axis_name=self.axis_name)
        last = jnp.where(state.steps_seen > 0, state.steps_seen, cell.max_steps) - 1
        idx = t if self.training else jnp.minimum(t, last)
        sx, sh, sc = jax.tree.map(lambda a: a[idx], (state.x, state.h, state.c))
        wx = cell._matmul(_check_input(x, params["w_x"], "xs"), params["w_x"])
        ax, sx = norms.run(cell._input_norm, params.get("n_x", {}), wx, sx, **kw)
        ah, sh = norms.run(cell._recurrent_norm, params.get("n_h", {}), cell._matmul(h, params["w_h"]), sh, **kw)
        c_new, o = _lstm_update(ax + ah, c)
        cn, sc = norms.run(cell._cell_norm, params.get("n_c", {}), c_new, sc, **kw)
        h_new = o * jnp.tanh(cn)
        if valid is not None:
            keep = valid[..., None]
            c_new, h_new, h = jnp.where(keep, c_new, c), jnp.where(keep, h_new, 0), jnp.where(keep, h_new, h)
        else:
            h = h_new
        return (LSTMCarry(c_new, h), t + 1), (h_new, (sx, sh, sc))


def bn_lstm_rnn(cell: BNLSTMCell, params, state: BNLSTMState, xs, *, training, lengths=None,
                initial_carry=None, time_major=False, axis_name=None, unroll=1):
    """Runs a `BNLSTMCell` over a sequence with `rnn`; statistics over the batch at each step.

    Args:
      cell, params, state: the cell, its parameters and its `BNLSTMState`.
      xs: `[*batch, T, features]` (or time-major) with at least one batch axis, or none inside
        a mapped `axis_name`.
      training: batch statistics per step, and update `state` (requires T <= max_steps);
        otherwise per-step population statistics, step t using those of
        `min(t, steps_seen - 1)`.
      lengths: as for `rnn`; at each step only the sequences still running contribute.
      axis_name: named axis to synchronize batch statistics across (data parallelism).

    Returns:
      `(ys, final_carry, new_state)`.
    """
    _checks.python_bool(training)
    xs = _checks.floating(xs, "xs")
    if xs.ndim < 3 and axis_name is None:
        raise ValueError(f"`xs` must have a batch axis for batch statistics, got shape {xs.shape}.")
    T, batch_shape = (xs.shape[0], xs.shape[1:-1]) if time_major else (xs.shape[-2], xs.shape[:-2])
    if training and T > cell.max_steps:
        raise ValueError(
            f"`xs` has {T} time steps but the cell keeps statistics for max_steps={cell.max_steps}; "
            "train on sequences no longer than max_steps (or raise it)."
        )
    steps = _BNSteps(cell, state, training, axis_name)
    if initial_carry is not None:
        initial_carry = (initial_carry, jnp.zeros((), jnp.int32))
    (ys, stats), (carry, _), bad = _run(steps, params, _to_time_major(xs, time_major), lengths=lengths,
                                        initial_carry=initial_carry, reverse=False, precompute_inputs=None,
                                        unroll=unroll)  # fmt: skip
    if bad is not None:
        ys, carry = _poison(ys, bad, 1), jax.tree.map(lambda a: _poison(a, bad, 0), carry)
        # The batch statistics pool every sequence, a clipped one too: all of them become NaN,
        # the same on every replica (never varying per example under `vmap`).
        any_bad = jnp.any(bad)
        if axis_name is not None:
            any_bad = lax.pmax(any_bad.astype(jnp.int32), axis_name) > 0
        stats = jax.tree.map(lambda a: jnp.where(any_bad, jnp.nan, a), stats)
    ys = _from_time_major(ys, time_major, len(batch_shape))
    if training:
        # Steps no sequence reached (on any shard) keep their old statistics.
        mask, _ = _lengths_mask(lengths, T, batch_shape)
        active = jnp.ones((T,), bool) if mask is None else jnp.any(mask.reshape(T, -1), axis=1)
        if axis_name is not None:
            active = lax.pmax(active.astype(jnp.int32), axis_name) > 0
        merge = lambda new, old: old.at[:T].set(jnp.where(active[:, None], new, old[:T]))  # noqa: E731
        seen = jnp.maximum(state.steps_seen, jnp.sum(active, dtype=jnp.int32))
        state = BNLSTMState(*jax.tree.map(merge, stats, tuple(state[:3])), seen)
    return ys, carry, state
