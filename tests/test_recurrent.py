"""Tests of lnjax/recurrent.py: normalized cells (every per-term combination), the scan layers,
masking, the cell protocol, and the BN-LSTM.

References used here:
* a plain Python loop over the pure step `cell(params, carry, x_t)` (for the scan layers);
* NumPy float64 transcriptions of the paper's equations (LN-LSTM supplement eq. 20-22, LN-GRU
  eq. 26-28, LN-RNN eq. 4, and Cooijmans et al.'s BN-LSTM), written below independently of lnjax;
* Flax's linen `LSTMCell`/`OptimizedLSTMCell`/`GRUCell` and PyTorch's `nn.LSTM`/`nn.GRU` for the
  unnormalized baselines.

Everything that compares against a float64 reference runs lnjax in float64 (params and inputs
both float64; x64 is enabled in conftest). Sizes are small (H = 5..6, T <= 10) to keep the file
fast.
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax
from lnjax import norms
from lnjax import (
    BNLSTMCell,
    BNLSTMState,
    GRUCell,
    LSTMCarry,
    LSTMCell,
    RNNCell,
    bidirectional_rnn,
    bn_lstm_rnn,
    rnn,
    stacked_rnn,
)
from lnjax.normalization import BatchNormState

F64 = jnp.float64
HIGHEST = jax.lax.Precision.HIGHEST  # float64 references: no reduced-precision matmul passes
TIGHT = dict(rtol=1e-10, atol=1e-12, equal_nan=False)  # float64 vs float64, same maths reordered
F32_TOL = dict(rtol=1e-5, atol=1e-5, equal_nan=False)
H, F, T = 5, 3, 5

# The test programs are tiny and each is compiled once and run once: XLA's backend optimizations
# cost more time than they save here (about 40% of the compile time). Semantics are unchanged.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def term(norm, **options):
    """A normalizer from a name; "none" is None (the unnormalized term). Values, not strings, so
    that `init` with few input features does not warn (the warning itself is tested separately)."""
    return None if norm == "none" else norms.get(norm, **options)


def make_cell(kind, norm="layer", hidden=H, **kw):
    """Cells used throughout, `norm` on every term."""
    n = term(norm)
    kw.setdefault("precision", HIGHEST)
    if kind == "lstm":
        return LSTMCell(hidden, n, n, n, **kw)
    if kind == "lstm_variant":  # per-gate statistics, normalized carry, raw input term
        return LSTMCell(hidden, None, term(norm, groups=4), n, carry_normalized_cell=True, **kw)
    if kind == "gru":
        return GRUCell(hidden, n, n, **kw)
    if kind == "rnn":
        return RNNCell(hidden, n, **kw)
    raise AssertionError(kind)


def random_params(cell, seed, input_size=F, dtype=F64):
    """Parameters with the structure of `cell.init` (names, shapes, dtypes), every entry random:
    gains 1 + 0.3 N(0, 1) and biases 0.3 N(0, 1) (so that a swapped or missing gain/bias shows
    up), weight matrices N(0, 1 / fan_in). Drawn with NumPy: eager JAX initializers would
    compile a few programs per new shape."""
    shapes = jax.eval_shape(lambda: cell.init(jax.random.PRNGKey(0), input_size, dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = path[-1].key
        noise = rng.normal(size=leaf.shape)
        if name == "scale":
            v = 1 + 0.3 * noise
        elif name == "bias":
            v = 0.3 * noise
        else:
            v = noise / np.sqrt(leaf.shape[0])
        out.append(jnp.asarray(v, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def to_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def rand(seed, shape, dtype=F64, scale=1.0):
    """N(0, scale^2) test data, drawn with NumPy (no JAX program to compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def assert_tree_close(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape, (x.shape, y.shape)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TIGHT))


def loop_rnn(cell, params, xs, carry):
    """Reference layer: a Python loop over the pure step function. `xs` is `[*batch, T, F]`."""
    ys = []
    for t in range(xs.shape[-2]):
        carry, y = cell(params, carry, xs[..., t, :])
        ys.append(y)
    return jnp.stack(ys, axis=-2), carry


def weighted_sum(ys, carry, wy, wc):
    """A scalar that depends on every output and every carry entry with distinct weights."""
    total = jnp.sum(ys * wy)
    for leaf, w in zip(jax.tree.leaves(carry), wc):
        total = total + jnp.sum(leaf * w)
    return total


# ---- NumPy float64 transcriptions of the paper (independent of lnjax) ----------------------


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_ln(z, g, b, eps):
    """Ba et al. eq. 3-5: biased variance over the units, eps inside the root."""
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return g * (z - mu) / np.sqrt(var + eps) + b


def np_rms(z, g, b, eps):
    return g * z / np.sqrt((z**2).mean(-1, keepdims=True) + eps) + b


def np_norm(norm, z, p, eps, groups=1):
    """One term: "none" is `z + b` (or `z` without a bias); with `groups`, statistics per
    group (each gate's H units), gain and bias per unit of the whole vector."""
    if norm == "none":
        return z + p["bias"] if "bias" in p else z
    fn = np_ln if norm == "layer" else np_rms
    n = z.shape[-1] // groups
    parts = [fn(z[..., k * n : (k + 1) * n], 1.0, 0.0, eps) for k in range(groups)]
    return p["scale"] * np.concatenate(parts, -1) + p["bias"]


def np_ln_lstm(p, xs, *, terms, eps, groups=(1, 1), carry_normalized=False):
    """Supplement eq. 20-22 for xs [B, T, I], gates in lnjax's order (i, f, g, o) (the
    whole-4H statistics do not depend on the order; only the parameter layout does).
    `terms`: the norms of the input, recurrent and cell terms; `groups`: of the first two."""
    B, T_, _ = xs.shape
    Hh = p["w_h"].shape[0]
    nx, nh, nc = terms
    c, h = np.zeros((B, Hh)), np.zeros((B, Hh))
    ys = []
    for t in range(T_):
        ax, ah = xs[:, t] @ p["w_x"], h @ p["w_h"]
        a = np_norm(nh, ah, p["n_h"], eps, groups[1]) + np_norm(nx, ax, p["n_x"], eps, groups[0])
        i, f, g, o = (a[:, k * Hh : (k + 1) * Hh] for k in range(4))
        c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
        cn = np_norm(nc, c, p.get("n_c", {}), eps)
        h = np_sigmoid(o) * np.tanh(cn)
        if carry_normalized:
            c = cn
        ys.append(h)
    return np.stack(ys, 1), (c, h)


def np_ln_gru(p, xs, *, terms, eps, paper_update=False):
    """Supplement eq. 26-28, four normalizations `terms = (N_1, N_2, N_3, N_4)`, gates (r, z).
    The documented update is `h = z * h_prev + (1 - z) * n`; with `paper_update` the paper's
    eq. 28 `h = (1 - z) * h_prev + z * n` is used instead."""
    B, T_, _ = xs.shape
    Hh = p["w_h"].shape[0]
    n1, n2, n3, n4 = terms
    h = np.zeros((B, Hh))
    ys = []
    for t in range(T_):
        ax, ah = xs[:, t] @ p["w_x"], h @ p["w_h"]
        gates = np_norm(n1, ah[:, : 2 * Hh], p["n_h_gates"], eps) + np_norm(n2, ax[:, : 2 * Hh], p["n_x_gates"], eps)
        r, z = np_sigmoid(gates[:, :Hh]), np_sigmoid(gates[:, Hh:])
        cand_x = np_norm(n3, ax[:, 2 * Hh :], p["n_x_cand"], eps)
        n = np.tanh(cand_x + r * np_norm(n4, ah[:, 2 * Hh :], p["n_h_cand"], eps))
        h = (1 - z) * h + z * n if paper_update else z * h + (1 - z) * n
        ys.append(h)
    return np.stack(ys, 1), h


def np_ln_rnn(p, xs, *, norm, eps):
    """Eq. 4: `h_t = tanh(g / sigma_t * (a_t - mu_t) + b)` with `a_t = W_hh h + W_xh x`."""
    B, T_, _ = xs.shape
    h = np.zeros((B, p["w_h"].shape[0]))
    ys = []
    for t in range(T_):
        h = np.tanh(np_norm(norm, xs[:, t] @ p["w_x"] + h @ p["w_h"], p["n"], eps))
        ys.append(h)
    return np.stack(ys, 1), h


# --------------------------------------------------------------------------------------------
# the scan layer equals a Python loop over the step function (values and gradients)
# --------------------------------------------------------------------------------------------

KINDS = ["lstm", "lstm_variant", "gru", "rnn"]
NORMS = ["layer", "rms", "none"]


