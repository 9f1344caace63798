"""Defaults shared by every experiment config (Flax-examples convention: `get_config()`)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.task = ml_collections.ConfigDict(
        {"name": "digits", "permute": False, "data_dir": "", "path": "", "seed": 0, "length": 50,
         "train_size": 10000, "test_size": 1000}
    )
    c.model = ml_collections.ConfigDict(
        {"kind": "mlp", "hidden": (256, 256), "norm": "layer", "cell": "lstm",
         "gain_init": 1.0, "norm_input": True, "forget_bias": 0.0,
         "dn_radius": 30, "dn_sigma": 1.0}  # dn_*: norm="divisive" in RNN cells
    )
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3, "grad_clip": 10.0})
    c.batch_size = 128
    c.num_steps = 1000
    c.steps_per_call = 50  # steps fused into one compiled call (a lax.scan)
    c.unroll = 1  # lax.scan unroll of those steps
    c.eval_every = 50
    c.checkpoint_every = 500
    # Members of the vmapped sweep: the product of these (empty: the single default value).
    c.sweep = ml_collections.ConfigDict({"seed": (0, 1, 2), "learning_rate": ()})
    # Device mesh (axes "sweep" x "data"): sweep members are split over the `sweep` axis, each
    # member's batch over the `data` axis (data parallelism). 0 = automatic: use as many of the
    # visible devices as the sweep size and batch size divide (see experiments/train.py).
    c.mesh = ml_collections.ConfigDict({"sweep": 0, "data": 0})
    return c
