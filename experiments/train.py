"""Jitted, vmapped training with Optax: one compiled program trains a whole sweep.

The state (`TrainState`), the step (`make_train_chunk`) and the loop (`fit`). A sweep's
members (`experiments.sweep`) all have the same shapes, so they are stacked on a leading axis
and trained with `jax.vmap`. `config.steps_per_call` steps are fused into one `lax.scan` per
call; the train state is donated. A member whose loss or gradients become non-finite is frozen
at its last finite state and marked diverged; the others are unaffected.

Checkpoints (`experiments.checkpoints`: orbax, verified) are written every
`config.checkpoint_every` steps, on completion, and when JAX's preemption service
(multi-process runs) announces a preemption, after which the run stops. The same call resumes
from the latest one and, all randomness being derived from the step counter, ends with exactly
the parameters and metrics of an uninterrupted run.

The whole config is checked (`experiments.checks`, with the task's data and its model traced
on one batch) before the first file is written; a bad value is a `ConfigError` naming the key.
A workdir that cannot hold the run is a `WorkdirError` naming the file (`experiments.workdir`);
process 0 holds an exclusive lock on `<workdir>/.lock` while it runs.

Devices: the step runs under `jax.shard_map` on the ("sweep", "data") mesh of
`experiments.mesh`. The loss, and so the gradients, are averaged over "data" and batch norm
synchronizes its statistics over it, so any mesh computes what one device computes with the
whole batch (to float rounding). In a multi-process run every process calls `fit` alike:
process 0 writes config.json and metrics.jsonl, and every process takes part in the (single)
orbax checkpoint and in restoring it.

Run a config:  python -m experiments.main --config=configs/mlp_digits.py --workdir=runs/mlp
Its curves:    python -m experiments.curves runs/mlp   (or: tensorboard --logdir runs/mlp)
"""

import contextlib
import functools
import json
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import checkpoints, checks, metrics, optim, sweep, tasks
from experiments import mesh as mesh_lib
from experiments import workdir as workdir_lib
from experiments.mesh import DATA, SWEEP


class TrainState(NamedTuple):
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key: saved by orbax as a plain array
    step: jax.Array
    diverged_at: jax.Array  # -1 while finite, else the step at which the member diverged
    # The member's swept model options read by the step ({dotted key: scalar}; see
    # experiments/sweep.py): traced values, so that the members share one program.
    hparams: dict


def _init_groups(members) -> dict[tuple, np.ndarray]:
    """The members' indices by their values of the swept model options that only set initial
    parameters (one group, all members, when none is swept)."""
    groups = {}
    for i, m in enumerate(members):
        groups.setdefault(tuple((k, v) for k, v in m.items() if sweep.is_init_only(k)), []).append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def init_state(task: tasks.Task, opt, members, sharding=None) -> TrainState:
    """The stacked initial state of every member (leading axis = member), laid out as
    `sharding` if given (e.g. `NamedSharding(mesh, P("sweep"))`). Each member's swept settings
    go where the program reads them: the optimizer's into its injected hyperparameters, the
    model options that set initial parameters into `init`, the others into `hparams`."""
    seeds = np.asarray([m["seed"] for m in members], np.uint32)
    values = sweep.member_values(members)
    hyper = {k.removeprefix(sweep.OPTIMIZER): v for k, v in values.items() if k.startswith(sweep.OPTIMIZER)}
    traced = {k: v for k, v in values.items() if sweep.is_traced(k)}
    groups = _init_groups(members)

    def one(model, seed, hyper, hparams):
        init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        params, model_state = model.init(init_key)
        opt_state = opt.init(params)
        opt_state.hyperparams.update(hyper)
        return TrainState(params, model_state, opt_state, data_key, jnp.zeros((), jnp.int32),
                          jnp.full((), -1, jnp.int32), hparams)

    # Seeds and settings are constants of the program, so no host array has to be placed first
    # (with several processes, jit inputs must be global arrays).
    def stacked():
        parts = []
        for init_values, idx in groups.items():
            some = jax.tree.map(lambda a: jnp.asarray(a[idx]), (seeds, hyper, traced))
            parts.append(jax.vmap(functools.partial(one, task.model_for(dict(init_values))))(*some))
        if len(parts) == 1:
            return parts[0]
        order = np.argsort(np.concatenate(list(groups.values())))
        return jax.tree.map(lambda *a: jnp.concatenate(a)[order], *parts)

    return jax.jit(stacked, out_shardings=sharding)()