def check_scan_against_loop(cell, params, layouts, seed=0):
    """For each `(xs shape, time_major)` in `layouts` and both `precompute_inputs`, compares
    `rnn` with the Python loop: outputs, final carry, and gradients of a weighted sum of all
    outputs and carry entries w.r.t. params and xs. All scans are compiled as one program."""
    cases = []
    for li, (shape, tm) in enumerate(layouts):
        batch_shape = shape[1:-1] if tm else shape[:-2]
        carry0 = cell.initial_carry(batch_shape, F64)
        wy = rand(seed + 20 + li, shape[:-1] + (cell.hidden_size,))
        wc = [rand(seed + 30 + 2 * li + k, leaf.shape) for k, leaf in enumerate(jax.tree.leaves(carry0))]
        cases.append((rand(seed + 10 + li, shape), tm, batch_shape, wy, wc))

    def loss_scan(p, x, tm, pre, wy, wc):
        ys, carry = rnn(cell, p, x, time_major=tm, precompute_inputs=pre)
        return weighted_sum(ys, carry, wy, wc), (ys, carry)

    def loss_loop(p, x, tm, batch_shape, wy, wc):
        xb = jnp.moveaxis(x, 0, -2) if tm else x
        ys, carry = loop_rnn(cell, p, xb, cell.initial_carry(batch_shape, F64))
        ys = jnp.moveaxis(ys, -2, 0) if tm else ys
        return weighted_sum(ys, carry, wy, wc), (ys, carry)

    @fast_jit
    def all_scans(p, xs):
        out = []
        for x, (_, tm, _, wy, wc) in zip(xs, cases):
            for pre in (True, False):
                vg = jax.value_and_grad(loss_scan, (0, 1), has_aux=True)
                out.append(vg(p, x, tm, pre, wy, wc))
        return out

    got = all_scans(params, [c[0] for c in cases])
    for li, (x, tm, batch_shape, wy, wc) in enumerate(cases):
        # the reference runs eagerly, step by step
        (l_ref, (ys_ref, c_ref)), g_ref = jax.value_and_grad(loss_loop, (0, 1), has_aux=True)(
            params, x, tm, batch_shape, wy, wc
        )
        # the gradient is nowhere trivially zero
        assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g_ref))
        for k in range(2):
            (l, (ys, c)), g = got[2 * li + k]
            assert ys.shape == ys_ref.shape and ys.dtype == F64
            assert type(c) is type(c_ref)
            assert_tree_close((l, ys, c), (l_ref, ys_ref, c_ref))
            assert_tree_close(g, g_ref)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_rnn_equals_python_loop_values_and_grads(kind, norm):
    """Every cell kind and norm, two batch axes [2, 3, T, F], both precompute_inputs."""
    cell = make_cell(kind, norm)
    check_scan_against_loop(cell, random_params(cell, 0), [((2, 3, T, F), False)])


# --------------------------------------------------------------------------------------------
# each cell equals a NumPy float64 transcription of the paper's equations
# --------------------------------------------------------------------------------------------


def run_lnjax(cell, params, xs):
    ys, carry = fast_jit(lambda p, x: rnn(cell, p, x, precompute_inputs=False))(params, xs)
    return np.asarray(ys), to_np(carry)


EPS = 1e-3
TERMS = ["layer", "rms", "none"]


def cell_terms(names, **options):
    return [term(n, eps=EPS, **options) if n != "none" else None for n in names]


@pytest.mark.parametrize("names", [(x, h, c) for x in TERMS for h in TERMS for c in ("layer", "none")]
                         + [("rms", "rms", "rms"), ("none", "none", "rms")], ids="-".join)
def test_lstm_every_term_combination_matches_numpy(names):
    """Paper form (layer, layer, layer), recurrent-only (none, layer, layer), DRAW's cell-only
    (none, none, layer), the standard LSTM (none, none, none) and every mix between."""
    cell = LSTMCell(H, *cell_terms(names), precision=HIGHEST)
    params = random_params(cell, 2)
    xs = rand(4, (4, 7, F), scale=2.0)
    ys, carry = run_lnjax(cell, params, xs)
    ref_ys, (ref_c, ref_h) = np_ln_lstm(to_np(params), np.asarray(xs), terms=names, eps=EPS)
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(carry.c, ref_c, **TIGHT)
    np.testing.assert_allclose(carry.h, ref_h, **TIGHT)
    for key, name in zip(("n_x", "n_h"), names):
        assert set(params[key]) == ({"bias"} if name == "none" else {"scale", "bias"})
    assert set(params.get("n_c", {})) == (set() if names[2] == "none" else {"scale", "bias"})
    if names[2] == "layer":
        # the carried c is raw: it is not itself normalized (mean over units is not ~0)
        assert np.max(np.abs(carry.c.mean(-1))) > 1e-3


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_lstm_per_gate_statistics_and_normalized_carry_match_numpy(norm):
    x, h = cell_terms((norm, norm), groups=4)
    (c,) = cell_terms((norm,))
    cell = LSTMCell(H, x, h, c, carry_normalized_cell=True, precision=HIGHEST)
    params = random_params(cell, 2)
    xs = rand(4, (4, 7, F), scale=2.0)
    ys, carry = run_lnjax(cell, params, xs)
    ref_ys, (ref_c, ref_h) = np_ln_lstm(to_np(params), np.asarray(xs), terms=(norm,) * 3, eps=EPS,
                                        groups=(4, 4), carry_normalized=True)  # fmt: skip
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(carry.c, ref_c, **TIGHT)
    np.testing.assert_allclose(carry.h, ref_h, **TIGHT)


def test_ln_lstm_variants_differ():
    """The variants are genuinely different functions (guards against an option being ignored)."""
    xs = rand(5, (3, 6, F), scale=2.0)
    ln = norms.layer()
    base = LSTMCell(H, ln, precision=HIGHEST)
    params = random_params(base, 3)
    y0, c0 = run_lnjax(base, params, xs)
    g4 = norms.layer(groups=4)
    for cell in (LSTMCell(H, g4, g4, precision=HIGHEST), LSTMCell(H, ln, carry_normalized_cell=True, precision=HIGHEST)):
        y1, c1 = run_lnjax(cell, params, xs)
        assert np.max(np.abs(y1 - y0)) > 1e-3
    p_noin = dict(params, n_x={"bias": params["n_x"]["bias"]})
    y2, _ = run_lnjax(LSTMCell(H, None, precision=HIGHEST), p_noin, xs)
    assert np.max(np.abs(y2 - y0)) > 1e-3


GRU_TERMS = [(a, b, c, d) for a in ("layer", "none") for b in ("layer", "none") for c in ("layer", "none")
             for d in ("layer", "none")] + [("rms",) * 4]


@pytest.mark.parametrize("names", GRU_TERMS, ids="-".join)
def test_gru_every_term_combination_matches_numpy(names):
    """`names` = (N_1, N_2, N_3, N_4) of eq. 26-28; the cell takes them as the pairs
    input_norm = (N_2, N_3), recurrent_norm = (N_1, N_4)."""
    n1, n2, n3, n4 = cell_terms(names)
    cell = GRUCell(H, (n2, n3), (n1, n4), precision=HIGHEST)
    params = random_params(cell, 4)
    xs = rand(6, (4, 7, F), scale=2.0)
    ys, h = run_lnjax(cell, params, xs)
    ref_ys, ref_h = np_ln_gru(to_np(params), np.asarray(xs), terms=names, eps=EPS)
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(h, ref_h, **TIGHT)
    if names[1] != "layer" or names[0] != "layer":
        return
    # Paper's eq. 28 writes the update the other way round: the same cell with z -> -z, i.e.
    # with the z-half of both gate normalizations' gains and biases negated.
    p = to_np(params)
    for k in ("n_h_gates", "n_x_gates"):
        p[k] = {n: np.concatenate([v[:H], -v[H:]]) for n, v in p[k].items()}
    paper_ys, _ = np_ln_gru(p, np.asarray(xs), terms=names, eps=EPS, paper_update=True)
    np.testing.assert_allclose(ys, paper_ys, **TIGHT)


def test_gru_one_normalizer_is_used_for_both_terms_of_a_side():
    rms = norms.rms()
    one, pair = GRUCell(H, rms, None), GRUCell(H, (rms, rms), (None, None))
    params = random_params(one, 4)
    xs = rand(6, (4, 7, F))
    assert jax.tree.structure(params) == jax.tree.structure(random_params(pair, 4))
    assert_tree_close(run_lnjax(one, params, xs), run_lnjax(pair, params, xs))
    with pytest.raises(ValueError, match="input_norm"):
        GRUCell(H, ("layer", "layer", "layer"))


