"""Jitted, vmapped training with Optax: one compiled program trains a whole sweep.

A sweep is the product of `config.sweep.seed` and `config.sweep.learning_rate`; every member
has the same shapes, so the members are stacked on a leading axis and trained with `jax.vmap`.
`config.steps_per_call` steps are fused into one `lax.scan` per call; the train state is
donated. A member whose loss or gradients become non-finite is frozen at its last finite
state and marked diverged; the others are unaffected.

Checkpoints (orbax, with its save policies) are written every `config.checkpoint_every` steps,
on completion, and when JAX's preemption service (multi-process runs) announces a preemption,
after which the run stops. The same command resumes from the latest one and, all randomness
being derived from the step counter, ends with exactly the parameters and metrics of an
uninterrupted run. Each checkpoint
records (in its orbax custom metadata) the config that produced it and the SHA-256 of every
array: resuming under another config is refused even without config.json, and a corrupt or
unreadable latest checkpoint is reported (a RuntimeWarning naming the step and the file), set
aside into `<workdir>/corrupt_checkpoints/` and the previous valid one used; with none valid,
`CheckpointError` names every file. A step directory holding another step's state (renamed or
copied) counts as corrupt.

The whole config is checked (`check_config`, with the task's data and its model traced on one
batch, so that the normalizers check their option values) before the first file is written; a
bad value is a `ConfigError` naming the key and the allowed values, which the command line
prints as one `error: ...` line (exit status 1, no traceback). A workdir that cannot hold the
run (not a directory, a file where the run keeps a directory or the reverse, a config.json or
metrics.jsonl line that is not the run's, a failed write) is a `WorkdirError` naming the file,
printed alike; what was saved is kept. While it runs, process 0 holds an exclusive lock on
`<workdir>/.lock`, so a second run on the same workdir is refused.

Devices: the training step runs under `jax.shard_map` on a 2-D mesh with axes ("sweep",
"data") (`config.mesh`). The stacked members are split over "sweep"; within a member the batch
is split over "data" and the training set is sharded over "data" too (each device, and so each
process, holds one contiguous slice of the examples; a batch is gathered from the slices with a
reduce-scatter). The loss, and so the gradients, are averaged over "data" and batch norm
synchronizes its statistics over it, so any mesh computes what one device computes with the
whole batch (to float rounding). One device is the 1 x 1 mesh of the same code. Multi-process
runs (`--coordinator_address`, `--num_processes`, `--process_id`, or `--distributed` for JAX's
cluster auto-detection) call `jax.distributed.initialize` and then run the same program over
the global mesh; process 0 writes config.json and metrics.jsonl, and every process takes part
in the (single) orbax checkpoint and in restoring it.

Run a config:  python -m experiments.train --config=configs/mlp_digits.py --workdir=runs/mlp
Its curves:    python -m experiments.curves runs/mlp   (or: tensorboard --logdir runs/mlp)
"""

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data as data_lib
from experiments import models
from lnjax import norms


