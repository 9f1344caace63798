"""The optimizer of a run: Optax's, behind a gradient clip that cannot overflow."""

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "sgd", "adamw")


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
