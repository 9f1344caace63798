"""The builders of the recurrent benchmark's contenders (registered in `benchmarks.contenders`):
each takes the benchmark's `Context` and returns one `harness.Contender` whose run is a
training step, with the loss and gradients it computes from the shared weights for the
agreement check of its group."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from benchmarks import _harness as H

LR = 1e-3  # torch_lstm.LR too: both take the same SGD step
EPS = 1e-5
LN_LSTM_KEYS = ("w_x", "w_h", "n_x/scale", "n_x/bias", "n_h/scale", "n_h/bias", "n_c/scale", "n_c/bias")


def _get(tree, key):
    for k in key.split("/"):
        tree = tree[k]
    return tree


@dataclasses.dataclass
class Context:
    """The benchmark's data and the weights each agreement group shares (lnjax's)."""

    T: int
    B: int
    H: int
    I: int
    xs: Any
    tgt: Any
    xs_t: Any
    tgt_t: Any
    params: dict  # by group: "LN-LSTM", "LN-GRU", "LSTM"
    profiled: dict = dataclasses.field(default_factory=dict)  # name: (run, compiled), for kernel profiles


def context(T, B, H, I) -> Context:
    import jax
    import jax.numpy as jnp
    import torch

    import lnjax

    rng = np.random.default_rng(0)
    xs_np = rng.standard_normal((B, T, I), dtype=np.float32)
    tgt_np = (0.5 * rng.standard_normal((B, T, H))).astype(np.float32)
    p_u = lnjax.LSTMCell(H, None, None, None).init(jax.random.key(2), I)
    p_u["n_x"]["bias"] = 0.1 * jax.random.normal(jax.random.key(3), (4 * H,))
    p_u["n_h"]["bias"] = 0.1 * jax.random.normal(jax.random.key(4), (4 * H,))
    params = {"LN-LSTM": lnjax.LSTMCell(H).init(jax.random.key(0), I),
              "LN-GRU": lnjax.GRUCell(H).init(jax.random.key(1), I), "LSTM": p_u}
    return Context(T, B, H, I, jnp.asarray(xs_np), jnp.asarray(tgt_np), torch.tensor(xs_np), torch.tensor(tgt_np),
                   params)


def _jax(ctx, name, group, loss_fn, params, note="", grads_view=None):
    """A jitted SGD step on donated params; agreement on (loss, grads) from a separate jit."""
    import jax
    import jax.numpy as jnp

    def step(p, xs, tgt):
        loss, g = jax.value_and_grad(loss_fn)(p, xs, tgt)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), loss

    compiled, cs = H.timed_compile(jax.jit(step, donate_argnums=0), params, ctx.xs, ctx.tgt)
    state = {"p": jax.tree.map(jnp.copy, params)}

    def run():
        state["p"], loss = compiled(state["p"], ctx.xs, ctx.tgt)
        return H.block(loss)

    ctx.profiled[name] = (run, compiled)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def outputs():
        loss, g = grad_fn(params, ctx.xs, ctx.tgt)
        return (loss, *(grads_view(g) if grads_view else jax.tree.leaves(g)))

    return H.Contender(name, run, cs, note=note, outputs=outputs, group=group)


def _torch(ctx, name, group, forward, params, note="", compile_s=None, grads_view=None, init=None):
    """PyTorch's step updating `params` in place; agreement from `init` (default: their values now)."""
    import torch

    from benchmarks.torch_lstm import train_step

    init = [p.detach().clone() for p in (init or params)]

    def outputs():
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, v in zip(params, init):
                p.copy_(v)
        loss, grads = train_step(forward, params, ctx.xs_t, ctx.tgt_t)
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        return (loss, *(grads_view(grads) if grads_view else grads))

    return H.Contender(name, lambda: train_step(forward, params, ctx.xs_t, ctx.tgt_t)[0], compile_s,
                       note=note, outputs=outputs, group=group)


def lnjax_cell(name, group, precompute, xla=False, note=""):
    """lnjax's LN-LSTM or LN-GRU (`group`), its layer norms autodiffed where `xla`."""
    def build(ctx):
        import jax.numpy as jnp

        import lnjax

        if group == "LN-GRU":
            cell = lnjax.GRUCell(ctx.H)
        else:
            ln = lnjax.norms.layer(implementation="xla") if xla else None
            cell = lnjax.LSTMCell(ctx.H, ln, ln, ln) if xla else lnjax.LSTMCell(ctx.H)

        def loss_fn(p, xs, tgt):
            ys, _ = lnjax.rnn(cell, p, xs, precompute_inputs=precompute)
            return jnp.mean((ys - tgt) ** 2)

        view = (lambda g: [_get(g, k) for k in LN_LSTM_KEYS]) if group == "LN-LSTM" else None
        return _jax(ctx, name, group, loss_fn, ctx.params[group], note=note, grads_view=view)
    return build


