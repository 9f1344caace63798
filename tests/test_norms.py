"""`lnjax.norms`: normalizers as values, checked where they are built and where they are applied."""

import jax.numpy as jnp
import numpy as np
import pytest

import lnjax
from lnjax import norms

Z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)

STATELESS = {"layer": norms.layer(), "rms": norms.rms(), "layer-no-bias": norms.layer(bias=False),
             "layer-groups": norms.layer(groups=2), "divisive": norms.divisive(2), "bias": norms.bias(),
             "identity": norms.identity()}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_params_with_other_keys_are_an_error_not_a_dropped_gain(name):
    norm = STATELESS[name]
    good = norm.init(8)
    norm.apply(good, Z)
    wrong = [{"gamma": jnp.ones(8), "beta": jnp.zeros(8)}, {**good, "extra": jnp.ones(8)}]
    wrong += [{k: v for k, v in good.items() if k != drop} for drop in good]
    for params in wrong:
        with pytest.raises(ValueError, match=r"`params` has keys .* but this normalizer's `init` makes"):
            norm.apply(params, Z)
    with pytest.raises(TypeError, match="`params` must be a dict"):
        norm.apply([jnp.ones(8)], Z)


def test_stateful_params_with_other_keys_are_an_error():
    norm = norms.batch()
    state = norm.init_state(8)
    with pytest.raises(ValueError, match=r"`params` has keys \['gamma'\]"):
        norm.apply({"gamma": jnp.ones(8)}, Z, state, training=True)
    with pytest.raises(ValueError, match=r"`params` has keys \[\]"):
        norm.apply({}, Z, state, training=True)


def test_a_gain_from_another_normalizer_of_the_same_form_is_accepted():
    # rms() and layer() both hold a scale and a bias: their params are interchangeable.
    y = norms.layer().apply(norms.rms().init(8), Z)
    np.testing.assert_allclose(y, lnjax.layer_norm(Z), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_gain_init_that_is_not_finite_is_an_error(value):
    with pytest.raises(ValueError, match="`scale_init` .* must be finite"):
        norms.layer(scale_init=value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_fast_variance_must_be_a_bool(value):
    norm = norms.layer(fast_variance=value)
    with pytest.raises(TypeError, match="`fast_variance` must be a Python bool"):
        norm.apply(norm.init(8), Z)
