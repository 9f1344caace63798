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
        clip = (max_norm > 0) & (n > max_norm / m)  # a swept max_norm of 0 is no clipping
        # g / (m n) = unit / n: the clipped gradient never forms m * n or a tiny max_norm / (m n).
        return jax.tree.map(lambda g, u: jnp.where(clip, u / n.astype(u.dtype) * max_norm, g), updates, unit), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(opt_cfg, swept: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """Gradient clipping, weight decay, then the optimizer. The learning rate, and the settings
    named in `swept` (`grad_clip`, `weight_decay`: those that differ across the sweep's members),
    are injected: they live in the optimizer state, one value per member.

    `weight_decay` (None: the optimizer's own, 1e-4 for adamw and none for adam and sgd) is
    adamw's decoupled decay, and for adam and sgd a decay added to the gradient (PyTorch's
    `weight_decay`, L2 regularization)."""
    factories = {"adam": optax.adam, "sgd": optax.sgd, "adamw": optax.adamw}
    if opt_cfg.name not in factories:
        raise ValueError(f"`optimizer.name` must be one of {tuple(factories)}, got {opt_cfg.name!r}.")
    fixed = {"grad_clip": opt_cfg.grad_clip, "weight_decay": opt_cfg.get("weight_decay")}
    # The config's value (0 for an unset one) stands in until `train.init_state` sets each member's.
    injected = {k: 0.0 if fixed[k] is None else fixed[k] for k in swept}

    def build(learning_rate, **values):
        clip, decay = ({**fixed, **values}[k] for k in ("grad_clip", "weight_decay"))
        steps = [clip_by_global_norm(clip)] if "grad_clip" in values or clip > 0 else []
        if opt_cfg.name == "adamw":
            return optax.chain(*steps, optax.adamw(learning_rate, **({} if decay is None else {"weight_decay": decay})))
        if decay is not None:
            steps.append(optax.add_decayed_weights(decay))
        return optax.chain(*steps, factories[opt_cfg.name](learning_rate))

    return optax.inject_hyperparams(build)(learning_rate=opt_cfg.learning_rate, **injected)