class TrainState(NamedTuple):
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key: saved by orbax as a plain array
    step: jax.Array
    diverged_at: jax.Array  # -1 while finite, else the step at which the member diverged


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, a loss and the data it trains on (arrays kept on the host until `fit`)."""

    model: models.Model
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]
    data: data_lib.Dataset


def classification_loss(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"error": jnp.mean(jnp.argmax(logits, -1).astype(labels.dtype) != labels)}


def regression_loss(outputs, targets):
    return jnp.mean((outputs[..., 0] - targets) ** 2), {}


def build_task(cfg) -> Task:
    """Builds the task that `cfg.task` and `cfg.model` describe."""
    name = cfg.task.name
    if name in ("digits", "digits_rows", "digits_pixels", "mnist"):
        if name == "mnist":
            if not cfg.task.data_dir:  # "" would read the current directory
                raise ValueError("`task.name`='mnist' needs `task.data_dir`: the directory of MNIST's IDX files.")
            ds = data_lib.mnist_idx(cfg.task.data_dir)
        else:
            seq = {"digits": None, "digits_rows": "row", "digits_pixels": "pixel"}[name]
            flat = cfg.model.kind == "mlp"
            ds = data_lib.digits(as_sequence=seq, flatten=flat, permute=cfg.task.permute)
            if cfg.model.kind == "convnet":
                ds = ds._replace(x_train=ds.x_train[..., None], x_test=ds.x_test[..., None])
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "adding":
        xtr, ytr = data_lib.adding_problem(cfg.task.seed, cfg.task.train_size, cfg.task.length)
        xte, yte = data_lib.adding_problem(cfg.task.seed + 1, cfg.task.test_size, cfg.task.length)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, 0)
        loss_fn, n_out = regression_loss, 1
    elif name == "copying":
        xtr, ytr = data_lib.copying_memory(cfg.task.seed, cfg.task.train_size, cfg.task.length)
        xte, yte = data_lib.copying_memory(cfg.task.seed + 1, cfg.task.test_size, cfg.task.length)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, data_lib.COPY_VOCAB_SIZE)
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "colour_graphs":
        ds = data_lib.colour_graph_data(cfg.task.seed, num_train=cfg.task.train_size, num_test=cfg.task.test_size)
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "char_lm":
        if cfg.task.path:
            text, source = data_lib.read_text(cfg.task.path), f"text file {cfg.task.path!r}"
        else:
            text, source = data_lib.bible_text(), "the bundled corpus"
        n_train, n_val = cfg.task.train_size, cfg.task.test_size
        if len(text) < n_train + n_val:
            raise ValueError(f"`task.train_size` + `task.test_size` = {n_train + n_val} characters, "
                             f"but {source} has {len(text)}.")
        corpus = data_lib.text_corpus(text[: n_train + n_val], cfg.task.length, n_val, source=source)
        xtr, ytr = data_lib.windows(corpus.train, cfg.task.length)
        xte, yte = data_lib.windows(corpus.val, cfg.task.length) if corpus.val.size else (xtr, ytr)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, len(corpus.vocab))
        loss_fn, n_out = classification_loss, ds.num_classes
    else:
        raise ValueError(
            "`task.name` must be digits, digits_rows, digits_pixels, mnist, adding, copying, "
            f"char_lm or colour_graphs, got {name!r}."
        )

    tokens = name in ("copying", "char_lm")  # int tokens in, one prediction per step out
    if isinstance(ds.x_train, data_lib.Graphs):
        if cfg.model.kind != "gin":
            raise ValueError(f"`task.name`={name!r} needs `model.kind`='gin', got {cfg.model.kind!r}.")
        input_size = in_channels = ds.x_train.nodes.shape[-1]  # node features
        max_steps = None
    else:
        if cfg.model.kind == "gin":
            raise ValueError(f"`model.kind`='gin' needs `task.name`='colour_graphs', got {name!r}.")
        if cfg.model.kind == "rnn":
            input_size = ds.num_classes if tokens else ds.x_train.shape[-1]
        else:
            input_size = int(np.prod(ds.x_train.shape[1:]))  # the MLP's flattened input
        in_channels, max_steps = ds.x_train.shape[-1], ds.x_train.shape[1]
    model = build_model(cfg, input_size=input_size, num_outputs=n_out, in_channels=in_channels,
                        max_steps=max_steps, tokens=tokens)  # fmt: skip
    return Task(model, loss_fn, ds)


def _defaults_key(model_cfg):
    return "bn_lstm" if model_cfg.kind == "rnn" and model_cfg.cell == "bn_lstm" else model_cfg.norm


def norm_options(model_cfg) -> dict:
    """The factory options of the model's normalizers (configs/base.py): the experiment's
    `model.norm_defaults` for `model.norm` (for the BN-LSTM cell: its entry "bn_lstm"), updated
    by every entry of `model.norm_args` that is set (not None)."""
    defaults = model_cfg.get("norm_defaults", {}).get(_defaults_key(model_cfg))
    options = defaults.to_dict() if hasattr(defaults, "to_dict") else dict(defaults or {})
    args = model_cfg.get("norm_args")
    args = args.to_dict() if hasattr(args, "to_dict") else dict(args or {})
    options.update({k: v for k, v in args.items() if v is not None})
    return options


def build_model(cfg, *, input_size, num_outputs, in_channels=1, max_steps=None, tokens=False) -> models.Model:
    """The model `cfg.model` describes, for inputs of `input_size` features (flattened for the
    MLP; the vocabulary size with `tokens`), `in_channels` channels (ConvNet) and sequences of
    at most `max_steps` steps (RNN); for the GIN, `input_size` node features. Its normalizers get `norm_options(cfg.model)`.

    Raises ValueError for an unknown `model.kind`, `model.norm` or `model.cell`, and for an
    option the normalizer does not take (naming `config.model.norm_args`), and for a graph
    normalization outside the GIN."""
    m = cfg.model
    options = norm_options(m)
    if m.kind != "gin" and isinstance(m.norm, str) and m.norm.startswith("graph"):
        raise ValueError(f"`model.norm`={m.norm!r} normalizes over graphs: it needs `model.kind`='gin', "
                         f"got {m.kind!r}.")
    try:
        if m.kind == "mlp":
            return models.mlp((input_size, *m.hidden, num_outputs), norm=m.norm, norm_args=options,
                              batch_size=cfg.batch_size)  # fmt: skip
        if m.kind == "convnet":
            return models.convnet(num_outputs, tuple(m.hidden), norm=m.norm, in_channels=in_channels,
                                  norm_args=options)  # fmt: skip
        if m.kind == "rnn":
            return models.sequence_model(
                input_size, num_outputs, m.hidden[0], cell=m.cell, norm=m.norm, norm_args=options,
                input_norm=m.get("input_norm"), max_steps=max_steps, forget_bias=m.get("forget_bias"),
                tokens=tokens, readout="all" if tokens else "last",
            )
        if m.kind == "gin":
            return models.gin((input_size, *m.hidden), num_outputs, norm=m.norm, readout=m.readout,
                              norm_args=options)  # fmt: skip
    except TypeError as e:  # an option the normalizer does not take
        raise ValueError(f"config.model: {e} ({_options_hint(m)})") from None
    raise ValueError(f"`model.kind` must be mlp, convnet, rnn or gin, got {m.kind!r}.")


def _options_hint(model_cfg) -> str:
    return ("the normalizer's options: the entries of `config.model.norm_args` that are set, over "
            f"`config.model.norm_defaults.{_defaults_key(model_cfg)}`")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with the norm taken as `m * ||g / m||`, `m = max |g|`.

    A finite gradient can have a global norm beyond float32's range (an LN-LSTM from the zero
    state on all-zero inputs: each step's Jacobian is about `1 / (4 eps)`), where optax's
    `sqrt(sum g**2)` overflows to inf and the clipped update becomes 0 or NaN. Pre-scaling by
    the largest entry keeps every finite gradient's clipped direction exact.
    """

    def update(updates, state, params=None):
        del params
        m = jnp.max(jnp.stack([jnp.max(jnp.abs(g)).astype(jnp.float32) for g in jax.tree.leaves(updates)]))
        m = jnp.where(m > 0, m, 1.0)
        unit = jax.tree.map(lambda g: g / m.astype(g.dtype), updates)  # max |entry| = 1
        n = optax.tree.norm(unit)  # the norm is m * n, which may itself overflow
        clip = n > max_norm / m
        # g / (m n) = unit / n: the clipped gradient never forms m * n or a tiny max_norm / (m n).
        return jax.tree.map(lambda g, u: jnp.where(clip, u / n.astype(u.dtype) * max_norm, g), updates, unit), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
    """Gradient clipping then the optimizer, with the learning rate injected so that it can
    differ across sweep members (it lives in the optimizer state)."""
    factories = {"adam": optax.adam, "sgd": optax.sgd, "adamw": optax.adamw}
    if opt_cfg.name not in factories:
        raise ValueError(f"`optimizer.name` must be one of {tuple(factories)}, got {opt_cfg.name!r}.")

    def build(learning_rate):
        steps = [factories[opt_cfg.name](learning_rate)]
        if opt_cfg.grad_clip > 0:
            steps.insert(0, clip_by_global_norm(opt_cfg.grad_clip))
        return optax.chain(*steps)

    return optax.inject_hyperparams(build)(learning_rate=opt_cfg.learning_rate)


def sweep_members(cfg) -> list[dict]:
    """The sweep's members: the product of seeds and learning rates, in a fixed order."""
    seeds = tuple(cfg.sweep.seed) or (0,)
    lrs = tuple(cfg.sweep.learning_rate) or (cfg.optimizer.learning_rate,)
    return [{"seed": int(s), "learning_rate": float(lr)} for lr, s in itertools.product(lrs, seeds)]


# --------------------------------------------------------------------------------------------
# The device mesh
# --------------------------------------------------------------------------------------------

SWEEP, DATA = "sweep", "data"  # the mesh axes: sweep members, and the batch within a member


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_mesh_config(cfg, num_members: int):
    """The device-independent checks of `config.mesh` (types and divisibility)."""
    share = {SWEEP: (num_members, f"the number of sweep members ({num_members}: seeds x learning rates)"),
             DATA: (cfg.batch_size, f"`config.batch_size`={cfg.batch_size}")}
    for axis, (total, what) in share.items():
        size = cfg.mesh[axis]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"`config.mesh.{axis}` must be an int >= 0 (0: automatic), got {size!r}.")
        if size and total % size:
            raise ValueError(
                f"`config.mesh.{axis}`={size} must divide {what}: every device along the "
                f"{axis!r} mesh axis gets an equal share (choose a divisor of {total}, or 0 for automatic)."
            )


