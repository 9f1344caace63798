"""lnjax's Flax modules through the kinds of checks Flax runs on its own normalization and
recurrent layers, written here from the behaviour Flax documents (not copied from its tests).

Where Flax has the module, lnjax's output is compared with Flax's over a product of dtypes,
masks, feature axes and variance modes (with the options that ask for Flax's behaviour where
lnjax's contract differs on purpose: README, "Coming from Flax"); the cells run in Flax's own
`nnx.RNN` / `nn.RNN` with Flax's weights; `initialize_carry` has Flax's signature and carry;
parameter names and shapes match. What lnjax refuses on purpose (complex inputs) is a
TypeError naming the argument.
"""

import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lnjax
import lnjax.linen
import lnjax.nnx

SHAPE = (4, 3, 5, 6)  # [batch, height, width, channels]


@pytest.fixture(autouse=True)
def _standard_promotion():
    # Flax mixes float32 statistics with bfloat16 inputs, which conftest's strict promotion refuses
    with jax.numpy_dtype_promotion("standard"):
        yield


def _rand(shape, dtype=jnp.float32, seed=0, loc=0.5):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, 2.0, shape), dtype)


def _close(got, want, dtype=jnp.float32):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=tol, atol=tol)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


# --- normalization layers against Flax's ------------------------------------------------------

# (layer, options both take, Flax's extra ones, lnjax's extra ones, num_features for x of SHAPE)
NORM_CASES = [
    ("LayerNorm", dict(), {}, {}, 6),
    ("LayerNorm", dict(reduction_axes=(1, 2, 3), feature_axes=-1), {}, {}, 6),
    ("LayerNorm", dict(reduction_axes=(2, 3), feature_axes=(2, 3), use_scale=False), {}, {}, 30),
    ("RMSNorm", dict(), {}, {}, 6),
    ("RMSNorm", dict(reduction_axes=(1, 2, 3), feature_axes=-1), {}, {}, 6),
    ("GroupNorm", dict(num_groups=3), {}, {}, 6),
    ("GroupNorm", dict(num_groups=None, group_size=3, use_bias=False), {}, {}, 6),
    ("InstanceNorm", dict(), {}, {}, 6),
    ("InstanceNorm", dict(feature_axes=(2, 3)), {}, {}, 30),
    ("InstanceNorm", dict(feature_axes=(1, -1), use_scale=False), {}, {}, 18),
]  # fmt: skip
NORM_IDS = [f"{c[0]}-{i}" for i, c in enumerate(NORM_CASES)]


def _variance(name, fast):
    """RMSNorm has no mean, so no variance formula to choose."""
    return {} if name == "RMSNorm" else dict(use_fast_variance=fast)


def _perturbed(tree, seed=1):
    """Parameters away from their init (1, 0), so that a mix-up of scale and bias shows."""
    leaves, tdef = jax.tree.flatten(tree)
    return tdef.unflatten([leaf + 0.1 * _rand(leaf.shape, leaf.dtype, seed + i, 0.0) for i, leaf in enumerate(leaves)])


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,kw,flax_kw,lnjax_kw,nf", NORM_CASES, ids=NORM_IDS)
def test_nnx_layers_equal_flax(name, kw, flax_kw, lnjax_kw, nf, dtype, fast):
    """Same parameter tree (names, shapes), and with the same parameters the same output as
    Flax's nnx layer, in an explicit output dtype, exact or one-pass variance."""
    kw = dict(kw, epsilon=1e-5, dtype=dtype, **_variance(name, fast))
    theirs = getattr(nnx, name)(nf, **kw, **flax_kw, rngs=nnx.Rngs(0))
    ours = getattr(lnjax.nnx, name)(nf, **kw, **lnjax_kw, rngs=nnx.Rngs(0))
    assert _shapes(nnx.state(ours, nnx.Param)) == _shapes(nnx.state(theirs, nnx.Param))
    params = _perturbed(nnx.state(theirs, nnx.Param))
    nnx.update(theirs, params)
    nnx.update(ours, params)
    x = _rand(SHAPE, dtype)
    _close(ours(x), theirs(x), dtype)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name,kw,flax_kw,lnjax_kw,nf", NORM_CASES[::2], ids=NORM_IDS[::2])
