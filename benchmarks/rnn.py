"""Recurrent layers: training-step throughput (tokens/s) of LN-LSTM / LN-GRU and baselines.

A training step is: run the layer over `[B, T, I]` inputs, loss = mean squared error against
a fixed random target `[B, T, H]`, gradients of every parameter, and an SGD update in place
(JAX: `jax.jit` with the parameters donated; PyTorch: `p -= lr * p.grad`). Tokens/s is
`B * T / median step time`.

Contenders, all in one process per configuration, timed interleaved:

* lnjax LN-LSTM and LN-GRU (`lnjax.rnn`), each with `precompute_inputs=True` (one matmul for
  `N_x(W_x x)` over all steps, before the scan) and `False` (inside the scan);
* lnjax unnormalized LSTM (`LSTMCell(H, None, None, None)`), Flax `nn.RNN(nn.OptimizedLSTMCell)` and PyTorch
  `nn.LSTM`, with the same weights;
* a hand-written PyTorch LN-LSTM of lnjax's equations (input projection hoisted out of the
  loop, as PyTorch users write it), eager and `torch.jit.script`-ed (default settings).

Agreement is checked within each group (LN-LSTM, LN-GRU, LSTM): loss and gradients from the
same weights and data.

    python -m benchmarks.rnn '{"T": 100, "B": 32, "H": 256, "I": 128}'
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import _harness as H
from benchmarks.report import XLA_CELL

CONFIGS = ({"T": 100, "B": 32, "H": 256, "I": 128}, {"T": 200, "B": 1, "H": 128, "I": 128})
LR = 1e-3
EPS = 1e-5
LN_LSTM_KEYS = ("w_x", "w_h", "n_x/scale", "n_x/bias", "n_h/scale", "n_h/bias", "n_c/scale", "n_c/bias")


def _get(tree, key):
    for k in key.split("/"):
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------------------
# PyTorch implementations.


def torch_ln_lstm(xs, w_x, w_h, nx_s, nx_b, nh_s, nh_b, nc_s, nc_b, eps: float):
    """lnjax's LSTMCell(H) (layer norm on every term) in PyTorch: gates = LN_h(W_h h) + LN_x(W_x x),
    c = s(f) c + s(i) tanh(g), h = s(o) tanh(LN_c(c)); gate order (i, f, g, o)."""
    B, T = xs.shape[0], xs.shape[1]
    H4 = w_h.shape[1]
    Hs = H4 // 4
    u = F.layer_norm(torch.matmul(xs, w_x), [H4], nx_s, nx_b, eps)
    h = torch.zeros(B, Hs, dtype=xs.dtype)
    c = torch.zeros(B, Hs, dtype=xs.dtype)
    outs: list[torch.Tensor] = []
    for t in range(T):
        gates = u[:, t] + F.layer_norm(torch.matmul(h, w_h), [H4], nh_s, nh_b, eps)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, [Hs], nc_s, nc_b, eps))
        outs.append(h)
    return torch.stack(outs, 1)


def _torch_step(forward, params, xs, tgt):
    """One training step; returns (loss, grads) before the update."""
    for p in params:
        p.grad = None
    loss = torch.mean((forward(xs) - tgt) ** 2)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
    return loss.detach(), grads


# ----------------------------------------------------------------------------------------


def run(job):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import lnjax

    T, B, Hd, I = job["T"], job["B"], job["H"], job["I"]
    reps, warmup = job.get("reps", 10), job.get("warmup", 1)
    rng = np.random.default_rng(0)
    xs_np = rng.standard_normal((B, T, I), dtype=np.float32)
    tgt_np = (0.5 * rng.standard_normal((B, T, Hd))).astype(np.float32)
    xs, tgt = jnp.asarray(xs_np), jnp.asarray(tgt_np)
    xs_t, tgt_t = torch.tensor(xs_np), torch.tensor(tgt_np)
    cons, profiled = [], {}

    def jax_contender(name, group, loss_fn, params, note="", grads_view=None):
        """A jitted SGD step on donated params; agreement on (loss, grads) from a separate jit."""
        def step(p, xs, tgt):
            loss, g = jax.value_and_grad(loss_fn)(p, xs, tgt)
            return jax.tree.map(lambda a, b: a - LR * b, p, g), loss

        compiled, cs = H.timed_compile(jax.jit(step, donate_argnums=0), params, xs, tgt)
        state = {"p": jax.tree.map(jnp.copy, params)}

        def run():
            state["p"], loss = compiled(state["p"], xs, tgt)
            return H.block(loss)

        profiled[name] = (run, compiled)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn))

        def outputs():
            loss, g = grad_fn(params, xs, tgt)
            return (loss, *(grads_view(g) if grads_view else jax.tree.leaves(g)))

        cons.append(H.Contender(name, run, cs, note=note, outputs=outputs, group=group))

    def torch_contender(name, group, forward, params, note="", compile_s=None, grads_view=None, init=None):
        init = [p.detach().clone() for p in (init or params)]

        def outputs():
            with torch.no_grad():
                saved = [p.detach().clone() for p in params]
                for p, v in zip(params, init):
                    p.copy_(v)
            loss, grads = _torch_step(forward, params, xs_t, tgt_t)
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            return (loss, *(grads_view(grads) if grads_view else grads))

        cons.append(H.Contender(name, lambda: _torch_step(forward, params, xs_t, tgt_t)[0], compile_s,
                                note=note, outputs=outputs, group=group))

    # LN-LSTM ------------------------------------------------------------------------------
    cell = lnjax.LSTMCell(Hd)
    p_lstm = cell.init(jax.random.key(0), I)
    for pre in (True, False):
        def loss_fn(p, xs, tgt, pre=pre):
            ys, _ = lnjax.rnn(cell, p, xs, precompute_inputs=pre)
            return jnp.mean((ys - tgt) ** 2)

        jax_contender(f"lnjax LN-LSTM, precompute_inputs={pre}", "LN-LSTM", loss_fn, p_lstm,
                      grads_view=lambda g: [_get(g, k) for k in LN_LSTM_KEYS])

    if job.get("xla", True):
        xla_ln = lnjax.norms.layer(implementation="xla")
        xla_cell = lnjax.LSTMCell(Hd, xla_ln, xla_ln, xla_ln)
        for pre in (False, True):
            def floss(p, xs, tgt, pre=pre):
                ys, _ = lnjax.rnn(xla_cell, p, xs, precompute_inputs=pre)
                return jnp.mean((ys - tgt) ** 2)

            jax_contender(f"lnjax LN-LSTM{XLA_CELL}, precompute_inputs={pre}", "LN-LSTM", floss,
                          p_lstm, note="autodiff of the layer-norm formula",
                          grads_view=lambda g: [_get(g, k) for k in LN_LSTM_KEYS])

    tparams = [torch.tensor(np.asarray(_get(p_lstm, k))).requires_grad_(True) for k in LN_LSTM_KEYS]
    tinit = [p.detach().clone() for p in tparams]

    def ln_fwd(xs):
        return torch_ln_lstm(xs, *tparams, EPS)

    torch_contender("torch LN-LSTM, eager", "LN-LSTM", ln_fwd, tparams, note="hand-written, same equations")
    t0 = time.perf_counter()
    scripted = torch.jit.script(torch_ln_lstm)

    def ln_fwd_script(xs):
        return scripted(xs, *tparams, EPS)

    for _ in range(3):  # the profiling executor optimizes after its first runs
        _torch_step(ln_fwd_script, tparams, xs_t, tgt_t)
    torch_contender("torch LN-LSTM, torch.jit.script", "LN-LSTM", ln_fwd_script, tparams,
                    note="default fuser settings", compile_s=time.perf_counter() - t0, init=tinit)

    # LN-GRU -------------------------------------------------------------------------------
    gcell = lnjax.GRUCell(Hd)
    p_gru = gcell.init(jax.random.key(1), I)
    for pre in (True, False):
        def gloss(p, xs, tgt, pre=pre):
            ys, _ = lnjax.rnn(gcell, p, xs, precompute_inputs=pre)
            return jnp.mean((ys - tgt) ** 2)

        jax_contender(f"lnjax LN-GRU, precompute_inputs={pre}", "LN-GRU", gloss, p_gru)

    # Unnormalized LSTM, same weights in three libraries ---------------------------------
    ucell = lnjax.LSTMCell(Hd, None, None, None)
    p_u = ucell.init(jax.random.key(2), I)
    p_u["n_x"]["bias"] = 0.1 * jax.random.normal(jax.random.key(3), (4 * Hd,))
    p_u["n_h"]["bias"] = 0.1 * jax.random.normal(jax.random.key(4), (4 * Hd,))

    def uloss(p, xs, tgt):
        ys, _ = lnjax.rnn(ucell, p, xs)
        return jnp.mean((ys - tgt) ** 2)

    # Canonical view of the plain LSTM's gradients: (dW_x [I,4H], dW_h [H,4H], d(b_x + b_h)).
    jax_contender("lnjax LSTM (no norm)", "LSTM", uloss, p_u,
                  note=f"precompute_inputs={lnjax.recurrent.default_precompute_inputs(B)} (default)",
                  grads_view=lambda g: [g["w_x"], g["w_h"], g["n_h"]["bias"]])

    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(Hd))
    gates = "ifgo"
    fcell = {}
    for k, gname in enumerate(gates):
        sl = slice(k * Hd, (k + 1) * Hd)
        fcell[f"i{gname}"] = {"kernel": p_u["w_x"][:, sl]}
        fcell[f"h{gname}"] = {"kernel": p_u["w_h"][:, sl], "bias": (p_u["n_x"]["bias"] + p_u["n_h"]["bias"])[sl]}
    p_flax = {"params": {"cell": fcell}}

    def floss(p, xs, tgt):
        return jnp.mean((flax_rnn.apply(p, xs) - tgt) ** 2)

    def flax_view(g):
        c = g["params"]["cell"]
        return [jnp.concatenate([c[f"i{k}"]["kernel"] for k in gates], 1),
                jnp.concatenate([c[f"h{k}"]["kernel"] for k in gates], 1),
                jnp.concatenate([c[f"h{k}"]["bias"] for k in gates], 0)]

    jax_contender("flax nn.RNN(OptimizedLSTMCell)", "LSTM", floss, p_flax, note="unnormalized",
                  grads_view=flax_view)

    lstm = torch.nn.LSTM(I, Hd, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.tensor(np.asarray(p_u["w_x"]).T))
        lstm.weight_hh_l0.copy_(torch.tensor(np.asarray(p_u["w_h"]).T))
        lstm.bias_ih_l0.copy_(torch.tensor(np.asarray(p_u["n_x"]["bias"])))
        lstm.bias_hh_l0.copy_(torch.tensor(np.asarray(p_u["n_h"]["bias"])))
    lparams = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
    torch_contender("torch nn.LSTM", "LSTM", lambda xs: lstm(xs)[0], lparams, note="unnormalized",
                    grads_view=lambda g: [g[0].T, g[1].T, g[3]])

    H.log(f"rnn T={T} B={B} H={Hd} I={I}")
    # float32 through T steps of a recurrence: rounding differences of ~1e-7 (a matmul blocked
    # differently) grow; gradient entries near zero then differ by up to ~0.5% of the largest.
    # An error in the equations shows as O(1) differences everywhere.
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=1e-2, atol_frac=1e-2,
                           budget_s=job.get("budget_s", 60.0))
    for r in rows:
        r["tokens_per_s"] = B * T / r["median_s"]
    default = lnjax.recurrent.default_precompute_inputs(B)
    profile = {}
    if job.get("profile") and jax.default_backend() == "cpu":
        for name in (f"lnjax LN-LSTM, precompute_inputs={default}", "lnjax LSTM (no norm)",
                     "flax nn.RNN(OptimizedLSTMCell)"):
            H.log(f"rnn T={T} B={B}: kernel profile of {name}")
            profile[name] = H.kernel_profile(*profiled[name], steps=T)
    return dict(config=dict(T=T, B=B, H=Hd, I=I), rows=rows, meta=meta, default_precompute_inputs=default,
                profile=profile)


if __name__ == "__main__":
    H.job_main(run)