def _batch_indices(key, step, n, batch_size):
    """Indices of the batch at `step`: epochs of a fresh permutation, a pure function of the
    key and the step (so a resumed run draws the same batches)."""
    per_epoch = n // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
    return jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch_size,), (batch_size,))


def make_train_chunk(task: tasks.Task, opt, batch_size: int, num_steps: int, unroll: int = 1, *, mesh: Mesh | None = None):
    """A jitted function running `num_steps` fused steps of every member on `mesh`.

    Call it as `chunk(state, x_train, y_train)` with the state laid out as `P("sweep")` and
    the training set as `P("data")` (see `put_on_mesh`; arrays not laid out so are moved).
    Inside `shard_map`, each device runs its members (vmapped) on its `batch_size / data`
    examples of each batch; the loss is the mean over the data axis, so gradients are those of
    the whole batch, and batch norm gets `axis_name="data"`. Returns the new state and each
    member's training loss at each step, `[member, step]` (NaN once it diverged): the loss of
    every step reaches the host with the state, without a transfer per step.

    `unroll` goes to the `lax.scan` over steps: XLA:CPU runs convolution gradients inside a
    while loop ~10x slower than unrolled (measured on the ConvNet config), so ConvNets unroll.
    """
    mesh = mesh or mesh_lib.single_device_mesh()
    num_examples = task.data.y_train.shape[0]  # the slices may hold padding beyond it

    def loss(params, model_state, hparams, x, y):
        out, new_state = task.model_for(hparams).apply(params, model_state, x, training=True, axis_name=DATA)
        value, _ = task.loss_fn(out, y)
        return lax.pmean(value, DATA), new_state

    def train_step(state: TrainState, x_shard, y_shard):
        idx = _batch_indices(state.key, state.step, num_examples, batch_size)
        x, y = mesh_lib.local_batch(x_shard, idx), mesh_lib.local_batch(y_shard, idx)
        (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.model_state,
                                                                                   state.hparams, x, y)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Finite entries, not a finite norm: a finite gradient's norm can overflow (see
        # `clip_by_global_norm`). The update itself can overflow (huge learning rate): keep the
        # last finite state.
        finite = jnp.isfinite(value) & jnp.stack(
            [jnp.isfinite(a).all() for a in jax.tree.leaves((grads, params, model_state))]).all()
        ok = finite & (state.diverged_at < 0)
        new = TrainState(params, model_state, opt_state, state.key, state.step + 1, state.diverged_at, state.hparams)
        frozen = state._replace(
            step=state.step + 1,
            diverged_at=jnp.where(state.diverged_at < 0, state.step, state.diverged_at),
        )
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, frozen)
        return state, jnp.where(ok, value, jnp.nan)

    def chunk(state, x_shard, y_shard):
        def body(s, _):
            return train_step(s, x_shard, y_shard)

        return jax.lax.scan(body, state, None, length=num_steps, unroll=unroll)

    # shard_map types the parameters as equal on every "data" device (they are not split over
    # it), so autodiff sums their per-device gradient contributions over "data" itself: the
    # gradient of the data-averaged loss is the whole batch's, the same on every device.
    sharded = jax.shard_map(
        jax.vmap(chunk, in_axes=(0, None, None)), mesh=mesh,
        in_specs=(P(SWEEP), P(DATA), P(DATA)), out_specs=(P(SWEEP), P(SWEEP)),
    )
    return jax.jit(sharded, donate_argnums=0)