def test_linen_layers_equal_flax(name, kw, flax_kw, lnjax_kw, nf, fast):
    kw = dict(kw, epsilon=1e-5, **_variance(name, fast))
    x = _rand(SHAPE)
    variables = getattr(nn, name)(**kw, **flax_kw).init(jax.random.key(0), x)
    assert _shapes(getattr(lnjax.linen, name)(**kw, **lnjax_kw).init(jax.random.key(0), x)) == _shapes(variables)
    variables = _perturbed(variables)
    _close(getattr(lnjax.linen, name)(**kw, **lnjax_kw).apply(variables, x),
           getattr(nn, name)(**kw, **flax_kw).apply(variables, x))  # fmt: skip


@pytest.mark.parametrize("feature_axes", [0, (0, 3), (-4, 1)])
def test_instance_norm_refuses_the_batch_axis_as_flax(feature_axes):
    """Flax: "The channel axes cannot include the leading dimension" (a ValueError)."""
    x = _rand(SHAPE)
    with pytest.raises(ValueError):
        nn.InstanceNorm(feature_axes=feature_axes).init(jax.random.key(0), x)
    for layer in (lnjax.nnx.InstanceNorm(6, feature_axes=feature_axes), lnjax.linen.InstanceNorm(feature_axes=feature_axes)):
        with pytest.raises(ValueError, match=r"batch axis 0"):
            layer(x) if isinstance(layer, nnx.Module) else layer.init(jax.random.key(0), x)


def test_instance_norm_feature_axes_op():
    """The op with several channel axes: per example and channel pair, over the other axes."""
    x = _rand(SHAPE)
    y = lnjax.instance_norm(x, axis=(1, 3), eps=0.0)
    xf = np.asarray(x, np.float64)
    want = (xf - xf.mean(axis=2, keepdims=True)) / xf.std(axis=2, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"`scale` has shape \(6,\), expected \(3, 6\)"):
        lnjax.instance_norm(x, jnp.ones(6), axis=(1, 3))
    with pytest.raises(ValueError, match="one spatial position"):
        lnjax.instance_norm(x, axis=(1, 2, 3))


# --- BatchNorm: training, running statistics, masks -------------------------------------------

# Masks of Flax's form: broadcastable to x, of its rank (each dimension 1 or x's).
MASK_SHAPES = [None, (4, 3, 5, 1), (4, 1, 1, 1), (4, 3, 5, 6), (1, 3, 1, 6), (4, 1, 5, 6)]


def _mask(shape, seed=3):
    if shape is None:
        return None
    m = np.random.default_rng(seed).random(shape) > 0.35
    m.flat[0] = True  # some data in every feature's statistics is not needed, but keeps it simple
    return jnp.asarray(m)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
def test_batch_norm_equals_flax(mshape, fast):
    """Training steps then evaluation: outputs and running statistics equal Flax's (with Flax's
    biased running variance), for every mask form Flax takes, nnx and linen."""
    mask, x = _mask(mshape), _rand(SHAPE)
    kw = dict(momentum=0.8, epsilon=1e-5, use_fast_variance=fast)
    theirs = nnx.BatchNorm(6, **kw, rngs=nnx.Rngs(0))
    ours = lnjax.nnx.BatchNorm(6, **kw, unbiased_running_var=False)
    for step in range(2):
        xs = x + step
        _close(ours(xs, mask=mask), theirs(xs, mask=mask))
    for k in ("mean", "var"):
        _close(getattr(ours, k)[...], getattr(theirs, k)[...])
    _close(ours(x, use_running_average=True), theirs(x, use_running_average=True))
    # linen: the same, through `batch_stats`
    fl, ll = nn.BatchNorm(use_running_average=False, **kw), lnjax.linen.BatchNorm(use_running_average=False, **kw,
                                                                                  unbiased_running_var=False)
    v = fl.init(jax.random.key(0), x, mask=mask)
    assert _shapes(ll.init(jax.random.key(0), x, mask=mask)) == _shapes(v)
    (yf, sf), (yl, sl) = (m.apply(v, x, mask=mask, mutable=["batch_stats"]) for m in (fl, ll))
    _close(yl, yf)
    jax.tree.map(_close, sl, sf)


