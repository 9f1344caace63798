"""Normalizers as values: what the cells and models compose, one per normalized term.

A `Normalizer` is a NamedTuple of pure functions over the last axis of `z` (the H units of the
paper), built by a factory that closes over its hyperparameters, as Optax builds gradient
transformations:

    norm = lnjax.norms.layer(eps=1e-6)
    params = norm.init(64)          # {"scale": ones(64), "bias": zeros(64)}
    y = norm.apply(params, z)       # g * (z - mu) / sqrt(sigma^2 + eps) + b   (eq. 5)

Stateful normalizers (batch statistics) also have `init_state(size, dtype) -> state`, and
their `apply(params, z, state, *, training, **context)` returns `(y, new_state)`; `init_state`
is None for the others. `run` applies either kind.

Every factory takes the options of the pure op it wraps (`layer(eps=...)` is `layer_norm(...,
eps=...)`), whose signature holds the only default; an unknown option is a TypeError at
construction. Two options are the normalizer's own: `scale_init`, the initial gain (1.0, the
paper's choice over 0.1), and `bias`, whether it has a bias (True). Equal arguments give the
identical value, so cells holding normalizers compare equal and jit caches hit.

The string shortcuts ("layer", "rms", ...) resolve in one place, `get`.
"""

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp

from lnjax import _checks, normalization, relatives

__all__ = [
    "Normalizer",
    "batch",
    "batch_layer",
    "bias",
    "divisive",
    "domain_agnostic_batch",
    "get",
    "graph",
    "graph_adjacency",
    "graph_batch",
    "graph_learned",
    "graph_node",
    "group",
    "identity",
    "layer",
    "names",
    "resolve",
    "rms",
    "run",
    "switchable",
]

# Gains 1 and biases 0 at init (Ba et al. find gain 1.0 clearly better than 0.1).
_OWN_OPTIONS = {"scale_init": 1.0, "bias": True}
# Arguments the normalizer supplies itself, never options.
_RESERVED = {"x", "scale", "bias", "state", "control", "weights", "training", "axis", "return_l1"}


class Normalizer(NamedTuple):
    """A normalization of the last axis as pure functions (see the module docstring).

    Attributes:
      init: `(size, dtype=float32) -> params`, a dict with "scale" `[size]` and/or "bias".
      apply: stateless: `(params, z, **context) -> y`; stateful: `(params, z, state, *,
        training, **context) -> (y, new_state)`. `y` has `z`'s shape and dtype.
      init_state: `(size, dtype=float32) -> state` for a stateful normalizer, else None.
      name: the call that built it, e.g. "layer(eps=1e-06)".
      context: the names of the keyword arguments `apply` takes besides the state and mode
        (e.g. `("axis_name", "mask")`); `run` passes only these.
      spec: `(factory name, args, sorted keyword options)` of the call that built it, its kind
        and options as data (e.g. `("layer", (), (("eps", 1e-06),))`).
    """

    init: Callable[..., dict]
    apply: Callable[..., Any]
    init_state: Callable[..., Any] | None
    name: str
    context: tuple[str, ...] = ()
    spec: tuple = ()

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def __repr__(self):
        return f"lnjax.norms.{self.name}"


def _cached(factory):
    """Names the Normalizer after its call, and gives the identical one for equal arguments
    (its closures compare by identity)."""
    cache = {}

    @functools.wraps(factory)
    def build(*args, **kwargs):
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in sorted(kwargs.items())]
        spec = (factory.__name__, args, tuple(sorted(kwargs.items())))
        make = lambda: factory(*args, **kwargs)._replace(name=f"{factory.__name__}({', '.join(shown)})",  # noqa: E731
                                                         spec=spec)  # fmt: skip
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # an unhashable option (e.g. an array): build afresh
            return make()
        if key not in cache:
            cache[key] = make()
        return cache[key]

    return build