def mesh_shape(cfg, num_members: int, num_devices: int, *, num_processes: int = 1) -> tuple[int, int]:
    """The `(sweep, data)` mesh shape for `config.mesh` on `num_devices` devices.

    A positive `config.mesh.sweep` / `config.mesh.data` is used as given; 0 is automatic: among
    the sizes that divide the number of members (sweep) and the batch size (data), the pair
    using the most devices, then the largest sweep size (sweep members need no communication).
    Raises a ValueError naming the config key for a size that does not divide, for more devices
    than are visible, and, with several processes, for a mesh that leaves some devices out.
    """
    _check_mesh_config(cfg, num_members)
    fixed_s, fixed_d = cfg.mesh[SWEEP], cfg.mesh[DATA]
    wanted = (fixed_s or 1) * (fixed_d or 1)
    if wanted > num_devices:
        raise ValueError(
            f"`config.mesh` asks for sweep x data = {fixed_s or 1} x {fixed_d or 1} = {wanted} devices, "
            f"but only {num_devices} are visible (jax.device_count()); use at most {num_devices}, or 0 for automatic."
        )
    candidates = [
        (s, d)
        for s in ([fixed_s] if fixed_s else _divisors(num_members))
        for d in ([fixed_d] if fixed_d else _divisors(cfg.batch_size))
        if s * d <= num_devices
    ]
    s, d = max(candidates, key=lambda sd: (sd[0] * sd[1], sd[0]))
    if num_processes > 1 and s * d != num_devices:
        raise ValueError(
            f"`config.mesh` resolves to sweep x data = {s} x {d} = {s * d} devices, but a run over "
            f"{num_processes} processes must use all {num_devices} devices (each process feeds its "
            f"own devices): set `config.mesh.sweep` x `config.mesh.data` = {num_devices} (the "
            f"{num_members} members divisible by sweep, `config.batch_size`={cfg.batch_size} by data)."
        )
    return s, d


def make_mesh(cfg, num_members: int) -> Mesh:
    """The ("sweep", "data") mesh `config.mesh` describes, over the visible devices."""
    s, d = mesh_shape(cfg, num_members, jax.device_count(), num_processes=jax.process_count())
    return jax.make_mesh((s, d), (SWEEP, DATA), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[: s * d])


def single_device_mesh() -> Mesh:
    """The 1 x 1 mesh: what a run on one device uses."""
    return jax.make_mesh((1, 1), (SWEEP, DATA), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])


def put_on_mesh(tree, mesh: Mesh, spec: P, *, pad_to=1):
    """Global arrays from the host arrays of `tree` (the same on every process), laid out as `spec`.

    Each process supplies only the shards of its own devices (`make_array_from_callback`), so
    with `spec=P("data")` a process materializes just its slice of the examples. The leading
    axis is zero-padded to a multiple of `pad_to` (an even split); padding is never sampled.
    """

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % pad_to:
            x = np.concatenate([x, np.zeros((pad_to - x.shape[0] % pad_to, *x.shape[1:]), x.dtype)])
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree.map(put, tree)


@functools.lru_cache
def _replicate(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def fetch(tree, mesh: Mesh):
    """`tree` as NumPy on every process (arrays sharded over other processes are gathered)."""
    return jax.tree.map(np.asarray, _replicate(mesh)(tree))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def init_state(task: Task, opt, members, sharding=None) -> TrainState:
    """The stacked initial state of every member (leading axis = member), laid out as
    `sharding` if given (e.g. `NamedSharding(mesh, P("sweep"))`)."""
    seeds = np.asarray([m["seed"] for m in members], np.uint32)
    lrs = np.asarray([m["learning_rate"] for m in members], np.float32)

    def one(seed, lr):
        init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        params, model_state = task.model.init(init_key)
        opt_state = opt.init(params)
        opt_state.hyperparams["learning_rate"] = lr
        return TrainState(params, model_state, opt_state, data_key, jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32))

    # Seeds and rates are constants of the program, so no host array has to be placed first
    # (with several processes, jit inputs must be global arrays).
    return jax.jit(lambda: jax.vmap(one)(jnp.asarray(seeds), jnp.asarray(lrs)), out_shardings=sharding)()


def _batch_indices(key, step, n, batch_size):
    """Indices of the batch at `step`: epochs of a fresh permutation, a pure function of the
    key and the step (so a resumed run draws the same batches)."""
    per_epoch = n // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
    return jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch_size,), (batch_size,))


def _local_batch(shards, idx):
    """This device's part of the global batch `x[idx]` of every array of `shards`, inside
    `shard_map` over "data".

    The examples are split into contiguous slices along "data" (`shard` is this device's).
    Every device contributes the rows of the global batch it holds, zeros elsewhere, and a
    reduce-scatter sums the contributions (each row has one owner, so the sum is exact) and
    hands device k the k-th block of `len(idx) / data` rows.
    """

    def local(shard):
        rows = idx - lax.axis_index(DATA) * shard.shape[0]
        held = (rows >= 0) & (rows < shard.shape[0])
        part = shard[jnp.clip(rows, 0, shard.shape[0] - 1)]
        part = jnp.where(held.reshape(-1, *(1,) * (shard.ndim - 1)), part, jnp.zeros((), shard.dtype))
        return lax.psum_scatter(part, DATA, scatter_dimension=0, tiled=True)

    return jax.tree.map(local, shards)


def make_train_chunk(task: Task, opt, batch_size: int, num_steps: int, unroll: int = 1, *, mesh: Mesh | None = None):
    """A jitted function running `num_steps` fused steps of every member on `mesh`.

    Call it as `chunk(state, x_train, y_train)` with the state laid out as `P("sweep")` and
    the training set as `P("data")` (see `put_on_mesh`; arrays not laid out so are moved).
    Inside `shard_map`, each device runs its members (vmapped) on its `batch_size / data`
    examples of each batch; the loss is the mean over the data axis, so gradients are those of
    the whole batch, and batch norm gets `axis_name="data"`. Returns the new state and each
    member's mean training loss over the chunk.

    `unroll` goes to the `lax.scan` over steps: XLA:CPU runs convolution gradients inside a
    while loop ~10x slower than unrolled (measured on the ConvNet config), so ConvNets unroll.
    """
    mesh = mesh or single_device_mesh()
    num_examples = task.data.y_train.shape[0]  # the slices may hold padding beyond it

    def loss(params, model_state, x, y):
        out, new_state = task.model.apply(params, model_state, x, training=True, axis_name=DATA)
        value, _ = task.loss_fn(out, y)
        return lax.pmean(value, DATA), new_state

    def train_step(state: TrainState, x_shard, y_shard):
        idx = _batch_indices(state.key, state.step, num_examples, batch_size)
        x, y = _local_batch(x_shard, idx), _local_batch(y_shard, idx)
        (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.model_state, x, y)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Finite entries, not a finite norm: a finite gradient's norm can overflow (see
        # `clip_by_global_norm`). The update itself can overflow (huge learning rate): keep the
        # last finite state.
        finite = jnp.isfinite(value) & jnp.stack(
            [jnp.isfinite(a).all() for a in jax.tree.leaves((grads, params, model_state))]).all()
        ok = finite & (state.diverged_at < 0)
        new = TrainState(params, model_state, opt_state, state.key, state.step + 1, state.diverged_at)
        frozen = state._replace(
            step=state.step + 1,
            diverged_at=jnp.where(state.diverged_at < 0, state.step, state.diverged_at),
        )
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, frozen)
        return state, jnp.where(ok, value, jnp.nan)

    def chunk(state, x_shard, y_shard):
        def body(s, _):
            return train_step(s, x_shard, y_shard)

        state, losses = jax.lax.scan(body, state, None, length=num_steps, unroll=unroll)
        return state, jnp.nanmean(losses)

    # shard_map types the parameters as equal on every "data" device (they are not split over
    # it), so autodiff sums their per-device gradient contributions over "data" itself: the
    # gradient of the data-averaged loss is the whole batch's, the same on every device.
    sharded = jax.shard_map(
        jax.vmap(chunk, in_axes=(0, None, None)), mesh=mesh,
        in_specs=(P(SWEEP), P(DATA), P(DATA)), out_specs=(P(SWEEP), P(SWEEP)),
    )
    return jax.jit(sharded, donate_argnums=0)