@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
def test_ln_rnn_matches_numpy_eq4(norm):
    cell = RNNCell(H, *cell_terms((norm,)), precision=HIGHEST)
    params = random_params(cell, 5)
    xs = rand(7, (4, 7, F), scale=2.0)
    ys, h = run_lnjax(cell, params, xs)
    ref_ys, ref_h = np_ln_rnn(to_np(params), np.asarray(xs), norm=norm, eps=EPS)
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(h, ref_h, **TIGHT)


def test_ln_lstm_init_matches_paper():
    p = jax.jit(lambda k: LSTMCell(H).init(k, 16))(jax.random.PRNGKey(0))
    for k in ("n_x", "n_h", "n_c"):
        np.testing.assert_array_equal(p[k]["scale"], 1.0)  # gains 1, biases 0 (main text and code)
        np.testing.assert_array_equal(p[k]["bias"], 0.0)
    assert p["n_x"]["scale"].shape == p["n_h"]["scale"].shape == (4 * H,)  # whole-4H vector
    assert p["n_c"]["scale"].shape == (H,)
    p = jax.jit(lambda k: LSTMCell(H, forget_bias=1.0).init(k, 16))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(p["n_x"]["bias"][H : 2 * H], 1.0)  # f is the second gate
    np.testing.assert_array_equal(p["n_x"]["bias"][:H], 0.0)
    # a gain init is the normalizer's option
    p = LSTMCell(H, norms.layer(scale_init=0.1)).init(jax.random.PRNGKey(0), 16)
    np.testing.assert_array_equal(p["n_x"]["scale"], np.float32(0.1))
    np.testing.assert_array_equal(p["n_h"]["scale"], 1.0)
    # without a bias in the input term, the forget bias goes to the recurrent term's
    p = LSTMCell(H, norms.layer(bias=False), forget_bias=1.0).init(jax.random.PRNGKey(0), 16)
    assert set(p["n_x"]) == {"scale"}
    np.testing.assert_array_equal(p["n_h"]["bias"][H : 2 * H], 1.0)
    no_bias = norms.rms(bias=False)
    with pytest.raises(ValueError, match="forget_bias"):
        LSTMCell(H, no_bias, no_bias, forget_bias=1.0).init(jax.random.PRNGKey(0), 16)


def test_ln_input_term_keeps_only_direction_of_x():
    """Table 1 single-case re-scaling, the paper's caveat: with eps = 0, LN(W_x x_t) is
    invariant to re-scaling each x_t by delta > 0; with one input feature only the sign
    survives. Without the input term normalized, the scale is kept."""
    xs = rand(9, (3, 6, 1))
    delta = jnp.exp(rand(10, (3, 6, 1)))  # a different positive factor for every step
    # a nonzero initial h, so that the recurrent LN never sees the all-zero vector (eps = 0)
    c0 = LSTMCarry(rand(11, (3, H)), rand(12, (3, H)))
    tol = dict(rtol=1e-9, atol=1e-12, equal_nan=False)
    for norm in ("layer", "rms"):
        n = term(norm, eps=0.0)
        cell = LSTMCell(H, n, n, n, precision=HIGHEST)
        p = random_params(cell, 8, input_size=1)
        run = fast_jit(lambda p, x: rnn(cell, p, x, initial_carry=c0)[0])
        ys = run(p, xs)
        assert np.all(np.isfinite(ys))
        np.testing.assert_allclose(run(p, xs * delta), ys, **tol)
        np.testing.assert_allclose(run(p, jnp.sign(xs)), ys, **tol)
        cell_raw = LSTMCell(H, None, n, n, precision=HIGHEST)
        p_raw = random_params(cell_raw, 8, input_size=1)
        run_raw = fast_jit(lambda p, x: rnn(cell_raw, p, x, initial_carry=c0)[0])
        assert float(jnp.max(jnp.abs(run_raw(p_raw, xs * delta) - run_raw(p_raw, xs)))) > 1e-3


# --------------------------------------------------------------------------------------------
# norm="none" matches Flax and PyTorch
# --------------------------------------------------------------------------------------------


def lstm_flax_params(p):
    """lnjax (w_x [I,4H] in (i,f,g,o), w_h [H,4H], n_x.bias, n_h.bias) -> Flax cell params."""
    Hh = p["w_h"].shape[0]
    b = p["n_x"]["bias"] + p["n_h"]["bias"]  # Flax has one bias per gate (on the h Dense)
    out = {}
    for k, gate in enumerate("ifgo"):
        sl = slice(k * Hh, (k + 1) * Hh)
        out[f"i{gate}"] = {"kernel": p["w_x"][:, sl]}
        out[f"h{gate}"] = {"kernel": p["w_h"][:, sl], "bias": b[sl]}
    return out


def gru_flax_params(p):
    """Flax GRUCell: ir/iz/in with bias, hr/hz without, hn with bias (inside the reset)."""
    Hh = p["w_h"].shape[0]
    bx = jnp.concatenate([p["n_x_gates"]["bias"] + p["n_h_gates"]["bias"], p["n_x_cand"]["bias"]])
    out = {}
    for k, gate in enumerate("rzn"):
        sl = slice(k * Hh, (k + 1) * Hh)
        out[f"i{gate}"] = {"kernel": p["w_x"][:, sl], "bias": bx[sl]}
        out[f"h{gate}"] = {"kernel": p["w_h"][:, sl]}
    out["hn"]["bias"] = p["n_h_cand"]["bias"]
    return out


