"""Jitted, vmapped training with Optax: one compiled program trains a whole sweep.

A sweep is the product of `config.sweep.seed` and `config.sweep.learning_rate`; every member
has the same shapes, so the members are stacked on a leading axis and trained with `jax.vmap`.
`config.steps_per_call` steps are fused into one `lax.scan` per call; the train state is
donated. A member whose loss or gradients become non-finite is frozen at its last finite
state and marked diverged; the others are unaffected.

Checkpoints (orbax) are written every `config.checkpoint_every` steps and on completion; the
same command resumes from the latest one and, all randomness being derived from the step
counter, ends with exactly the parameters and metrics of an uninterrupted run.

Run a config:  python -m experiments.train --config=configs/mlp_digits.py --workdir=runs/mlp
"""

import dataclasses
import itertools
import json
import os
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import data as data_lib
from experiments import models


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
    else:
        raise ValueError(f"`task.name` must be digits, digits_rows, digits_pixels, mnist or adding, got {name!r}.")

    m = cfg.model
    if m.kind == "mlp":
        model = models.mlp((int(np.prod(ds.x_train.shape[1:])), *m.hidden, n_out), norm=m.norm)
    elif m.kind == "convnet":
        model = models.convnet(n_out, tuple(m.hidden), norm=m.norm, in_channels=ds.x_train.shape[-1])
    elif m.kind == "rnn":
        model = models.sequence_model(
            ds.x_train.shape[-1], n_out, m.hidden[0], cell=m.cell, norm=m.norm,
            gain_init=m.get("gain_init"), norm_input=m.get("norm_input"),
            max_steps=ds.x_train.shape[1], forget_bias=m.get("forget_bias"),
        )
    else:
        raise ValueError(f"`model.kind` must be mlp, convnet or rnn, got {m.kind!r}.")
    return Task(model, loss_fn, ds)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
    """Gradient clipping then the optimizer, with the learning rate injected so that it can
    differ across sweep members (it lives in the optimizer state)."""
    factories = {"adam": optax.adam, "sgd": optax.sgd, "adamw": optax.adamw}
    if opt_cfg.name not in factories:
        raise ValueError(f"`optimizer.name` must be one of {tuple(factories)}, got {opt_cfg.name!r}.")

    def build(learning_rate):
        steps = [factories[opt_cfg.name](learning_rate)]
        if opt_cfg.grad_clip > 0:
            steps.insert(0, optax.clip_by_global_norm(opt_cfg.grad_clip))
        return optax.chain(*steps)

    return optax.inject_hyperparams(build)(learning_rate=opt_cfg.learning_rate)


def sweep_members(cfg) -> list[dict]:
    """The sweep's members: the product of seeds and learning rates, in a fixed order."""
    seeds = tuple(cfg.sweep.seed) or (0,)
    lrs = tuple(cfg.sweep.learning_rate) or (cfg.optimizer.learning_rate,)
    return [{"seed": int(s), "learning_rate": float(lr)} for lr, s in itertools.product(lrs, seeds)]


def init_state(task: Task, opt, members) -> TrainState:
    """The stacked initial state of every member (leading axis = member)."""
    seeds = jnp.asarray([m["seed"] for m in members], jnp.uint32)
    lrs = jnp.asarray([m["learning_rate"] for m in members], jnp.float32)

    def one(seed, lr):
        init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        params, model_state = task.model.init(init_key)
        opt_state = opt.init(params)
        opt_state.hyperparams["learning_rate"] = lr
        return TrainState(params, model_state, opt_state, data_key, jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32))

    return jax.jit(jax.vmap(one))(seeds, lrs)


def _batch_indices(key, step, n, batch_size):
    """Indices of the batch at `step`: epochs of a fresh permutation, a pure function of the
    key and the step (so a resumed run draws the same batches)."""
    per_epoch = n // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
    return jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch_size,), (batch_size,))


def make_train_chunk(task: Task, opt, batch_size: int, num_steps: int, unroll: int = 1):
    """A jitted function running `num_steps` fused steps of every member.

    `unroll` goes to the `lax.scan` over steps: XLA:CPU runs convolution gradients inside a
    while loop ~10x slower than unrolled (measured on the ConvNet config), so ConvNets unroll.
    """

    def loss(params, model_state, x, y):
        out, new_state = task.model.apply(params, model_state, x, training=True)
        value, _ = task.loss_fn(out, y)
        return value, new_state

    def train_step(state: TrainState, x_all, y_all):
        idx = _batch_indices(state.key, state.step, x_all.shape[0], batch_size)
        (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(
            state.params, state.model_state, x_all[idx], y_all[idx]
        )
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(grads))
        # The update itself can overflow (huge learning rate): keep the last finite state.
        finite &= jnp.stack([jnp.isfinite(a).all() for a in jax.tree.leaves((params, model_state))]).all()
        ok = finite & (state.diverged_at < 0)
        new = TrainState(params, model_state, opt_state, state.key, state.step + 1, state.diverged_at)
        frozen = state._replace(
            step=state.step + 1,
            diverged_at=jnp.where(state.diverged_at < 0, state.step, state.diverged_at),
        )
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, frozen)
        return state, jnp.where(ok, value, jnp.nan)

    def chunk(state, x_all, y_all):
        def body(s, _):
            return train_step(s, x_all, y_all)

        state, losses = jax.lax.scan(body, state, None, length=num_steps, unroll=unroll)
        return state, jnp.nanmean(losses)

    return jax.jit(jax.vmap(chunk, in_axes=(0, None, None)), donate_argnums=0)


