"""The members of a sweep: every combination of the swept values, trained as one program."""

import itertools


def sweep_members(cfg) -> list[dict]:
    """The sweep's members: the product of seeds and learning rates, in a fixed order."""
    seeds = tuple(cfg.sweep.seed) or (0,)
    lrs = tuple(cfg.sweep.learning_rate) or (cfg.optimizer.learning_rate,)
    return [{"seed": int(s), "learning_rate": float(lr)} for lr, s in itertools.product(lrs, seeds)]