def test_unnormalized_cells_match_flax():
    """Float64 (tight); the float32 comparison at 1e-5 is made against PyTorch below."""
    import flax.linen as nn

    xs = rand(11, (3, 6, F))
    cases = []
    for kind, flax_cell, to_flax in (
        ("lstm", nn.OptimizedLSTMCell, lstm_flax_params),
        ("lstm", nn.LSTMCell, lstm_flax_params),
        ("gru", nn.GRUCell, gru_flax_params),
    ):
        cell = make_cell(kind, "none")
        p = random_params(cell, 9)
        layer = nn.RNN(flax_cell(H, param_dtype=F64), return_carry=True)
        fparams = {"params": {"cell": to_flax(p)}}
        # the structure built by hand is exactly Flax's own (names, shapes, dtypes)
        ref = jax.eval_shape(layer.init, jax.random.PRNGKey(0), xs)
        assert jax.tree.structure(fparams) == jax.tree.structure(ref)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), fparams) == jax.tree.map(lambda a: (a.shape, a.dtype), ref)
        cases.append((cell, p, layer, fparams))

    @fast_jit
    def both(xs):
        out = []
        for cell, p, layer, fparams in cases:
            ys, carry = rnn(cell, p, xs)
            # Flax's cells mix Python scalars and arrays in ways the strict promotion of the
            # test suite refuses; 'standard' only around Flax (lnjax runs strict).
            with jax.numpy_dtype_promotion("standard"):
                f_carry, f_ys = layer.apply(fparams, xs)
            out.append(((ys, tuple(carry) if isinstance(carry, LSTMCarry) else carry), (f_ys, f_carry)))
        return out

    for got, ref in both(xs):
        assert_tree_close(got, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_unnormalized_cells_match_torch(dtype):
    import torch

    tdt = torch.float32 if dtype == jnp.float32 else torch.float64
    tol = F32_TOL if dtype == jnp.float32 else TIGHT
    xs = rand(12, (3, 6, F), dtype)
    xt = torch.from_numpy(np.array(xs))  # a writable copy
    cells = {kind: make_cell(kind, "none") for kind in ("lstm", "gru")}
    params = {kind: random_params(c, 10, dtype=dtype) for kind, c in cells.items()}
    outs = fast_jit(lambda ps, x: {k: rnn(cells[k], ps[k], x) for k in cells})(params, xs)
    for kind in ("lstm", "gru"):
        p = params[kind]
        ys, carry = outs[kind]
        assert ys.dtype == dtype
        if kind == "lstm":
            mod = torch.nn.LSTM(F, H, batch_first=True, dtype=tdt)
            b_ih, b_hh = p["n_x"]["bias"], p["n_h"]["bias"]
        else:
            mod = torch.nn.GRU(F, H, batch_first=True, dtype=tdt)
            b_ih = jnp.concatenate([p["n_x_gates"]["bias"], p["n_x_cand"]["bias"]])
            b_hh = jnp.concatenate([p["n_h_gates"]["bias"], p["n_h_cand"]["bias"]])
        with torch.no_grad():
            mod.weight_ih_l0.copy_(torch.from_numpy(np.array(p["w_x"]).T.copy()))
            mod.weight_hh_l0.copy_(torch.from_numpy(np.array(p["w_h"]).T.copy()))
            mod.bias_ih_l0.copy_(torch.from_numpy(np.array(b_ih)))
            mod.bias_hh_l0.copy_(torch.from_numpy(np.array(b_hh)))
            t_ys, t_state = mod(xt)
        np.testing.assert_allclose(ys, t_ys.numpy(), **tol)
        if kind == "lstm":
            h_n, c_n = t_state
            np.testing.assert_allclose(carry.h, h_n[0].numpy(), **tol)
            np.testing.assert_allclose(carry.c, c_n[0].numpy(), **tol)
        else:
            np.testing.assert_allclose(carry, t_state[0].numpy(), **tol)


# --------------------------------------------------------------------------------------------
# masking, reverse, bidirectional, stacked
# --------------------------------------------------------------------------------------------

TM = 6
LENGTHS = [TM, 3, 0, 1]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_masked_batch_equals_each_sequence_alone(kind):
    cell = make_cell(kind)
    params = random_params(cell, 11)
    B = len(LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    valid = np.arange(TM)[None, :] < np.asarray(LENGTHS)[:, None]  # [B, T]
    # padding holds large garbage: it must not leak into anything
    xs = jnp.where(jnp.asarray(valid)[..., None], rand(12, (B, TM, F)), 1e3 * rand(13, (B, TM, F)))
    wy = rand(14, (B, TM, H))
    wc = [rand(15 + k, (B, H)) for k in range(len(jax.tree.leaves(cell.initial_carry())))]

    @fast_jit
    def padded(p, x):
        def loss(p, x, pre):
            ys, carry = rnn(cell, p, x, lengths=lengths, precompute_inputs=pre)
            return weighted_sum(ys, carry, wy, wc), (ys, carry)

        return [jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, pre) for pre in (True, False)]

    # reference: each sequence alone (no padding), stepped eagerly by the pure cell
    refs = []
    for b, L in enumerate(LENGTHS):

        def loss_alone(p, x):
            ys_b, c_b = loop_rnn(cell, p, x, cell.initial_carry((), F64))
            return weighted_sum(ys_b, c_b, wy[b, :L], [w[b] for w in wc]), (ys_b, c_b)

        refs.append(jax.value_and_grad(loss_alone, (0, 1), has_aux=True)(params, xs[b, :L]) if L else None)

    for (_, (ys, carry)), (gp, gx) in padded(params, xs):
        ys, gx = np.asarray(ys), np.asarray(gx)
        assert np.all(ys[~valid] == 0.0)  # outputs at padded steps are exactly zero
        assert np.all(gx[~valid] == 0.0)  # padded inputs get exactly zero gradient
        assert np.all(gx[valid] != 0.0)
        gp_sum = jax.tree.map(jnp.zeros_like, params)
        for b, L in enumerate(LENGTHS):
            carry_b = jax.tree.map(lambda a: a[b], carry)
            if L == 0:  # the initial carry and all-zero outputs
                assert_tree_close(carry_b, cell.initial_carry((), F64))
                assert np.all(ys[b] == 0.0)
                continue
            (_, (ys_b, c_b)), (gp_b, gx_b) = refs[b]
            np.testing.assert_allclose(ys[b, :L], ys_b, **TIGHT)
            assert_tree_close(carry_b, c_b)
            np.testing.assert_allclose(gx[b, :L], gx_b, **TIGHT)
            gp_sum = jax.tree.map(jnp.add, gp_sum, gp_b)
        # the padded-batch loss is the sum of the per-sequence losses, so are its gradients
        assert_tree_close(gp, gp_sum)


def test_rnn_equals_python_loop_layouts():
    """Time-major ([T, 2, 3, F]) and no batch axis ([T, F]), both precompute_inputs, against the
    Python loop as above. The layout code is shared by all cells; the LSTM has the tuple carry.
    (Placed after the masking tests, whose unbatched references warm the same eager ops.)"""
    cell = make_cell("lstm", "layer")
    layouts = [((T, 2, 3, F), True), ((T, F), False)]
    check_scan_against_loop(cell, random_params(cell, 1), layouts, seed=100)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_reverse_with_lengths_flips_each_sequence_within_its_length(kind):
    cell = make_cell(kind, "rms")
    params = random_params(cell, 12)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    xs = rand(16, (len(LENGTHS), TM, F))

    @fast_jit
    def run(p, x):
        rev = [rnn(cell, p, x, lengths=lengths, reverse=True, precompute_inputs=pre) for pre in (True, False)]
        # without lengths: equal to running on the whole sequence flipped
        no_len = rnn(cell, p, x, reverse=True)
        ref_ys, ref_c = rnn(cell, p, jnp.flip(x, 1))
        return rev, no_len, (jnp.flip(ref_ys, 1), ref_c)

    rev, no_len, no_len_ref = run(params, xs)
    assert_tree_close(no_len, no_len_ref)
    for ys, carry in rev:
        ys = np.asarray(ys)
        for b, L in enumerate(LENGTHS):
            assert np.all(ys[b, L:] == 0.0)  # padding stays at the end
            if L == 0:
                assert_tree_close(jax.tree.map(lambda a: a[b], carry), cell.initial_carry((), F64))
                continue
            ref_ys, ref_c = loop_rnn(cell, params, jnp.flip(xs[b, :L], 0), cell.initial_carry((), F64))
            np.testing.assert_allclose(ys[b, :L], np.flip(np.asarray(ref_ys), 0), **TIGHT)
            assert_tree_close(jax.tree.map(lambda a: a[b], carry), ref_c)


def test_bidirectional_equals_two_rnn_calls():
    fwd, bwd = make_cell("lstm"), make_cell("gru", hidden=6)
    pf, pb = random_params(fwd, 13), random_params(bwd, 14)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    xs = rand(17, (len(LENGTHS), TM, F))

    @fast_jit
    def api(pf, pb, x):
        bm = bidirectional_rnn((fwd, bwd), (pf, pb), x, lengths=lengths)
        tm = bidirectional_rnn((fwd, bwd), (pf, pb), jnp.swapaxes(x, 0, 1), lengths=lengths, time_major=True)
        return bm, tm

    @fast_jit
    def by_hand(pf, pb, x):
        yf, cf = rnn(fwd, pf, x, lengths=lengths)
        yb, cb = rnn(bwd, pb, x, lengths=lengths, reverse=True)
        return jnp.concatenate([yf, yb], -1), (cf, cb)

    (ys, (cf, cb)), (ys_tm, carries_tm) = api(pf, pb, xs)
    assert ys.shape == (len(LENGTHS), TM, H + 6)
    assert_tree_close((ys, (cf, cb)), by_hand(pf, pb, xs))
    # time-major gives the same thing transposed
    assert_tree_close((jnp.swapaxes(ys_tm, 0, 1), carries_tm), (ys, (cf, cb)))


def test_stacked_with_bidirectional_layer_equals_composition():
    # the composition is what is tested here, so mostly cheap cells; the last layer's carry is
    # a tuple
    l1 = make_cell("rnn", "layer")
    l2 = (make_cell("rnn", "rms"), make_cell("gru", "none", hidden=4))
    l3 = make_cell("lstm", "none", hidden=6)
    p1 = random_params(l1, 15)
    p2 = (random_params(l2[0], 16, input_size=H), random_params(l2[1], 17, input_size=H))
    p3 = random_params(l3, 18, input_size=H + 4)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    xs = rand(18, (len(LENGTHS), TM, F))
    ys, carries = fast_jit(lambda ps, x: stacked_rnn([l1, l2, l3], ps, x, lengths=lengths))([p1, p2, p3], xs)

    @fast_jit
    def by_hand(p1, p2, p3, x):
        y1, c1 = rnn(l1, p1, x, lengths=lengths)
        y2f, c2f = rnn(l2[0], p2[0], y1, lengths=lengths)
        y2b, c2b = rnn(l2[1], p2[1], y1, lengths=lengths, reverse=True)
        y3, c3 = rnn(l3, p3, jnp.concatenate([y2f, y2b], -1), lengths=lengths)
        return y3, c1, c2f, c2b, c3

    y3, c1, c2f, c2b, c3 = by_hand(p1, p2, p3, xs)
    assert_tree_close(ys, y3)
    assert len(carries) == 3
    assert_tree_close(carries[0], c1)
    assert_tree_close(carries[1], (c2f, c2b))
    assert_tree_close(carries[2], c3)
    assert np.all(np.asarray(ys)[~(np.arange(TM)[None] < np.asarray(LENGTHS)[:, None])] == 0.0)


@dataclasses.dataclass(frozen=True)
class MinimalGRU:
    """A user's cell with only the documented protocol: `initial_carry` and `__call__` (no
    `project_inputs`, no `init`, parameters under the user's own names)."""

    hidden: int

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden), dtype)

    def __call__(self, params, h, x):
        z = jax.nn.sigmoid(x @ params["a"] + h @ params["b"])
        h = z * h + (1 - z) * jnp.tanh(lnjax.layer_norm(x @ params["c"], params["g"]))
        return h, 2 * h


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_user_defined_cell_with_only_call_and_initial_carry(batch):
    cell = MinimalGRU(4)
    params = {"a": rand(40, (F, 4)), "b": rand(41, (4, 4)), "c": rand(42, (F, 4)), "g": rand(43, (4,))}
    xs = rand(44, (batch, T, F))
    lengths = jnp.asarray(T - np.arange(batch) % T, jnp.int32)  # in [1, T]
    for pre in (None, True, False):  # `precompute_inputs` is moot without `project_inputs`
        ys, h = rnn(cell, params, xs, precompute_inputs=pre)
        ref_ys, ref_h = loop_rnn(cell, params, xs, cell.initial_carry((batch,), F64))
        assert_tree_close((ys, h), (ref_ys, ref_h))
    ys, h = rnn(cell, params, xs, lengths=lengths, reverse=True)
    b = batch - 1
    L = int(lengths[b])
    ref_ys, ref_h = loop_rnn(cell, params, jnp.flip(xs[b, :L], 0), cell.initial_carry((), F64))
    np.testing.assert_allclose(ys[b, :L], np.flip(np.asarray(ref_ys), 0), **TIGHT)
    np.testing.assert_allclose(h[b], ref_h, **TIGHT)
    assert h.dtype == F64  # the carry takes the parameters' dtype
    ys2, _ = bidirectional_rnn((cell, cell), (params, params), xs)
    assert ys2.shape == (batch, T, 8)


