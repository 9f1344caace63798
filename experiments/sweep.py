"""The members of a sweep: every combination of the swept values, trained as one program.

`config.sweep.seed`, `config.sweep.learning_rate` (the optimizer's) and `config.sweep.<key>`
for a float-valued config key under `model` or `optimizer` (configs/base.py declares one entry
per key: `sweep.model.norm_args.eps`, `sweep.optimizer.weight_decay`, ...) each hold a tuple of
values, empty for the config's own value. The members are their product, the seed varying
fastest, then the learning rate, then the other keys in the config's order.

Every member runs in the same compiled program, so a swept value must reach it as data:
- an optimizer setting is one of the optimizer's injected hyperparameters (in its state);
- a model option that only sets initial parameters (`INIT_ONLY`: the gain init, the forget
  bias) is given to the model's `init` as each member's own Python number (lnjax checks them
  as numbers when the parameters are made; nothing in the step reads them);
- any other model option (eps, momentum, ...) is a traced per-member scalar, kept in the
  state (`TrainState.hparams`), from which the step builds the member's model.
"""

import itertools
from typing import Any

import ml_collections
import numpy as np

SEED, LEARNING_RATE = "seed", "learning_rate"
INIT_ONLY = ("scale_init", "forget_bias")  # the last part of a model key that only sets initial parameters
OPTIMIZER, MODEL = "optimizer.", "model."


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


def axes(cfg) -> dict[str, tuple]:
    """The swept config keys (dotted) other than the seed and the learning rate, with their values."""
    return {k: tuple(v) for k, _, v in config_keys(cfg.sweep) if k not in (SEED, LEARNING_RATE) and len(v)}


def sweep_members(cfg) -> list[dict]:
    """The sweep's members, each `{"seed", "learning_rate", <swept key>: value, ...}`."""
    seeds = tuple(cfg.sweep.seed) or (0,)
    lrs = tuple(cfg.sweep.learning_rate) or (cfg.optimizer.learning_rate,)
    other = axes(cfg)
    return [{SEED: int(s), LEARNING_RATE: float(lr), **{k: float(v) for k, v in zip(other, values)}}
            for *values, lr, s in itertools.product(*other.values(), lrs, seeds)]


def member_values(members) -> dict[str, np.ndarray]:
    """Each swept setting across the members as a float32 array, keyed by its config key (the
    learning rate as "optimizer.learning_rate")."""
    keys = [k for k in members[0] if k != SEED]
    return {(OPTIMIZER + k if k == LEARNING_RATE else k): np.asarray([m[k] for m in members], np.float32)
            for k in keys}


def is_init_only(key: str) -> bool:
    return key.startswith(MODEL) and key.rsplit(".", 1)[-1] in INIT_ONLY


def is_traced(key: str) -> bool:
    """Whether the step reads the swept model option `key` as a traced value (`TrainState.hparams`)."""
    return key.startswith(MODEL) and not is_init_only(key)


def optimizer_keys(cfg) -> tuple[str, ...]:
    """The optimizer's settings that vary across the members (learning_rate not included)."""
    return tuple(k.removeprefix(OPTIMIZER) for k in axes(cfg) if k.startswith(OPTIMIZER))


def with_values(cfg, values: dict):
    """`cfg` with the dotted keys of `values` set (numbers or traced scalars: the copy is not
    type-checked); `cfg` itself when `values` is empty."""
    if not values:
        return cfg
    out = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    for key, value in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out