def test_batch_norm_per_position_mask_is_the_elementwise_one():
    """lnjax's own form (`x.shape` without the feature axis) is the elementwise mask with a
    size-1 feature axis."""
    x, m = _rand(SHAPE), _mask((4, 3, 5))
    for axis, fshape, pos, elementwise in ((-1, 6, m, m[..., None]), ((2, 3), (5, 6), m[..., 0], m[:, :, :1, None])):
        state = lnjax.batch_norm_state(fshape)
        a = lnjax.batch_norm(x, None, None, state, training=True, axis=axis, mask=pos)
        b = lnjax.batch_norm(x, None, None, state, training=True, axis=axis, mask=elementwise)
        jax.tree.map(_close, a, b)


@pytest.mark.parametrize("mshape", [(4, 3, 5, 2), (3, 5, 6), (6,), (4, 3, 1), (2, 4, 3, 5, 6), ()], ids=str)
def test_batch_norm_refuses_other_mask_shapes(mshape):
    x = _rand(SHAPE)
    with pytest.raises(ValueError, match=rf"`mask` has shape {re_shape(mshape)}.*elementwise"):
        lnjax.nnx.BatchNorm(6)(x, mask=jnp.ones(mshape, bool))
    with pytest.raises(TypeError, match="`mask` must be boolean"):
        lnjax.batch_norm(x, None, None, lnjax.batch_norm_state(6), training=True, mask=jnp.ones(SHAPE))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@jax.jit
def _masked_step(x, mask):
    """`batch_norm`'s output and new state (from mean 0.3, variance 2), and the gradient of a
    weighted sum of its unmasked outputs."""
    state = lnjax.BatchNormState(jnp.full(x.shape[-1], 0.3, x.dtype), jnp.full(x.shape[-1], 2.0, x.dtype))

    def loss(x):
        y, new = lnjax.batch_norm(x, None, None, state, training=True, momentum=0.5, eps=1e-3, mask=mask,
                                  unbiased_running_var=False)  # fmt: skip
        weights = jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)
        return jnp.sum(jnp.where(jnp.broadcast_to(mask, y.shape), y, 0) * weights), (y, new)

    g, (y, new) = jax.grad(loss, has_aux=True)(x)
    return y, new, g


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_elementwise_mask_statistics(data):
    """Property: with any elementwise mask, each feature's statistics are those of its
    unmasked entries; the running averages of a feature with none stay as they were; masked
    entries, even NaN, reach no gradient."""
    shape = data.draw(st.tuples(st.integers(2, 4), st.integers(1, 3), st.integers(1, 3)), "shape")
    mshape = tuple(data.draw(st.sampled_from([1, n]), f"mask dim {i}") for i, n in enumerate(shape))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    small = rng.random(mshape) > 0.4
    mask = np.broadcast_to(small, shape)
    x = rng.normal(0.0, 1.0, shape)
    y, new, g = _masked_step(jnp.asarray(np.where(mask, x, np.nan), jnp.float32), jnp.asarray(small))
    for f in range(shape[-1]):
        v = x[..., f][mask[..., f]]
        if v.size == 0:  # no data: the running averages as they were
            assert (float(new.mean[f]), float(new.var[f])) == (np.float32(0.3), np.float32(2.0))
            continue
        np.testing.assert_allclose(float(new.mean[f]), 0.5 * 0.3 + 0.5 * v.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(new.var[f]), 0.5 * 2.0 + 0.5 * v.var(), rtol=1e-4, atol=1e-6)
        want = (v - v.mean()) / np.sqrt(v.var() + 1e-3)
        np.testing.assert_allclose(np.asarray(y[..., f])[mask[..., f]], want, rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.where(mask, 0.0, g) == 0))