@dataclasses.dataclass(frozen=True)
class RunningSum:
    """A user's cell whose carry is a dict of per-sequence scalars (`[*batch]`, an int counter
    among them) and whose output is a per-sequence scalar."""

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return {"steps": jnp.zeros(batch_shape, jnp.int32), "total": jnp.zeros(batch_shape, dtype)}

    def __call__(self, params, carry, x):
        total = carry["total"] + params["w"] * jnp.sum(x, axis=-1)
        return {"steps": carry["steps"] + 1, "total": total}, total


@pytest.mark.parametrize("time_major", [False, True])
def test_per_sequence_scalar_carries_and_outputs_keep_their_layout(time_major):
    xs = rand(45, (3, T, F))
    lengths = jnp.asarray([T, 2, 0], jnp.int32)
    params = {"w": jnp.asarray(2.0, F64)}
    want = 2 * np.cumsum(np.sum(np.asarray(xs), -1), axis=1)  # [batch, T]
    for lens in (None, lengths):
        ys, carry = rnn(RunningSum(), params, jnp.swapaxes(xs, 0, 1) if time_major else xs, lengths=lens,
                        time_major=time_major)  # fmt: skip
        ys = np.asarray(ys).T if time_major else np.asarray(ys)
        assert ys.shape == (3, T)
        steps = np.full(3, T) if lens is None else np.asarray(lens)
        valid = np.arange(T)[None] < steps[:, None]
        np.testing.assert_allclose(ys, np.where(valid, want, 0), **TIGHT)
        np.testing.assert_array_equal(carry["steps"], steps)
        np.testing.assert_allclose(carry["total"], [want[b, n - 1] if n else 0 for b, n in enumerate(steps)], **TIGHT)


def test_a_carry_leaf_without_the_batch_axes_cannot_be_masked_by_lengths():
    @dataclasses.dataclass(frozen=True)
    class Shared:
        def initial_carry(self, batch_shape=(), dtype=jnp.float32):
            return jnp.zeros((), dtype)

        def __call__(self, params, carry, x):
            return carry + jnp.sum(x), jnp.sum(x, axis=-1)

    rnn(Shared(), {}, rand(46, (3, T, F)))  # fine without lengths
    with pytest.raises(ValueError, match=r"carry leaf has shape \(\), but with `lengths` every carry leaf must start"):
        rnn(Shared(), {}, rand(46, (3, T, F)), lengths=jnp.asarray([1, 2, 3], jnp.int32))


@pytest.mark.parametrize("k", range(3), ids=["lstm-per-gate", "gru-rms", "rnn"])
def test_no_time_steps_or_no_sequences_give_empty_outputs(k):
    cell = per_gate_gru_rnn_cells()[k]
    params = cell.init(jax.random.key(0), F)
    for shape in ((4, 0, F), (0, 5, F)):
        for pre in (True, False):
            ys, carry = rnn(cell, params, jnp.zeros(shape, jnp.float32), precompute_inputs=pre)
            assert ys.shape == shape[:-1] + (6,)
            assert_tree_close(carry, cell.initial_carry(shape[:1], jnp.float32))


def test_initial_carry_of_the_wrong_structure_or_shape_is_an_error():
    cell = make_cell("lstm")
    p = random_params(cell, 19)
    xs = rand(19, (2, 4, F))
    for bad in (jnp.zeros((2, H)), LSTMCarry(jnp.zeros((3, H)), jnp.zeros((3, H))),
                LSTMCarry(jnp.zeros((2, H + 1)), jnp.zeros((2, H + 1)))):  # fmt: skip
        with pytest.raises(ValueError, match="`initial_carry` has shapes"):
            rnn(cell, p, xs, initial_carry=bad)
    # The right shapes in another dtype than the step's carry: named, not scan's own TypeError.
    want = rnn(cell, p, xs)[1]
    for dtype in (jnp.int32, jnp.bfloat16):
        bad = jax.tree.map(lambda a: a.astype(dtype), want)
        with pytest.raises(TypeError, match=r"`initial_carry` has dtypes .*expected"):
            rnn(cell, p, xs, initial_carry=bad)
        with pytest.raises(TypeError, match=r"`initial_carry` has dtypes"):
            jax.jit(lambda c: rnn(cell, p, xs, initial_carry=c))(bad)


def test_initial_carry_is_used():
    cell = make_cell("lstm")
    p = random_params(cell, 19)
    xs = rand(19, (2, 3, 4, F))
    c0 = LSTMCarry(rand(20, (2, 3, H)), rand(21, (2, 3, H)))
    lengths = jnp.asarray([[0, 2, 4], [1, 0, 3]], jnp.int32)
    run = fast_jit(lambda p, x, L: (rnn(cell, p, x, initial_carry=c0), rnn(cell, p, x, initial_carry=c0, lengths=L)))
    (ys, c), (_, c_len) = run(p, xs, lengths)
    ref_ys, ref_c = loop_rnn(cell, p, xs, c0)
    assert_tree_close((ys, c), (ref_ys, ref_c))
    # with length 0 the initial carry comes back unchanged; with full length, the full run
    for leaf, leaf0, leaf_full in zip(c_len, c0, c):
        np.testing.assert_array_equal(leaf[0, 0], leaf0[0, 0])
        np.testing.assert_array_equal(leaf[1, 1], leaf0[1, 1])
        np.testing.assert_allclose(leaf[0, 2], leaf_full[0, 2], **TIGHT)


# --------------------------------------------------------------------------------------------
# BN-LSTM (Cooijmans et al. 2016)
# --------------------------------------------------------------------------------------------

BN_H, BN_MAX = 5, 8


def np_bn_lstm(p, state, xs, lengths, *, training, momentum, eps):
    """NumPy BN-LSTM over xs [B, T, I]: batch statistics of the sequences still running at each
    step (biased variance to normalize; running averages with the unbiased one, per step), or
    in eval the per-step population statistics of step min(t, steps_seen - 1)."""
    B, T_, _ = xs.shape
    Hh = p["w_h"].shape[0]
    new = {k: {s: v.copy() for s, v in d.items()} for k, d in state.items() if k != "seen"}
    c, h = np.zeros((B, Hh)), np.zeros((B, Hh))
    ys = np.zeros((B, T_, Hh))
    last = (state["seen"] if state["seen"] > 0 else BN_MAX) - 1
    for t in range(T_):
        act = lengths > t
        if training and not act.any():
            continue

        def bn(z, key, g, b):
            if training:
                zz = z[act]
                n = zz.shape[0]
                mu, var = zz.mean(0), zz.var(0)
                new[key]["mean"][t] = momentum * state[key]["mean"][t] + (1 - momentum) * mu
                new[key]["var"][t] = momentum * state[key]["var"][t] + (1 - momentum) * var * n / (n - 1)
            else:
                s = min(t, last)
                mu, var = state[key]["mean"][s], state[key]["var"][s]
            return g * (z - mu) / np.sqrt(var + eps) + b

        a = bn(xs[:, t] @ p["w_x"], "x", p["n_x"]["scale"], p["n_x"]["bias"]) + bn(h @ p["w_h"], "h", p["n_h"]["scale"], 0)
        i, f, g, o = (a[:, k * Hh : (k + 1) * Hh] for k in range(4))
        c_new = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
        h_new = np_sigmoid(o) * np.tanh(bn(c_new, "c", p["n_c"]["scale"], p["n_c"]["bias"]))
        m = act[:, None]
        c, h = np.where(m, c_new, c), np.where(m, h_new, h)
        ys[:, t] = np.where(m, h_new, 0.0)
    seen = max(state["seen"], int(np.max(lengths, initial=0))) if training else state["seen"]
    return ys, (c, h), new, seen