def make_evaluate(task: Task, mesh: Mesh | None = None):
    """`evaluate(state, x, y)`: every member's test metrics; each device evaluates its members
    on the whole (replicated) test set."""

    def evaluate(state: TrainState, x, y):
        out, _ = task.model.apply(state.params, state.model_state, x, training=False)
        value, metrics = task.loss_fn(out, y)
        return {"loss": value, **metrics}

    sharded = jax.shard_map(
        jax.vmap(evaluate, in_axes=(0, None, None)), mesh=mesh or single_device_mesh(),
        in_specs=(P(SWEEP), P(), P()), out_specs=P(SWEEP),
    )
    return jax.jit(sharded)


# Every row names its member and the step; the metrics are numbers (NaN/inf included).
_ROW_INTS = ("step", "member", "seed", "diverged_at")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _row_problem(row) -> str | None:
    """What makes `row` (a parsed line) no metrics row, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in (*_ROW_INTS, "learning_rate"):
        if key not in row:
            return f"no {key!r}"
        if not (_is_number(row[key]) and (key == "learning_rate" or isinstance(row[key], int))):
            return f"{key!r} is {row[key]!r}, not {'a number' if key == 'learning_rate' else 'an int'}"
    for key, value in row.items():
        if key.startswith(("train_", "test_")) and not _is_number(value):
            return f"{key!r} is {value!r}, not a number"
    return None


def read_metrics(path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a `metrics.jsonl` (up to a step, if given).

    Only an unterminated last line is dropped: the one a run killed while writing it leaves.
    Any other line that is not a metrics row (not UTF-8, not JSON, not an object, a field
    missing or of the wrong type) is a WorkdirError naming the file and the line: resuming
    without it would silently lose that evaluation.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WorkdirError(f"cannot read {path}: {e.strerror or e}") from e
    rows = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # the last piece: b"" or a torn line
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except ValueError as e:
            problem = f"not JSON ({e})"
        else:
            problem = _row_problem(row)
        if problem:
            raise WorkdirError(f"{path}, line {number}: not a metrics row: {problem}. Repair or delete the line "
                               "(each line is one member's evaluation, as the run wrote it).")
        if up_to_step is None or row["step"] <= up_to_step:
            rows.append(row)
    return rows


def member_name(member: dict) -> str:
    """A sweep member (or a metrics row) as `lr=0.001,seed=0`."""
    return f"lr={member['learning_rate']:g},seed={member['seed']}"


def _tensorboard_writers(logdir: pathlib.Path, members, step: int):
    """One tensorboardX writer per member, in `logdir/<index>_<member_name>`. Resuming at `step`,
    TensorBoard drops what an interrupted run logged after it (`purge_step`)."""
    from tensorboardX import SummaryWriter

    # tensorboardX names its file by the second and truncates it: a resume started within the
    # second of the last run would erase that run's events. Nanoseconds keep each file, in order.
    suffix = f".{time.time_ns()}"
    return [SummaryWriter(str(logdir / f"{i:03d}_{member_name(m)}"), purge_step=step + 1 if step else None,
                          filename_suffix=suffix)
            for i, m in enumerate(members)]


@contextlib.contextmanager
def _writing(path, what="write"):
    """An OSError inside (a full disk, a read-only workdir) as a WorkdirError naming the file
    (`path`, unless the error names another)."""
    try:
        yield
    except OSError as e:
        raise WorkdirError(f"cannot {what} {e.filename or path}: {e.strerror or e}") from e


def _write_atomic(path: pathlib.Path, text: str):
    """Replaces `path` by `text` whole or not at all (a failed write leaves the old file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir that holds another run: the user's to fix
    (the command line prints it as one `error: ...` line, without a traceback)."""


class CheckpointError(ValueError):
    """No checkpoint of the workdir can be restored as saved (each one is corrupt)."""


class WorkdirError(ValueError):
    """A workdir that cannot hold the run: not a directory, in use by another run, one of its
    files or directories not what the run wrote there, or a read or write that failed (a full
    disk, no permission). The message names the file; nothing the run saved is changed."""


OPTIMIZERS = ("adam", "sgd", "adamw")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_positive_float(v) -> bool:
    # inf is allowed: that member diverges and is frozen, as any diverging member (NaN is not > 0)
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(v > 0)


def _check_values(cfg, num_examples=None):
    """The checks of `check_config` that need no model: types, ranges and the schedule."""
    def need(ok, key, allowed, value):
        if not ok:
            raise ConfigError(f"`config.{key}` must be {allowed}, got {value!r}.")

    for name in ("num_steps", "steps_per_call", "batch_size", "eval_every", "checkpoint_every", "unroll"):
        need(_is_int(cfg[name]) and cfg[name] >= 1, name, "an int >= 1", cfg[name])
    for name in ("eval_every", "checkpoint_every"):
        if cfg[name] % cfg.steps_per_call:
            raise ConfigError(
                f"`config.{name}`={cfg[name]} must be a multiple of `config.steps_per_call`="
                f"{cfg.steps_per_call} (evaluation and checkpoints happen between fused calls)."
            )
    if cfg.num_steps % cfg.steps_per_call:
        raise ConfigError(f"`config.num_steps`={cfg.num_steps} must be a multiple of `config.steps_per_call`={cfg.steps_per_call}.")
    if num_examples is not None and cfg.batch_size > num_examples:
        raise ConfigError(f"`config.batch_size` must be at most the number of training examples ({num_examples}), "
                          f"got {cfg.batch_size}.")
    need(cfg.optimizer.name in OPTIMIZERS, "optimizer.name", f"one of {OPTIMIZERS}", cfg.optimizer.name)
    need(_is_positive_float(cfg.optimizer.learning_rate), "optimizer.learning_rate", "a number > 0",
         cfg.optimizer.learning_rate)
    clip = cfg.optimizer.grad_clip
    need(isinstance(clip, (int, float)) and not isinstance(clip, bool) and np.isfinite(clip) and clip >= 0,
         "optimizer.grad_clip", "a finite number >= 0 (0: no clipping)", clip)
    for lr in cfg.sweep.learning_rate:
        need(_is_positive_float(lr), "sweep.learning_rate", "a tuple of numbers > 0", tuple(cfg.sweep.learning_rate))
    for seed in cfg.sweep.seed:
        need(_is_int(seed) and 0 <= seed < 2**32, "sweep.seed", "a tuple of ints in [0, 2**32)", tuple(cfg.sweep.seed))
    if "seed" in cfg.task:
        need(_is_int(cfg.task.seed) and 0 <= cfg.task.seed < 2**31 - 1, "task.seed", "an int in [0, 2**31 - 1)", cfg.task.seed)
    hidden = tuple(cfg.model.hidden)
    need(all(_is_int(h) and h >= 1 for h in hidden) and (hidden or cfg.model.kind == "mlp"), "model.hidden",
         "a tuple of ints >= 1" + ("" if cfg.model.kind == "mlp" else " (at least one)"), hidden)
    need(isinstance(cfg.model.norm, str) and cfg.model.norm in norms.names(), "model.norm",
         f"one of {norms.names()}", cfg.model.norm)


def check_config(cfg, num_examples: int | None = None, task: "Task | None" = None):
    """Rejects settings that would otherwise fail late or silently, each with a `ConfigError`
    (a ValueError) of one line naming the key and its allowed values. Writes nothing.

    `num_examples`: the size of the training set, if known (`fit` passes it): `batch_size`
    may not exceed it. `task`: the task built from `cfg` (`fit` passes it). Its model is then
    traced (not compiled) on one batch of the task's data, which runs every check the
    normalizers make of their option values (eps, momentum, groups against the layer's
    width, ...) and the cell's of `forget_bias`. Without it, a model is built for a dummy
    input, which checks the names and the options taken, not their values."""
    _check_values(cfg, num_examples)
    try:
        _check_mesh_config(cfg, len(sweep_members(cfg)))
        if task is None:
            build_model(cfg, input_size=1, num_outputs=1, max_steps=1)
        else:
            _trace_task(task, cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _trace_task(task: Task, cfg):
    """Traces one training step's forward pass, and an evaluation, on a batch of the task's
    shapes: the normalizers check their options when applied, so a bad value fails here
    rather than after the workdir was written."""
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((cfg.batch_size, *a.shape[1:]), a.dtype),
                         (task.data.x_train, task.data.y_train))

    def forward(key, x, y):
        params, state = task.model.init(key)
        for training in (True, False):
            out, _ = task.model.apply(params, state, x, training=training)
            task.loss_fn(out, y)

    try:
        jax.eval_shape(forward, jax.random.PRNGKey(0), *batch)
    except ValueError as e:
        raise ValueError(f"config.model: {e} ({_options_hint(cfg.model)})") from None


def _check_extension(old: dict, new: dict, workdir, source="config.json"):
    """A workdir's run may only be continued with more steps (nothing else decides its result).
    `source`: where `old` was read (named in the error)."""
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (old, new))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not changed or (changed == ["num_steps"] and b["num_steps"] >= a["num_steps"]):
        return  # training longer: resume from the last checkpoint and go on
    detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
    raise ConfigError(
        f"{workdir} holds a run with a different config ({detail}) according to its {source}; "
        "only `num_steps` may grow to extend a run. Use another --workdir or delete it."
    )


# --------------------------------------------------------------------------------------------
# Verified checkpoints
# --------------------------------------------------------------------------------------------

# Each step's orbax `custom_metadata` (in its _CHECKPOINT_METADATA, written and finalized with
# the step) records the run's config and the SHA-256 of every array of the state: a step is
# bound to the config that produced it, and its arrays are verified when restored. (Orbax
# checksums only the index of its zarr3 shards, not the array bytes, and has no option to
# verify what it restores.)
RECORD_KEY = "lnjax_checkpoint"
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def state_digests(state, mesh: Mesh) -> dict[str, str]:
    """SHA-256 of each array of `state` (dtype, shape and bytes; host copies, gathered from
    every process), keyed by its path in the tree."""
    host = fetch(state, mesh)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
        a = np.ascontiguousarray(leaf)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


class _Corrupt(Exception):
    """One step that cannot be restored as saved: the file (or array) at fault, and why."""

    def __init__(self, step, where, why):
        super().__init__(f"checkpoint step {step}: {where}: {why}")
        self.step = step


def _first_line(e: BaseException, limit=300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _bad_json_file(step_dir: pathlib.Path):
    """The first of orbax's JSON files under `step_dir` that does not parse, with the error."""
    files = [f for f in sorted(step_dir.rglob("*")) if f.is_file()
             and (f.name in _JSON_FILES or f.parent.name == "array_metadatas")]
    for f in files:
        try:
            json.loads(f.read_bytes())
        except (ValueError, OSError) as e:
            return f, e
    return None, None


def _corrupt_from(step, step_dir: pathlib.Path, e: BaseException) -> _Corrupt:
    bad, err = _bad_json_file(step_dir)
    if bad is not None:
        return _Corrupt(step, f"file {bad}", f"unreadable ({_first_line(err)})")
    return _Corrupt(step, f"files under {step_dir}", f"restore failed ({_first_line(e)})")


def _restore_verified(manager, step, abstract, mesh, config: dict, workdir):
    """Step `step`'s state, after checking its record: the config it was saved under may only
    differ in a smaller `num_steps` (else ConfigError), and every array's SHA-256 must match
    (else `_Corrupt`, naming the array and the step directory)."""
    import orbax.checkpoint as ocp

    step_dir = pathlib.Path(str(manager.directory)) / str(step)
    try:
        record = (manager.metadata(step).custom_metadata or {}).get(RECORD_KEY)
    except Exception as e:  # noqa: BLE001 (orbax raises what its readers raise: JSON, OS, ValueError)
        raise _corrupt_from(step, step_dir, e) from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or not isinstance(record.get("sha256"), dict):
        bad, err = _bad_json_file(step_dir)
        where = f"file {bad}" if bad is not None else f"file {step_dir / '_CHECKPOINT_METADATA'}"
        why = f"unreadable ({_first_line(err)})" if bad is not None else f"has no {RECORD_KEY!r} record (config and checksums)"
        raise _Corrupt(step, where, why)
    _check_extension(record["config"], config, workdir, source=f"checkpoint step {step}")
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001
        raise _corrupt_from(step, step_dir, e) from None
    got = state_digests(state, mesh)
    if got.keys() != record["sha256"].keys():
        raise _Corrupt(step, f"files under {step_dir / 'default'}", "the arrays restored are not those recorded")
    wrong = [k for k in got if got[k] != record["sha256"][k]]
    if wrong:
        raise _Corrupt(step, f"files under {step_dir / 'default'}",
                       f"SHA-256 mismatch of {len(wrong)} array(s), first `state{wrong[0]}`")
    # A whole step directory moved or copied under another step's name verifies as saved:
    # the state's own step counter tells, or the run would resume at a step it never reached.
    held = sorted({int(s) for s in fetch(state.step, mesh)})
    if held != [step]:
        raise _Corrupt(step, f"files under {step_dir}", f"hold the state of step {', '.join(map(str, held))}, "
                       f"not of step {step} (a step directory renamed or copied)")
    return state


def restore_latest_valid(manager, abstract, mesh, config: dict, workdir):
    """`(step, state, bad)`: the newest checkpoint that restores as saved (`(0, None, [])` for
    none at all), and the steps found corrupt on the way, each reported with a warning naming
    the step and the file. Raises CheckpointError naming every file if no checkpoint is valid,
    and ConfigError if the newest readable one was saved under another config."""
    bad = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, _restore_verified(manager, step, abstract, mesh, config, workdir), bad
        except _Corrupt as e:
            bad.append(e)
            warnings.warn(f"corrupt {e}; falling back to the previous checkpoint.", RuntimeWarning, stacklevel=2)
    if bad:
        raise CheckpointError(f"no valid checkpoint in {manager.directory}: " + "; ".join(map(str, bad))
                              + ". Delete the workdir's checkpoints to train afresh.")
    return 0, None, bad


def _set_aside(ckpt_dir: pathlib.Path, steps, primary: bool):
    """Moves the corrupt steps out of `ckpt_dir` (into `corrupt_checkpoints/` next to it) so
    that they are saved again; every process waits for it."""
    if primary:
        dest = ckpt_dir.parent / "corrupt_checkpoints"
        with _writing(dest, "move a corrupt checkpoint to"):
            dest.mkdir(exist_ok=True)
            for step in steps:
                target = dest / str(step)
                n = 1
                while target.exists():
                    target, n = dest / f"{step}.{n}", n + 1
                shutil.move(str(ckpt_dir / str(step)), str(target))
                print(f"moved corrupt checkpoint step {step} to {target}", file=sys.stderr)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lnjax: corrupt checkpoints set aside")


def _loss_postfix(losses) -> str:
    """The progress bar's note: the training loss of the last chunk (the mean over the members
    still training, for a sweep)."""
    live = losses[np.isfinite(losses)]
    if not live.size:
        return "every member diverged"
    text = f"train loss {live.mean():.4g}"
    if losses.size == 1:
        return text
    diverged = losses.size - live.size
    return f"{text} (mean of {live.size} members" + (f"; {diverged} diverged)" if diverged else ")")


def fit(cfg: ml_collections.ConfigDict, workdir, *, progress=True, desc: str | None = None,
        task: Task | None = None):
    """Trains the sweep `cfg` describes in `workdir`, resuming from its latest checkpoint.

    Writes `workdir/config.json`, `workdir/metrics.jsonl` (one line per member per
    evaluation), the same metrics for TensorBoard in `workdir/tensorboard/<member>/` and
    `workdir/checkpoints/`. `progress`: show a progress bar with the training
    loss, labelled `desc` (default `config.name`); nested in an open bar, it goes when done.
    Returns `(final_state, metrics_rows, members)`, the state as global arrays on the mesh `config.mesh` describes. In a multi-process run
    every process calls `fit` alike: process 0 writes the config and the metrics, all of them
    write (their shards of) the checkpoints and restore them.

    Nothing is written before every check has passed: `ConfigError` for a bad config value or
    a workdir whose config.json or checkpoints hold another run, `CheckpointError` if no
    checkpoint restores as saved (see `restore_latest_valid`), `WorkdirError` for a workdir
    that cannot hold the run (see `_check_workdir`) or that another run is using: process 0
    holds an exclusive lock on `workdir/.lock` while it runs. A write that fails later (a full
    disk) is a `WorkdirError` naming the file; what was saved before it is kept.
    """
    workdir = _workdir_path(workdir)
    task, members, mesh = _setup(cfg, task)
    run = _Run(cfg, task, members, mesh, workdir, primary=jax.process_index() == 0)
    _check_workdir(workdir)
    with _workdir_lock(workdir) if run.primary else contextlib.nullcontext():
        return _fit_locked(run, progress, desc)


class _Run(NamedTuple):
    """What the stages of `fit` share."""

    cfg: Any
    task: Task
    members: list
    mesh: Mesh
    workdir: pathlib.Path
    primary: bool  # process 0: writes config.json and metrics.jsonl (orbax: checkpoints)


def _setup(cfg, task):
    """`(task, members, mesh)`, the task built once (unless given) after the checks that need
    no data, and checked itself (`check_config` with the task)."""
    _check_values(cfg)
    try:
        task = task or build_task(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:  # a data file that is missing or unreadable
        key = {"mnist": "data_dir", "char_lm": "path"}.get(cfg.task.name)
        if key is None:
            raise
        raise ConfigError(f"`config.task.{key}`={cfg.task[key]!r}: {e}") from None
    check_config(cfg, num_examples=task.data.y_train.shape[0], task=task)
    members = sweep_members(cfg)
    try:
        mesh = make_mesh(cfg, len(members))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task, members, mesh


def _fit_locked(run: _Run, progress, desc):
    cfg, workdir = run.cfg, run.workdir
    config_json = cfg.to_json(sort_keys=True)
    config = json.loads(config_json)
    _check_saved_config(workdir / "config.json", config, workdir)

    opt = make_optimizer(cfg.optimizer)
    state = init_state(run.task, opt, run.members, NamedSharding(run.mesh, P(SWEEP)))
    ckpt_dir = workdir / "checkpoints"
    manager, step, state = _resume(run, ckpt_dir, state, config)
    with _writing(workdir, "create"):
        workdir.mkdir(parents=True, exist_ok=True)
    if run.primary:
        _write_atomic(workdir / "config.json", config_json)
    manager = manager or _checkpoint_manager(ckpt_dir, cfg)
    try:
        rows = _start_metrics(run, step)
        state = _train(run, opt, state, step, rows, manager, config, progress, desc)
    finally:
        manager.close()
    return state, rows, run.members


def _workdir_path(workdir) -> pathlib.Path:
    if not str(workdir).strip():  # pathlib would take "" for the current directory
        raise WorkdirError(f"--workdir must name a directory, got {str(workdir)!r}.")
    return pathlib.Path(workdir).absolute()


LOCK_FILE = ".lock"
# What a run keeps in its workdir, as a file (False) or a directory (True).
_WORKDIR_ENTRIES = {"config.json": False, "metrics.jsonl": False, LOCK_FILE: False, "checkpoints": True,
                    "corrupt_checkpoints": True, "tensorboard": True}


def _check_workdir(workdir: pathlib.Path):
    """Refuses a workdir that is not a directory, or whose entries are not what a run writes
    there (a WorkdirError naming the entry), before anything in it is read or written."""
    with _writing(workdir, "read"):
        if workdir.exists() and not workdir.is_dir():
            raise WorkdirError(f"--workdir {workdir} is not a directory; name a new directory or a run's.")
        for name, is_dir in _WORKDIR_ENTRIES.items():
            path = workdir / name
            if (path.exists() or path.is_symlink()) and not (path.is_dir() if is_dir else path.is_file()):
                kind = "a directory" if is_dir else "a regular file"
                raise WorkdirError(f"{path} must be {kind}, as a run writes it; move it away or use another --workdir.")


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path):
    """Holds `workdir/.lock` exclusively, so that a second run on the workdir is refused
    rather than interleaving its checkpoints and metrics with this one's. flock: the kernel
    releases it when the process ends, even on kill -9, so a stale lock cannot block a resume."""
    import fcntl

    path = workdir / LOCK_FILE
    with _writing(workdir, "create"):
        workdir.mkdir(parents=True, exist_ok=True)
    with _writing(path, "open"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(f"--workdir {workdir} is in use by another run (it holds {path}); wait for that "
                               "run to end or use another --workdir.") from None
        except OSError as e:
            raise WorkdirError(f"cannot lock {path}: {e.strerror or e}") from e
        yield
    finally:
        os.close(fd)


def _check_saved_config(path: pathlib.Path, config: dict, workdir):
    """Refuses a config.json that is not a run's config, or that holds another run's."""
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_bytes())
        why = None if isinstance(saved, dict) else f"a JSON {type(saved).__name__}, not an object"
    except OSError as e:
        raise WorkdirError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:  # not UTF-8, or not JSON
        why = f"not JSON: {_first_line(e)}"
    if why:
        raise WorkdirError(f"{path} is not a run's config ({why}). Delete it to resume from the checkpoints, "
                           "which record their config, or use another --workdir.")
    _check_extension(saved, config, workdir)


def _checkpoint_manager(ckpt_dir: pathlib.Path, cfg):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    save_steps = [policies.FixedIntervalPolicy(cfg.checkpoint_every), policies.SpecificStepsPolicy((cfg.num_steps,)),
                  policies.PreemptionCheckpointingPolicy()]  # the last one: JAX's preemption notice
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False,
                                           save_decision_policy=policies.AnySavePolicy(save_steps))
    with _writing(ckpt_dir, "open"):
        return ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=ocp.StandardCheckpointHandler())