def make_evaluate(task: tasks.Task, mesh: Mesh | None = None):
    """`evaluate(state, x, y)`: every member's test metrics; each device evaluates its members
    on the whole (replicated) test set."""

    def evaluate(state: TrainState, x, y):
        out, _ = task.model_for(state.hparams).apply(state.params, state.model_state, x, training=False)
        value, extra = task.loss_fn(out, y)
        return {"loss": value, **extra}

    sharded = jax.shard_map(
        jax.vmap(evaluate, in_axes=(0, None, None)), mesh=mesh or mesh_lib.single_device_mesh(),
        in_specs=(P(SWEEP), P(), P()), out_specs=P(SWEEP),
    )
    return jax.jit(sharded)


def fit(cfg: ml_collections.ConfigDict, workdir, *, progress=True, desc: str | None = None,
        task: tasks.Task | None = None):
    """Trains the sweep `cfg` describes in `workdir`, resuming from its latest checkpoint.

    Writes `workdir/config.json`, `workdir/run.json` (the members and the implementation
    choices taken), `workdir/metrics.jsonl` (one line per member per evaluation), the same
    metrics for TensorBoard in `workdir/tensorboard/<member>/` (with the hyperparameters, and
    the training loss every `config.log_every` steps in `.../steps/`) and `workdir/checkpoints/`.
    `progress`: show a progress bar with the training loss, labelled `desc` (default
    `config.name`); nested in an open bar, it goes when done. Returns `(final_state,
    metrics_rows, members)`, the state as global arrays on the mesh `config.mesh` describes.
    In a multi-process run every process calls `fit` alike: process 0 writes the config and
    the metrics, all of them write (their shards of) the checkpoints and restore them.

    Nothing is written before every check has passed: `ConfigError` for a bad config value or
    a workdir whose config.json or checkpoints hold another run, `CheckpointError` if no
    checkpoint restores as saved (see `checkpoints.restore_latest_valid`), `WorkdirError` for a
    workdir that cannot hold the run (see `workdir.check_workdir`) or that another run is
    using: process 0 holds an exclusive lock on `workdir/.lock` while it runs. A write that fails later (a full
    disk) is a `WorkdirError` naming the file; what was saved before it is kept.
    """
    workdir = workdir_lib.workdir_path(workdir)
    task, members, mesh = _setup(cfg, task)
    run = _Run(cfg, task, members, mesh, workdir, primary=jax.process_index() == 0)
    workdir_lib.check_workdir(workdir)
    with workdir_lib.lock(workdir) if run.primary else contextlib.nullcontext():
        return _fit_locked(run, progress, desc)


class _Run(NamedTuple):
    """What the stages of `fit` share."""

    cfg: Any
    task: tasks.Task
    members: list
    mesh: Mesh
    workdir: pathlib.Path
    primary: bool  # process 0: writes config.json and metrics.jsonl (orbax: checkpoints)


def _setup(cfg, task):
    """`(task, members, mesh)`, the task built once (unless given) after the checks that need
    no data, and checked itself (`check_config` with the task)."""
    checks.check_values(cfg)
    try:
        task = task or tasks.build_task(cfg)
    except ValueError as e:
        raise checks.ConfigError(str(e)) from None
    except OSError as e:  # a data file that is missing or unreadable
        key = tasks.task_spec(cfg.task.name).data_file
        if key is None:
            raise
        raise checks.ConfigError(f"`config.task.{key}`={cfg.task[key]!r}: {e}") from None
    checks.check_config(cfg, num_examples=task.data.y_train.shape[0], task=task)
    members = sweep.sweep_members(cfg)
    try:
        mesh = mesh_lib.make_mesh(cfg, len(members))
    except ValueError as e:
        raise checks.ConfigError(str(e)) from None
    return task, members, mesh