def bn_state_to_np(s):
    return {
        "x": {"mean": np.asarray(s.x.mean), "var": np.asarray(s.x.var)},
        "h": {"mean": np.asarray(s.h.mean), "var": np.asarray(s.h.var)},
        "c": {"mean": np.asarray(s.c.mean), "var": np.asarray(s.c.var)},
        "seen": int(s.steps_seen),
    }


def random_bn_state(seed, seen):
    """Non-trivial running statistics (means N(0, 0.09), variances log-normal) per step."""
    rng = np.random.default_rng(seed)

    def stats(n):
        mean, log_var = 0.3 * rng.normal(size=(BN_MAX, n)), 0.3 * rng.normal(size=(BN_MAX, n))
        return BatchNormState(jnp.asarray(mean, F64), jnp.asarray(np.exp(log_var), F64))

    return BNLSTMState(stats(4 * BN_H), stats(4 * BN_H), stats(BN_H), jnp.asarray(seen, jnp.int32))


@pytest.fixture(scope="module")
def bn_setup():
    bn = dict(momentum=0.8, eps=1e-3)
    cell = BNLSTMCell(BN_H, BN_MAX, norms.batch(**bn), norms.batch(bias=False, **bn), norms.batch(**bn),
                      precision=HIGHEST)  # fmt: skip
    params = random_params(cell, 20)
    assert set(params["n_x"]) == {"scale", "bias"} and set(params["n_h"]) == {"scale"}
    state = random_bn_state(24, seen=3)
    return cell, params, state


@pytest.mark.parametrize("traced_lengths", [False, True])
def test_bn_lstm_under_vmap_with_axis_name_and_lengths_equals_the_whole_batch(bn_setup, traced_lengths):
    cell, params, state = bn_setup
    xs = rand(25, (3, BN_MAX, F))
    lengths = jnp.asarray([BN_MAX, 3, 4], jnp.int32)
    whole = lnjax.bn_lstm_rnn(cell, params, state, xs, training=True, lengths=lengths)
    per_example = lambda x, n: lnjax.bn_lstm_rnn(cell, params, state, x, training=True, lengths=n,  # noqa: E731
                                                 axis_name="b")  # fmt: skip
    run = jax.vmap(per_example, in_axes=(0, 0), out_axes=(0, 0, None), axis_name="b")
    got = (jax.jit(run) if traced_lengths else run)(xs, lengths)
    assert_tree_close(got, whole)


def test_bn_lstm_traced_length_out_of_range_makes_its_outputs_and_all_statistics_nan(bn_setup):
    cell, params, state = bn_setup
    ys, carry, new = jax.jit(lambda n: lnjax.bn_lstm_rnn(cell, params, state, rand(25, (3, BN_MAX, F)),
                                                         training=True, lengths=n))(jnp.asarray([2, 9, 3]))
    np.testing.assert_array_equal(np.isnan(ys).all(axis=(1, 2)), [False, True, False])
    np.testing.assert_array_equal(np.isnan(carry.h).all(axis=1), [False, True, False])
    assert all(np.isnan(leaf[:BN_MAX]).all() for leaf in jax.tree.leaves(new[:3]))


def test_bn_lstm_init():
    cell = BNLSTMCell(BN_H, BN_MAX)
    p = cell.init(jax.random.PRNGKey(0), F)
    for k in ("n_x", "n_h", "n_c"):
        np.testing.assert_array_equal(p[k]["scale"], np.float32(0.1))  # Cooijmans et al.: gain 0.1
    assert "bias" not in p["n_h"]  # one bias b, in N_x
    np.testing.assert_array_equal(p["n_x"]["bias"][BN_H : 2 * BN_H], 1.0)  # forget-gate bias 1
    np.testing.assert_array_equal(p["n_c"]["bias"], 0.0)
    s = cell.init_state()
    assert s.x.mean.shape == (BN_MAX, 4 * BN_H) and s.c.var.shape == (BN_MAX, BN_H)
    assert int(s.steps_seen) == 0


def test_bn_lstm_training_updates_per_step_statistics(bn_setup):
    cell, params, state = bn_setup
    lengths = np.asarray([5, 4, 4, 2, 5, 3])  # longest 5 < T = 6 < max_steps = 8
    B, T_ = len(lengths), 6
    xs = rand(25, (B, T_, F))

    @fast_jit
    def train(p, s, x, L):
        with_lengths = bn_lstm_rnn(cell, p, s, x, training=True, lengths=L)
        return with_lengths, bn_lstm_rnn(cell, p, cell.init_state(F64), x, training=True)

    (ys, carry, new_state), (_, _, s2) = train(params, state, xs, jnp.asarray(lengths, jnp.int32))
    assert int(new_state.steps_seen) == 5  # max(old 3, longest length 5)
    # explicit: step t's running statistics of W_x x_t, from that step's running sequences
    wx = np.asarray(xs) @ np.asarray(params["w_x"])  # [B, T, 4H]
    for t in range(5):
        a = wx[lengths > t, t]
        n = a.shape[0]
        assert n >= 2
        exp_mean = 0.8 * np.asarray(state.x.mean[t]) + 0.2 * a.mean(0)
        exp_var = 0.8 * np.asarray(state.x.var[t]) + 0.2 * a.var(0, ddof=1)  # unbiased
        np.testing.assert_allclose(new_state.x.mean[t], exp_mean, **TIGHT)
        np.testing.assert_allclose(new_state.x.var[t], exp_var, **TIGHT)
    # steps beyond the batch's longest length (5) and beyond T keep their old statistics
    for old, new in zip(jax.tree.leaves(state[:3]), jax.tree.leaves(new_state[:3])):
        np.testing.assert_array_equal(np.asarray(new)[5:], np.asarray(old)[5:])
        assert np.all(np.abs(np.asarray(new)[:5] - np.asarray(old)[:5]) > 0)
    # everything (outputs, carry, h and c statistics too) against the NumPy transcription
    ref_ys, (ref_c, ref_h), ref_state, ref_seen = np_bn_lstm(
        to_np(params), bn_state_to_np(state), np.asarray(xs), lengths, training=True, momentum=0.8, eps=1e-3
    )
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(carry.c, ref_c, **TIGHT)
    np.testing.assert_allclose(carry.h, ref_h, **TIGHT)
    got = bn_state_to_np(new_state)
    assert got["seen"] == ref_seen
    for k in ("x", "h", "c"):
        for s in ("mean", "var"):
            np.testing.assert_allclose(got[k][s], ref_state[k][s], **TIGHT)
    # without lengths (from a fresh state), steps_seen becomes T
    assert int(s2.steps_seen) == T_
    assert np.all(np.asarray(s2.x.mean)[T_:] == 0) and np.all(np.asarray(s2.x.var)[T_:] == 1)