def _split(op, options, context=()):
    """`(scale_init, has_bias, op_options)`, checking `options` against `op`'s signature."""
    own = {k: options.pop(k, v) for k, v in _OWN_OPTIONS.items()}
    params = inspect.signature(op).parameters
    for k in options:
        if k in _RESERVED or k in context or k not in params:
            allowed = sorted(set(params) - _RESERVED - set(context)) + sorted(_OWN_OPTIONS)
            raise TypeError(f"`{k}` is not an option of this normalizer (`{op.__name__}`); "
                            f"options: {', '.join(allowed)}.")  # fmt: skip
    missing = [k for k, p in params.items() if p.default is p.empty and p.kind is p.KEYWORD_ONLY
               and k not in options and k not in context and k not in _RESERVED]  # fmt: skip
    if missing:
        raise TypeError(f"`{op.__name__}` needs {', '.join(f'`{k}`' for k in missing)}.")
    if own["scale_init"] is not None:
        _checks.real_scalar(own["scale_init"], "scale_init")
        if not math.isfinite(float(own["scale_init"])):
            raise ValueError(f"`scale_init` (the initial gain) must be finite, got {own['scale_init']!r}.")
    if not isinstance(own["bias"], bool):
        raise TypeError(f"`bias` must be a bool (whether the normalizer has a bias), got {own['bias']!r}.")
    return own["scale_init"], own["bias"], options


def _param_names(scale_init, has_bias) -> tuple[str, ...]:
    """The gain and bias keys of the params `_affine_init(scale_init, has_bias)` makes."""
    return (*(("scale",) if scale_init is not None else ()), *(("bias",) if has_bias else ()))


def _checked(apply, names: tuple[str, ...]):
    """`apply` that first checks `params` has exactly the keys `names`: a gain or bias under
    another key (or missing) would otherwise be dropped without a word."""
    want = sorted(names)

    @functools.wraps(apply)
    def checked(params, *args, **kwargs):
        if not isinstance(params, Mapping):
            raise TypeError(f"`params` must be a dict with keys {want} (what `init` returns), got "
                            f"{type(params).__name__}.")  # fmt: skip
        if sorted(params) != want:
            raise ValueError(f"`params` has keys {sorted(params)}, but this normalizer's `init` makes {want}; "
                             "were these params made by another normalizer?")  # fmt: skip
        return apply(params, *args, **kwargs)

    return checked


def _affine_init(scale_init, has_bias, extra=None):
    def init(size, dtype=jnp.float32):
        size = _checks.positive_int(size, "size")
        p = {} if scale_init is None else {"scale": jnp.full((size,), scale_init, dtype)}
        if has_bias:
            p["bias"] = jnp.zeros((size,), dtype)
        if extra is not None:
            p.update(extra(size, dtype))
        return p

    return init


def _lead(v, ndim):
    """A per-unit vector with explicit leading size-1 axes (for rank-promotion=raise)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _grouped(op, groups, options):
    """Stateless apply of `op(z, scale, bias, **options)`; with `groups` > 1, statistics over
    each of `groups` equal slices of the last axis (per-gate statistics), then the gain and bias."""
    groups = _checks.positive_int(groups, "groups")

    def apply(params, z, **context):
        scale, b = params.get("scale"), params.get("bias")
        if groups == 1:
            return op(z, scale, b, **options, **context)
        z = _checks.floating(z, "z")
        if z.ndim < 1 or z.shape[-1] % groups:
            raise ValueError(f"`groups`={groups} does not divide the last axis of z (shape {z.shape}).")
        # Sizes spelled out: a `-1` cannot be inferred for an empty batch.
        y = op(z.reshape(z.shape[:-1] + (groups, z.shape[-1] // groups)), **options, **context).reshape(z.shape)
        y = y if scale is None else y * _lead(scale.astype(y.dtype), y.ndim)
        return y if b is None else y + _lead(b.astype(y.dtype), y.ndim)

    return apply


def _stateless(op, options, *, groups=1, bound=None, context=()):
    """A normalizer over `op(z, scale, bias, **options, **context)`. `bound`: the `(name,
    value)` of an argument the factory takes positionally (divisive's radius, group's
    num_groups)."""
    context = context + ((bound[0],) if bound else ())
    scale_init, has_bias, options = _split(op, dict(options), context)
    fn = op
    if bound:
        def fn(x, scale=None, b=None, **kw):
            return op(x, scale=scale, bias=b, **{bound[0]: bound[1]}, **kw)
    apply = _checked(_grouped(fn, groups, options), _param_names(scale_init, has_bias))
    return Normalizer(_affine_init(scale_init, has_bias), apply, None, None,
                      tuple(c for c in context if not bound or c != bound[0]))


# --- stateless normalizers -----------------------------------------------------------------------


@_cached
def layer(*, groups: int = 1, **options) -> Normalizer:
    """Layer normalization (eq. 3-5), `lnjax.layer_norm` over the last axis.

    `groups` > 1 computes the statistics per group of units (per gate, with `groups=4` in an
    LSTM); gain and bias stay per unit. Options: those of `layer_norm` (`eps`,
    `fast_variance`, `implementation`), and `scale_init`, `bias`.
    """
    return _stateless(normalization.layer_norm, options, groups=groups)


@_cached
def rms(*, groups: int = 1, **options) -> Normalizer:
    """RMS normalization, `lnjax.rms_norm` over the last axis (options as for `layer`)."""
    return _stateless(normalization.rms_norm, options, groups=groups)


@_cached
def divisive(radius, **options) -> Normalizer:
    """Divisive normalization, `lnjax.divisive_norm` with window `radius` over neighbouring
    units (None: all). Options: `sigma`, `suppression_radius`, `summation`, `edges`, and
    `scale_init`, `bias`."""
    return _stateless(relatives.divisive_norm, options, bound=("radius", radius))


@_cached
def group(num_groups, **options) -> Normalizer:
    """Group normalization, `lnjax.group_norm` of `[batch, *spatial, channels]` over each
    example's groups of channels and its positions; `group(1)` is the ConvNet LN of §6.7."""
    return _stateless(normalization.group_norm, options, bound=("num_groups", num_groups))


