"""Defaults shared by every experiment config (Flax-examples convention: `get_config()`).

Normalizers. Every model builds its normalizers with `lnjax.norms.get(model.norm, **options)`
(`experiments.tasks.norm_options`), the options being

* `model.norm_defaults[model.norm]`: the experiment's own settings for that normalizer, the
  one place they are written down (set here and in `recurrent`), e.g. the momentum 0.9 of
  the batch statistics (lnjax's default is 0.99) and divisive norm's window radius;
* updated by every entry of `model.norm_args` that is set (not None), e.g.
  `--config.model.norm_args.eps=1e-6`, `--config.model.norm_args.scale_init=0.1`.

Configs are locked on the command line, so `model.norm_args` declares the factory options one
may set there (`NORM_OPTIONS`; each None, "unset"); another option is set in a config file
(`c.model.norm_args.summation = False`). An option the normalizer does not take (e.g.
`radius` with `norm=layer`) is an error before training (`experiments.checks.check_config`).
For the BN-LSTM (`model.cell="bn_lstm"`, whose batch normalizers `model.norm` does not choose)
an experiment's defaults would be `model.norm_defaults.bn_lstm` (none is set), added to the
cell's own (Cooijmans et al.'s: gains 0.1 and so on), and `model.norm_args` updates them.
"""

import ml_collections
from ml_collections import config_dict

# The options `model.norm_args` declares, so that `--config.model.norm_args.<name>=...` works
# with the locked config: those of lnjax.norms' factories that the experiments' normalizers
# take (see each factory's docstring for which takes what).
NORM_OPTIONS = {
    "scale_init": float,  # every normalizer with a gain: its initial value (1.0)
    "bias": bool,  # whether the normalizer has a bias (True)
    "eps": float,
    "momentum": float,  # of running batch statistics
    "fast_variance": bool,
    "implementation": str,  # of layer/RMS/batch norm: None, "xla" or "fused"
    "groups": int,  # layer/RMS norm: statistics per group of units (4: per LSTM gate)
    "num_groups": int,  # group norm
    "radius": int,  # divisive norm's window (units on each side)
    "sigma": float,  # divisive norm's smoothing term
    "suppression_radius": int,
    "batch_size": int,  # batch-layer norm's m (the MLP gives it `config.batch_size`)
}

# Batch statistics in every experiment: running averages with momentum 0.9.
BATCH_MOMENTUM = 0.9


def norm_args() -> ml_collections.ConfigDict:
    """`model.norm_args`: every option of `NORM_OPTIONS`, unset (None)."""
    return ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in NORM_OPTIONS.items()})


def _float_keys(cfg: ml_collections.ConfigDict) -> dict:
    """An empty tuple for every float key of `cfg`, nested as in `cfg` (`model.norm_defaults`
    left out: `model.norm_args` overrides it)."""
    out = {}
    for k in cfg:
        if isinstance(cfg[k], ml_collections.ConfigDict):
            if k != "norm_defaults" and (nested := _float_keys(cfg[k])):
                out[k] = nested
        elif cfg.get_type(k) is float:
            out[k] = ()
    return out


def sweep_axes(c: ml_collections.ConfigDict) -> dict:
    """`sweep.<key>` for every float key of `c.model` and `c.optimizer`: the keys a sweep may
    vary, declared because the config is locked on the command line (the learning rate's is
    `sweep.learning_rate`)."""
    optimizer = _float_keys(c.optimizer)
    del optimizer["learning_rate"]
    return {"model": _float_keys(c.model), "optimizer": optimizer}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.task = ml_collections.ConfigDict(
        {"name": "digits", "permute": False, "data_dir": "", "path": "", "seed": 0, "length": 50,
         "train_size": 10000, "test_size": 1000}
    )
    c.model = ml_collections.ConfigDict({
        "kind": "mlp", "hidden": (256, 256), "norm": "layer", "cell": "lstm",
        # The input term(s) of an LSTM/GRU cell: None is `norm`; "none" leaves W_x x_t
        # unnormalized (the recurrent-only form); or another name (built with the same options).
        "input_norm": config_dict.placeholder(str),
        "forget_bias": 0.0,  # of every LSTM cell, the BN-LSTM's included
        "norm_args": norm_args(),
        "norm_defaults": {
            "batch": {"momentum": BATCH_MOMENTUM},
            "switchable": {"momentum": BATCH_MOMENTUM},
            "batch_layer": {"momentum": BATCH_MOMENTUM},
            "graph_batch": {"momentum": BATCH_MOMENTUM},
            "graph_learned": {"momentum": BATCH_MOMENTUM},
            "divisive": {"radius": 16},  # the MLP's window over its hidden units
        },
    })
    c.optimizer = ml_collections.ConfigDict({
        "name": "adam", "learning_rate": 1e-3, "grad_clip": 10.0,
        # None: the optimizer's own (adamw's 1e-4; none for adam and sgd, where a value is
        # added to the gradient as L2 regularization, PyTorch's `weight_decay`)
        "weight_decay": config_dict.placeholder(float),
    })
    c.batch_size = 128
    c.num_steps = 1000
    c.steps_per_call = 50  # steps fused into one compiled call (a lax.scan)
    c.unroll = 1  # lax.scan unroll of those steps
    c.eval_every = 50
    c.log_every = 1  # the training loss to TensorBoard (tensorboard/<member>/steps/) every this many steps
    c.checkpoint_every = 500
    # Members of the vmapped sweep: the product of these (empty: the config's own value), all
    # trained as one compiled program (experiments/sweep.py): seeds, learning rates, and
    # `sweep.<key>` for each float key of the model and optimizer, e.g.
    # `--config.sweep.model.norm_args.eps='(1e-5,1e-3)'`.
    c.sweep = ml_collections.ConfigDict({"seed": (0, 1, 2), "learning_rate": ()})
    c.sweep.update(sweep_axes(c))
    # Device mesh (axes "sweep" x "data"): sweep members are split over the `sweep` axis, each
    # member's batch over the `data` axis (data parallelism). 0 = automatic: use as many of the
    # visible devices as the sweep size and batch size divide (see experiments/mesh.py).
    c.mesh = ml_collections.ConfigDict({"sweep": 0, "data": 0})
    return c


def recurrent(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` set up for a recurrent model (`model.kind="rnn"`), with the normalizer settings the
    RNN experiments use."""
    c.model.kind = "rnn"
    nd = c.model.norm_defaults
    nd.divisive.radius = 30  # Ren et al. 2017: a window of 60 units in a tanh RNN
    nd.rms = {"eps": 1e-5}  # the cells' eps, layer and RMS norm alike (rms_norm's own is 1e-6)
    # No `nd.bn_lstm`: the BN-LSTM keeps the cell's own defaults, Cooijmans et al.'s (gains 0.1).
    return c
