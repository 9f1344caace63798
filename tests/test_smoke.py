import jax.numpy as jnp
import numpy as np

import lnjax


def test_layer_norm_zero_mean_unit_variance():
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    y = np.asarray(lnjax.layer_norm(x, eps=0.0), np.float64)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-5)
    assert lnjax.layer_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
