"""The normalization layers of both Flax frontends, each written down once.

A `Spec` names the pure op a layer wraps and the op's options it exposes; their defaults are
read from the op's signature, so a default lives only in the op. `lnjax.nnx` and `lnjax.linen`
build their classes (signature, attributes, docstring, call) from the same `Spec`s, so the two
frontends cannot drift (tests/test_modules.py checks that they agree).
"""

import dataclasses
import inspect
import textwrap
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lnjax import _checks, normalization

ones = jax.nn.initializers.ones
zeros = jax.nn.initializers.zeros


def dense(x, w, bias):
    """`x @ w + bias` in `x`'s dtype (`WeightNormDense`); the bias is broadcast explicitly (no
    rank promotion)."""
    x = _checks.floating(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"`x` has shape {x.shape}; its last axis must be in_features={w.shape[0]}.")
    y = jnp.dot(x, w.astype(x.dtype))
    return y if bias is None else y + jnp.broadcast_to(bias.astype(y.dtype), y.shape)


def bidirectional(forward, backward, xs, *, return_carry=False, **kw):
    """The `Bidirectional` layers of both frontends: `forward` and `backward` (reversed within
    each sequence's length) over `xs`, outputs concatenated."""
    yf, cf = forward(xs, return_carry=True, **kw)
    yb, cb = backward(xs, reverse=True, return_carry=True, **kw)
    ys = jnp.concatenate([yf, yb], axis=-1)
    return (ys, (cf, cb)) if return_carry else ys


@dataclasses.dataclass(frozen=True)
class Spec:
    """One normalization layer.

    Attributes:
      name: the class name in both frontends.
      op: the pure op, called `op(x, *positional, scale, bias, [state], **options, **call)`.
      doc: what the layer computes (its docstring's first part).
      options: names of the op's keyword arguments that are the layer's options.
      positional: `(name, default)` of arguments the layer takes after `num_features` and
        passes to the op before `scale` (GroupNorm's `num_groups`).
      call: the op's keyword arguments given at call time (BatchNorm's `mask`).
      channels: parameters of shape `[channels]` (an int `num_features`, the channel axis
        `axis`), else of shape `x.shape[axis]` (an int or a tuple).
      use_bias: the default of `use_bias` (off for RMS norm, as in its authors' code).
      stateful: running statistics `mean`, `var` (`BatchNormState`), switched by
        `use_running_average`.
    """

    name: str
    op: Callable
    doc: str
    options: tuple[str, ...]
    positional: tuple[tuple[str, object], ...] = ()
    call: tuple[str, ...] = ()
    channels: bool = False
    use_bias: bool = True
    stateful: bool = False

    def defaults(self) -> dict:
        """`{option: default}`: the positional ones, then the op's options, then the params'."""
        params = inspect.signature(self.op).parameters
        return {**dict(self.positional), **{k: params[k].default for k in self.options},
                "use_scale": True, "use_bias": self.use_bias, "scale_init": ones, "bias_init": zeros}

    def check(self, settings: dict, channels: int | None = None):
        """Checks the positional arguments (GroupNorm's `num_groups` divides the channels)."""
        if "num_groups" in settings:
            g = _checks.positive_int(settings["num_groups"], "num_groups")
            if channels is not None and channels % g:
                raise ValueError(f"`num_groups`={g} does not divide `num_features`={channels}.")

    def param_shape(self, shape, axis) -> tuple[int, ...]:
        """The shape of `scale` and `bias` for inputs of `shape`."""
        if self.channels:
            return (shape[_checks.channel_axis(axis, len(shape), batch_first=True)],)
        return tuple(shape[a] for a in _checks.axes(axis, len(shape)))

    def apply(self, x, scale, bias, settings: dict, state=None, **call):
        """The op on `x` with the layer's `settings` (its options and positional arguments)."""
        args = [settings[k] for k, _ in self.positional]
        kw = {k: settings[k] for k in self.options}
        if self.stateful:
            return self.op(x, *args, scale, bias, state, **kw, **call)
        return self.op(x, *args, scale, bias, **kw, **call)

    def docstring(self, frontend: str) -> str:
        options = ", ".join(f"`{k}`" for k, _ in self.positional) or ""
        ops = ", ".join(f"`{k}`" for k in self.options)
        shape = "`[channels]`" if self.channels else "`x.shape[axis]`"
        lines = [
            self.doc, "",
            "Options (the same names and defaults as the pure op, where the defaults live):",
            f"  {options + ', ' if options else ''}{ops}: see `lnjax.{self.op.__name__}`.",
            f"  use_scale, use_bias: create `scale` (init 1) and `bias` (init 0), of shape {shape}"
            f" (`use_bias` defaults to {self.use_bias}).",
            "  scale_init, bias_init, param_dtype: their initializers and dtype.",
        ]
        if self.stateful:
            lines.append("  use_running_average: the mode when the call gives none (None: every call "
                         "chooses); running statistics `mean`, `var`, init 0 and 1, "
                         + ("`nnx.BatchStat`s." if frontend == "nnx" else "in `batch_stats`, not updated "
                            "during `init`."))
        if frontend == "nnx":
            lines.insert(3, "  num_features: the number of channels" if self.channels else
                         "  num_features: `x.shape[axis]`, an int or a tuple when `axis` is a tuple.")
            lines.append("  rngs: needed only by random initializers.")
        def wrap(line):
            indent = " " * (4 if line.startswith("  ") else 0)
            return textwrap.fill(line, 96, subsequent_indent=indent).replace("\n", "\n    ")

        return "\n    ".join(wrap(line) if line else line for line in lines)


SPECS = (
    Spec("LayerNorm", normalization.layer_norm,
         "Layer normalization (Ba, Kiros & Hinton 2016, eq. 3-5): `y = scale * (x - mu) / "
         "sqrt(sigma^2 + eps) + bias`, the statistics of each example over `axis`.",
         ("axis", "eps", "fast_variance", "implementation")),
    Spec("RMSNorm", normalization.rms_norm,
         "RMS normalization (Zhang & Sennrich 2019): `y = scale * x / sqrt(mean(x^2) + eps) + "
         "bias`, the mean over `axis`: layer norm without re-centering.",
         ("axis", "eps", "implementation"), use_bias=False),
    Spec("BatchNorm", normalization.batch_norm,
         "Batch normalization (Ioffe & Szegedy 2015) with running statistics: training "
         "normalizes with the batch statistics over every axis but `axis` and updates the "
         "running averages (unbiased variance); evaluation uses them. The call takes `mask` "
         "(padding left out of the statistics) and `use_running_average`.",
         ("axis", "momentum", "eps", "axis_name", "fast_variance", "implementation"),
         call=("mask",), stateful=True),
    Spec("GroupNorm", normalization.group_norm,
         "Group normalization (Wu & He 2018, eq. 1-3): per example, `num_groups` contiguous "
         "groups of channels, each over its channels and all spatial axes; `x` "
         "`[batch, *spatial, channels]`.",
         ("axis", "eps", "fast_variance"), positional=(("num_groups", 32),), channels=True),
    Spec("InstanceNorm", normalization.instance_norm,
         "Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016): each example's channel "
         "over the spatial axes; `x` `[batch, *spatial, channels]`.",
         ("axis", "eps", "fast_variance"), channels=True),
)  # fmt: skip
