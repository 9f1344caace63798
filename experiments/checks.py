"""The checks of a config before anything is written: each bad value is one `ConfigError`."""

import jax
import numpy as np
from flax import traverse_util

from experiments import mesh as mesh_lib
from experiments import optim, sweep, tasks
from lnjax import norms


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir that holds another run: the user's to fix
    (the command line prints it as one `error: ...` line, without a traceback)."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_positive_float(v) -> bool:
    # inf is allowed: that member diverges and is frozen, as any diverging member (NaN is not > 0)
    return _is_real(v) and bool(v > 0)


def check_values(cfg, num_examples=None):
    """The checks of `check_config` that need no model: types, ranges and the schedule."""
    def need(ok, key, allowed, value):
        if not ok:
            raise ConfigError(f"`config.{key}` must be {allowed}, got {value!r}.")

    for name in ("num_steps", "steps_per_call", "batch_size", "eval_every", "checkpoint_every", "unroll", "log_every"):
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
    need(cfg.optimizer.name in optim.OPTIMIZERS, "optimizer.name", f"one of {optim.OPTIMIZERS}", cfg.optimizer.name)
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
    decay = cfg.optimizer.get("weight_decay")
    need(decay is None or _is_real(decay) and np.isfinite(decay) and decay >= 0, "optimizer.weight_decay",
         "a finite number >= 0 (None: the optimizer's own)", decay)
    _check_sweep(cfg)


def _check_sweep(cfg):
    """Each `config.sweep.<key>` varies a float key of the model or the optimizer, over finite
    numbers (>= 0 for the optimizer's clip and decay); the model's own checks of each value
    run when the model is traced (`check_config`)."""
    # A float key, or an unset one declared float (a copy of the config may have lost the type).
    floats = {k for k, t, v in sweep.config_keys(cfg) if t == "float" or (v is None and t == "NoneType")}
    for key, values in sweep.axes(cfg).items():
        if key not in floats or not key.startswith((sweep.MODEL, sweep.OPTIMIZER)):
            raise ConfigError(f"`config.sweep.{key}`: a sweep varies float keys of `config.model` and "
                              f"`config.optimizer` (and `config.sweep.seed`), and `config.{key}` is none.")
        low = 0 if key.startswith(sweep.OPTIMIZER) else -np.inf
        if not all(_is_real(v) and np.isfinite(v) and v >= low for v in values):
            allowed = "finite numbers" + (" >= 0" if low == 0 else "")
            raise ConfigError(f"`config.sweep.{key}` must be a tuple of {allowed}, got {values!r}.")


def check_config(cfg, num_examples: int | None = None, task: "tasks.Task | None" = None):
    """Rejects settings that would otherwise fail late or silently, each with a `ConfigError`
    (a ValueError) of one line naming the key and its allowed values. Writes nothing.

    `num_examples`: the size of the training set, if known (`fit` passes it): `batch_size`
    may not exceed it. `task`: the task built from `cfg` (`fit` passes it). Its model is then
    traced (not compiled) on one batch of the task's data, which runs every check the
    normalizers make of their option values (eps, momentum, groups against the layer's
    width, ...) and the cell's of `forget_bias`, for the config's values and for each value
    a sweep gives a model option. Without it, a model is built for a dummy input, which checks
    the names and the options taken, not their values."""
    check_values(cfg, num_examples)
    try:
        mesh_lib.check_mesh_config(cfg, len(sweep.sweep_members(cfg)))
        for values in [{}, *({k: v} for k, vs in sweep.axes(cfg).items() if k.startswith(sweep.MODEL) for v in vs)]:
            if task is None:
                tasks.build_model(sweep.with_values(cfg, values), input_size=1, num_outputs=1, max_steps=1)
            else:
                _trace_task(task.model_for(values), task, cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _trace_task(model, task: tasks.Task, cfg):
    """Traces `model`'s forward pass in one training step, and an evaluation, on a batch of the
    task's shapes: the normalizers check their options when applied, so a bad value fails here
    rather than after the workdir was written."""
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((cfg.batch_size, *a.shape[1:]), a.dtype),
                         (task.data.x_train, task.data.y_train))

    def forward(key, x, y):
        params, state = model.init(key)
        for training in (True, False):
            out, _ = model.apply(params, state, x, training=training)
            task.loss_fn(out, y)

    try:
        jax.eval_shape(forward, jax.random.PRNGKey(0), *batch)
    except ValueError as e:
        raise ValueError(f"config.model: {e} ({tasks.options_hint(cfg.model)})") from None


def check_extension(old: dict, new: dict, workdir, source="config.json"):
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
