"""The Flax modules (`lnjax.nnx`, `lnjax.linen`) against the pure ops they wrap.

A module is a shell: with the same parameters it must give exactly (bitwise) the pure op's
output, and NNX must equal Linen. Batch norm also: the running statistics after training steps
equal `lnjax.batch_norm`'s, evaluation uses them, the mode switches work.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lnjax
import lnjax.linen
import lnjax.nnx

DTYPES = [jnp.float32, jnp.bfloat16]


def _rand(shape, dtype=jnp.float32, seed=0, loc=0.0, scale=1.0):
    a = np.random.default_rng(seed).normal(loc, scale, size=shape)
    return jnp.asarray(a, dtype)


def _const(value):
    """An initializer returning `value` (checks the module asks for its shape)."""

    def init(key, shape, dtype):
        assert tuple(shape) == value.shape, (shape, value.shape)
        return value.astype(dtype)

    return init


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def _group_norm(x, scale, bias, *, num_groups, **kw):
    return lnjax.group_norm(x, num_groups, scale, bias, **kw)


PURE = {
    "LayerNorm": lnjax.layer_norm,
    "RMSNorm": lnjax.rms_norm,
    "GroupNorm": _group_norm,
    "InstanceNorm": lnjax.instance_norm,
}

# (module name, x shape, the modules' keyword arguments, the pure op's, num_features)
CASES = [
    ("LayerNorm", (4, 3, 8), dict(), dict(), 8),
    ("LayerNorm", (4, 3, 8), dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), dict(axis=(-2, -1)), (3, 8)),
    ("LayerNorm", (4, 3, 8), dict(reduction_axes=(-2, -1)), dict(axis=(-2, -1)), 8),  # Flax's per-channel
    ("LayerNorm", (4, 3, 8), dict(reduction_axes=1, feature_axes=1, epsilon=1e-3, use_fast_variance=True),
     dict(axis=1, eps=1e-3, fast_variance=True), 3),
    ("RMSNorm", (4, 3, 8), dict(), dict(), 8),
    ("RMSNorm", (4, 3, 8), dict(reduction_axes=(1, 2), feature_axes=(1, 2), use_bias=True), dict(axis=(1, 2)),
     (3, 8)),
    ("GroupNorm", (2, 4, 4, 6), dict(num_groups=3), dict(num_groups=3), 6),
    ("GroupNorm", (2, 4, 4, 6), dict(num_groups=None, group_size=2), dict(num_groups=3), 6),
    ("GroupNorm", (2, 6, 4, 4), dict(num_groups=2, feature_axes=1), dict(num_groups=2, axis=1), 6),
    ("InstanceNorm", (2, 4, 4, 6), dict(), dict(), 6),
    ("InstanceNorm", (2, 6, 4, 4), dict(feature_axes=1, epsilon=0.1), dict(axis=1, eps=0.1), 6),
]  # fmt: skip


def _params(shape, dtype, use_bias=True, seed=1):
    """Non-trivial `scale`, `bias` so that a swapped or ignored parameter shows."""
    p = {"scale": _rand(shape, dtype, seed, loc=1.0, scale=0.2)}
    if use_bias:
        p["bias"] = _rand(shape, dtype, seed + 1, scale=0.2)
    return p


def _modules(name, nf, kw, params, param_dtype):
    """The nnx module with `params` as initial values, and the linen module."""
    inits = {f"{k}_init": _const(v) for k, v in params.items()}
    kw = dict(kw, param_dtype=param_dtype)
    return getattr(lnjax.nnx, name)(nf, **kw, **inits), getattr(lnjax.linen, name)(**kw)


def _over(p, x, axis):
    """A parameter of the feature axes broadcast to `x.shape[axis]`, as the pure op takes it."""
    return None if p is None else jnp.broadcast_to(p, [x.shape[a] for a in np.atleast_1d(axis)])


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,kw,pure_kw,nf", CASES)
def test_module_equals_pure_op(name, shape, kw, pure_kw, nf, dtype, param_dtype):
    x = _rand(shape, dtype, loc=0.5)
    pshape = (nf,) if isinstance(nf, int) else nf
    params = _params(pshape, param_dtype, use_bias=kw.get("use_bias", name != "RMSNorm"))
    m, lm = _modules(name, nf, kw, params, param_dtype)
    scale, bias = params["scale"], params.get("bias")
    if name in ("LayerNorm", "RMSNorm"):
        axis = pure_kw.get("axis", -1)
        scale, bias = _over(scale, x, axis), _over(bias, x, axis)
    want = PURE[name](x, scale, bias, **pure_kw)
    assert want.dtype == dtype
    _equal(m(x), want)
    _equal(lm.apply({"params": params}, x), want)
    # linen's init makes parameters of the same names, shapes and dtypes
    got = jax.eval_shape(lm.init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == {
        "params": {k: (v.shape, v.dtype) for k, v in params.items()}
    }
    # `dtype` is the output's; the statistics are the same
    for out in (jnp.float32, jnp.bfloat16):
        _equal(getattr(lnjax.nnx, name)(nf, **kw, param_dtype=param_dtype, dtype=out,
                                        **{f"{k}_init": _const(v) for k, v in params.items()})(x),
               want.astype(out))  # fmt: skip


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_optional_parameters(use_scale, use_bias):
    x = _rand((3, 5))
    m = lnjax.nnx.LayerNorm(5, use_scale=use_scale, use_bias=use_bias)
    lm = lnjax.linen.LayerNorm(use_scale=use_scale, use_bias=use_bias)
    names = {n for n, use in (("scale", use_scale), ("bias", use_bias)) if use}
    assert set(nnx.state(m, nnx.Param).keys()) == names
    variables = lm.init(jax.random.key(0), x)
    assert set(variables.get("params", {})) == names
    scale = jnp.ones(5, jnp.float32) if use_scale else None
    bias = jnp.zeros(5, jnp.float32) if use_bias else None
    want = lnjax.layer_norm(x, scale, bias)
    _equal(m(x), want)
    _equal(lm.apply(variables, x), want)


def test_init_values_and_names():
    x = _rand((2, 4, 4, 6))
    key = jax.random.key(0)
    built = {
        "LayerNorm": (lnjax.nnx.LayerNorm(6), lnjax.linen.LayerNorm()),
        "RMSNorm": (lnjax.nnx.RMSNorm(6, use_bias=True), lnjax.linen.RMSNorm(use_bias=True)),
        "GroupNorm": (lnjax.nnx.GroupNorm(6, 2), lnjax.linen.GroupNorm(num_groups=2)),
        "InstanceNorm": (lnjax.nnx.InstanceNorm(6), lnjax.linen.InstanceNorm()),
        "BatchNorm": (lnjax.nnx.BatchNorm(6), lnjax.linen.BatchNorm(use_running_average=False)),
    }
    for name, (m, lm) in built.items():
        nparams = nnx.state(m, nnx.Param)
        lparams = lm.init(key, x)["params"]
        assert set(nparams.keys()) == set(lparams) == {"scale", "bias"}, name
        for p in (nparams["scale"][...], lparams["scale"]):
            _equal(p, jnp.ones(6, jnp.float32))
        for p in (nparams["bias"][...], lparams["bias"]):
            _equal(p, jnp.zeros(6, jnp.float32))
    assert lnjax.nnx.RMSNorm(6).bias is None  # RMSNorm has no bias unless asked
    # random initializers need rngs (constant ones do not)
    normal = nnx.initializers.normal()
    assert lnjax.nnx.LayerNorm(6, scale_init=normal, rngs=nnx.Rngs(0)).scale[...].shape == (6,)
    with pytest.raises(TypeError, match="rngs=nnx.Rngs"):
        lnjax.nnx.LayerNorm(6, scale_init=normal)
    m = lnjax.nnx.LayerNorm((3, 4), reduction_axes=(1, 2), feature_axes=(1, 2), param_dtype=jnp.bfloat16)
    assert m.scale[...].shape == (3, 4) and m.scale[...].dtype == jnp.bfloat16


def test_constructor_checks():
    for bad in (0, -1, 2.0, (), (3, 0)):
        with pytest.raises(ValueError, match="num_features"):
            lnjax.nnx.LayerNorm(bad)
    with pytest.raises(ValueError, match="num_features"):
        lnjax.nnx.BatchNorm(0)
    with pytest.raises(ValueError, match="does not divide"):
        lnjax.nnx.GroupNorm(6, 4)
    with pytest.raises(ValueError, match="num_groups"):
        lnjax.nnx.GroupNorm(6, 0)
    with pytest.raises(ValueError, match="num_groups"):
        lnjax.linen.GroupNorm(num_groups=0)
    with pytest.raises(ValueError, match="out_features"):
        lnjax.nnx.WeightNormDense(3, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features"):
        lnjax.linen.WeightNormDense(0)
    with pytest.raises(ValueError, match="last axis must be in_features=3"):
        lnjax.nnx.WeightNormDense(3, 2, rngs=nnx.Rngs(0))(jnp.ones((2, 5), jnp.float32))
    dense = lnjax.linen.WeightNormDense(2)
    variables = dense.init(jax.random.key(0), jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="last axis must be in_features=3"):
        dense.apply(variables, jnp.ones((2, 5), jnp.float32))


def test_shape_errors_come_from_the_pure_op():
    x = _rand((3, 8))
    with pytest.raises(ValueError, match=r"`scale` has shape \(5,\), expected \(8,\)"):
        lnjax.nnx.LayerNorm(5)(x)
    with pytest.raises(ValueError, match="does not divide the 8 channels"):
        lnjax.linen.GroupNorm(num_groups=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="state.mean"):
        lnjax.nnx.BatchNorm(5, use_scale=False, use_bias=False)(x)


# --- batch norm ---------------------------------------------------------------------------------

# (x shape, axis, num_features, mask shape)
BN_CASES = [
    ((8, 5), -1, 5, (8,)),
    ((4, 3, 2, 2), 1, 3, (4, 2, 2)),
    ((6, 3, 4), (-2, -1), (3, 4), (6,)),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,nf,mshape", BN_CASES)
def test_batch_norm_training_and_eval(shape, axis, nf, mshape, dtype, masked):
    pshape = (nf,) if isinstance(nf, int) else nf
    params = _params(pshape, jnp.float32)
    kw = dict(axis=axis, momentum=0.9, eps=1e-3)
    mkw = dict(axis=axis, momentum=0.9, epsilon=1e-3)
    m = lnjax.nnx.BatchNorm(nf, **mkw, scale_init=_const(params["scale"]),
                            bias_init=_const(params["bias"]))  # fmt: skip
    lm = lnjax.linen.BatchNorm(**mkw)
    variables = {"params": params, "batch_stats": dict(lnjax.batch_norm_state(pshape)._asdict())}
    state = lnjax.batch_norm_state(pshape)
    for step in range(3):  # training: outputs and running statistics, step by step
        x = _rand(shape, dtype, seed=10 + step, loc=step, scale=1 + step)
        mask = (_rand(mshape, seed=20 + step) > -0.5) if masked else None
        want, state = lnjax.batch_norm(x, params["scale"], params["bias"], state,
                                       training=True, mask=mask, **kw)  # fmt: skip
        _equal(m(x, mask=mask), want)
        y, upd = lm.apply(variables, x, mask=mask, use_running_average=False,
                          mutable=["batch_stats"])  # fmt: skip
        _equal(y, want)
        variables = {**variables, **upd}
        for got in (m.mean[...], variables["batch_stats"]["mean"]):
            _equal(got, state.mean)
        for got in (m.var[...], variables["batch_stats"]["var"]):
            _equal(got, state.var)
    assert np.all(np.asarray(state.mean) != 0)
    # evaluation: the running statistics, which stay as they are
    x = _rand(shape, dtype, seed=30)
    want, _ = lnjax.batch_norm(x, params["scale"], params["bias"], state, training=False, **kw)
    m.eval()
    _equal(m(x), want)
    _equal(lm.apply(variables, x, use_running_average=True), want)
    _equal(lnjax.linen.BatchNorm(use_running_average=True, **mkw).apply(variables, x), want)
    _equal(m.mean[...], state.mean)
    _equal(m.var[...], state.var)


def test_nnx_batch_norm_modes():
    x = _rand((8, 5))
    m = lnjax.nnx.BatchNorm(5, momentum=0.5)
    assert m.use_running_average is False  # training by default, as nnx.BatchNorm
    state = lnjax.batch_norm_state(5)
    train, state1 = lnjax.batch_norm(x, None, None, state, training=True, momentum=0.5)
    evaluate, _ = lnjax.batch_norm(x, None, None, state, training=False)
    # the call argument overrides the attribute, and evaluation leaves the statistics alone
    _equal(m(x, use_running_average=True), evaluate)
    _equal(m(x, True), evaluate)  # positionally, as Flax's
    _equal(m.mean[...], state.mean)
    m.eval()
    assert m.use_running_average is True
    _equal(m(x), evaluate)
    view = nnx.view(m, use_running_average=False)
    assert view.use_running_average is False and m.use_running_average is True
    _equal(view(x), train)  # a view shares the statistics with the module
    _equal(m.mean[...], state1.mean)
    m.train()
    assert m.use_running_average is False
    # a model of modules switches every BatchNorm at once
    model = nnx.Sequential(lnjax.nnx.BatchNorm(5), lnjax.nnx.LayerNorm(5))
    model.eval()
    assert model.layers[0].use_running_average is True
    with pytest.raises(ValueError, match=r"(?s)constructor.*call time.*model\.eval\(\).*nnx\.view"):
        lnjax.nnx.BatchNorm(5, use_running_average=None)(x)


def test_linen_batch_norm_modes():
    x = _rand((8, 5))
    bn = lnjax.linen.BatchNorm()
    with pytest.raises(ValueError, match=r"(?s)attribute.*call time.*mutable"):
        bn.init(jax.random.key(0), x)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    # as in linen, init computes batch statistics but does not update the running ones
    _equal(variables["batch_stats"]["mean"], jnp.zeros(5, jnp.float32))
    _equal(variables["batch_stats"]["var"], jnp.ones(5, jnp.float32))
    with pytest.raises(ValueError, match="just once"):  # linen's merge_param
        eval_bn = lnjax.linen.BatchNorm(use_running_average=True)
        eval_bn.apply(variables, x, use_running_average=True)
    with pytest.raises(Exception, match="batch_stats"):  # training needs a mutable collection
        bn.apply(variables, x, use_running_average=False)

    class Net(nn.Module):  # the usual linen pattern: a `train` flag passed down
        @nn.compact
        def __call__(self, x, train: bool):
            return lnjax.linen.BatchNorm(use_running_average=not train)(x)

    _equal(lnjax.linen.BatchNorm().apply(variables, x, True), lnjax.batch_norm(
        x, None, None, lnjax.batch_norm_state(5), training=False)[0])  # positionally, as Flax's
    net_vars = Net().init(jax.random.key(0), x, train=True)
    y, upd = Net().apply(net_vars, x, train=True, mutable=["batch_stats"])
    want, state = lnjax.batch_norm(x, None, None, lnjax.batch_norm_state(5), training=True)
    _equal(y, want)
    _equal(upd["batch_stats"]["BatchNorm_0"]["var"], state.var)


def test_batch_norm_axis_name_under_vmap():
    # the batch axis vmapped away: statistics synchronized through `axis_name`
    x = _rand((8, 5))
    state = lnjax.batch_norm_state(5)
    want, st = lnjax.batch_norm(x, None, None, state, training=True)
    m = lnjax.nnx.BatchNorm(5, axis_name="batch")
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), out_axes=0, axis_name="batch")(m, x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)  # psum vs sum: not bitwise
    np.testing.assert_allclose(m.var[...], st.var, rtol=1e-6)


# --- weight-normalized dense ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3)])
def test_weight_norm_dense(shape, dtype):
    x = _rand(shape, dtype)
    m = lnjax.nnx.WeightNormDense(3, 6, rngs=nnx.Rngs(0))
    assert set(nnx.state(m, nnx.Param).keys()) == {"v", "g", "bias"}
    _equal(m.g[...], jnp.ones(6, jnp.float32))
    _equal(m.bias[...], jnp.zeros(6, jnp.float32))
    params = {"v": _rand((3, 6), seed=1), "g": _rand((6,), seed=2), "bias": _rand((6,), seed=3)}
    for k, v in params.items():
        getattr(m, k)[...] = v
    w = lnjax.weight_norm(params["v"], params["g"]).astype(dtype)
    want = jnp.dot(x, w) + jnp.broadcast_to(params["bias"].astype(dtype), shape[:-1] + (6,))
    _equal(m(x), want)
    lm = lnjax.linen.WeightNormDense(6)
    init = lm.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, init) == {"v": (3, 6), "g": (6,), "bias": (6,)}
    _equal(init["g"], jnp.ones(6, jnp.float32))
    _equal(lm.apply({"params": params}, x), want)
    # with g = 1 each output unit's weight vector has unit norm
    w0 = lnjax.weight_norm(init["v"], init["g"])
    np.testing.assert_allclose(jnp.linalg.norm(w0, axis=0), 1, rtol=1e-6)
    nob = lnjax.nnx.WeightNormDense(3, 6, use_bias=False, rngs=nnx.Rngs(0))
    assert set(nnx.state(nob, nnx.Param).keys()) == {"v", "g"}
    assert "bias" not in lnjax.linen.WeightNormDense(6, use_bias=False).init(
        jax.random.key(0), x)["params"]  # fmt: skip


# --- transformations ----------------------------------------------------------------------------


def test_nnx_jit_equals_pure_jit():
    x = _rand((6, 4, 8), loc=3.0)
    p = _params((8,), jnp.float32)
    ln = lnjax.nnx.LayerNorm(8, scale_init=_const(p["scale"]), bias_init=_const(p["bias"]))
    _equal(nnx.jit(lambda m, x: m(x))(ln, x), jax.jit(lnjax.layer_norm)(x, p["scale"], p["bias"]))
    bn = lnjax.nnx.BatchNorm(8)
    step = nnx.jit(lambda m, x: m(x))
    pure = jax.jit(lambda x, s: lnjax.batch_norm(x, jnp.ones(8), jnp.zeros(8), s, training=True))
    state = lnjax.batch_norm_state(8)
    for _ in range(2):  # the statistics are updated in place through nnx.jit
        y = step(bn, x)
        want, state = pure(x, state)
        _equal(y, want)
        _equal(bn.mean[...], state.mean)
        _equal(bn.var[...], state.var)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "BatchNorm", "WeightNormDense"])
def test_grad_equals_pure_grad(name):
    x = _rand((6, 8), loc=1.0)
    s, b = _params((8,), jnp.float32).values()
    if name == "WeightNormDense":
        m = lnjax.nnx.WeightNormDense(8, 8, rngs=nnx.Rngs(0))
        v = jnp.eye(8, dtype=jnp.float32) + _rand((8, 8), seed=7, scale=0.1)
        m.v[...], m.g[...], m.bias[...] = v, s, b
        params = (m.v[...], s, b)

        def pure(p, x):
            return jnp.dot(x, lnjax.weight_norm(p[0], p[1])) + jnp.broadcast_to(p[2], (6, 8))

        def from_module(g):
            return (g["v"][...], g["g"][...], g["bias"][...])
    else:
        kw = dict(scale_init=_const(s), bias_init=_const(b))
        if name == "RMSNorm":
            kw["use_bias"] = True
        m = getattr(lnjax.nnx, name)(8, **kw)
        params = (s, b)
        if name == "BatchNorm":

            def pure(p, x):
                st = lnjax.batch_norm_state(8)
                return lnjax.batch_norm(x, *p, st, training=True)[0]
        else:

            def pure(p, x):
                return PURE[name](x, *p)

        def from_module(g):
            return (g["scale"][...], g["bias"][...])

    target = _rand((6, 8), seed=5)

    def loss(y):
        return jnp.sum((y - target) ** 2)

    grads, gx = nnx.jit(nnx.grad(lambda m, x: loss(m(x)), argnums=(0, 1)))(m, x)
    want, wx = jax.jit(jax.grad(lambda p, x: loss(pure(p, x)), argnums=(0, 1)))(params, x)
    for got, ref in zip(from_module(grads), want):
        _equal(got, ref)
    _equal(gx, wx)


@pytest.mark.parametrize("spec", lnjax._modules.SPECS, ids=lambda s: s.name)
def test_frontends_take_their_options_and_defaults_from_one_place(spec):
    """Both frontends are built from one spec: the same options, in the same order, with each
    default the op's own (under Flax's name) or the one in `MODULE_DEFAULTS`."""
    import dataclasses
    import inspect

    op_params = inspect.signature(spec.op).parameters
    nnx_params = dict(inspect.signature(getattr(lnjax.nnx, spec.name)).parameters)
    linen_fields = {f.name: f.default for f in dataclasses.fields(getattr(lnjax.linen, spec.name))
                    if f.name not in ("parent", "name")}  # fmt: skip
    for k in spec.options:
        op = spec.op_name(k)
        want = op_params[op].default if op else lnjax._modules.MODULE_DEFAULTS[k]
        if k == "use_bias":
            want = spec.use_bias
        assert nnx_params[k].default == linen_fields[k] == want, k
    mode = ["use_running_average"] if spec.stateful else []
    assert list(linen_fields) == mode + list(spec.options)
    assert list(nnx_params) == ["num_features", *spec.positional, *mode,
                                *(k for k in spec.options if k not in spec.positional), "rngs"]
    # every op argument but the ones the layer computes is an option
    given = {spec.op_name(k) for k in spec.options} | {"x", "scale", "bias", "state", "training", "mask"}
    assert set(op_params) - given <= {"num_groups"}, set(op_params) - given


def test_unknown_argument_names_the_signature():
    with pytest.raises(TypeError, match=r"lnjax.nnx.LayerNorm\(num_features.*reduction_axes.*'axis'"):
        lnjax.nnx.LayerNorm(8, axis=1)
