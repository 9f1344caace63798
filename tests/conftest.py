"""Test-wide JAX settings.

* float64 is enabled so that references and `check_grads` can run in double precision; every
  test that checks low-precision behaviour builds its float32/bf16/f16 inputs explicitly.
* Strict dtype promotion and rank promotion raise: a cheap guard against silent upcasting
  and broadcasting inside lnjax (as in Equinox's test suite).
"""

import os

os.environ.setdefault("XLA_FLAGS", "")  # keep one CPU device unless a test asks otherwise

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
