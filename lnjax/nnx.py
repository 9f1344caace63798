"""Flax NNX modules: thin shells over the pure ops of `lnjax.normalization`
and the cells and layers of `lnjax.recurrent`.

Each module creates its parameters (`scale`, `bias`; `v`, `g`, `bias` for `WeightNormDense`) and
running statistics in `__init__`, and its `__call__` calls the pure op; shapes, dtypes and errors
are the pure op's (the output has the input's dtype, statistics are at least float32). The
normalization layers take `flax.nnx`'s argument names and positions, and the cells are Flax RNN
cells (`nnx.RNNCellBase`); README's "Coming from Flax" lists where they differ on purpose.
"""

import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lnjax import _checks, _modules, normalization, norms, recurrent, relatives

__all__ = ["BNLSTM", "RNN", "BatchNorm", "GRUCell", "GroupNorm", "InstanceNorm", "LSTMCell", "LayerNorm", "Norm",
           "ProxyNorm", "RMSNorm", "SimpleCell", "WeightNormDense"]

Initializer = Callable[..., jax.Array]
ones, zeros = _modules.ones, _modules.zeros


# --- helpers ----------------------------------------------------------------------------------


def _feature_shape(num_features) -> tuple[int, ...]:
    """`num_features` (an int, or a tuple for several feature axes) as a tuple of positive ints."""
    shape = tuple(num_features) if isinstance(num_features, (tuple, list)) else (num_features,)
    if not shape:
        raise ValueError("`num_features` must be a positive int or a non-empty tuple of them.")
    return tuple(_checks.positive_int(n, "num_features") for n in shape)


def _param(use: bool, init: Initializer, shape, dtype, rngs: nnx.Rngs | None):
    """An `nnx.Param` from `init`, or None. Without `rngs` the initializer gets key None, which
    the default (constant) initializers ignore; random ones need `rngs`."""
    if not use:
        return nnx.data(None)  # data, not static, as in nnx.LayerNorm
    if rngs is not None:
        return nnx.Param(init(rngs.params(), shape, dtype))
    try:
        return nnx.Param(init(None, shape, dtype))
    except TypeError as e:
        raise TypeError(f"{e}: a random initializer needs a key; pass `rngs=nnx.Rngs(0)`.") from e


def _value(p):
    return None if p is None else p[...]


# --- normalization layers ---------------------------------------------------------------------


_MODE_ERROR = (
    "lnjax.nnx.BatchNorm does not know whether to use batch statistics (training) or the running "
    "averages (evaluation): `use_running_average` is None. Set it in one of these ways:\n\n"
    "1. in the constructor: `BatchNorm(..., use_running_average=False)` (True for evaluation);\n"
    "2. at call time: `bn(x, use_running_average=True/False)`;\n"
    "3. on the whole model: `model.train()` / `model.eval()`;\n"
    "4. as a view: `nnx.view(model, use_running_average=True/False)`."
)


