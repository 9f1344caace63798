"""What the two Flax frontends share, written down once: the normalization layers' specs and
the RNN layers' call.

A `Spec` names the pure op a layer wraps and the layer's options, under Flax's names and in
Flax's order; an option that is an op argument takes its default from the op's signature, the
others (parameter creation, output dtype) from `MODULE_DEFAULTS`, so each default lives in one
place. `lnjax.nnx` and `lnjax.linen` build their classes (signature, attributes, docstring,
call) from the same `Spec`s, so the two frontends cannot drift (tests/test_modules.py checks
that they agree, tests/test_flax_swap.py that they stand in for Flax's layers).
"""

import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax.linen.recurrent import flip_sequences

from lnjax import _checks, normalization, recurrent

ones = jax.nn.initializers.ones
zeros = jax.nn.initializers.zeros


def dense_input(x, in_features):
    """`x`, checked as the input of a `WeightNormDense` with `in_features` inputs."""
    x = _checks.floating(x)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"`x` has shape {x.shape}; its last axis must be in_features={in_features}.")
    return x


def dense(x, w, bias):
    """`x @ w + bias` in `x`'s dtype (`WeightNormDense`); the bias is broadcast explicitly (no
    rank promotion)."""
    x = dense_input(x, w.shape[0])
    y = jnp.dot(x, w.astype(x.dtype))
    return y if bias is None else y + jnp.broadcast_to(bias.astype(y.dtype), y.shape)


def check_carry_init(carry_init):
    """`carry_init` after checking it is None or an initializer."""
    if carry_init is not None and not callable(carry_init):
        raise TypeError(f"`carry_init` must be None or an initializer `(key, shape, dtype) -> array`, "
                        f"got {carry_init!r}.")  # fmt: skip
    return carry_init


def cell_carry(cell, input_shape, dtype, carry_init, keys):
    """The carry of the pure `cell` for inputs `[*batch, in_features]` (`input_shape`): zeros
    (`cell.initial_carry`), or `carry_init(key, shape, dtype)` for each of its arrays (the
    LSTM's `c`, then `h`, as Flax), with the keys `keys(n)` gives for n arrays (None entries for
    initializers that need no key)."""
    zeros = cell.initial_carry(tuple(input_shape[:-1]), dtype)
    if check_carry_init(carry_init) is None:
        return zeros
    leaves, tree = jax.tree.flatten(zeros)
    try:
        carry = [jnp.asarray(carry_init(k, z.shape, z.dtype)) for k, z in zip(keys(len(leaves)), leaves)]
    except TypeError as e:  # a random initializer given key None
        raise TypeError(f"`carry_init`: {e}; a random initializer needs a key: pass `rngs`.") from e
    for c, z in zip(carry, leaves):
        if c.shape != z.shape:
            raise ValueError(f"`carry_init` returned shape {c.shape} for the carry's {z.shape}.")
    return jax.tree.unflatten(tree, carry)


def flax_rnn(layer, cell, params, inputs, *, initial_carry, seq_lengths, **call):
    """`lnjax.rnn` under `flax.nnx.RNN`'s conventions, for the `RNN` layers of both frontends:
    the call's `return_carry`, `time_major`, `reverse`, `keep_order` (the `layer`'s attributes
    where None); outputs, or `(carry, outputs)`."""
    o = {k: getattr(layer, k) if v is None else v for k, v in call.items()}
    inputs = _checks.floating(inputs, "inputs")  # named as the layer names it (`lnjax.rnn`'s is `xs`)
    ys, carry = recurrent.rnn(cell, params, inputs, lengths=seq_lengths, initial_carry=initial_carry,
                              reverse=o["reverse"], time_major=o["time_major"], unroll=layer.unroll,
                              precompute_inputs=layer.precompute_inputs)  # fmt: skip
    if o["reverse"] and not o["keep_order"]:  # Flax's order: as computed, reversed within each length
        lengths = None if seq_lengths is None else jnp.asarray(seq_lengths, int)  # flax's arange's dtype
        ys = flip_sequences(ys, lengths, num_batch_dims=ys.ndim - 2, time_major=o["time_major"])
    return (carry, ys) if o["return_carry"] else ys


# The modules' options that are not op arguments, and Flax's defaults for them: a module option
# that is an op argument (under Flax's name, `OP_NAMES`) takes the op's default instead.
MODULE_DEFAULTS = {
    "num_groups": 32, "group_size": None, "dtype": None, "param_dtype": jnp.float32,
    "use_bias": True, "use_scale": True, "bias_init": zeros, "scale_init": ones,
    "feature_axes": -1, "reduction_axes": None,
}  # fmt: skip
# Flax's names of the ops' arguments.
OP_NAMES = {"epsilon": "eps", "use_fast_variance": "fast_variance"}
# The options checked when the layer is built, under the layer's names (the op checks them
# again, but its errors would name its own arguments: `eps` for `epsilon`).
_BOOLS = ("use_bias", "use_scale", "use_fast_variance", "unbiased_running_var")