def test_bn_lstm_eval_uses_stored_statistics(bn_setup):
    cell, params, state = bn_setup  # steps_seen = 3
    lengths = np.asarray([10, 7, 4, 10])
    xs = rand(26, (4, 10, F))  # T = 10 > steps_seen and > max_steps: allowed in eval
    evaluate = fast_jit(lambda s, x, L=None: bn_lstm_rnn(cell, params, s, x, training=False, lengths=L))
    L = jnp.asarray(lengths, jnp.int32)
    ys, carry, out_state = evaluate(state, xs, L)
    ref_ys, (ref_c, ref_h), _, _ = np_bn_lstm(
        to_np(params), bn_state_to_np(state), np.asarray(xs), lengths, training=False, momentum=0.8, eps=1e-3
    )
    np.testing.assert_allclose(ys, ref_ys, **TIGHT)
    np.testing.assert_allclose(carry.h, ref_h, **TIGHT)
    np.testing.assert_allclose(carry.c, ref_c, **TIGHT)
    # the state is unchanged
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out_state)):
        np.testing.assert_array_equal(a, b)
    # steps >= steps_seen reuse the statistics of step steps_seen - 1: overwriting the stored
    # statistics of steps 3.. changes nothing ...
    garbage = jax.tree.map(lambda a: a.at[3:].set(123.0), state[:3])
    ys_g, _, _ = evaluate(BNLSTMState(*garbage, state.steps_seen), xs, L)
    np.testing.assert_array_equal(ys_g, ys)
    # ... while changing those of step 2 changes every output from step 2 on, but not before
    moved = jax.tree.map(lambda a: a.at[2].add(0.5), state[:3])
    ys_m, _, _ = evaluate(BNLSTMState(*moved, state.steps_seen), xs, L)
    np.testing.assert_array_equal(ys_m[:, :2], ys[:, :2])
    diff = np.abs(np.asarray(ys_m) - np.asarray(ys))
    assert np.all(diff[0, 2:].max(-1) > 0)  # sequence 0 runs all 10 steps
    # eval has no batch dependence: one sequence alone gives the same outputs
    ys_1, _, _ = evaluate(state, xs[1:2, :7])
    np.testing.assert_allclose(ys_1[0], ys[1, :7], **TIGHT)


def test_bn_lstm_training_longer_than_max_steps_raises(bn_setup):
    cell, params, state = bn_setup
    with pytest.raises(ValueError, match="max_steps"):
        bn_lstm_rnn(cell, params, state, rand(27, (2, BN_MAX + 1, F)), training=True)
    with pytest.raises(TypeError, match="training"):
        bn_lstm_rnn(cell, params, state, rand(27, (2, 3, F)), training=1)


# --------------------------------------------------------------------------------------------
# jit, grad, vmap
# --------------------------------------------------------------------------------------------


def test_jit_grad_vmap_agree_with_eager():
    cell = make_cell("rnn")
    lengths = jnp.asarray([5, 2, 0], jnp.int32)
    xs = rand(29, (3, 5, F))

    def f(p, x, L):
        ys, c = rnn(cell, p, x, lengths=L)
        return jnp.sum(jnp.tanh(ys)) + jnp.sum(c**2)

    params = random_params(cell, 21)
    # jit with lengths traced (the range check is skipped, the mask is still exact)
    jf, jg = jax.jit(f), jax.jit(jax.grad(f, (0, 1)))
    np.testing.assert_allclose(jf(params, xs, lengths), f(params, xs, lengths), **TIGHT)
    assert_tree_close(jg(params, xs, lengths), jax.grad(f, (0, 1))(params, xs, lengths))
    # vmap over parameters of several seeds
    seeds = [random_params(cell, s) for s in (30, 31, 32)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *seeds)
    out = jax.jit(jax.vmap(f, (0, None, None)))(stacked, xs, lengths)
    np.testing.assert_allclose(out, [jf(p, xs, lengths) for p in seeds], **TIGHT)
    grads = jax.jit(jax.vmap(jax.grad(f, (0, 1)), (0, None, None)))(stacked, xs, lengths)
    for k, p in enumerate(seeds):
        assert_tree_close(jax.tree.map(lambda a: a[k], grads), jg(p, xs, lengths))
    # vmap over examples (unbatched [T, F] inputs, lengths batched under vmap)
    run = jax.jit(lambda x, L: rnn(cell, params, x, lengths=L))
    assert_tree_close(jax.jit(jax.vmap(run))(xs, lengths), run(xs, lengths))


# --------------------------------------------------------------------------------------------
# warnings and errors
# --------------------------------------------------------------------------------------------


def init_shapes(cell, input_size):
    """`cell.init` traced abstractly: the warning is raised at trace time, nothing compiles."""
    return jax.eval_shape(lambda: cell.init(jax.random.PRNGKey(0), input_size))


@pytest.mark.parametrize("cls", [LSTMCell, GRUCell])
def test_one_input_feature_with_a_named_input_norm_is_an_error(cls):
    for norm in ("layer", "rms"):
        with pytest.raises(ValueError, match="input_size=1") as err:
            init_shapes(cls(H, norm, norm), 1)
        # names the argument and both remedies
        assert "input_norm=None" in str(err.value) and f"input_norm=lnjax.norms.{norm}()" in str(err.value)
        with pytest.warns(UserWarning, match="may fail to learn"):
            init_shapes(cls(H, norm, norm), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init_shapes(cls(H, norms.layer()), 1)  # the paper's form, chosen explicitly
        init_shapes(cls(H, None), 1)  # recurrent terms only
        init_shapes(cls(H), 9)  # many features: no warning
        init_shapes(RNNCell(H), 1)  # normalizes the sum (eq. 4): nothing lost
        for unnormalized in ("none", "bias", "identity"):  # shortcuts that normalize nothing
            init_shapes(cls(H, unnormalized), 1)


def test_one_feature_sequence_task_trains_with_recurrent_only_normalization():
    """The documented remedy: with one feature per step, LN on the recurrent terms only reads
    the input's magnitude, so a sum of a sequence is learnable (the paper's form sees only
    signs and cannot fit it: its loss stays far higher)."""
    import optax

    def task(key):
        x = jax.random.uniform(key, (64, 6, 1), jnp.float32, 0.0, 1.0)
        return x, x.sum((1, 2))

    def fit(cell):
        opt = optax.adam(3e-2)

        def loss(p, x, y):
            _, carry = rnn(cell, p["cell"], x)
            return jnp.mean((carry.h @ p["w"] - y) ** 2)

        @jax.jit
        def train(key):
            p = {"cell": cell.init(key, 1), "w": jnp.ones((16,), jnp.float32)}
            with jax.numpy_dtype_promotion("standard"):
                s = opt.init(p)

            def body(c, k):
                p, s = c
                value, g = jax.value_and_grad(loss)(p, *task(k))
                with jax.numpy_dtype_promotion("standard"):
                    u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), value

            (p, _), _ = jax.lax.scan(body, (p, s), jax.random.split(key, 300))
            return loss(p, *task(jax.random.key(99)))

        return float(train(jax.random.key(0)))

    recurrent_only, paper = fit(LSTMCell(16, None)), fit(LSTMCell(16, norms.layer()))
    variance = 6 / 12  # of the target: the loss of predicting its mean
    assert recurrent_only < 0.05 * variance, recurrent_only
    assert paper > 2 * recurrent_only, (paper, recurrent_only)


@pytest.mark.parametrize("reverse", [False, True])
def test_traced_lengths_out_of_range_make_exactly_those_sequences_nan(reverse):
    """Eagerly, lengths outside [0, T] are a ValueError; traced under jit they cannot raise, so
    those sequences' outputs and carries are NaN (not those of a clipped length), and the
    other sequences are unchanged."""
    cell = make_cell("lstm")
    p = random_params(cell, 3)
    xs = rand(33, (4, 5, F))
    run = jax.jit(lambda L: rnn(cell, p, xs, lengths=L, reverse=reverse))
    ys, carry = run(jnp.asarray([5, 6, -1, 2], jnp.int32))
    ref_ys, ref_carry = rnn(cell, p, xs, lengths=jnp.asarray([5, 5, 0, 2], jnp.int32), reverse=reverse)
    for got, want in ((ys, ref_ys), *zip(carry, ref_carry)):
        got, want = np.asarray(got), np.asarray(want)
        assert np.all(np.isnan(got[1:3]))
        np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], **TIGHT)
    in_range = run(jnp.asarray([5, 0, 3, 2], jnp.int32))
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(in_range))