def _resume(run: _Run, ckpt_dir: pathlib.Path, state, config: dict):
    """`(manager, step, state)` of the newest valid checkpoint (`(None, 0, state)` without a
    checkpoint directory); the corrupt ones met on the way are set aside."""
    import orbax.checkpoint as ocp

    if not ckpt_dir.is_dir():
        return None, 0, state
    manager = _checkpoint_manager(ckpt_dir, run.cfg)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    step, restored, bad = restore_latest_valid(manager, abstract, run.mesh, config, run.workdir)
    if bad:
        _set_aside(ckpt_dir, [e.step for e in bad], run.primary)
        manager.reload()
    return manager, step, state if restored is None else restored


def _evaluates_at(step: int, cfg) -> bool:
    return step % cfg.eval_every == 0 or step == cfg.num_steps


def _start_metrics(run: _Run, step: int) -> list[dict]:
    """The metrics rows up to `step`, rewritten as the whole metrics.jsonl (an interrupted
    run's later rows go: they are computed again). Only the evaluations this config makes are
    kept: a run extended from `num_steps` 150 to 300 evaluated at 150 as its last step, which
    the longer run does not."""
    path = run.workdir / "metrics.jsonl"
    rows = [r for r in read_metrics(path, step) if _evaluates_at(r["step"], run.cfg)]
    if run.primary:
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _save(manager, step, state, config, mesh):
    import orbax.checkpoint as ocp

    record = {"config": config, "sha256": state_digests(state, mesh)}
    try:
        manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={RECORD_KEY: record})
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore wrap I/O errors in their own types)
        raise WorkdirError(f"cannot save checkpoint step {step} in {manager.directory}: {_first_line(e)}") from e


