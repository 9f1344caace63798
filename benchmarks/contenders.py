"""The benchmark's contenders, registered once each (as fastrnns' runner registers its
models): a name, the suite that measures it, the ops it computes, the modes it is timed in, its
role (how the report and the targets refer to it) and its builder. The measurers iterate this
registry; the report and `benchmarks.targets` look names up in it, and an unknown name is an
error.

Suites and their builders:
  norms: `build(op, h, dtype) -> fn`, `fn(x, scale, bias) -> y` (batch norm: `-> (y, stats)`),
    for roles lnjax, xla, fast, flax, attempt; `build(op, h, dtype) -> fn` of torch tensors for
    role torch; `build(xj, xt) -> (run, compile seconds)` for role copy (x only).
  rnn: `build(ctx) -> harness.Contender`, ctx a `benchmarks.rnn_builders.Context`; `ops` holds
    the cell whose agreement group it joins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from benchmarks import attempts, rnn_builders

OPS = ("layer", "rms", "batch")
MODES = ("forward", "forward+backward")
EPS = {"layer": 1e-5, "rms": 1e-6, "batch": 1e-5}
MOMENTUM = 0.9  # Flax convention (weight of the old value); PyTorch's momentum=0.1


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # shown in the tables
    suite: str  # the measuring module: "norms" or "rnn"
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    role: str
    build: Callable
    note: str = ""


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in REGISTRY:
        raise ValueError(f"contender {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry
    return entry


def get(name: str) -> Entry:
    """The entry called `name`; an unknown name is a ValueError listing the registered ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown contender {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def of(suite: str, op: str, *roles: str) -> list[Entry]:
    """The entries of `suite` computing `op` in any of `roles` (every role if none), in
    registration order."""
    return [e for e in REGISTRY.values() if e.suite == suite and op in e.ops and (not roles or e.role in roles)]


def name(op: str, role: str, suite: str = "norms") -> str:
    """The name of the one contender of `suite` computing `op` in `role`."""
    found = of(suite, op, role)
    if len(found) != 1:
        raise ValueError(f"{len(found)} contenders of {suite} compute {op!r} as {role!r}, expected one")
    return found[0].name


def names(op: str, role: str, suite: str = "norms") -> tuple[str, ...]:
    return tuple(e.name for e in of(suite, op, role))


# ----------------------------------------------------------------------------------------
# The norm ops.

LNJAX_OPS = {"layer": "layer_norm", "rms": "rms_norm", "batch": "batch_norm"}
CLASSES = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BatchNorm"}


def _lnjax(**options):
    """lnjax's op with `options`, as `fn(x, scale, bias)` (batch norm in training mode, from
    fresh statistics)."""
    def build(op, h, dtype):
        import lnjax

        fn, eps = getattr(lnjax, LNJAX_OPS[op]), EPS[op]
        if op == "rms":
            return lambda x, s, b: fn(x, s, eps=eps, **options)
        if op == "layer":
            return lambda x, s, b: fn(x, s, b, eps=eps, **options)
        state0 = lnjax.batch_norm_state(h)
        return lambda x, s, b: fn(x, s, b, state0, training=True, momentum=MOMENTUM, eps=eps, **options)
    return build


def _flax_linen(op, h, dtype):
    import flax.linen as nn
    import jax.numpy as jnp

    dt, eps = jnp.dtype(dtype), EPS[op]
    if op == "batch":
        lin = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=eps, dtype=dt, param_dtype=dt)
        stats0 = {"mean": jnp.zeros((h,), jnp.float32), "var": jnp.ones((h,), jnp.float32)}

        def linen_bn(x, s, b):
            y, upd = lin.apply({"params": {"scale": s, "bias": b}, "batch_stats": stats0}, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]
        return linen_bn
    lin = getattr(nn, CLASSES[op])(epsilon=eps, dtype=dt, param_dtype=dt)
    if op == "rms":
        return lambda x, s, b: lin.apply({"params": {"scale": s}}, x)
    return lambda x, s, b: lin.apply({"params": {"scale": s, "bias": b}}, x)