def torch_ln_lstm(name, scripted):
    """The hand-written PyTorch LN-LSTM on lnjax's LN-LSTM weights, eager or `torch.jit.script`-ed."""
    def build(ctx):
        import torch

        from benchmarks import torch_lstm

        p = ctx.params["LN-LSTM"]
        tparams = [torch.tensor(np.asarray(_get(p, k))).requires_grad_(True) for k in LN_LSTM_KEYS]
        if not scripted:
            return _torch(ctx, name, "LN-LSTM", lambda xs: torch_lstm.ln_lstm(xs, *tparams, EPS), tparams,
                          note="hand-written, same equations")
        init = [t.detach().clone() for t in tparams]
        t0 = time.perf_counter()
        fn = torch.jit.script(torch_lstm.ln_lstm)

        def forward(xs):
            return fn(xs, *tparams, EPS)

        for _ in range(3):  # the profiling executor optimizes after its first runs
            torch_lstm.train_step(forward, tparams, ctx.xs_t, ctx.tgt_t)
        return _torch(ctx, name, "LN-LSTM", forward, tparams, note="default fuser settings",
                      compile_s=time.perf_counter() - t0, init=init)
    return build


def lnjax_lstm(name):
    """lnjax's unnormalized LSTM (`LSTMCell(H, None, None, None)`) in `rnn`'s default form."""
    def build(ctx):
        import jax.numpy as jnp

        import lnjax

        cell = lnjax.LSTMCell(ctx.H, None, None, None)

        def loss_fn(p, xs, tgt):
            ys, _ = lnjax.rnn(cell, p, xs)
            return jnp.mean((ys - tgt) ** 2)

        # Canonical view of the plain LSTM's gradients: (dW_x [I,4H], dW_h [H,4H], d(b_x + b_h)).
        return _jax(ctx, name, "LSTM", loss_fn, ctx.params["LSTM"],
                    note=f"precompute_inputs={lnjax.heuristics.default_precompute_inputs(ctx.B)} (default)",
                    grads_view=lambda g: [g["w_x"], g["w_h"], g["n_h"]["bias"]])
    return build


def flax_lstm(name):
    """Flax's `nn.RNN(nn.OptimizedLSTMCell)` with the plain LSTM's weights."""
    def build(ctx):
        import flax.linen as nn
        import jax.numpy as jnp

        p_u, Hd, gates = ctx.params["LSTM"], ctx.H, "ifgo"
        flax_rnn = nn.RNN(nn.OptimizedLSTMCell(Hd))
        fcell = {}
        for k, gname in enumerate(gates):
            sl = slice(k * Hd, (k + 1) * Hd)
            fcell[f"i{gname}"] = {"kernel": p_u["w_x"][:, sl]}
            fcell[f"h{gname}"] = {"kernel": p_u["w_h"][:, sl], "bias": (p_u["n_x"]["bias"] + p_u["n_h"]["bias"])[sl]}

        def loss_fn(p, xs, tgt):
            return jnp.mean((flax_rnn.apply(p, xs) - tgt) ** 2)

        def view(g):
            c = g["params"]["cell"]
            return [jnp.concatenate([c[f"i{k}"]["kernel"] for k in gates], 1),
                    jnp.concatenate([c[f"h{k}"]["kernel"] for k in gates], 1),
                    jnp.concatenate([c[f"h{k}"]["bias"] for k in gates], 0)]

        return _jax(ctx, name, "LSTM", loss_fn, {"params": {"cell": fcell}}, note="unnormalized", grads_view=view)
    return build


def torch_lstm_module(name):
    """PyTorch's `nn.LSTM` with the plain LSTM's weights."""
    def build(ctx):
        import torch

        p_u = ctx.params["LSTM"]
        lstm = torch.nn.LSTM(ctx.I, ctx.H, batch_first=True)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(torch.tensor(np.asarray(p_u["w_x"]).T))
            lstm.weight_hh_l0.copy_(torch.tensor(np.asarray(p_u["w_h"]).T))
            lstm.bias_ih_l0.copy_(torch.tensor(np.asarray(p_u["n_x"]["bias"])))
            lstm.bias_hh_l0.copy_(torch.tensor(np.asarray(p_u["n_h"]["bias"])))
        lparams = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
        return _torch(ctx, name, "LSTM", lambda xs: lstm(xs)[0], lparams, note="unnormalized",
                      grads_view=lambda g: [g[0].T, g[1].T, g[3]])
    return build