def _log_evaluation(run: _Run, log, writers, rows, step, ev, tl, div):
    """Appends each member's row at `step` to metrics.jsonl and TensorBoard."""
    with _writing(run.workdir / "metrics.jsonl"):
        for i, member in enumerate(run.members):
            row = {"step": step, "member": i, **member, "train_loss": float(tl[i]),
                   **{f"test_{k}": float(v[i]) for k, v in ev.items()}, "diverged_at": int(div[i])}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            if writers and row["diverged_at"] < 0:  # a frozen member's curves end where it diverged
                for key, value in row.items():
                    if key.startswith(("train_", "test_")):  # as train/loss, test/error, ...
                        writers[i].add_scalar(key.replace("_", "/", 1), value, global_step=step)
        log.flush()
    with _writing(run.workdir / "tensorboard"):
        for w in writers:
            w.flush()


def _train(run: _Run, opt, state, step, rows, manager, config, progress, desc):
    """Trains from `step` to `config.num_steps` (or a preemption), evaluating, logging and
    saving on the config's schedule; returns the final state."""
    from tqdm.auto import tqdm

    cfg, mesh, task = run.cfg, run.mesh, run.task
    x_tr, y_tr = (put_on_mesh(a, mesh, P(DATA), pad_to=mesh.shape[DATA]) for a in task.data[:2])
    x_te, y_te = (put_on_mesh(a, mesh, P()) for a in task.data[2:4])
    chunk = make_train_chunk(task, opt, cfg.batch_size, cfg.steps_per_call, cfg.unroll, mesh=mesh)
    evaluate = make_evaluate(task, mesh)
    bar = tqdm(total=cfg.num_steps, initial=step, disable=not (progress and run.primary), desc=desc or cfg.name,
               unit="step", leave=None)
    metrics_path = run.workdir / "metrics.jsonl"
    with contextlib.ExitStack() as closing:
        closing.callback(bar.close)  # also on an error, so that its message starts a line of its own
        with _writing(metrics_path, "open"):
            log = closing.enter_context(open(metrics_path if run.primary else os.devnull, "a"))
        with _writing(run.workdir / "tensorboard", "create"):
            tensorboard = _tensorboard_writers(run.workdir / "tensorboard", run.members, step) if run.primary else []
        writers = [closing.enter_context(w) for w in tensorboard]
        while step < cfg.num_steps:
            state, train_loss = chunk(state, x_tr, y_tr)
            # One chunk at a time: with a chunk queued behind a running one (async dispatch),
            # XLA:CPU (jax 0.10.2) deadlocked in the LN-LSTM's scan (all threads in futex wait).
            # A chunk is many steps, so nothing measurable is lost by waiting for it.
            jax.block_until_ready(state)
            step += cfg.steps_per_call
            tl = None
            if _evaluates_at(step, cfg):
                ev, tl, div = fetch((evaluate(state, x_te, y_te), train_loss, state.diverged_at), mesh)
                _log_evaluation(run, log, writers, rows, step, ev, tl, div)
            if progress:  # on every process, as fetching is collective; one fetch per chunk
                tl = fetch(train_loss, mesh) if tl is None else tl
                bar.set_postfix_str(_loss_postfix(tl), refresh=False)
            bar.update(cfg.steps_per_call)
            if manager.should_save(step):
                _save(manager, step, state, config, mesh)
                if manager.reached_preemption(step):
                    print(f"preempted: saved step {step}; the same command resumes there", file=sys.stderr)
                    break
    return state