def _flax_nnx(op, h, dtype):
    """The NNX module `nnx.split` outside and `nnx.merge`d inside the function (no `nnx.jit`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    dt, eps = jnp.dtype(dtype), EPS[op]
    extra = {"use_running_average": False, "momentum": MOMENTUM} if op == "batch" else {}
    mod = getattr(nnx, CLASSES[op])(h, epsilon=eps, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0), **extra)
    graphdef, state = nnx.split(mod)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    leaves0 = [leaf for _, leaf in paths_leaves]

    def nnx_fn(x, s, b):
        new = {"scale": s, "bias": b}
        vals = [next((v for k, v in new.items() if f"'{k}'" in nm), leaf) for nm, leaf in zip(keys, leaves0)]
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, vals))
        y = m(x)
        return (y, (m.mean.value, m.var.value)) if op == "batch" else y
    return nnx_fn


def _torch(op, h, dtype):
    import torch
    import torch.nn.functional as F

    eps = EPS[op]
    if op == "layer":
        return lambda x, w, b: F.layer_norm(x, (h,), w, b, eps)
    if op == "rms":
        return lambda x, w, b: F.rms_norm(x, (h,), w, eps)
    # PyTorch's CPU kernel wants running statistics in the input's dtype when the weights
    # have it (as after `module.to(torch.bfloat16)`).
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    rm, rv = torch.zeros(h, dtype=tdt), torch.ones(h, dtype=tdt)
    return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, momentum=1 - MOMENTUM, eps=eps)


def _copy_jit(xj, xt):
    import jax

    from benchmarks import _harness as H

    copy, cs = H.timed_compile(jax.jit(lambda a: a + 0), xj)
    return (lambda: H.block(copy(xj))), cs


def _copy_numpy(xj, xt):
    import numpy as np

    src = np.asarray(xj).view(np.uint8)
    dst = np.empty_like(src)
    return (lambda: np.copyto(dst, src)), None


def _copy_torch(xj, xt):
    return (lambda: xt.clone()), None


COPY_JIT, COPY_NUMPY, COPY_TORCH = "copy: jax.jit(x + 0)", "copy: np.copyto (preallocated)", "copy: torch.clone"


def _norm_entries():
    both, fast_ops = MODES, ("layer", "batch")
    for op in OPS:
        lnjax_name = f"lnjax.{LNJAX_OPS[op]}"
        exact = "" if op == "rms" else ", exact variance"
        default = "training=True, default" if op == "batch" else "default"
        register(Entry(lnjax_name, "norms", (op,), both, "lnjax", _lnjax(),
                       f"{default}: native C++ kernels on CPU{exact}"))
        register(Entry(f'{lnjax_name}(implementation="fused")', "norms", (op,), both, "fused",
                       _lnjax(implementation="fused"), f"closed-form custom_jvp in XLA (the default off CPU){exact}"))
        register(Entry(f'{lnjax_name}(implementation="xla")', "norms", (op,), both, "xla", _lnjax(implementation="xla"),
                       f"autodiff of the formula{exact}"))
        if op in fast_ops:
            register(Entry(f"{lnjax_name}(fast_variance=True)", "norms", (op,), both, "fast",
                           _lnjax(fast_variance=True), "one-pass variance, as Flax's default"))
        linen_note = "use_fast_variance=True (default; no effect without centring)" if op == "rms" else \
            "use_fast_variance=True (default)"
        register(Entry(f"flax.linen.{CLASSES[op]}", "norms", (op,), both, "flax", _flax_linen, linen_note))
        register(Entry(f"flax.nnx.{CLASSES[op]}", "norms", (op,), both, "flax", _flax_nnx,
                       "use_fast_variance=True (default); split/merge inside jax.jit"))
        register(Entry(f"torch F.{LNJAX_OPS[op]}", "norms", (op,), both, "torch", _torch, "eager"))
    for copy_name, build, note in ((COPY_JIT, _copy_jit, "new output buffer, like the ops"),
                                   (COPY_NUMPY, _copy_numpy, "no allocation: the bandwidth limit"),
                                   (COPY_TORCH, _copy_torch, "new output buffer")):
        register(Entry(copy_name, "norms", OPS, ("forward",), "copy", build, note))
    # The layer-norm VJPs tried (`benchmarks.attempts`), measured beside lnjax's own.
    for attempt in attempts.NAMES:
        if attempt not in REGISTRY:  # lnjax's fast_variance=True is among them
            register(Entry(attempt, "norms", ("layer",), both, "attempt", attempts.builder(attempt),
                           attempts.DESCRIPTIONS[attempt]))


# ----------------------------------------------------------------------------------------
# The recurrent layers' training step.

XLA_CELL = '(implementation="xla")'
TRAINING = ("training",)
FLAX_LSTM = "flax nn.RNN(OptimizedLSTMCell)"
PLAIN_LSTM = "lnjax LSTM (no norm)"
TORCH_LN_LSTM = {False: "torch LN-LSTM, eager", True: "torch LN-LSTM, torch.jit.script"}


def cell_name(cell: str, precompute: bool, xla: bool = False) -> str:
    """The name of lnjax's `cell` ("LN-LSTM", "LN-GRU") in one projection form."""
    return f"lnjax {cell}{XLA_CELL if xla else ''}, precompute_inputs={precompute}"


def _rnn_entries():
    def cell(group, pre, xla=False, note=""):
        name = cell_name(group, pre, xla)
        register(Entry(name, "rnn", (group,), TRAINING, "xla" if xla else "lnjax",
                       rnn_builders.lnjax_cell(name, group, pre, xla, note), note))

    for pre in (True, False):
        cell("LN-LSTM", pre)
    for pre in (False, True):
        cell("LN-LSTM", pre, xla=True, note="autodiff of the layer-norm formula")
    for scripted in (False, True):
        register(Entry(TORCH_LN_LSTM[scripted], "rnn", ("LN-LSTM",), TRAINING, "torch",
                       rnn_builders.torch_ln_lstm(TORCH_LN_LSTM[scripted], scripted)))
    for pre in (True, False):
        cell("LN-GRU", pre)
    register(Entry(PLAIN_LSTM, "rnn", ("LSTM",), TRAINING, "lnjax", rnn_builders.lnjax_lstm(PLAIN_LSTM)))
    register(Entry(FLAX_LSTM, "rnn", ("LSTM",), TRAINING, "flax", rnn_builders.flax_lstm(FLAX_LSTM)))
    register(Entry("torch nn.LSTM", "rnn", ("LSTM",), TRAINING, "torch", rnn_builders.torch_lstm_module("torch nn.LSTM")))


_norm_entries()
_rnn_entries()
