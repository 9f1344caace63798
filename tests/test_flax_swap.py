"""lnjax's normalization layers swapped into Flax models in place of Flax's own.

With Flax's arguments (plus the lnjax options that ask for Flax's behaviour where lnjax's
numerical contract differs on purpose: README, "Coming from Flax"), a model trained with
lnjax's layer must follow the one trained with Flax's: the same parameter and state trees, and
the same losses, gradients, states and evaluation outputs, to float32 rounding. NNX trains with
`nnx.Optimizer` under `nnx.jit`, Linen with a `TrainState` and a `batch_stats` collection.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import lnjax.linen
import lnjax.nnx

C = 8
X = [jnp.asarray(np.random.default_rng(i).normal(0.5, 2.0, (4, 3, 3, C)), jnp.float32) for i in range(3)]

# (layer, the arguments both take, Flax's extra ones, lnjax's extra ones). Flax's variance is
# the fast one-pass one by default and lnjax's the exact one; Flax's running variance is biased.
CASES = [
    ("LayerNorm", dict(epsilon=1e-6), dict(use_fast_variance=False), {}),
    ("LayerNorm", dict(reduction_axes=(1, 2, 3), feature_axes=-1, use_bias=False), dict(use_fast_variance=False), {}),
    ("RMSNorm", dict(epsilon=1e-5), {}, {}),
    ("BatchNorm", dict(momentum=0.9), dict(use_fast_variance=False), dict(unbiased_running_var=False)),
    ("BatchNorm", dict(axis=(2, 3), epsilon=1e-3), dict(use_fast_variance=False), dict(unbiased_running_var=False)),
    ("GroupNorm", dict(num_groups=4, epsilon=1e-6), dict(use_fast_variance=False), {}),
    ("GroupNorm", dict(num_groups=None, group_size=2), dict(use_fast_variance=False, epsilon=1e-5), {}),
    ("InstanceNorm", dict(epsilon=1e-6, use_scale=False), dict(use_fast_variance=False), {}),
]  # fmt: skip
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
# nnx.BatchNorm takes one int `num_features`: no tuple `axis`
NNX = [(c, i) for c, i in zip(CASES, IDS) if not isinstance(c[1].get("axis"), tuple)]


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam mixes Python floats and int32 counts, which conftest's strict promotion refuses
    with jax.numpy_dtype_promotion("standard"):
        yield


def _close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (path, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip


# The dense layer before the norm has no bias: batch and instance norm remove it, so its
# gradient is rounding noise, which Adam's normalized steps would amplify into different biases.
class NNXNet(nnx.Module):
    def __init__(self, norm, rngs):
        self.dense = nnx.Linear(C, C, use_bias=False, rngs=rngs)
        self.norm = norm
        self.out = nnx.Linear(C, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.dense(x))))


def _nnx_model(module, name, kw):
    rngs = nnx.Rngs(0)
    dense = nnx.Linear(C, C, use_bias=False, rngs=rngs)  # built first, so both models draw the same weights
    norm = getattr(module, name)(C, **kw, rngs=rngs)
    net = NNXNet(norm, rngs)
    net.dense = dense
    return net


def _nnx_run(model):
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    def loss_fn(model, x):
        return jnp.mean((model(x) - 1.0) ** 2)

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x)
        opt.update(model, grads)
        return loss, grads

    history = [step(model, opt, x) for x in X]
    model.eval()
    return history, nnx.jit(lambda m, x: m(x))(model, X[0] + 1.0)


@pytest.mark.parametrize("name,kw,flax_kw,lnjax_kw", [c for c, _ in NNX], ids=[i for _, i in NNX])
def test_nnx_swap(name, kw, flax_kw, lnjax_kw):
    theirs = _nnx_model(nnx, name, {**kw, **flax_kw})
    ours = _nnx_model(lnjax.nnx, name, {**kw, **lnjax_kw})
    # the same state tree (names, variable types, shapes, dtypes) and initial values
    _close(nnx.state(ours), nnx.state(theirs))
    assert jax.tree.map(type, nnx.state(ours), is_leaf=lambda v: isinstance(v, nnx.Variable)) == jax.tree.map(
        type, nnx.state(theirs), is_leaf=lambda v: isinstance(v, nnx.Variable))  # fmt: skip
    (ours_hist, ours_eval), (theirs_hist, theirs_eval) = _nnx_run(ours), _nnx_run(theirs)
    for (lo, go), (lt, gt) in zip(ours_hist, theirs_hist):
        _close(lo, lt)
        _close(nnx.to_pure_dict(go), nnx.to_pure_dict(gt))
    _close(nnx.state(ours), nnx.state(theirs))  # parameters, optimizer-free state, running stats
    _close(ours_eval, theirs_eval)


class LinenNet(nn.Module):
    norm: type
    train: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(C, use_bias=False, name="dense")(x)
        if self.norm.__name__ == "BatchNorm":
            h = self.norm(use_running_average=not self.train, name="norm")(h)
        else:
            h = self.norm(name="norm")(h)
        return nn.Dense(1, name="out")(jax.nn.relu(h))


class State(train_state.TrainState):
    batch_stats: dict


def _linen_run(module, name, kw):
    cls = functools.partial(getattr(module, name), **kw)
    cls.__name__ = name
    net = LinenNet(cls)
    variables = net.init(jax.random.key(0), X[0])
    state = State.create(apply_fn=net.apply, params=variables["params"], tx=optax.adam(0.05),
                         batch_stats=variables.get("batch_stats", {}))  # fmt: skip

    @jax.jit
    def step(state, x):
        def loss_fn(params):
            y, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"])
            return jnp.mean((y - 1.0) ** 2), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads).replace(batch_stats=upd.get("batch_stats", {}))
        return state, (loss, grads)

    history = []
    for x in X:
        state, out = step(state, x)
        history.append(out)
    evaluated = LinenNet(cls, train=False).apply({"params": state.params, "batch_stats": state.batch_stats},
                                                 X[0] + 1.0)  # fmt: skip
    return variables, history, state, evaluated


@pytest.mark.parametrize("name,kw,flax_kw,lnjax_kw", CASES, ids=IDS)
def test_linen_swap(name, kw, flax_kw, lnjax_kw):
    ours = _linen_run(lnjax.linen, name, {**kw, **lnjax_kw})
    theirs = _linen_run(nn, name, {**kw, **flax_kw})
    _close(ours[0], theirs[0])  # the init variables: names, shapes, dtypes and values
    for (lo, go), (lt, gt) in zip(ours[1], theirs[1]):
        _close(lo, lt)
        _close(go, gt)
    _close((ours[2].params, ours[2].batch_stats), (theirs[2].params, theirs[2].batch_stats))
    _close(ours[3], theirs[3])


def test_where_the_contract_differs():
    """The differences of README's table, each shown: Flax's defaults give other numbers."""
    x = jnp.asarray(np.random.default_rng(0).normal(1e3, 1.0, (4, C)), jnp.float32)
    # exact variance by default: Flax's one-pass variance loses the centred digits
    exact = lnjax.linen.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False).apply({}, x)
    flax_fast = nn.LayerNorm(use_scale=False, use_bias=False).apply({}, x)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(np.var(np.asarray(x, np.float64), -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(flax_fast - ref)) > 1e-3
    # output dtype: the input's (Flax promotes with the float32 parameters); `dtype` asks for one
    xb = x.astype(jnp.bfloat16) - 1e3
    m = lnjax.nnx.LayerNorm(C)
    assert m(xb).dtype == jnp.bfloat16
    assert nnx.LayerNorm(C, rngs=nnx.Rngs(0))(xb).dtype == jnp.float32
    assert lnjax.nnx.LayerNorm(C, dtype=jnp.float32)(xb).dtype == jnp.float32
    # running variance: unbiased by default (as PyTorch), Flax's biased one on request
    ours, theirs = lnjax.nnx.BatchNorm(C), nnx.BatchNorm(C, rngs=nnx.Rngs(0))
    ours(x - 1e3), theirs(x - 1e3)
    np.testing.assert_allclose(ours.var[...] - 0.99, (theirs.var[...] - 0.99) * 4 / 3, rtol=1e-4)


# Flax's arguments that lnjax's layers do not take (README's table says why).
NOT_TAKEN = {"axis_index_groups", "force_float32_reductions", "promote_dtype", "bias_metadata", "scale_metadata"}
NOT_TAKEN_BY = {"LayerNorm": {"axis_name"}, "RMSNorm": {"axis_name", "use_fast_variance"}, "BatchNorm": set(),
                "GroupNorm": {"axis_name"}, "InstanceNorm": {"axis_name"}}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_TAKEN_BY))
def test_flax_argument_names_and_positions(name):
    import dataclasses
    import inspect

    def names(frontend, cls):
        if frontend is nn:
            return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    for flax_mod, ours_mod in ((nnx, lnjax.nnx), (nn, lnjax.linen)):
        theirs, ours = names(flax_mod, getattr(flax_mod, name)), names(flax_mod, getattr(ours_mod, name))
        assert set(theirs) - set(ours) == (NOT_TAKEN | NOT_TAKEN_BY[name]) & set(theirs)
        # the arguments both take come in the same order, so positional calls mean the same
        assert [k for k in theirs if k in ours] == [k for k in ours if k in theirs]
    nnx_params = inspect.signature(getattr(lnjax.nnx, name).__init__).parameters.values()
    flax_params = inspect.signature(getattr(nnx, name).__init__).parameters.values()
    positional = lambda ps: [p.name for p in ps if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]  # noqa: E731
    assert positional(nnx_params) == positional(flax_params)