@_cached
def graph_node(**options) -> Normalizer:
    """`lnjax.graph_node_norm` of node features `[num_nodes, features]`."""
    return _stateless(relatives.graph_node_norm, options)


@_cached
def graph_adjacency(**options) -> Normalizer:
    """`lnjax.graph_adjacency_norm`; `apply(params, z, edges=...)`."""
    return _stateless(relatives.graph_adjacency_norm, options, context=("edges",))


@_cached
def graph(**options) -> Normalizer:
    """`lnjax.graph_norm`; `apply(params, z, segment_ids=..., num_segments=...)`."""
    return _stateless(relatives.graph_norm, options, context=("segment_ids", "num_segments"))


def _add_bias(z, b=None):
    return z if b is None else z + _lead(b.astype(z.dtype), z.ndim)


@_cached
def bias() -> Normalizer:
    """No normalization, only a bias: `z + b` (the unnormalized baseline's term)."""
    apply = _checked(lambda params, z: _add_bias(z, params["bias"]), ("bias",))
    return Normalizer(_affine_init(None, True), apply, None, None)


@_cached
def identity() -> Normalizer:
    """No normalization and no parameters: `z`."""
    return Normalizer(_affine_init(None, False), _checked(lambda params, z: z, ()), None, None)


# --- stateful normalizers ------------------------------------------------------------------------


def _stateful(op, options, init_state, *, context=("axis_name", "mask"), extra=None, pre=None):
    """A normalizer over `op(z, scale, bias, *extra_params, state, training=..., **options)`."""
    scale_init, has_bias, options = _split(op, dict(options), context)
    extra_names = () if extra is None else tuple(extra(1, jnp.float32))

    def apply(params, z, state, *, training, **ctx):
        extras = [params[k] for k in extra_names]
        if pre is not None:
            return pre(params.get("scale"), params.get("bias"), extras, z, state, training, {**options, **ctx})
        return op(z, params.get("scale"), params.get("bias"), *extras, state, training=training, **options, **ctx)

    apply = _checked(apply, (*_param_names(scale_init, has_bias), *extra_names))
    return Normalizer(_affine_init(scale_init, has_bias, extra), apply, init_state, None, context)


@_cached
def batch(**options) -> Normalizer:
    """Batch normalization, `lnjax.batch_norm` with `axis=-1`; state `batch_norm_state(size)`.
    Context at `apply`: `mask`, `axis_name`. Options: `momentum`, `eps`, `fast_variance`,
    `implementation`, and `scale_init`, `bias`."""
    return _stateful(normalization.batch_norm, options, normalization.batch_norm_state)


def _switch(scale, b, extras, z, state, training, kw):
    (control,) = extras
    if z.ndim >= 3:
        return relatives.switchable_norm(z, scale, b, control, state, training=training, **kw)
    # No spatial axes, so no instance statistics: the IN weight is pinned at 0, leaving the
    # LN/BN mix of the authors' SwitchNorm1d.
    control = relatives.SwitchableControl(*(logits.at[0].set(-jnp.inf) for logits in control))
    y, state = relatives.switchable_norm(z[:, None], scale, b, control, state, training=training, **kw)
    return y[:, 0], state