def make_evaluate(task: Task):
    def evaluate(state: TrainState, x, y):
        out, _ = task.model.apply(state.params, state.model_state, x, training=False)
        value, metrics = task.loss_fn(out, y)
        return {"loss": value, **metrics}

    return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)))


def _read_metrics(path: pathlib.Path, up_to_step: int) -> list[dict]:
    """Metrics already written, up to a step; a torn last line (kill -9) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["step"] <= up_to_step:
                rows.append(row)
    return rows


def _write_atomic(path: pathlib.Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_config(cfg):
    """Rejects settings that would otherwise fail late or silently."""
    for name in ("num_steps", "steps_per_call", "batch_size"):
        if cfg[name] < 1:
            raise ValueError(f"`config.{name}` must be >= 1, got {cfg[name]}.")
    for name in ("eval_every", "checkpoint_every"):
        if cfg[name] % cfg.steps_per_call:
            raise ValueError(
                f"`config.{name}`={cfg[name]} must be a multiple of `config.steps_per_call`="
                f"{cfg.steps_per_call} (evaluation and checkpoints happen between fused calls)."
            )
    if cfg.num_steps % cfg.steps_per_call:
        raise ValueError(f"`config.num_steps`={cfg.num_steps} must be a multiple of `config.steps_per_call`={cfg.steps_per_call}.")


def fit(cfg: ml_collections.ConfigDict, workdir, *, progress=True, task: Task | None = None):
    """Trains the sweep `cfg` describes in `workdir`, resuming from its latest checkpoint.

    Writes `workdir/config.json`, `workdir/metrics.jsonl` (one line per member per
    evaluation) and `workdir/checkpoints/`. Returns `(final_state, metrics_rows, members)`.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    check_config(cfg)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config_json = cfg.to_json(sort_keys=True)
    saved = workdir / "config.json"
    if saved.exists() and saved.read_text() != config_json:
        raise ValueError(
            f"{workdir} holds a run with a different config; use another --workdir or delete it."
        )
    _write_atomic(saved, config_json)

    task = task or build_task(cfg)
    opt = make_optimizer(cfg.optimizer)
    members = sweep_members(cfg)
    if cfg.batch_size > task.data.x_train.shape[0]:
        raise ValueError(f"`config.batch_size`={cfg.batch_size} exceeds the {task.data.x_train.shape[0]} training examples.")
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in task.data[:4])
    state = init_state(task, opt, members)
    chunk = make_train_chunk(task, opt, cfg.batch_size, cfg.steps_per_call, cfg.unroll)
    evaluate = make_evaluate(task)

    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )
    step = 0
    if manager.latest_step() is not None:
        step = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    metrics_path = workdir / "metrics.jsonl"
    rows = _read_metrics(metrics_path, step)
    _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    bar = tqdm(total=cfg.num_steps, initial=step, disable=not progress, desc=cfg.name, unit="step")
    with open(metrics_path, "a") as log:
        while step < cfg.num_steps:
            state, train_loss = chunk(state, x_tr, y_tr)
            step += cfg.steps_per_call
            bar.update(cfg.steps_per_call)
            if step % cfg.eval_every == 0 or step == cfg.num_steps:
                ev = jax.device_get(evaluate(state, x_te, y_te))
                tl, div = jax.device_get((train_loss, state.diverged_at))
                for i, member in enumerate(members):
                    row = {"step": step, "member": i, **member, "train_loss": float(tl[i]),
                           **{f"test_{k}": float(v[i]) for k, v in ev.items()},
                           "diverged_at": int(div[i])}
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
                manager.save(step, args=ocp.args.StandardSave(state))
                manager.wait_until_finished()
    bar.close()
    manager.close()
    return state, rows, members


def main(argv):
    from absl import flags

    del argv
    cfg = flags.FLAGS.config
    state, rows, members = fit(cfg, flags.FLAGS.workdir)
    last = {r["member"]: r for r in rows}
    for i, m in enumerate(members):
        r = last.get(i, {})
        print(json.dumps({**m, **{k: v for k, v in r.items() if k.startswith("test_") or k == "diverged_at"}}))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
