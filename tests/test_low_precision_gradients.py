"""Low-precision gradients are rounded once.

For a bfloat16 or float16 input, every op computes in float32 and casts its input up once:
reverse mode then sums the cotangent contributions in float32 and rounds the total once. Two
casts of the same input (one for the statistics, one for the centring) each round their own,
large and partly cancelling cotangent, and the gradient loses most of its digits (PyTorch's
`test_GroupNorm_cpu_mixed_dtype` checks the same property).

The reference is the float32 gradient of the same op at the same (exactly representable)
input and cotangent. The cotangent has a large common part (1 + 0.1 N(0, 1)), which makes
the cancellation, and so a second rounding, visible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax

_BN = lnjax.batch_norm_state(3)
_LAST = (4, 8, 4, 3)  # [batch, *space, channels]
_EDGES = jnp.array([[0, 1, 2, 3, 4], [1, 2, 3, 0, 0]], jnp.int32)
_SEG = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)

# name: (function of x, shape of x)
OPS = {
    "layer_norm": (lambda x: lnjax.layer_norm(x), _LAST),
    "layer_norm-xla": (lambda x: lnjax.layer_norm(x, implementation="xla"), _LAST),
    "layer_norm-two-axes": (lambda x: lnjax.layer_norm(x, axis=(-2, -1)), _LAST),
    "rms_norm": (lambda x: lnjax.rms_norm(x), _LAST),
    "rms_norm-two-axes": (lambda x: lnjax.rms_norm(x, axis=(-2, -1)), _LAST),
    "batch_norm": (lambda x: lnjax.batch_norm(x, None, None, _BN, training=True)[0], _LAST),
    "batch_norm-xla": (lambda x: lnjax.batch_norm(x, None, None, _BN, training=True, implementation="xla")[0],
                       _LAST),
    "batch_norm-mask": (lambda x: lnjax.batch_norm(x, None, None, _BN, training=True,
                                                   mask=jnp.arange(4 * 8 * 4).reshape(4, 8, 4) % 5 > 0)[0],
                        _LAST),
    "group_norm": (lambda x: lnjax.group_norm(x, 2, axis=1), (4, 8, 4, 3)),
    "instance_norm": (lambda x: lnjax.instance_norm(x, axis=1), (4, 8, 4, 3)),
    "switchable_norm": (lambda x: lnjax.switchable_norm(x, None, None, lnjax.switchable_control(), _BN,
                                                        training=True)[0], _LAST),
    "batch_layer_norm": (lambda x: lnjax.batch_layer_norm(x, None, None, lnjax.batch_layer_norm_state((8, 4, 3)),
                                                          training=True)[0], _LAST),
    "domain_agnostic_batch_norm": (lambda x: lnjax.domain_agnostic_batch_norm(
        x, None, None, _BN, source_mask=jnp.array([True, True, False, True]), training=True)[0], _LAST),
    "divisive_norm": (lambda x: lnjax.divisive_norm(x, radius=2), (6, 16)),
    "graph_node_norm": (lambda x: lnjax.graph_node_norm(x), (6, 8)),
    "graph_adjacency_norm": (lambda x: lnjax.graph_adjacency_norm(x, edges=_EDGES), (6, 8)),
    "graph_norm": (lambda x: lnjax.graph_norm(x, segment_ids=_SEG, num_segments=2), (6, 8)),
    "graph_batch_norm": (lambda x: lnjax.graph_batch_norm(x, None, None, lnjax.batch_norm_state(8),
                                                          training=True)[0], (6, 8)),
    "weight_norm": (lambda v: lnjax.weight_norm(v, jnp.ones(3, v.dtype)), (8, 3)),
    "proxy_norm": (lambda y: lnjax.proxy_norm(y), (6, 8)),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(OPS))
def test_low_precision_gradient_is_the_float32_gradient_rounded_once(name, dtype):
    fn, shape = OPS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), dtype)
    g = jnp.asarray(1 + 0.1 * rng.normal(size=shape), dtype)
    _, vjp = jax.vjp(jax.jit(fn), x)
    got = np.asarray(vjp(g)[0], np.float64)
    _, vjp32 = jax.vjp(jax.jit(fn), x.astype(jnp.float32))
    want = np.asarray(vjp32(g.astype(jnp.float32))[0], np.float64)
    rounded = np.asarray(jnp.asarray(want, dtype), np.float64)
    # One rounding of `want` is within half an ulp of each entry; allow one ulp of the
    # largest entry for the float32 computations' own differences (the bug measured 5-30).
    ulp = float(jnp.finfo(dtype).eps)
    err = np.max(np.abs(got - rounded)) / np.max(np.abs(want))
    assert err <= ulp, f"{name}: gradient off by {err / ulp:.1f} ulp of its largest entry"