def _fit_locked(run: _Run, progress, desc):
    cfg, workdir = run.cfg, run.workdir
    config_json = cfg.to_json(sort_keys=True)
    config = json.loads(config_json)
    workdir_lib.check_saved_config(workdir / "config.json", config, workdir)

    opt = optim.make_optimizer(cfg.optimizer, sweep.optimizer_keys(cfg))
    state = init_state(run.task, opt, run.members, NamedSharding(run.mesh, P(SWEEP)))
    ckpt_dir = workdir / "checkpoints"
    manager, step, state = checkpoints.resume(ckpt_dir, cfg, state, config, run.mesh, workdir, run.primary)
    with workdir_lib.writing(workdir, "create"):
        workdir.mkdir(parents=True, exist_ok=True)
    if run.primary:
        workdir_lib.write_atomic(workdir / "config.json", config_json)
        workdir_lib.write_atomic(workdir / "run.json", json.dumps(metrics.run_metadata(cfg, run.members, run.mesh),
                                                                  indent=1))
    manager = manager or checkpoints.checkpoint_manager(ckpt_dir, cfg)
    try:
        rows = metrics.start_metrics(run.workdir, run.cfg, step, run.primary)
        state = _train(run, opt, state, step, rows, manager, config, progress, desc)
    finally:
        manager.close()
    return state, rows, run.members


def _train(run: _Run, opt, state, step, rows, manager, config, progress, desc):
    """Trains from `step` to `config.num_steps` (or a preemption), evaluating, logging and
    saving on the config's schedule; returns the final state."""
    from tqdm.auto import tqdm

    cfg, mesh, task = run.cfg, run.mesh, run.task
    x_tr, y_tr = (mesh_lib.put_on_mesh(a, mesh, P(DATA), pad_to=mesh.shape[DATA]) for a in task.data[:2])
    x_te, y_te = (mesh_lib.put_on_mesh(a, mesh, P()) for a in task.data[2:4])
    chunk = make_train_chunk(task, opt, cfg.batch_size, cfg.steps_per_call, cfg.unroll, mesh=mesh)
    evaluate = make_evaluate(task, mesh)
    bar = tqdm(total=cfg.num_steps, initial=step, disable=not (progress and run.primary), desc=desc or cfg.name,
               unit="step", leave=None)
    with contextlib.ExitStack() as closing:
        closing.callback(bar.close)  # also on an error, so that its message starts a line of its own
        log = metrics.RunLog(run.workdir, cfg, run.members, step, run.primary, closing)
        while step < cfg.num_steps:
            state, losses = chunk(state, x_tr, y_tr)
            # One chunk at a time: with a chunk queued behind a running one (async dispatch),
            # XLA:CPU (jax 0.10.2) deadlocked in the LN-LSTM's scan (all threads in futex wait).
            # A chunk is many steps, so nothing measurable is lost by waiting for it.
            jax.block_until_ready(state)
            first, step = step, step + cfg.steps_per_call
            evaluated = metrics.evaluates_at(step, cfg)
            # Fetching is collective (every process takes part): at most one fetch per chunk.
            if evaluated or progress or (step // cfg.log_every > first // cfg.log_every):
                ev = evaluate(state, x_te, y_te) if evaluated else {}
                ev, losses, div = mesh_lib.fetch((ev, losses, state.diverged_at), mesh)
                log.steps(first, losses)
                tl = metrics.chunk_means(losses)
                if evaluated:
                    log.evaluation(rows, step, ev, tl, div)
                bar.set_postfix_str(metrics.loss_postfix(tl), refresh=False)
            bar.update(cfg.steps_per_call)
            if manager.should_save(step):
                checkpoints.save(manager, step, state, config, mesh)
                if manager.reached_preemption(step):
                    print(f"preempted: saved step {step}; the same command resumes there", file=sys.stderr)
                    break
    return state


def set_verbosity(verbose: bool):
    """Quiet by default (warnings and errors only): orbax logs dozens of INFO lines per
    checkpoint, which bury the progress bar. `verbose`: absl's INFO logs."""
    from absl import logging

    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