# --- what lnjax refuses, and the options it checks when the layer is built ---------------------


def _complex(shape):
    return (_rand(shape) + 1j * _rand(shape, seed=1)).astype(jnp.complex64)


def test_complex_inputs_are_refused_naming_the_argument():
    """Flax's BatchNorm and its GRU/Simple cells take complex64; lnjax refuses complex input
    (README, "Coming from Flax"): a TypeError naming `x`, from the ops, layers and cells."""
    x = _complex((4, 3, 6))
    state = lnjax.batch_norm_state(6)
    ops = [lambda: lnjax.layer_norm(x), lambda: lnjax.rms_norm(x), lambda: lnjax.group_norm(x, 2),
           lambda: lnjax.instance_norm(x), lambda: lnjax.moments(x),
           lambda: lnjax.batch_norm(x, None, None, state, training=True)]  # fmt: skip
    layers = [lnjax.nnx.LayerNorm(6), lnjax.nnx.RMSNorm(6), lnjax.nnx.BatchNorm(6), lnjax.nnx.InstanceNorm(6),
              lnjax.nnx.GroupNorm(6, 2)]  # fmt: skip
    ops += [lambda m=m: m(x) for m in layers]
    ops += [lambda m=m: m.init(jax.random.key(0), x) for m in (lnjax.linen.LayerNorm(), lnjax.linen.BatchNorm(False))]
    for name in ("GRUCell", "SimpleCell", "LSTMCell"):
        cell = getattr(lnjax.nnx, name)(6, 4, input_norm=None, rngs=nnx.Rngs(0)) if name != "SimpleCell" else \
            lnjax.nnx.SimpleCell(6, 4, rngs=nnx.Rngs(0))  # fmt: skip
        ops.append(lambda c=cell: c(c.initialize_carry(x.shape), x))
        ops.append(lambda c=cell: lnjax.nnx.RNN(c)(x))
    for op in ops:
        with pytest.raises(TypeError, match="`(x|inputs)` must be a real floating-point array, got dtype complex64"):
            op()


@pytest.mark.parametrize("frontend", ["nnx", "linen"])
def test_options_are_checked_under_the_layers_names(frontend):
    """An option that the op checks too is checked when the layer is built, and named as the
    layer names it (`epsilon`, not the op's `eps`); a string is not a bool."""
    make = (lambda name, **kw: getattr(lnjax.nnx, name)(6, **kw)) if frontend == "nnx" else \
        (lambda name, **kw: getattr(lnjax.linen, name)(**kw))  # fmt: skip
    for name in ("LayerNorm", "RMSNorm", "BatchNorm", "InstanceNorm"):
        with pytest.raises(ValueError, match=r"`epsilon` must be >= 0, got -1"):
            make(name, epsilon=-1)
    for name, option in (("LayerNorm", "use_fast_variance"), ("BatchNorm", "use_fast_variance"), ("LayerNorm", "use_bias"),
                         ("BatchNorm", "unbiased_running_var"), ("GroupNorm", "use_scale")):  # fmt: skip
        with pytest.raises(TypeError, match=rf"`{option}` must be a Python bool, got 'yes'"):
            make(name, **{option: "yes"}, **({"num_groups": 2} if name == "GroupNorm" else {}))
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\], got 1.5"):
        make("BatchNorm", momentum=1.5)
    no = r"`use_running_average` must be True, False or None, got 'no'"
    with pytest.raises(TypeError, match=no):
        make("BatchNorm", use_running_average="no")
    x = _rand((4, 6))
    with pytest.raises(TypeError, match=no):
        if frontend == "nnx":
            make("BatchNorm")(x, use_running_average="no")
        else:
            make("BatchNorm").init(jax.random.key(0), x, use_running_average="no")
    if frontend == "nnx":  # an attribute set after construction, and `nnx.view`
        m = make("LayerNorm")
        m.epsilon = -1.0
        with pytest.raises(ValueError, match="`epsilon`"):
            m(x)
        with pytest.raises(TypeError, match=no):
            nnx.view(make("BatchNorm"), use_running_average="no")