def init_distributed(coordinator_address=None, num_processes=None, process_id=None, *, auto=False) -> bool:
    """Calls `jax.distributed.initialize` for a multi-process run; returns whether it did.

    Each setting falls back to an environment variable (`JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); one left unset after that is auto-detected by JAX
    on the clusters it knows (Cloud TPU, SLURM, Open MPI, Kubernetes). Nothing is set and
    `auto` is False: a single-process run, no initialization.
    """
    env = os.environ.get
    address = coordinator_address or env("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else env("JAX_PROCESS_ID")
    if not auto and address is None and count is None and index is None:
        return False
    jax.distributed.initialize(
        address, None if count is None else int(count), None if index is None else int(index)
    )
    return True


def _params_digest(params, i) -> str:
    """SHA-256 of member `i`'s parameters (host copies), to compare processes and runs."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(leaf[i]).tobytes())
    return h.hexdigest()


def define_config_flag(flag_values=None, sys_argv=None):
    """Defines `--config`, a config file from configs/, and its `--config.<key>=<value>`
    overrides (on `flag_values`, default absl's FLAGS). The config is locked: an override must
    name an existing key (so the normalizer options one can set are those `model.norm_args`
    declares, see configs/base.py). `sys_argv`: the command line, if not `sys.argv`."""
    from absl import flags
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True,
                                           flag_values=flags.FLAGS if flag_values is None else flag_values,
                                           sys_argv=sys_argv)  # fmt: skip


def set_verbosity(verbose: bool):
    """Quiet by default (warnings and errors only): orbax logs dozens of INFO lines per
    checkpoint, which bury the progress bar. `verbose`: absl's INFO logs."""
    from absl import logging

    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def config_keys(cfg, prefix="") -> list[tuple[str, str, Any]]:
    """`(dotted key, type name, value)` of every leaf of the ConfigDict `cfg`, in order (an
    unset placeholder has value None and the type it was declared with)."""
    out = []
    for k in cfg:
        v = cfg[k]
        if isinstance(v, ml_collections.ConfigDict):
            out += config_keys(v, f"{prefix}{k}.")
        else:
            t = cfg.get_type(k)
            out.append((f"{prefix}{k}", getattr(t, "__name__", str(t)), v))
    return out


_HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def _config_path(argv) -> str:
    """The `--config` file named on the command line (configs/base.py if none)."""
    paths = [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
             for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]
    if paths:
        return paths[-1]  # as absl: the last one counts
    return str(pathlib.Path(__file__).parents[1] / "configs" / "base.py")


def _print_help(argv):
    import runpy

    from absl import app

    app.usage(shorthelp=True, writeto_stdout=True)
    path = _config_path(argv)
    file, *arg = path.split(":", 1)  # ml_collections' `file.py:argument` form
    module = runpy.run_path(file)
    cfg = module["get_config"](*arg) if "get_config" in module else module["base_config"]()
    rows = [(f"--config.{k}", t, repr(v)) for k, t, v in config_keys(cfg)]
    width = max(len(r[0]) for r in rows)
    print(f"\nconfig keys of {path} (set with --config.<key>=<value>; None: unset):")
    for key, t, v in rows:
        print(f"  {key:<{width}}  {t:<6} {v}")


def _repeated_tuple_flag(flag_values, argv) -> str | None:
    """The error for a tuple config key given more than once in `argv`, or None.
    ml_collections joins the values of a repeated tuple flag (`--config.sweep.seed='(0,)'
    --config.sweep.seed='(1,)'` trains both seeds), where every other flag takes the last
    value: either reading would surprise someone, so neither is guessed."""
    from absl import flags

    names = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    for name in dict.fromkeys(names):
        count = names.count(name)
        if count > 1 and name in flag_values and isinstance(flag_values[name], flags.MultiFlag):
            joined = str(tuple(flag_values[name].value)).replace(" ", "")
            return f"--{name} is given {count} times: give the tuple once (all of them: --{name}='{joined}')"
    return None


def parse_flags(argv):
    """absl's flag parsing for the command line, made friendlier: `--help` also lists the config
    keys (of `--config`, else configs/base.py) with their types and defaults; a bare `-v` is
    `--verbosity=0` (INFO logs; absl's `-v` takes a level); an unknown key, a value that does
    not parse, a tuple key given twice or a config file that does not load is one
    `error: ...` line (exit status 2)."""
    from absl import flags

    argv = list(argv)
    if any(a in _HELP for a in argv[1:]):
        _print_help(argv)
        sys.exit(0)
    for i, a in enumerate(argv):
        if a == "-v" and not (i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit()):
            argv[i] = "--verbosity=0"
    try:
        rest = flags.FLAGS(argv)
        cfg = flags.FLAGS.config
        if cfg is not None and not isinstance(cfg, ml_collections.ConfigDict):
            cfg.name  # ml_collections defers a failed load to the first access: raises it
        message = _repeated_tuple_flag(flags.FLAGS, argv)
        if message is None:
            return rest
    except (KeyError, AttributeError) as e:  # ml_collections: a key the config does not have
        while e.args and isinstance(e.args[0], KeyError):  # AttributeError(KeyError(...))
            e = e.args[0]
        key, *hint = str(e.args[0] if e.args else e).splitlines()
        message = f"unknown config key {key.strip(chr(34))}" + "".join(f"; {h}" for h in hint)
    except OSError as e:  # the config file does not load (missing, or raising)
        message = f"--config={_config_path(argv)} does not load: {str(e).strip().splitlines()[-1].strip()}"
    except flags.Error as e:
        message = str(e)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _exit_with_error(e: BaseException):
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        set_verbosity(False)
    init_distributed(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
    cfg = f.config
    try:
        state, rows, members = fit(cfg, f.workdir)
    except (ConfigError, CheckpointError, WorkdirError) as e:  # the user's to fix: one line, no traceback
        _exit_with_error(e)
    except OSError as e:  # an I/O failure `fit` does not wrap: its str() names the file
        _exit_with_error(e)
    params = fetch(state.params, state.step.sharding.mesh)
    last = {r["member"]: r for r in rows}
    for i, m in enumerate(members):
        r = last.get(i, {})
        print(json.dumps({**m, **{k: v for k, v in r.items() if k.startswith("test_") or k == "diverged_at"},
                          "params_sha256": _params_digest(params, i)}))


if __name__ == "__main__":
    from absl import app, flags

    define_config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process runs: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes (else $JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (else $JAX_PROCESS_ID).")
    flags.DEFINE_bool("distributed", False,
                      "Call jax.distributed.initialize() even without the settings above, letting JAX "
                      "auto-detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
