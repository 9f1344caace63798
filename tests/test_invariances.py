"""Table 1 of Ba, Kiros & Hinton (2016) as property tests: which weight and data transformations
leave the normalized output unchanged.

Set-up (PAPER.md): a layer `a = W x` followed by the normalization, gain and bias after it.
`W` has shape [H, in], so row `w_i` holds the incoming weights of unit i (the paper's notation:
`a_i = w_i^T x`); a batch `X` is [N, in] and the summed inputs are `A = X W^T`, [N, H].

* BN: `batch_norm(A)` in training mode (batch statistics over the N cases, per unit).
* WN: `a = (g / ||v||) v^T x` with `W` in the role of `v`: `weight_norm(W, g, axis=0)` keeps the
  unit axis 0 and takes the norm of each row; then the bias.
* LN: `layer_norm(A)` over the H units of each case.
* RMSNorm: `rms_norm(A)` over the H units: the invariances of LN except re-centering.

Transformations (delta > 0): weight matrix re-scaling `W' = delta W`; weight matrix
re-centering `W' = W + 1 gamma^T` (gamma added to every row); weight vector re-scaling: one row
`w_i' = delta w_i`; dataset re-scaling `X' = delta X`; dataset re-centering `x_n' = x_n + gamma`
for every case; single training case re-scaling: one case `x_n' = delta x_n`.

Everything is float64 with eps = 0, so "invariant" is checked to ~1e-9 relative over deltas
spanning 1e-3..1e3; every "no" entry is shown by counterexamples in which the output changes by
more than 1e-3 of its magnitude (deltas kept away from 1, shifts of norm >= 0.5).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import lnjax

N, IN, H = 8, 5, 6

TRANSFORMS = [
    "weight_matrix_rescaling",
    "weight_matrix_recentering",
    "weight_vector_rescaling",
    "dataset_rescaling",
    "dataset_recentering",
    "single_case_rescaling",
]
# Table 1, plus RMSNorm ("the invariances of LN except re-centering").
TABLE = {
    "batch_norm": dict(zip(TRANSFORMS, [True, False, True, True, True, False])),
    "weight_norm": dict(zip(TRANSFORMS, [True, False, True, False, False, False])),
    "layer_norm": dict(zip(TRANSFORMS, [True, True, False, True, False, True])),
    "rms_norm": dict(zip(TRANSFORMS, [True, False, False, True, False, True])),
}
CELLS = [(m, t) for m in TABLE for t in TRANSFORMS]


def _layer(method, W, X, gain, bias):
    if method == "weight_norm":
        w = lnjax.weight_norm(W, gain, axis=0, eps=0.0)  # each row w_i rescaled to norm g_i
        return X @ w.T + bias[None, :]
    A = X @ W.T
    if method == "batch_norm":
        y, _ = lnjax.batch_norm(A, gain, bias, lnjax.batch_norm_state(H, jnp.float64), training=True, eps=0.0)
        return y
    if method == "layer_norm":
        return lnjax.layer_norm(A, gain, bias, eps=0.0)
    if method == "rms_norm":
        return lnjax.rms_norm(A, gain, bias, eps=0.0)
    raise AssertionError(method)


# Compiled once per method; the properties below only call them.
LAYERS = {m: jax.jit(lambda W, X, g, b, m=m: _layer(m, W, X, g, b)) for m in TABLE}


def _problem(seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(H, IN))
    X = rng.normal(size=(N, IN)) + rng.normal(size=IN)  # cases share a non-zero mean
    gain = rng.uniform(0.5, 2.0, size=H)
    bias = rng.normal(size=H)
    return rng, W, X, gain, bias


def _transform(name, rng, W, X, delta, shift):
    """Applies transformation `name`; `delta` for the scalings, `shift` (a norm) for gamma."""
    W, X = W.copy(), X.copy()
    gamma = rng.normal(size=IN)
    gamma *= shift / np.linalg.norm(gamma)
    if name == "weight_matrix_rescaling":
        W = delta * W
    elif name == "weight_matrix_recentering":
        W = W + np.ones((H, 1)) * gamma[None, :]  # W + 1 gamma^T
    elif name == "weight_vector_rescaling":
        W[rng.integers(H)] *= delta
    elif name == "dataset_rescaling":
        X = delta * X
    elif name == "dataset_recentering":
        X = X + gamma[None, :]
    elif name == "single_case_rescaling":
        X[rng.integers(N)] *= delta
    else:
        raise AssertionError(name)
    return W, X


seeds = st.integers(0, 2**32 - 1)
# Invariant entries: any delta > 0, over six decades; any shift.
any_delta = st.floats(-3.0, 3.0).map(lambda e: 10.0**e)
any_shift = st.floats(0.0, 100.0)
# Counterexamples: delta clearly away from 1, shifts clearly non-zero.
far_delta = st.one_of(st.floats(0.05, 0.5), st.floats(2.0, 20.0))
far_shift = st.floats(0.5, 10.0)


def _outputs(method, name, seed, delta, shift):
    rng, W, X, gain, bias = _problem(seed)
    W2, X2 = _transform(name, rng, W, X, delta, shift)
    y = np.asarray(LAYERS[method](W, X, gain, bias))
    y2 = np.asarray(LAYERS[method](W2, X2, gain, bias))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(y2))
    return y, y2


INVARIANT = [c for c in CELLS if TABLE[c[0]][c[1]]]
NOT_INVARIANT = [c for c in CELLS if not TABLE[c[0]][c[1]]]


@pytest.mark.parametrize("method,transform", INVARIANT, ids=[f"{m}-{t}" for m, t in INVARIANT])
@settings(max_examples=25, deadline=None)
@given(seed=seeds, delta=any_delta, shift=any_shift)
def test_invariant(method, transform, seed, delta, shift):
    y, y2 = _outputs(method, transform, seed, delta, shift)
    np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-9 * np.abs(y).max())


@pytest.mark.parametrize("method,transform", NOT_INVARIANT, ids=[f"{m}-{t}" for m, t in NOT_INVARIANT])
@settings(max_examples=25, deadline=None)
@given(seed=seeds, delta=far_delta, shift=far_shift)
def test_not_invariant(method, transform, seed, delta, shift):
    y, y2 = _outputs(method, transform, seed, delta, shift)
    # A clear margin: 1e6 times the invariance tolerance above. (Over 1500 random draws the
    # smallest relative change per cell was 0.03-0.28; hypothesis pushes delta and the shift to
    # the edges of their ranges, so the bound leaves room below that.)
    change = np.abs(y2 - y).max()
    assert change > 1e-3 * np.abs(y).max(), (change, np.abs(y).max())


def test_table_covers_every_cell():
    """Each method has every column, and the LN row is the paper's (a guard on the table above)."""
    assert all(set(row) == set(TRANSFORMS) for row in TABLE.values())
    assert len(INVARIANT) + len(NOT_INVARIANT) == 4 * 6
    assert [k for k, v in TABLE["layer_norm"].items() if not v] == ["weight_vector_rescaling", "dataset_recentering"]
    # RMSNorm differs from LN exactly in the re-centering entry LN has.
    diff = [k for k in TRANSFORMS if TABLE["layer_norm"][k] != TABLE["rms_norm"][k]]
    assert diff == ["weight_matrix_recentering"]