# --- recurrent cells --------------------------------------------------------------------------

IN, H, B, T = 10, 3, 4, 6  # more than 8 inputs: no few-input-features warning
CELL_NAMES = ["LSTMCell", "GRUCell", "SimpleCell"]
BLOCKS = {"LSTMCell": 4, "GRUCell": 3, "SimpleCell": 1}
PLAIN = {"LSTMCell": dict(input_norm=None, recurrent_norm=None, cell_norm=None),
         "GRUCell": dict(input_norm=None, recurrent_norm=None), "SimpleCell": dict(norm=None)}  # fmt: skip


def _from_flax(name, p):
    """lnjax's parameters of the unnormalized cell computing what Flax's nnx cell `p` does."""
    cat = lambda *a: jnp.concatenate(a, axis=-1)  # noqa: E731
    if name == "LSTMCell":  # Flax: i = sigmoid(W_ii x + W_hi h + b_hi), ... ; one bias, on the h side
        gates = ("i", "f", "g", "o")
        return {"w_x": cat(*(p["i" + g + ("_" if g == "f" else "")]["kernel"] for g in gates)),
                "w_h": cat(*(p["h" + g]["kernel"] for g in gates)),
                "n_x": {"bias": jnp.zeros(4 * H, jnp.float32)}, "n_h": {"bias": cat(*(p["h" + g]["bias"] for g in gates))}}
    b = p["dense_i"]["bias"]
    if name == "GRUCell":  # Flax's nnx GRU: biases on the input side only
        return {"w_x": p["dense_i"]["kernel"], "w_h": p["dense_h"]["kernel"],
                "n_x_gates": {"bias": b[: 2 * H]}, "n_x_cand": {"bias": b[2 * H :]},
                "n_h_gates": {"bias": jnp.zeros(2 * H, jnp.float32)}, "n_h_cand": {"bias": jnp.zeros(H, jnp.float32)}}
    return {"w_x": p["dense_i"]["kernel"], "w_h": p["dense_h"]["kernel"], "n": {"bias": b}}  # fmt: skip