@_cached
def switchable(**options) -> Normalizer:
    """Switchable normalization, `lnjax.switchable_norm` (its control is a parameter,
    "control"). On `[batch, features]` there are no instance statistics: it mixes LN and BN,
    as the authors' SwitchNorm1d. Context: `axis_name`."""
    return _stateful(relatives.switchable_norm, options, normalization.batch_norm_state, context=("axis_name",),
                     extra=lambda size, dtype: {"control": relatives.switchable_control(dtype)},
                     pre=_switch)  # fmt: skip


@_cached
def batch_layer(**options) -> Normalizer:
    """Batch layer normalization, `lnjax.batch_layer_norm` of `[batch, features]`. Options:
    `momentum`, `eps`, `batch_size`, and `scale_init`, `bias`. Context: `axis_name`."""
    return _stateful(relatives.batch_layer_norm, options, relatives.batch_layer_norm_state, context=("axis_name",))


@_cached
def graph_batch(**options) -> Normalizer:
    """`lnjax.graph_batch_norm`; context: `node_mask`, `axis_name`."""
    return _stateful(relatives.graph_batch_norm, options, normalization.batch_norm_state,
                     context=("node_mask", "axis_name"))


def _default(op, name):
    return inspect.signature(op).parameters[name].default


@_cached
def graph_learned(**options) -> Normalizer:
    """`lnjax.graph_learned_norm` (its mixing weights are a parameter, "weights"); stateful
    when "batch" is in `kinds` (as by default). Context: `segment_ids`, `num_segments`,
    `edges`, `node_mask`, `axis_name`."""
    op = relatives.graph_learned_norm
    kinds, weighting = (options.get(k, _default(op, k)) for k in ("kinds", "weighting"))
    def weights(size, dtype):
        return {"weights": relatives.graph_learned_weights(size, kinds, weighting, dtype)}

    ctx = ("segment_ids", "num_segments", "edges", "node_mask", "axis_name")
    norm = _stateful(op, options, normalization.batch_norm_state, context=ctx, extra=weights)
    if "batch" in kinds:
        return norm
    return norm._replace(apply=lambda params, z, **c: norm.apply(params, z, None, training=False, **c)[0],
                         init_state=None)  # fmt: skip


@_cached
def domain_agnostic_batch(**options) -> Normalizer:
    """`lnjax.domain_agnostic_batch_norm`: batch statistics of the source-domain examples only;
    context: `source_mask` (required), `axis_name`."""
    return _stateful(relatives.domain_agnostic_batch_norm, options, normalization.batch_norm_state,
                     context=("source_mask", "axis_name"))  # fmt: skip


# --- the registry --------------------------------------------------------------------------------

_REGISTRY = {f.__name__: f for f in (layer, rms, divisive, group, bias, identity, batch, switchable,
                                     batch_layer, domain_agnostic_batch, graph_node, graph_adjacency,
                                     graph, graph_batch, graph_learned)}  # fmt: skip


def names() -> tuple[str, ...]:
    """The string shortcuts `get` accepts, plus "none" (unnormalized)."""
    return ("none", *_REGISTRY)


def get(name: str, **options) -> Normalizer | None:
    """The normalizer a string names, built with `options`: `get("layer", eps=1e-6)` is
    `layer(eps=1e-6)`. "none" is None (the caller's unnormalized form)."""
    if name == "none":
        if options:
            raise TypeError(f'norm "none" takes no options, got {sorted(options)}.')
        return None
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; expected one of {names()} or a Normalizer.")
    return _REGISTRY[name](**options)


def resolve(spec, name: str = "norm") -> Normalizer | None:
    """`spec` as a Normalizer: a Normalizer is itself, a string goes through `get`, None stays
    None. `name` is the argument named in errors."""
    if spec is None or isinstance(spec, Normalizer):
        return spec
    if isinstance(spec, str):
        try:
            return get(spec)
        except (TypeError, ValueError) as e:
            raise type(e)(f"`{name}`: {e}") from None
    raise TypeError(f"`{name}` must be a Normalizer (see lnjax.norms), a name from {names()} or "
                    f"None, got {spec!r}.")  # fmt: skip


def run(norm: Normalizer | None, params, z, state=None, *, training=None, **context):
    """`(y, new_state)` for either kind of normalizer, so that one call serves any: `norm` None
    is the identity, a stateless one ignores `state` and `training`, and each gets only the
    `context` it takes (`norm.context`; e.g. `axis_name` reaches batch statistics only)."""
    if norm is None:
        return z, state
    context = {k: v for k, v in context.items() if k in norm.context}
    if not norm.stateful:
        return norm.apply(params, z, **context), state
    return norm.apply(params, z, state, training=training, **context)