class _Mode(nnx.Module):
    """The train/eval switch of the modules with running statistics, as `nnx.BatchNorm`'s."""

    def _training(self, use_running_average) -> bool:
        mode = _modules.mode_flag(self.use_running_average if use_running_average is None else use_running_average)
        if mode is None:
            raise ValueError(_MODE_ERROR.replace("BatchNorm", type(self).__name__))
        return not mode

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(model, use_running_average=...)`, as in `nnx.BatchNorm`."""
        if use_running_average is not None:
            self.use_running_average = _modules.mode_flag(use_running_average)


class _NormLayer(nnx.Module):
    SPEC: _modules.Spec

    def _normalize(self, x, use_running_average=None, **call):
        spec = self.SPEC
        scale, bias = _value(self.scale), _value(self.bias)
        settings = {k: getattr(self, k) for k in spec.options}
        if not spec.stateful:
            return spec.apply(x, scale, bias, settings)
        training = self._training(use_running_average)
        state = normalization.BatchNormState(self.mean[...], self.var[...])
        y, state = spec.apply(x, scale, bias, settings, state, training=training, **call)
        if training:
            self.mean[...], self.var[...] = state
        return y


class _Norm(_NormLayer):
    def __call__(self, x):
        """`x` normalized, in `dtype` (None: `x`'s dtype)."""
        return self._normalize(x)


class _BatchNorm(_NormLayer, _Mode):
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """`x` normalized, in `dtype` (None: `x`'s dtype); `use_running_average` overrides the
        attribute; `mask` (`x.shape` without `axis`, or elementwise as Flax's: `x`'s rank, each
        dimension 1 or `x`'s) leaves False entries out of the statistics (`lnjax.batch_norm`)."""
        return self._normalize(x, use_running_average, mask=mask)


def _norm_layer(spec: _modules.Spec):
    """The nnx class of `spec`: `Name(num_features, *positional, *, **options, rngs=None)`."""
    defaults = spec.defaults()
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_ONLY), P("num_features", P.POSITIONAL_OR_KEYWORD)]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=defaults[k]) for k in spec.positional]
    if spec.stateful:
        params.append(P("use_running_average", P.KEYWORD_ONLY, default=False))
    params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in defaults.items() if k not in spec.positional]
    params.append(P("rngs", P.KEYWORD_ONLY, default=None))
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"lnjax.nnx.{spec.name}{cls.__signature__}: {e}.") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        rngs = a.pop("rngs")
        self.num_features = shape = _feature_shape(a.pop("num_features"))
        spec.check(a)
        if spec.args:
            spec.args(a, math.prod(shape))
        for k, v in a.items():  # the options, as attributes of the same names
            setattr(self, k, v)
        self.scale = _param(self.use_scale, self.scale_init, shape, self.param_dtype, rngs)
        self.bias = _param(self.use_bias, self.bias_init, shape, self.param_dtype, rngs)
        if spec.stateful:
            state = normalization.batch_norm_state(shape)
            self.mean, self.var = nnx.BatchStat(state.mean), nnx.BatchStat(state.var)

    __init__.__signature__ = signature
    namespace = {"__init__": __init__, "SPEC": spec, "__module__": __name__,
                 "__doc__": spec.docstring("nnx"), "__qualname__": spec.name}  # fmt: skip
    cls = type(spec.name, (_BatchNorm if spec.stateful else _Norm,), namespace)
    cls.__signature__ = signature.replace(parameters=params[1:])
    return cls


LayerNorm, RMSNorm, BatchNorm, GroupNorm, InstanceNorm = (_norm_layer(spec) for spec in _modules.SPECS)


class WeightNormDense(nnx.Module):
    """Dense layer with a weight-normalized kernel (Salimans & Kingma 2016, eq. 2).

    `y = x @ w + bias` with `w = g * v / ||v||` (`lnjax.weight_norm`), the norm over
    `in_features`, so each output unit's weight vector has norm `g` (init 1).
    `x`: `[..., in_features]`; `y`: `[..., out_features]` in `x`'s dtype (`w`, `bias` are cast).

    Args:
      in_features, out_features: sizes of the last axis of `x` and of `y`.
      use_bias: create `bias` (init 0), of shape `[out_features]`.
      kernel_init: initializer of `v`, `[in_features, out_features]`; only its direction matters.
      bias_init, param_dtype: the bias initializer and the dtype of `v`, `g`, `bias`.
      eps: inside the norm's square root, keeping `v = 0` finite.
      rngs: for `kernel_init`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
        bias_init: Initializer = zeros,
        param_dtype=jnp.float32,
        eps: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.out_features = _checks.positive_int(out_features, "out_features")
        self.v = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.g = nnx.Param(jnp.ones((out_features,), param_dtype))
        self.bias = _param(use_bias, bias_init, (out_features,), param_dtype, rngs)
        self.eps = eps

    def __call__(self, x):
        w = normalization.weight_norm(self.v[...], self.g[...], eps=self.eps)
        return _modules.dense(x, w, _value(self.bias))


# --- recurrent modules (shells over the cells of lnjax.recurrent) -------------------------


def _is_variable(v):
    return isinstance(v, nnx.Variable)


def _values(tree):
    """The arrays of a pytree of `nnx.Variable`s, same structure."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=_is_variable)


def _assign(variables, values):
    """Writes a pytree of arrays into the pytree of `nnx.Variable`s of the same structure."""
    for var, value in zip(jax.tree.leaves(variables, is_leaf=_is_variable), jax.tree.leaves(values)):
        var[...] = value


class _Params(nnx.Module):
    """Holds the parameters of a pure cell or normalizer, as `init` made them.

    Each top-level entry becomes an attribute of the same name (an `nnx.Param`, or a pytree of
    them), so `nnx.to_pure_dict(nnx.state(m, nnx.Param))` is exactly the pure tree, and
    `nnx.update(m, params)` loads pure parameters.
    """

    def _set_params(self, params):
        self._param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.data(jax.tree.map(nnx.Param, value)))

    @property
    def params(self) -> dict:
        """The parameters as the pure function takes them (`init`'s tree of arrays): a single
        RNN step is `m.cell(m.params, carry, x_t)`."""
        return {name: _values(getattr(self, name)) for name in self._param_names}


class _CellParams(_Params):
    def _init_cell(self, cell, in_features, param_dtype, rngs: nnx.Rngs):
        self.cell = cell
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.param_dtype = param_dtype
        self._set_params(cell.init(rngs.params(), self.in_features, param_dtype))


class _Cell(_CellParams, nnx.RNNCellBase):
    """The pure cell `lnjax.{}` as a Flax RNN cell (`nnx.RNNCellBase`): one step is
    `m(carry, x_t) -> (carry, y_t)`, `x_t` `[*batch, in_features]`, so it runs in `nnx.RNN` and
    `nnx.Bidirectional`, and in `lnjax.nnx.RNN`, which runs it with `lnjax.rnn`.

    Args:
      in_features, hidden_features: the input size and H.
      param_dtype: of the parameters and of `initialize_carry`'s carry.
      carry_init: the default initializer of `initialize_carry`'s carry (None: zeros), as Flax.
      rngs: required (random `w_x`, orthogonal `w_h`).
      **cell_options: the fields of `lnjax.{}` by name ({}; Flax's `kernel_init`,
        `recurrent_kernel_init`, `bias_init`), so that they and their defaults live in one place.

    Parameters: the attributes named as the top-level keys of `cell.init` (`w_x`, `w_h`, `n_x`,
    ...), exactly its tree; `cell` is the pure cell and `params` its arrays.
    """

    CELL: type

    def __init__(self, in_features: int, hidden_features: int, *, param_dtype=jnp.float32, carry_init=None,
                 rngs: nnx.Rngs, **cell_options):  # fmt: skip
        self.hidden_features = _checks.positive_int(hidden_features, "hidden_features")
        self.carry_init = _modules.check_carry_init(carry_init)
        self._init_cell(self.CELL(hidden_features, **cell_options), in_features, param_dtype, rngs)

    def __call__(self, carry, inputs):
        return self.cell(self.params, carry, inputs)

    def initialize_carry(self, input_shape, rngs=None, carry_init=None):
        """The carry for inputs `[*batch, in_features]`, in `param_dtype`: `carry_init` (else the
        constructor's; None: zeros) of each carry array, with keys from `rngs` (`nnx.Rngs`, whose
        `carry` stream is used, or a stream; not needed by constant initializers)."""
        stream = rngs.carry if isinstance(rngs, nnx.Rngs) else rngs
        init = self.carry_init if carry_init is None else carry_init
        return _modules.cell_carry(self.cell, input_shape, self.param_dtype, init,
                                   lambda n: [None if stream is None else stream() for _ in range(n)])

    @property
    def num_feature_axes(self) -> int:
        return 1


def _cell(name, cell_cls, what, options):
    doc = what + " " + _Cell.__doc__.format(cell_cls.__name__, cell_cls.__name__, options)
    return type(name, (_Cell,), {"CELL": cell_cls, "__doc__": doc, "__module__": __name__, "__qualname__": name})


LSTMCell = _cell("LSTMCell", recurrent.LSTMCell, "LN-LSTM cell.", "`input_norm`, `cell_norm`, `forget_bias`, ...")
GRUCell = _cell("GRUCell", recurrent.GRUCell, "LN-GRU cell.", "`input_norm`, `recurrent_norm`, ...")
SimpleCell = _cell("SimpleCell", recurrent.RNNCell, "LN tanh-RNN cell.", "`norm`, `precision`, ...")


class RNN(nnx.Module):
    """A layer over sequences: an lnjax cell run by `lnjax.rnn` (`jax.lax.scan`, with the
    input projections of all steps hoisted out of the loop where that is faster), under the
    arguments and conventions of `nnx.RNN`, so it takes its place, also in `nnx.Bidirectional`.

    `inputs` `[*batch, T, in_features]` (`[T, *batch, in_features]` if `time_major`) give the
    outputs `[*batch, T, hidden_features]`, or `(carry, outputs)` if `return_carry`.
    `seq_lengths` `[*batch]`: steps past a sequence's length leave its carry as it is and
    output zeros. `reverse` runs each sequence backwards within its length; its outputs come in
    the order computed unless `keep_order`. Every call argument left None takes the attribute.
    Without `initial_carry`, the cell's `initialize_carry` (zeros, or its `carry_init` with the
    call's `rngs`).

    Args:
      cell: `lnjax.nnx.LSTMCell`, `GRUCell` or `SimpleCell` (other cells: `nnx.RNN`).
      time_major, return_carry, reverse, keep_order, unroll: as in `nnx.RNN`.
      precompute_inputs: see `lnjax.rnn` (None: the faster form for the backend).
    """

    def __init__(self, cell: _Cell, *, time_major: bool = False, return_carry: bool = False, reverse: bool = False,
                 keep_order: bool = False, unroll: int = 1, precompute_inputs: bool | None = None):  # fmt: skip
        if not isinstance(cell, _Cell):
            raise TypeError(f"`cell` must be an lnjax.nnx cell (LSTMCell, GRUCell, SimpleCell), got "
                            f"{type(cell).__name__}; run other cells with nnx.RNN.")  # fmt: skip
        self.cell = cell
        self.time_major, self.return_carry, self.reverse, self.keep_order = time_major, return_carry, reverse, keep_order
        self.unroll, self.precompute_inputs = unroll, precompute_inputs

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry: bool | None = None,
                 time_major: bool | None = None, reverse: bool | None = None, keep_order: bool | None = None,
                 rngs=None):  # fmt: skip
        if initial_carry is None and self.cell.carry_init is not None:  # as nnx.RNN: the cell's
            t = 0 if (self.time_major if time_major is None else time_major) else -2
            initial_carry = self.cell.initialize_carry(jnp.shape(jnp.take(inputs, 0, axis=t)), rngs)
        return _modules.flax_rnn(self, self.cell.cell, self.cell.params, inputs, initial_carry=initial_carry,
                                 seq_lengths=seq_lengths, return_carry=return_carry, time_major=time_major,
                                 reverse=reverse, keep_order=keep_order)  # fmt: skip


class BNLSTM(_CellParams, _Mode):
    """Batch-normalized LSTM (Cooijmans et al. 2016): `lnjax.BNLSTMCell` (equations, defaults)
    run by `lnjax.bn_lstm_rnn`, with per-step population statistics.

    Training (`use_running_average=False`, the default as in `nnx.BatchNorm`) normalizes with
    batch statistics at each step and updates `stats`, a `BNLSTMState` of `nnx.BatchStat`s
    (`[max_steps, 4H]` or `[max_steps, H]` each, and `steps_seen`); evaluation uses them.
    `model.train()` / `model.eval()` and `nnx.view` switch the mode, as for `BatchNorm`.
    Parameters: `w_x`, `w_h`, `n_x`, `n_h`, `n_c`, exactly `cell.init`'s tree.

    Args:
      in_features, hidden_size, max_steps: input size, H, and the longest training length.
      use_running_average: the mode when the call does not give one; None makes every call choose.
      axis_name: named axis across which batch statistics are synchronized.
      param_dtype: of the parameters; statistics are at least float32.
      rngs: required (random `w_x`, orthogonal `w_h`).
      **cell_options: the other fields of `lnjax.BNLSTMCell` by name (its normalizers,
        `forget_bias`, `precision`, `dtype`).
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        max_steps: int,
        *,
        use_running_average: bool | None = False,
        axis_name: str | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        **cell_options,
    ):
        cell = recurrent.BNLSTMCell(hidden_size, max_steps=max_steps, **cell_options)
        self._init_cell(cell, in_features, param_dtype, rngs)
        state = cell.init_state(_checks.stats_dtype(jnp.dtype(param_dtype)))
        self.stats = nnx.data(jax.tree.map(nnx.BatchStat, state))
        self.use_running_average, self.axis_name = use_running_average, axis_name

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry=False, time_major=False,
                 use_running_average: bool | None = None, unroll=1):  # fmt: skip
        """`inputs`: `[*batch, T, in_features]` (at least one batch axis; time-major if
        `time_major`), T <= max_steps in training. Returns the outputs `[*batch, T, H]`, or
        `(carry, outputs)`, as `nnx.RNN`. `use_running_average` overrides the attribute."""
        training = self._training(use_running_average)
        ys, carry, state = recurrent.bn_lstm_rnn(
            self.cell, self.params, _values(self.stats), inputs, training=training, lengths=seq_lengths,
            initial_carry=initial_carry, time_major=time_major, axis_name=self.axis_name,
            unroll=unroll,
        )  # fmt: skip
        if training:
            _assign(self.stats, state)
        return (carry, ys) if return_carry else ys


# --- any normalizer of lnjax.norms --------------------------------------------------------------


class Norm(_Params, _Mode):
    """Any `lnjax.norms` normalizer of the last axis as a module: the relatives of layer norm
    (`norms.switchable()`, `norms.batch_layer()`, `norms.divisive(radius)`, the graph ones,
    `norms.domain_agnostic_batch()`, ...) or a user's own.

    Parameters: the attributes named as the keys of `norm.init(num_features)` (`scale`,
    `bias`, `control`, `weights`); a stateful normalizer's state is `stats`, a pytree of
    `nnx.BatchStat`s, switched as `BatchNorm`'s (`use_running_average`, `model.train()` /
    `model.eval()`, `nnx.view`). The call passes `**context` (e.g. `segment_ids`, `edges`,
    `source_mask`) to `norm.apply`.

    Args:
      norm: a `Normalizer`, or a name for `norms.get`.
      num_features: `x.shape[-1]`.
      use_running_average: the mode of a stateful normalizer when the call gives none.
      axis_name: named axis across which batch statistics are synchronized.
      param_dtype: of the parameters; statistics are at least float32.
      rngs: unused (the normalizers' initial values are constants); accepted as by Flax layers.
    """

    def __init__(self, norm, num_features: int, *, use_running_average: bool | None = False,
                 axis_name: str | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):  # fmt: skip
        del rngs
        self.norm = norms.resolve(norm, "norm")
        if self.norm is None:
            raise TypeError('`norm` must be a normalizer, got None (or "none").')
        self.num_features = _checks.positive_int(num_features, "num_features")
        self._set_params(self.norm.init(self.num_features, param_dtype))
        self.use_running_average, self.axis_name = use_running_average, axis_name
        if self.norm.stateful:
            state = self.norm.init_state(self.num_features, _checks.stats_dtype(jnp.dtype(param_dtype)))
            self.stats = nnx.data(jax.tree.map(nnx.BatchStat, state))

    def __call__(self, x, *, use_running_average: bool | None = None, **context):
        if not self.norm.stateful:
            return self.norm.apply(self.params, x, **context)
        training = self._training(use_running_average)
        y, state = norms.run(self.norm, self.params, x, _values(self.stats), training=training,
                             axis_name=self.axis_name, **context)  # fmt: skip
        if training:
            _assign(self.stats, state)
        return y


class ProxyNorm(nnx.Module):
    """Proxy-normalized activation (Labatie et al. 2021); see `lnjax.proxy_norm`.

    Replaces the activation after a layer or group norm that has no affine part of its own:
    `(phi(scale * y + bias) - E[phi(scale * Y~ + bias)]) / sqrt(Var[...] + eps)`, with
    `Y~ ~ N(proxy_bias, (1 + proxy_scale)^2)` per channel. Parameters `scale` (init 1), `bias`,
    `proxy_scale`, `proxy_bias` (init 0), each `[channels]`.

    Args:
      num_features: the number of channels.
      activation: the elementwise activation `phi`.
      axis: the channel axis.
      eps: inside the square root; 0.03 as the authors'.
      num_samples: number of Gaussian quantile points of the proxy.
      param_dtype: dtype of the parameters.
    """

    def __init__(self, num_features: int, *, activation: Callable = jax.nn.relu, axis: int = -1,
                 eps: float = 0.03, num_samples: int = 200, param_dtype=jnp.float32):  # fmt: skip
        self.num_features = _checks.positive_int(num_features, "num_features")
        shape = (self.num_features,)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype))
        self.proxy_scale = nnx.Param(jnp.zeros(shape, param_dtype))
        self.proxy_bias = nnx.Param(jnp.zeros(shape, param_dtype))
        self.activation, self.axis, self.eps = activation, axis, eps
        self.num_samples = _checks.positive_int(num_samples, "num_samples")

    def __call__(self, y):
        return relatives.proxy_norm(y, self.scale[...], self.bias[...], self.proxy_scale[...],
                          self.proxy_bias[...], activation=self.activation, axis=self.axis,
                          eps=self.eps, num_samples=self.num_samples)  # fmt: skip