@settings(max_examples=25, deadline=None)
@given(seed=seeds, delta=any_delta)
def test_layer_norm_invariant_to_per_case_rescaling_of_every_case(seed, delta):
    """Stronger than one case: LN is invariant to an independent delta_n for every case n."""
    rng, W, X, gain, bias = _problem(seed)
    d = delta * np.exp(rng.uniform(-2.0, 2.0, size=(N, 1)))
    for method in ("layer_norm", "rms_norm"):
        y = np.asarray(LAYERS[method](W, X, gain, bias))
        y2 = np.asarray(LAYERS[method](W, d * X, gain, bias))
        np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-9 * np.abs(y).max())


@settings(max_examples=25, deadline=None)
@given(seed=seeds, delta=any_delta)
def test_batch_and_weight_norm_invariant_to_rescaling_every_row(seed, delta):
    """Weight vector re-scaling with an independent delta_i for every row."""
    rng, W, X, gain, bias = _problem(seed)
    d = delta * np.exp(rng.uniform(-2.0, 2.0, size=(H, 1)))
    for method in ("batch_norm", "weight_norm"):
        y = np.asarray(LAYERS[method](W, X, gain, bias))
        y2 = np.asarray(LAYERS[method](d * W, X, gain, bias))
        np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-9 * np.abs(y).max())
