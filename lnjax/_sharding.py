"""Types of values inside `shard_map`: which mesh axes a value varies over."""

import jax
import jax.numpy as jnp
from jax import lax


def varying_like(carry, inputs):
    """`carry` (any pytree) marked as varying over every `shard_map` axis that some leaf of
    `inputs` varies over.

    Inside `shard_map`, a scan carry must keep its type: the zeros of a default carry vary over
    no mesh axis, but one step mixes in sharded inputs or parameters and makes the carry vary
    over their axes; and the outputs of a native kernel vary over none, where XLA's would vary
    over its inputs' axes. Outside `shard_map` this is the identity.
    """
    def varying(x):
        aval = jax.typeof(x)
        mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; `vma` before
        return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))

    axes = set().union(*(varying(leaf) for leaf in jax.tree.leaves(inputs)))

    def cast(c):
        missing = tuple(sorted(axes - varying(c)))
        # A counter in the carry (an int) does not depend on the data: it stays invariant.
        if not missing or not jnp.issubdtype(c.dtype, jnp.floating):
            return c
        return lax.pcast(c, missing, to="varying")

    return jax.tree.map(cast, carry) if axes else carry