@pytest.mark.parametrize("name", CELL_NAMES)
def test_cells_compute_flax_cells_in_flax_rnn(name):
    """With Flax's weights, lnjax's unnormalized cells run in Flax's `nnx.RNN` and `nn.RNN` (and
    lnjax's `RNN`) give Flax's cell's outputs and carry, gate order and update included."""
    theirs = getattr(nnx, name)(IN, H, rngs=nnx.Rngs(0))
    p = _perturbed(nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
    nnx.update(theirs, p)
    ours = getattr(lnjax.nnx, name)(IN, H, **PLAIN[name], rngs=nnx.Rngs(0))
    params = _from_flax(name, p)
    nnx.update(ours, params)
    xs, lengths = _rand((B, T, IN)), jnp.array([6, 2, 1, 4], int)
    want_carry, want = nnx.RNN(theirs, return_carry=True)(xs, seq_lengths=lengths)
    valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    lin = getattr(lnjax.linen, name)(H, **PLAIN[name])
    for carry, ys in (nnx.RNN(ours, return_carry=True)(xs, seq_lengths=lengths),
                      lnjax.nnx.RNN(ours, return_carry=True)(xs, seq_lengths=lengths),
                      nn.RNN(lin, return_carry=True).apply({"params": {"cell": params}}, xs, seq_lengths=lengths)):
        jax.tree.map(_close, tuple(carry) if name == "LSTMCell" else carry, want_carry)
        _close(jnp.where(valid, ys, 0), jnp.where(valid, want, 0))  # lnjax's outputs zeros on padding


@pytest.mark.parametrize("name", CELL_NAMES)
def test_initialize_carry_is_flax(name):
    """Flax's signatures (nnx: `(input_shape, rngs=None, carry_init=None)`; linen: `(rng,
    input_shape)` with a `carry_init` field), and Flax's carry for the same initializer and
    keys: the call's `carry_init`, else the constructor's, else zeros."""
    ours, theirs = getattr(lnjax.nnx, name)(IN, H, rngs=nnx.Rngs(0)), getattr(nnx, name)(IN, H, rngs=nnx.Rngs(0))
    sig = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert sig(ours.initialize_carry) == sig(theirs.initialize_carry) == ["input_shape", "rngs", "carry_init"]
    assert ours.num_feature_axes == theirs.num_feature_axes == 1
    init = jax.nn.initializers.normal(1.0)
    flat = lambda c: tuple(c) if name == "LSTMCell" else (c,)  # noqa: E731
    got, want = (m.initialize_carry((B, IN), nnx.Rngs(carry=3), carry_init=init) for m in (ours, theirs))
    jax.tree.map(np.testing.assert_array_equal, flat(got), flat(want))
    ctor = getattr(lnjax.nnx, name)(IN, H, carry_init=init, rngs=nnx.Rngs(0))
    jax.tree.map(np.testing.assert_array_equal, flat(ctor.initialize_carry((B, IN), nnx.Rngs(carry=3))), flat(want))
    for c in flat(ours.initialize_carry((2, B, IN))):  # zeros, no key needed
        assert c.shape == (2, B, H) and c.dtype == jnp.float32 and not c.any()
    with pytest.raises(TypeError, match="`carry_init`.*pass `rngs`"):
        ours.initialize_carry((B, IN), carry_init=init)
    with pytest.raises(TypeError, match="`carry_init` must be None or an initializer"):
        getattr(lnjax.nnx, name)(IN, H, carry_init=1.0, rngs=nnx.Rngs(0))
    lin, flin = getattr(lnjax.linen, name)(H, carry_init=init), getattr(nn, name)(H, carry_init=init)
    assert sig(lin.initialize_carry) == sig(flin.initialize_carry) == ["rng", "input_shape"]
    got, want = (m.initialize_carry(jax.random.key(4), (B, IN)) for m in (lin, flin))
    jax.tree.map(np.testing.assert_array_equal, flat(got), flat(want))


@pytest.mark.parametrize("name", CELL_NAMES)
def test_rnn_layers_start_from_the_cells_carry_init(name):
    """`lnjax.nnx.RNN` and `lnjax.linen.RNN`, as Flax's, start from the cell's `carry_init`."""
    ones = jax.nn.initializers.ones
    xs = _rand((B, T, IN))
    m = getattr(lnjax.nnx, name)(IN, H, carry_init=ones, rngs=nnx.Rngs(0))
    start = m.initialize_carry((B, IN))
    got = lnjax.nnx.RNN(m)(xs)
    _close(got, lnjax.nnx.RNN(m)(xs, initial_carry=start))
    assert not np.allclose(got, lnjax.nnx.RNN(getattr(lnjax.nnx, name)(IN, H, rngs=nnx.Rngs(0)))(xs))
    lm = getattr(lnjax.linen, name)(H, carry_init=ones)
    v = lnjax.linen.RNN(lm).init(jax.random.key(0), xs)
    _close(lnjax.linen.RNN(lm).apply(v, xs), lnjax.linen.RNN(lm).apply(v, xs, initial_carry=start))
    _close(nn.RNN(lm).apply(v, xs), lnjax.linen.RNN(lm).apply(v, xs))


def _arange_init(offset):
    """A deterministic initializer: distinct values that depend on the shape only."""
    return lambda key, shape, dtype=jnp.float32: (offset + jnp.arange(math.prod(shape)).reshape(shape) / 100).astype(dtype)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_cell_initializers(name):
    """`kernel_init`, `recurrent_kernel_init` and `bias_init` (Flax's cell arguments): called per
    gate, each with its own key, as Flax's LSTM cells; the parameters are their outputs; None
    keeps lnjax's own draws."""
    k, r, b = _arange_init(0.0), _arange_init(1.0), _arange_init(2.0)
    n = BLOCKS[name]
    inits = dict(kernel_init=k, recurrent_kernel_init=r, bias_init=b)
    cat = lambda f, shape: jnp.concatenate([f(None, shape)] * n, axis=-1)  # noqa: E731
    ours = getattr(lnjax.nnx, name)(IN, H, **inits, rngs=nnx.Rngs(0)).params
    lm = getattr(lnjax.linen, name)(H, **inits)
    lin = lm.init(jax.random.key(0), lm.initialize_carry(None, (B, IN)), jnp.ones((B, IN)))
    for p in (ours, lin["params"]):
        np.testing.assert_array_equal(p["w_x"], cat(k, (IN, H)))
        np.testing.assert_array_equal(p["w_h"], cat(r, (H, H)))
    bias = {"LSTMCell": ("n_x", 4), "GRUCell": ("n_x_gates", 2), "SimpleCell": ("n", 1)}[name]
    np.testing.assert_array_equal(ours[bias[0]]["bias"], jnp.concatenate([b(None, (H,))] * bias[1]))
    if name == "LSTMCell":  # the recurrent term's bias stays 0 (summed, the total is bias_init's), as Flax's one
        assert not ours["n_h"]["bias"].any()
        theirs = nnx.to_pure_dict(nnx.state(nnx.LSTMCell(IN, H, **inits, rngs=nnx.Rngs(0)), nnx.Param))
        mapped = _from_flax(name, theirs)
        for key in ("w_x", "w_h"):
            np.testing.assert_array_equal(ours[key], mapped[key])
        np.testing.assert_array_equal(ours["n_x"]["bias"] + ours["n_h"]["bias"], mapped["n_h"]["bias"])
    # random initializers: keys split per gate from the halves of the cell's key
    key, normal = jax.random.key(7), jax.nn.initializers.normal(1.0)
    cell = getattr(lnjax, "RNNCell" if name == "SimpleCell" else name)(H, kernel_init=normal, recurrent_kernel_init=normal)
    p = cell.init(key, IN)
    kx, kh = jax.random.split(key)
    for got, kk, shape in ((p["w_x"], kx, (IN, H)), (p["w_h"], kh, (H, H))):
        np.testing.assert_array_equal(got, jnp.concatenate([normal(q, shape, jnp.float32) for q in jax.random.split(kk, n)], -1))
    # None: LeCun normal drawn for the whole matrix at once (lnjax's draws, unchanged)
    p = getattr(lnjax, "RNNCell" if name == "SimpleCell" else name)(H).init(key, IN)
    np.testing.assert_array_equal(p["w_x"], jax.nn.initializers.lecun_normal()(kx, (IN, n * H), jnp.float32))


def test_cell_initializer_errors():
    with pytest.raises(TypeError, match="`kernel_init` must be an initializer"):
        lnjax.nnx.LSTMCell(IN, H, kernel_init="lecun", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`recurrent_kernel_init` returned shape \(3, 12\)"):
        lnjax.GRUCell(H, recurrent_kernel_init=lambda k, s, d: jnp.zeros((3, 12), d)).init(jax.random.key(0), IN)
    no_bias = lnjax.norms.layer(bias=False)
    with pytest.raises(ValueError, match="`bias_init` needs a bias"):
        lnjax.LSTMCell(H, no_bias, no_bias, bias_init=jax.nn.initializers.ones).init(jax.random.key(0), IN)
