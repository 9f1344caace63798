"""Flax Linen modules: thin shells over the pure ops of `lnjax.normalization`
and the cells and layers of `lnjax.recurrent`.

Each module is an `nn.Module` dataclass whose `@nn.compact` `__call__` creates its parameters
(`scale`, `bias`; `v`, `g`, `bias` for `WeightNormDense`), shaped from the input as in Linen, and
calls the pure op; shapes, dtypes and errors are the pure op's (the output has the input's dtype,
statistics are at least float32). `BatchNorm` keeps its running statistics in `batch_stats`.
The normalization layers take `flax.linen`'s attribute names and order, and the cells are Flax
RNN cells (`nn.RNNCellBase`); README's "Coming from Flax" lists where they differ on purpose.
For new code prefer `lnjax.nnx`, the same modules for Flax NNX.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from lnjax import _checks, _modules, normalization, norms, recurrent, relatives

__all__ = ["BNLSTM", "RNN", "BatchNorm", "GRUCell", "GroupNorm", "InstanceNorm", "LSTMCell", "LayerNorm", "Norm",
           "ProxyNorm", "RMSNorm", "SimpleCell", "WeightNormDense"]

Initializer = Callable[..., jax.Array]
ones, zeros = _modules.ones, _modules.zeros


# --- helpers ----------------------------------------------------------------------------------


def _feature_shape(x, axis) -> tuple[int, ...]:
    """`x.shape[axis]`, axis an int or a tuple of ints."""
    return tuple(jnp.shape(x)[a] for a in _checks.axes(axis, jnp.ndim(x)))


def _scale_bias(mdl: nn.Module, shape):
    """Creates (or fetches) the `scale` and `bias` of `mdl`, each None when switched off."""
    scale = mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype) if mdl.use_scale else None
    bias = mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype) if mdl.use_bias else None
    return scale, bias


# --- normalization layers ---------------------------------------------------------------------


_MODE_ERROR = (
    "lnjax.linen.BatchNorm does not know whether to use batch statistics (training) or the "
    "running averages (evaluation): `use_running_average` is None. Set it in one of these ways:\n\n"
    "1. as an attribute: `BatchNorm(use_running_average=not train)`;\n"
    "2. at call time: `BatchNorm()(x, use_running_average=not train)`.\n\n"
    "In training, also make the statistics mutable: `model.apply(variables, x, "
    "mutable=['batch_stats'])`."
)


def _mode(mdl: nn.Module, use_running_average) -> bool:
    """`training`, from the attribute or the call (exactly once, as in Linen's BatchNorm)."""
    _modules.mode_flag(mdl.use_running_average)
    _modules.mode_flag(use_running_average)
    if mdl.use_running_average is None and use_running_average is None:
        raise ValueError(_MODE_ERROR.replace("BatchNorm", type(mdl).__name__))
    return not nn.merge_param("use_running_average", mdl.use_running_average, use_running_average)


class _NormLayer(nn.Module):
    SPEC: ClassVar[_modules.Spec]

    def __post_init__(self):
        settings = {k: getattr(self, k) for k in self.SPEC.options}
        self.SPEC.check({**settings, "use_running_average": getattr(self, "use_running_average", None)})
        if self.SPEC.args:  # GroupNorm's num_groups / group_size, as far as known without x
            self.SPEC.args(settings)
        super().__post_init__()

    def _normalize(self, x, use_running_average=None, **call):
        spec = self.SPEC
        settings = {k: getattr(self, k) for k in spec.options}
        shape = spec.param_shape(jnp.shape(x), settings)
        scale, bias = _scale_bias(self, shape)
        if not spec.stateful:
            return spec.apply(x, scale, bias, settings)
        training = _mode(self, use_running_average)
        mean = self.variable("batch_stats", "mean", lambda: normalization.batch_norm_state(shape).mean)
        var = self.variable("batch_stats", "var", lambda: normalization.batch_norm_state(shape).var)
        init = self.is_initializing()
        if init:  # as Linen: statistics are not synchronized (nor updated) during `init`
            settings["axis_name"] = None
        y, state = spec.apply(x, scale, bias, settings, normalization.BatchNormState(mean.value, var.value),
                              training=training, **call)  # fmt: skip
        if training and not init:
            mean.value, var.value = state
        return y


class _Norm(_NormLayer):
    @nn.compact
    def __call__(self, x):
        """`x` normalized, in `dtype` (None: `x`'s dtype)."""
        return self._normalize(x)


class _BatchNorm(_NormLayer):
    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """`x` normalized, in `dtype` (None: `x`'s dtype); `use_running_average` here or as the
        attribute (exactly once); `mask` (`x.shape` without `axis`, or elementwise as Flax's:
        `x`'s rank, each dimension 1 or `x`'s) leaves False entries out of the statistics."""
        return self._normalize(x, use_running_average, mask=mask)


def _norm_layer(spec: _modules.Spec):
    """The linen class of `spec`: its attributes are the spec's options, same defaults and order."""
    fields = {**({"use_running_average": None} if spec.stateful else {}), **spec.defaults()}
    namespace = {**fields, "__annotations__": {k: Any for k in fields}, "SPEC": spec, "__module__": __name__,
                 "__doc__": spec.docstring("linen"), "__qualname__": spec.name}  # fmt: skip
    return type(spec.name, (_BatchNorm if spec.stateful else _Norm,), namespace)


LayerNorm, RMSNorm, BatchNorm, GroupNorm, InstanceNorm = (_norm_layer(spec) for spec in _modules.SPECS)


class WeightNormDense(nn.Module):
    """Dense layer with a weight-normalized kernel (Salimans & Kingma 2016, eq. 2).

    `y = x @ w + bias` with `w = g * v / ||v||` (`lnjax.weight_norm`), the norm over the input
    features, so each output unit's weight vector has norm `g` (init 1).
    `x`: `[..., in_features]`; `y`: `[..., features]` in `x`'s dtype (`w`, `bias` are cast).

    Attributes:
      features: the size of the last axis of `y`.
      use_bias: create `bias` (init 0), of shape `[features]`.
      kernel_init: initializer of `v`, `[in_features, features]`; only its direction matters.
      bias_init, param_dtype: the bias initializer and the dtype of `v`, `g`, `bias`.
      eps: inside the norm's square root, keeping `v = 0` finite.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = jax.nn.initializers.lecun_normal()
    bias_init: Initializer = zeros
    param_dtype: Any = jnp.float32
    eps: float = 1e-12

    def __post_init__(self):
        _checks.positive_int(self.features, "features")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "v"):  # name `x`, not Flax's initializer-shape error
            _modules.dense_input(x, self.get_variable("params", "v").shape[0])
        v = self.param("v", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype)
        g = self.param("g", ones, (self.features,), self.param_dtype)
        b = None
        if self.use_bias:
            b = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return _modules.dense(x, normalization.weight_norm(v, g, eps=self.eps), b)


# --- recurrent modules (shells over the cells of lnjax.recurrent) -------------------------


def _pure_params(mdl: nn.Module, init: Callable[[], dict], first: str | None = None) -> dict:
    """A pure function's parameters, stored as `mdl`'s `params` under the same names.

    At initialization they are one `init()` call (so the tree is exactly the pure one, and
    `apply({"params": pure_params}, ...)` works); afterwards they are read back. `first`: a key
    of the tree, asked for before `init()` runs (Linen's own error when `params` are missing).
    """
    if "params" in mdl.variables:
        return dict(mdl.variables["params"])
    if first is not None and not mdl.is_mutable_collection("params"):
        mdl.param(first, lambda _: None)
    return {name: mdl.param(name, lambda _, v=value: v) for name, value in init().items()}


def _cell_fields(cell_cls, rename=(), **extra) -> dict:
    """A class namespace whose attributes are the fields of the pure cell `cell_cls` (same types
    and defaults; names renamed by `rename`), then `extra`: the module's options live in the
    cell alone."""
    rename = dict(rename)
    fields = sorted((f for f in dataclasses.fields(cell_cls) if f.init), key=lambda f: f.kw_only)
    ns = {rename.get(f.name, f.name): f.default for f in fields if f.default is not dataclasses.MISSING}
    ns["__annotations__"] = {**{rename.get(f.name, f.name): f.type for f in fields}, **{k: Any for k in extra}}
    return {**ns, **extra, "CELL": cell_cls, "RENAME": rename}


class _CellModule(nn.Module):
    def __post_init__(self):
        self.cell  # noqa: B018  (the pure cell checks the settings)
        _modules.check_carry_init(getattr(self, "carry_init", None))
        super().__post_init__()

    @property
    def cell(self):
        """The pure cell: a single step is `module.cell(variables["params"], carry, x_t)`."""
        fields = (f.name for f in dataclasses.fields(self.CELL) if f.init)
        return self.CELL(**{f: getattr(self, self.RENAME.get(f, f)) for f in fields})

    def _params(self, in_features):
        return _pure_params(self, lambda: self.cell.init(self.make_rng("params"), in_features, self.param_dtype),
                            "w_x")  # fmt: skip


class _Cell(_CellModule, nn.RNNCellBase):
    @nn.compact
    def __call__(self, carry, inputs):
        """One step: `(carry, y_t)` for `inputs` `[*batch, in_features]`."""
        return self.cell(self._params(jnp.shape(inputs)[-1]), carry, inputs)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        """`carry_init` (zeros by default) of each carry array for inputs `[*batch, in_features]`,
        with `rng` (split for the LSTM's `c` and `h`, as Flax; None for constant initializers)."""
        def keys(n):  # as Flax: the LSTM splits `rng` for `c` and `h`, the other cells use it as is
            if rng is None:
                return [None] * n
            return [rng] if n == 1 else list(jax.random.split(rng, n))

        return _modules.cell_carry(self.cell, input_shape, self.param_dtype, self.carry_init, keys)

    @property
    def num_feature_axes(self) -> int:
        return 1


_CELL_DOC = """ cell: `lnjax.{}` as a Flax RNN cell (`nn.RNNCellBase`): one step is
    `(carry, y_t) = cell(carry, x_t)`, so it runs in `nn.RNN` and `nn.Bidirectional`, and in
    `lnjax.linen.RNN`, which runs it with `lnjax.rnn`. Its attributes are the cell's fields
    (their meaning and defaults there), with `hidden_size` named `features` as in Flax, and
    `param_dtype` (also the dtype of `initialize_carry`'s carry) and `carry_init` (its
    initializer, zeros), as Flax; `params` are exactly `cell.init`'s tree."""


def _cell(name, cell_cls, what):
    ns = _cell_fields(cell_cls, {"hidden_size": "features"}, param_dtype=jnp.float32, carry_init=zeros)
    return type(name, (_Cell,), {**ns, "__module__": __name__, "__doc__": what + _CELL_DOC.format(cell_cls.__name__)})


LSTMCell = _cell("LSTMCell", recurrent.LSTMCell, "LN-LSTM")
GRUCell = _cell("GRUCell", recurrent.GRUCell, "LN-GRU")
SimpleCell = _cell("SimpleCell", recurrent.RNNCell, "LN tanh-RNN")


class RNN(nn.Module):
    """A layer over sequences: an lnjax cell run by `lnjax.rnn` (`jax.lax.scan`, with the
    input projections of all steps hoisted out of the loop where that is faster), under the
    attributes and conventions of `nn.RNN`, so it takes its place, also in `nn.Bidirectional`.

    `inputs` `[*batch, T, in_features]` (`[T, *batch, in_features]` if `time_major`) give the
    outputs `[*batch, T, features]`, or `(carry, outputs)` if `return_carry`. `seq_lengths`
    `[*batch]`: steps past a sequence's length leave its carry as it is and output zeros.
    `reverse` runs each sequence backwards within its length; its outputs come in the order
    computed unless `keep_order`. Every call argument left None takes the attribute. Without
    `initial_carry`, the cell's `initialize_carry(init_key)` (key 0 by default, as `nn.RNN`).
    The parameters are the cell's (`params/cell/...`).

    Attributes:
      cell: `lnjax.linen.LSTMCell`, `GRUCell` or `SimpleCell` (other cells: `nn.RNN`).
      time_major, return_carry, reverse, keep_order, unroll: as in `nn.RNN`.
      precompute_inputs: see `lnjax.rnn` (None: the faster form for the backend).
    """

    cell: _Cell
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: int = 1
    precompute_inputs: bool | None = None

    def __post_init__(self):
        if not isinstance(self.cell, _Cell):
            raise TypeError(f"`cell` must be an lnjax.linen cell (LSTMCell, GRUCell, SimpleCell), got "
                            f"{type(self.cell).__name__}; run other cells with nn.RNN.")  # fmt: skip
        super().__post_init__()

    def __call__(self, inputs, *, initial_carry=None, init_key=None, seq_lengths=None, return_carry: bool | None = None,
                 time_major: bool | None = None, reverse: bool | None = None, keep_order: bool | None = None):  # fmt: skip
        x0 = jnp.take(inputs, 0, axis=0 if (self.time_major if time_major is None else time_major) else -2)
        # One step of the cell creates its parameters (in `init`) or reads them; XLA drops the step.
        self.cell(self.cell.cell.initial_carry(jnp.shape(x0)[:-1], self.cell.param_dtype), x0)
        if initial_carry is None:  # as nn.RNN: the cell's `carry_init`, with key 0 unless given
            initial_carry = self.cell.initialize_carry(jax.random.key(0) if init_key is None else init_key,
                                                       jnp.shape(x0))  # fmt: skip
        return _modules.flax_rnn(self, self.cell.cell, dict(self.cell.variables["params"]), inputs,
                                 initial_carry=initial_carry, seq_lengths=seq_lengths, return_carry=return_carry,
                                 time_major=time_major, reverse=reverse, keep_order=keep_order)  # fmt: skip


class _BNLSTM(_CellModule):
    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry=False, time_major=False,
                 use_running_average: bool | None = None, unroll=1):  # fmt: skip
        """`inputs`: `[*batch, T, in_features]` (at least one batch axis; time-major if
        `time_major`), T <= max_steps in training. Returns the outputs `[*batch, T, H]`, or
        `(carry, outputs)`, as `nn.RNN`."""
        training = _mode(self, use_running_average)
        params = self._params(jnp.shape(inputs)[-1])
        dtype = _checks.stats_dtype(jnp.dtype(self.param_dtype))
        stats = self.variable("batch_stats", "stats", self.cell.init_state, dtype)
        init = self.is_initializing()
        ys, carry, state = recurrent.bn_lstm_rnn(
            self.cell, params, stats.value, inputs, training=training, lengths=seq_lengths,
            initial_carry=initial_carry, time_major=time_major,
            axis_name=None if init else self.axis_name, unroll=unroll,
        )  # fmt: skip
        if training and not init:
            stats.value = state
        return (carry, ys) if return_carry else ys


BNLSTM = type("BNLSTM", (_BNLSTM,), {
    **_cell_fields(recurrent.BNLSTMCell, use_running_average=None, axis_name=None, param_dtype=jnp.float32),
    "__module__": __name__,
    "__doc__": """Batch-normalized LSTM (Cooijmans et al. 2016): `lnjax.BNLSTMCell` (equations,
    defaults) run by `lnjax.bn_lstm_rnn`, with per-step population statistics.

    Training normalizes with batch statistics at each step and updates `batch_stats` `stats`, a
    `BNLSTMState` (`[max_steps, 4H]` or `[max_steps, H]` each, and `steps_seen`); as in Linen's
    `BatchNorm` they are not updated during `init`. Evaluation uses them. `params` are exactly
    `cell.init`'s tree.

    Attributes:
      the fields of `lnjax.BNLSTMCell` (hidden_size, max_steps, its normalizers, ...), and
      use_running_average: the mode, given here or at call time (exactly once, as in Linen).
      axis_name: named axis across which batch statistics are synchronized; not used in `init`.
      param_dtype: of the parameters; statistics are at least float32.
    """,
})


# --- any normalizer of lnjax.norms --------------------------------------------------------------


class Norm(nn.Module):
    """Any `lnjax.norms` normalizer of the last axis as a module: the relatives of layer norm
    (`norms.switchable()`, `norms.batch_layer()`, `norms.divisive(radius)`, the graph ones,
    `norms.domain_agnostic_batch()`, ...) or a user's own.

    `params` are `norm.init(x.shape[-1])`'s tree; a stateful normalizer's state is the
    `batch_stats` `stats`, not updated during `init` (as Linen's `BatchNorm`). The call passes
    `**context` (e.g. `segment_ids`, `edges`, `source_mask`) to `norm.apply`.

    Attributes:
      norm: a `Normalizer`, or a name for `norms.get`.
      use_running_average: the mode of a stateful normalizer, here or at call time (exactly once).
      axis_name: named axis across which batch statistics are synchronized; not used in `init`.
      param_dtype: of the parameters; statistics are at least float32.
    """

    norm: Any
    use_running_average: bool | None = None
    axis_name: str | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool | None = None, **context):
        norm = norms.resolve(self.norm, "norm")
        if norm is None:
            raise TypeError('`norm` must be a normalizer, got None (or "none").')
        size = jnp.shape(x)[-1]
        params = _pure_params(self, lambda: norm.init(size, self.param_dtype))
        if not norm.stateful:
            return norm.apply(params, x, **context)
        training = _mode(self, use_running_average)
        dtype = _checks.stats_dtype(jnp.dtype(self.param_dtype))
        stats = self.variable("batch_stats", "stats", norm.init_state, size, dtype)
        init = self.is_initializing()
        y, state = norms.run(norm, params, x, stats.value, training=training,
                             axis_name=None if init else self.axis_name, **context)  # fmt: skip
        if training and not init:
            stats.value = state
        return y


class ProxyNorm(nn.Module):
    """Proxy-normalized activation (Labatie et al. 2021); see `lnjax.proxy_norm`.

    `(phi(scale * y + bias) - E[phi(scale * Y~ + bias)]) / sqrt(Var[...] + eps)`, with
    `Y~ ~ N(proxy_bias, (1 + proxy_scale)^2)` per channel; `params` `scale` (init 1), `bias`,
    `proxy_scale`, `proxy_bias` (init 0), each `[channels]`.

    Attributes:
      activation: the elementwise activation `phi`.
      axis: the channel axis.
      eps: inside the square root; 0.03 as the authors'.
      num_samples: number of Gaussian quantile points of the proxy.
      param_dtype: dtype of the parameters.
    """

    activation: Callable = jax.nn.relu
    axis: int = -1
    eps: float = 0.03
    num_samples: int = 200
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y):
        shape = _feature_shape(y, self.axis)
        p = {name: self.param(name, init, shape, self.param_dtype)
             for name, init in (("scale", ones), ("bias", zeros), ("proxy_scale", zeros),
                                ("proxy_bias", zeros))}  # fmt: skip
        return relatives.proxy_norm(y, p["scale"], p["bias"], p["proxy_scale"], p["proxy_bias"],
                          activation=self.activation, axis=self.axis, eps=self.eps,
                          num_samples=self.num_samples)  # fmt: skip