def test_bad_inputs_raise_clear_errors():
    cell = make_cell("lstm")
    p = random_params(cell, 0, dtype=jnp.float32)
    xs = jnp.zeros((2, 4, F), jnp.float32)
    for pre in (True, False):
        with pytest.raises(ValueError, match=f"input size {F}"):
            rnn(cell, p, jnp.zeros((2, 4, F + 1), jnp.float32), precompute_inputs=pre)
    with pytest.raises(ValueError, match="lengths"):
        rnn(cell, p, xs, lengths=jnp.asarray([1, 2, 3], jnp.int32))
    with pytest.raises(ValueError, match="lengths"):
        rnn(cell, p, xs, lengths=jnp.asarray([[1, 2]], jnp.int32))
    with pytest.raises(ValueError, match="lengths"):
        rnn(cell, p, xs, lengths=jnp.asarray([5, 2], jnp.int32))  # > T = 4
    with pytest.raises(ValueError, match="lengths"):
        rnn(cell, p, xs, lengths=jnp.asarray([-1, 2], jnp.int32))
    with pytest.raises(TypeError, match="lengths"):
        rnn(cell, p, xs, lengths=jnp.asarray([1.0, 2.0], jnp.float32))
    with pytest.raises(TypeError, match="xs"):
        rnn(cell, p, jnp.zeros((2, 4, F), jnp.int32))
    with pytest.raises(ValueError, match="xs"):
        rnn(cell, p, jnp.zeros((F,), jnp.float32))
    for cls in (LSTMCell, GRUCell, RNNCell):
        with pytest.raises(ValueError, match="norm"):
            cls(H, "layr")
        with pytest.raises(TypeError, match="stateful"):
            cls(H, norms.batch())
        with pytest.raises(TypeError, match="Normalizer"):
            cls(H, 3)
        with pytest.raises(ValueError, match="hidden_size"):
            cls(0)
    with pytest.raises(TypeError, match="not stateful"):
        BNLSTMCell(H, 4, input_norm=norms.layer())
    with pytest.raises(ValueError, match="hidden_size"):
        BNLSTMCell(0, 4)
    with pytest.raises(ValueError, match="max_steps"):
        BNLSTMCell(H, 0)
    with pytest.raises(ValueError, match="input_size"):
        make_cell("gru").init(jax.random.PRNGKey(0), 0)
    # Settings that used to slip through (issue 30, item 7).
    with pytest.raises(TypeError, match="`forget_bias` must be a real number"):
        LSTMCell(H, forget_bias="1")
    with pytest.raises(ValueError, match="`forget_bias` must be finite"):
        LSTMCell(H, forget_bias=float("nan"))
    with pytest.raises(TypeError, match="`forget_bias` must be a real number"):
        BNLSTMCell(H, 4, forget_bias=None)
    with pytest.raises(TypeError, match="`carry_normalized_cell` must be a Python bool"):
        LSTMCell(H, carry_normalized_cell="yes")
    for cls in (LSTMCell, GRUCell, RNNCell):
        for dtype in (jnp.int32, jnp.int8, "int8", bool):
            with pytest.raises(TypeError, match="`dtype` .*must be a floating dtype"):
                cls(H, dtype=dtype)


def per_gate_gru_rnn_cells(**options):
    g4, ln, rms = norms.layer(groups=4, **options), norms.layer(**options), norms.rms(**options)
    return [LSTMCell(6, g4, g4, ln, precision=HIGHEST), GRUCell(6, rms, rms, precision=HIGHEST),
            RNNCell(6, ln, precision=HIGHEST)]  # fmt: skip


@pytest.mark.parametrize("k", range(3), ids=["lstm-per-gate", "gru-rms", "rnn"])
def test_fused_norm_implementation_gives_the_same_outputs_and_gradients(k):
    # The default (fused closed-form derivatives) against autodiff of the formula.
    fused, cell = per_gate_gru_rnn_cells()[k], per_gate_gru_rnn_cells(implementation="xla")[k]
    params = cell.init(jax.random.key(3), 16, jnp.float64)
    xs = jax.random.normal(jax.random.key(4), (2, 5, 16), jnp.float64)

    def loss(c, p):
        ys, _ = lnjax.rnn(c, p, xs, lengths=jnp.array([5, 3]))
        return jnp.sum(ys * jnp.cos(ys))

    want, gwant = jax.value_and_grad(lambda p: loss(cell, p))(params)
    got, ggot = jax.jit(jax.value_and_grad(lambda p: loss(fused, p)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(ggot), jax.tree.leaves(gwant)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_rnn_runs_inside_shard_map_with_sharded_inputs():
    # Inside shard_map the default zero carry must be marked varying like the sharded inputs,
    # or lax.scan refuses the carry type (what data-parallel training hits).
    from jax.sharding import AxisType, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    cell = lnjax.LSTMCell(4, norms.layer())
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float32)
    bn = lnjax.BNLSTMCell(4, max_steps=5)
    bparams, bstate = bn.init(jax.random.key(2), 3), bn.init_state()

    def f(p, bp, bs, xs):
        ys, _ = lnjax.rnn(cell, p, xs, lengths=jnp.array([5, 2]))
        bys, _, _ = lnjax.bn_lstm_rnn(bn, bp, bs, xs, training=True, axis_name="data")
        return ys, bys

    sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P(), P("data")), out_specs=P("data")))
    for got, want in zip(sharded(params, bparams, bstate, xs),
                         _unsharded(f, params, bparams, bstate, xs)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _unsharded(f, p, bp, bs, xs):
    # axis_name needs a named axis outside shard_map too: a size-1 vmap provides it.
    ys, bys = jax.vmap(f, in_axes=(None, None, None, 0), axis_name="data")(p, bp, bs, xs[None])
    return ys[0], bys[0]


@pytest.mark.parametrize("make", [lnjax.RNNCell, lnjax.LSTMCell, lnjax.GRUCell])
def test_divisive_cells_over_the_whole_layer_with_sigma_zero_are_layer_norm_cells(make):
    # Ren et al.: LN is divisive normalization with both fields the whole layer and sigma = 0.
    terms = 1 if make is lnjax.RNNCell else 2
    dn, ln = make(6, *[norms.divisive(None, sigma=0.0)] * terms), make(6, *[norms.layer(eps=0.0)] * terms)
    params = ln.init(jax.random.key(5), 3, jnp.float64)
    assert jax.tree.structure(dn.init(jax.random.key(5), 3, jnp.float64)) == jax.tree.structure(params)
    xs = jax.random.normal(jax.random.key(6), (2, 4, 3), jnp.float64)
    np.testing.assert_allclose(lnjax.rnn(dn, params, xs)[0], lnjax.rnn(ln, params, xs)[0], rtol=1e-10, atol=1e-12)
    # A local window is a different function.
    local = make(6, *[norms.divisive(1, sigma=0.0)] * terms)
    assert not np.allclose(lnjax.rnn(local, params, xs)[0], lnjax.rnn(ln, params, xs)[0], atol=1e-3)


def test_nan_in_padding_reaches_no_output_and_no_gradient():
    cell = lnjax.LSTMCell(4, norms.layer())
    params = cell.init(jax.random.key(7), 3, jnp.float64)
    xs = jax.random.normal(jax.random.key(8), (2, 5, 3), jnp.float64)
    lengths = jnp.array([5, 2])
    poisoned = xs.at[1, 2:].set(jnp.nan)
    bn = lnjax.BNLSTMCell(4, max_steps=5)
    bparams, bstate = bn.init(jax.random.key(9), 3, jnp.float64), bn.init_state(jnp.float64)

    def loss(p, bp, xs):
        ys, _ = lnjax.rnn(cell, p, xs, lengths=lengths)
        bys, _, _ = lnjax.bn_lstm_rnn(bn, bp, bstate, xs, training=True, lengths=lengths)
        return jnp.sum(ys ** 2) + jnp.sum(bys ** 2)

    want = jax.value_and_grad(loss, argnums=(0, 1))(params, bparams, xs)
    got = jax.value_and_grad(loss, argnums=(0, 1))(params, bparams, poisoned)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_default_projection_form_follows_the_batch_size_on_cpu():
    # BENCHMARKS.md, "projection form": hoisted for small batches, per step for large ones.
    pick = lnjax.heuristics.default_precompute_inputs
    if jax.default_backend() == "cpu":
        assert [pick(b) for b in (1, 8, 16, 32, None)] == [True, True, False, False, False]
    else:
        assert all(pick(b) for b in (1, 8, 16, 32, None))


@pytest.mark.parametrize("cell", [LSTMCell(32), GRUCell(32), RNNCell(32), BNLSTMCell(32, max_steps=4)],
                         ids=["lstm", "gru", "rnn", "bn_lstm"])
def test_recurrent_init_is_per_block_orthogonal_with_one_qr(cell):
    """`w_h` is one `jax.nn.initializers.orthogonal()` matrix per gate block, each from its own
    key, made by one batched QR per cell: with two batched QRs in one program, XLA:CPU's
    LAPACK kernels deadlock a 2-core machine's thread pool when a sweep's init is vmapped."""
    key = jax.random.PRNGKey(7)
    w_h = cell.init(key, 5)["w_h"]
    H = 32
    blocks = w_h.shape[-1] // H
    _, kh = jax.random.split(key)
    expect = [jax.nn.initializers.orthogonal()(k, (H, H), jnp.float32) for k in jax.random.split(kh, blocks)]
    np.testing.assert_allclose(w_h, np.concatenate(expect, -1), rtol=0, atol=2e-6)
    sweep = jax.jit(jax.vmap(lambda k: cell.init(k, 5))).lower(jax.random.split(key, 30)).as_text()
    assert sweep.count("lapack_sgeqrf") == 1, "one QR per cell init"