def mode_flag(value, name: str = "use_running_average"):
    """`value` after checking it is None or a Python bool (a string such as "no" is truthy, and
    would silently select evaluation)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True, False or None, got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class Spec:
    """One normalization layer, under Flax's argument names.

    Attributes:
      name: the class name in both frontends (Flax's).
      op: the pure op, called `op(x, *args, scale, bias, [state], **op_options, **call)`.
      doc: what the layer computes (its docstring's first part).
      options: the layer's options in Flax's order (lnjax's own last). Each is an op argument
        (renamed by `OP_NAMES` and `renames`), with the op's default, or a `MODULE_DEFAULTS` one.
      renames: module option -> op argument, beyond `OP_NAMES`.
      axes: the option naming the axes of `scale` and `bias` (Flax's `feature_axes`); they are
        broadcast to the op's `axis` when that differs (LayerNorm's `reduction_axes`).
      positional: options that follow `num_features` positionally in nnx (GroupNorm's).
      args: `args(settings, channels=None, ndim=None)`, the op's positional arguments before
        `scale` (GroupNorm's `num_groups`) for `channels` features; it checks the settings, as
        far as `channels` and the input's `ndim` are known.
      use_bias: the default of `use_bias` (off for RMS norm, as in its authors' code).
      stateful: running statistics `mean`, `var` (`BatchNormState`), switched by
        `use_running_average`.
    """

    name: str
    op: Callable
    doc: str
    options: tuple[str, ...]
    renames: dict = dataclasses.field(default_factory=dict)
    axes: str = "feature_axes"
    positional: tuple[str, ...] = ()
    args: Callable | None = None
    use_bias: bool = True
    stateful: bool = False

    def op_name(self, option: str) -> str | None:
        """The op argument `option` sets, or None for a module-only option."""
        name = self.renames.get(option, OP_NAMES.get(option, option))
        p = inspect.signature(self.op).parameters.get(name)
        return name if p is not None and p.default is not inspect.Parameter.empty else None

    def defaults(self) -> dict:
        """`{option: default}` in the layer's order."""
        params = inspect.signature(self.op).parameters
        out = {k: params[self.op_name(k)].default if self.op_name(k) else MODULE_DEFAULTS[k] for k in self.options}
        return {**out, "use_bias": self.use_bias}

    def check(self, settings: dict) -> None:
        """Checks the options that need no input, naming them as the layer does (`epsilon`)."""
        for k in _BOOLS:
            if k in settings:
                _checks.python_bool(settings[k], k)
        if "epsilon" in settings:
            _checks.nonnegative(settings["epsilon"], "epsilon")
        if "momentum" in settings:
            _checks.in_unit_interval(settings["momentum"], "momentum")
        mode_flag(settings.get("use_running_average"))

    def param_shape(self, shape, settings) -> tuple[int, ...]:
        """The shape of `scale` and `bias` for inputs of `shape`: `shape` at the `axes` option."""
        return tuple(shape[a] for a in _checks.axes(settings[self.axes], len(shape), self.axes))

    def _fit(self, p, shape, settings):
        """`p` (of the `axes` option's shape, or its size) shaped as the op takes it: at the
        op's `axis`, broadcast over the axes there that are not feature axes."""
        if p is None:
            return None
        ndim = len(shape)
        axis = next(k for k in self.options if self.op_name(k) == "axis")
        feat = _checks.axes(settings[self.axes], ndim, self.axes)
        red = _checks.axes(settings[axis], ndim, axis)
        if not set(feat) <= set(red):
            raise ValueError(f"`{self.axes}`={settings[self.axes]!r} must be among `{axis}`="
                             f"{settings[axis]!r}: lnjax's scale and bias act on the normalized axes.")
        fshape = tuple(shape[a] for a in feat)
        if p.size != math.prod(fshape):
            return p  # the op's shape check reports it
        p = jnp.reshape(p, [shape[a] if a in feat else 1 for a in red])
        return jnp.broadcast_to(p, [shape[a] for a in red])

    def apply(self, x, scale, bias, settings: dict, state=None, **call):
        """The op on `x` with the layer's `settings`; the output in `settings["dtype"]`, else
        `x`'s dtype."""
        self.check(settings)  # again: an nnx layer's attributes may have been set since
        shape = jnp.shape(x)
        args = ()
        if self.args:
            args = self.args(settings, math.prod(self.param_shape(shape, settings)), len(shape))
        kw = {self.op_name(k): settings[k] for k in self.options if self.op_name(k)}
        scale, bias = self._fit(scale, shape, settings), self._fit(bias, shape, settings)
        out = self.op(x, *args, scale, bias, *((state,) if self.stateful else ()), **kw, **call)
        y, rest = (out[0], out[1:]) if self.stateful else (out, ())
        if settings["dtype"] is not None:
            y = y.astype(settings["dtype"])
        return (y, *rest) if rest else y

    def docstring(self, frontend: str) -> str:
        renamed = [f"`{k}` (`{self.op_name(k)}`)" if self.op_name(k) != k else f"`{k}`"
                   for k in self.options if self.op_name(k)]
        lines = [
            self.doc, "",
            "Options: Flax's names, positions and defaults, except where lnjax's numerical "
            "contract differs (README, \"Coming from Flax\"); each default lives in the op or in "
            "`MODULE_DEFAULTS`.",
            f"  {', '.join(renamed)}: see `lnjax.{self.op.__name__}`.",
            f"  {self.axes}: the axes of `scale` (init 1) and `bias` (init 0); `use_bias` defaults "
            f"to {self.use_bias}.",
            "  use_scale, use_bias, scale_init, bias_init, param_dtype: the parameters.",
            "  dtype: of the output (None: `x`'s dtype); statistics are at least float32.",
        ]
        if "group_size" in self.options:
            lines.append("  num_groups, group_size: exactly one is given (not None).")
        if self.stateful:
            lines.append("  use_running_average: the mode when the call gives none (None: every call "
                         "chooses); running statistics `mean`, `var`, init 0 and 1, "
                         + ("`nnx.BatchStat`s." if frontend == "nnx" else "in `batch_stats`, not updated "
                            "during `init`.") + " The call is `(x, use_running_average=None, *, mask=None)`.")
        if frontend == "nnx":
            lines.insert(3, "  num_features: the size of `scale` and `bias` (an int, or a tuple).")
            lines.append("  rngs: needed only by random initializers.")

        def wrap(line):
            indent = " " * (4 if line.startswith("  ") else 0)
            return textwrap.fill(line, 96, subsequent_indent=indent).replace("\n", "\n    ")

        return "\n    ".join(wrap(line) if line else line for line in lines)


def _groups(settings, channels: int | None = None, ndim: int | None = None) -> tuple:
    """GroupNorm's `(num_groups,)` for `channels`, from `num_groups` or `group_size` (as Flax:
    exactly one is given), checking them; with `ndim`, also `reduction_axes` for that rank."""
    g, size = settings["num_groups"], settings["group_size"]
    if (g is None) == (size is None):
        raise ValueError(f"Exactly one of `num_groups`={g!r} and `group_size`={size!r} must be given "
                         "(the other None).")  # fmt: skip
    red = settings["reduction_axes"]
    if red is not None and ndim is not None and _checks.axes(red, ndim, "reduction_axes") != tuple(range(1, ndim)):
        raise ValueError(f"`reduction_axes`={red!r}: lnjax's GroupNorm reduces over every axis but the "
                         f"first (the batch), {tuple(range(1, ndim))} here; use None, or jax.vmap.")
    name, n = ("num_groups", g) if g is not None else ("group_size", size)
    n = _checks.positive_int(n, name)
    if channels is None:
        return (None,)
    if channels % n:
        raise ValueError(f"`{name}`={n} does not divide the {channels} channels.")
    return (n if g is not None else channels // n,)


_PARAMS = ("dtype", "param_dtype", "use_bias", "use_scale", "bias_init", "scale_init")
SPECS = (
    Spec("LayerNorm", normalization.layer_norm,
         "Layer normalization (Ba, Kiros & Hinton 2016, eq. 3-5): `y = scale * (x - mu) / "
         "sqrt(sigma^2 + eps) + bias`, the statistics of each example over `reduction_axes`.",
         ("epsilon", *_PARAMS, "reduction_axes", "feature_axes", "use_fast_variance", "implementation"),
         renames={"reduction_axes": "axis"}),
    Spec("RMSNorm", normalization.rms_norm,
         "RMS normalization (Zhang & Sennrich 2019): `y = scale * x / sqrt(mean(x^2) + eps) + "
         "bias`, the mean over `reduction_axes`: layer norm without re-centering.",
         ("epsilon", *_PARAMS, "reduction_axes", "feature_axes", "implementation"),
         renames={"reduction_axes": "axis"}, use_bias=False),
    Spec("BatchNorm", normalization.batch_norm,
         "Batch normalization (Ioffe & Szegedy 2015) with running statistics: training "
         "normalizes with the batch statistics over every axis but `axis` and updates the "
         "running averages (unbiased variance unless `unbiased_running_var=False`, Flax's); "
         "evaluation uses them. `mask` leaves padding out of the statistics.",
         ("axis", "momentum", "epsilon", *_PARAMS, "axis_name", "use_fast_variance",
          "unbiased_running_var", "implementation"), axes="axis", stateful=True),
    Spec("GroupNorm", normalization.group_norm,
         "Group normalization (Wu & He 2018, eq. 1-3): per example, `num_groups` contiguous "
         "groups of channels, each over its channels and all spatial axes; `x` "
         "`[batch, *spatial, channels]`.",
         ("num_groups", "group_size", "epsilon", *_PARAMS, "reduction_axes", "use_fast_variance",
          "feature_axes"), renames={"feature_axes": "axis"}, positional=("num_groups", "group_size"),
         args=_groups),
    Spec("InstanceNorm", normalization.instance_norm,
         "Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016): each example's channel "
         "over the spatial axes; `x` `[batch, *spatial, channels]`.",
         ("epsilon", *_PARAMS, "feature_axes", "use_fast_variance"), renames={"feature_axes": "axis"}),
)  # fmt: skip
