"""Hyperparameter sweeps: 8 training runs as one `jax.vmap`, against the same 8 runs in turn.

Each run is a whole training loop fused into one program (`lax.scan` over the steps, Adam
from optax, a learning rate and an initialization seed per member). The sequential contender
calls the jitted single run 8 times and waits once at the end; the vmapped one calls the
jitted `vmap` of it once; a third runs the 8 in turn inside one program (`lax.map`). Agreement: member i of the vmap equals sequential run i.

    python -m benchmarks.sweep '{"model": "ln_mlp"}'
"""

from __future__ import annotations

import numpy as np

from benchmarks import _harness as H

MEMBERS = 8
CHECK_STEPS = 20
MODELS = {
    # A 2-hidden-layer MLP with layer norm, regression on a fixed random nonlinear target.
    "ln_mlp": dict(steps=300, batch=64, d_in=32, width=128, n_data=4096),
    # An LN-LSTM on a copy-the-sum task (small, so that the sweep is the point).
    "ln_lstm": dict(steps=100, batch=16, d_in=16, width=64, T=20, n_data=1024),
}


def _make(model, cfg):
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    import lnjax

    rng = np.random.default_rng(0)
    if model == "ln_mlp":
        X = jnp.asarray(rng.standard_normal((cfg["n_data"], cfg["d_in"]), dtype=np.float32))
        proj = rng.standard_normal((cfg["d_in"], 1)).astype(np.float32) / np.sqrt(cfg["d_in"])
        Y = jnp.sin(3 * X @ proj)

        def init(key):
            k1, k2, k3 = jax.random.split(key, 3)
            w = cfg["width"]
            glorot = jax.nn.initializers.glorot_normal()
            return {
                "w1": glorot(k1, (cfg["d_in"], w)), "b1": jnp.zeros(w), "g1": jnp.ones(w), "c1": jnp.zeros(w),
                "w2": glorot(k2, (w, w)), "b2": jnp.zeros(w), "g2": jnp.ones(w), "c2": jnp.zeros(w),
                "w3": glorot(k3, (w, 1)), "b3": jnp.zeros(1),
            }

        def apply(p, x):
            h = jax.nn.relu(lnjax.layer_norm(x @ p["w1"] + p["b1"], p["g1"], p["c1"]))
            h = jax.nn.relu(lnjax.layer_norm(h @ p["w2"] + p["b2"], p["g2"], p["c2"]))
            return h @ p["w3"] + p["b3"]
    else:
        T = cfg["T"]
        X = jnp.asarray(rng.standard_normal((cfg["n_data"], T, cfg["d_in"]), dtype=np.float32))
        Y = jnp.cumsum(X[..., :1], axis=1) / np.sqrt(T)
        cell = lnjax.LSTMCell(cfg["width"])

        def init(key):
            k1, k2 = jax.random.split(key)
            return {"cell": cell.init(k1, cfg["d_in"]),
                    "w": jax.nn.initializers.glorot_normal()(k2, (cfg["width"], 1)), "b": jnp.zeros(1)}

        def apply(p, x):
            ys, _ = lnjax.rnn(cell, p["cell"], x)
            return ys @ p["w"] + p["b"]

    n_batches = cfg["n_data"] // cfg["batch"]

    def train(key, lr):
        params = init(key)
        opt = optax.adam(lr)

        def loss_fn(p, x, y):
            return jnp.mean((apply(p, x) - y) ** 2)

        def step(carry, i):
            p, s = carry
            start = (i % n_batches) * cfg["batch"]
            x = lax.dynamic_slice_in_dim(X, start, cfg["batch"], 0)
            y = lax.dynamic_slice_in_dim(Y, start, cfg["batch"], 0)
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss

        (params, _), losses = lax.scan(step, (params, opt.init(params)), jnp.arange(cfg["steps"]))
        return params, losses

    return train


def run(job):
    import jax
    import jax.numpy as jnp

    model = job["model"]
    cfg = dict(MODELS[model])
    if job.get("steps"):
        cfg["steps"] = job["steps"]
    reps, warmup = job.get("reps", 5), job.get("warmup", 1)
    train = _make(model, cfg)
    keys = jax.random.split(jax.random.key(0), MEMBERS)
    lrs = jnp.logspace(-4, -1.5, MEMBERS)

    single, cs1 = H.timed_compile(jax.jit(train), keys[0], lrs[0])
    batched, csv = H.timed_compile(jax.jit(jax.vmap(train)), keys, lrs)
    mapped, csm = H.timed_compile(jax.jit(lambda k, lr: jax.lax.map(lambda a: train(*a), (k, lr))), keys, lrs)

    def sequential():
        outs = [single(keys[i], lrs[i]) for i in range(MEMBERS)]
        return H.block(jax.tree.map(lambda *a: jnp.stack(a), *outs))

    # Agreement on the first CHECK_STEPS losses of every member: Adam's sign-like updates turn
    # rounding differences (vmapped matmuls are blocked differently) into trajectories that
    # drift apart over hundreds of steps, while a wrong computation differs at once.
    cons = [
        H.Contender(f"{MEMBERS} runs in turn (jit of one run, called {MEMBERS} times)", sequential, cs1,
                    reference=True, outputs=lambda: sequential()[1][:, :CHECK_STEPS]),
        H.Contender(f"jax.vmap over {MEMBERS} runs (one jit)", lambda: H.block(batched(keys, lrs)), csv,
                    outputs=lambda: batched(keys, lrs)[1][:, :CHECK_STEPS]),
        H.Contender(f"lax.map over {MEMBERS} runs (one jit, in turn)", lambda: H.block(mapped(keys, lrs)), csm,
                    outputs=lambda: mapped(keys, lrs)[1][:, :CHECK_STEPS]),
    ]
    H.log(f"sweep {model} {cfg}")
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=1e-3, atol_frac=1e-3,
                           budget_s=job.get("budget_s", 20.0))
    return dict(model=model, cfg=cfg, members=MEMBERS, rows=rows, meta=meta)


if __name__ == "__main__":
    H.job_main(run)
