import jax.numpy as jnp
import numpy as np
import pytest

import lnjax


def test_layer_norm_zero_mean_unit_variance():
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    y = np.asarray(lnjax.layer_norm(x, eps=0.0), np.float64)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-5)
    assert lnjax.layer_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_import_loads_flax_only_when_a_frontend_is_used():
    """`import lnjax` imports jax and numpy, not flax (nor optax, chex); `lnjax.nnx` and
    `lnjax.linen` import it on first use."""
    import subprocess
    import sys

    code = ("import sys, lnjax; heavy = ('flax', 'optax', 'chex', 'orbax'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))); "
            "lnjax.nnx.LayerNorm; from lnjax import linen; print(linen.LayerNorm.__module__, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "lnjax.linen True"]
    assert {"nnx", "linen"} <= set(dir(lnjax))
    with pytest.raises(AttributeError, match="no attribute 'nxx'"):
        lnjax.nxx
