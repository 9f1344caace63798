"""Peak memory of LN-LSTM training at T=1000, with and without rematerialization.

The numbers are XLA's own accounting of the compiled training step
(`jax.jit(f).lower(...).compile().memory_analysis()`): `temp` is the scratch memory the
program needs beyond its arguments and outputs, which is where the activations saved for the
backward pass live. Rematerialization wraps the cell's step in `jax.checkpoint` inside the
scan, so only the carry of each step is saved and the step is recomputed in the backward
pass; `dots_saveable` keeps the matmul outputs and recomputes the rest. The step time of each
variant is measured too (interleaved), as the price of the memory saved.

    python -m benchmarks.memory '{"T": 1000}'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks import _harness as H


@dataclasses.dataclass(frozen=True)
class Remat:
    """A cell whose step is wrapped in `jax.checkpoint` (with an optional saving policy)."""

    cell: Any
    policy: Any = None

    def initial_carry(self, *args, **kwargs):
        return self.cell.initial_carry(*args, **kwargs)

    def project_inputs(self, params, x):
        return self.cell.project_inputs(params, x)

    def step(self, params, carry, u):
        import jax

        return jax.checkpoint(self.cell.step, policy=self.policy)(params, carry, u)

    def __call__(self, params, carry, x):
        import jax

        return jax.checkpoint(self.cell.__call__, policy=self.policy)(params, carry, x)


def run(job):
    import jax
    import jax.numpy as jnp

    import lnjax

    T, B, Hd, I = job.get("T", 1000), job.get("B", 32), job.get("H", 256), job.get("I", 128)
    reps, warmup = job.get("reps", 5), job.get("warmup", 1)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((B, T, I), dtype=np.float32))
    tgt = jnp.asarray(0.5 * rng.standard_normal((B, T, Hd), dtype=np.float32))
    cell = lnjax.LSTMCell(Hd)
    params = cell.init(jax.random.key(0), I)
    policies = {
        "none (saves every residual)": None,
        "jax.checkpoint(step)": "all",
        "jax.checkpoint(step, policy=dots_saveable)": jax.checkpoint_policies.dots_saveable,
    }
    cons, mem = [], []
    for pre in (False, True):
        for label, policy in policies.items():
            c = cell if policy is None else Remat(cell, None if policy == "all" else policy)

            def loss_fn(p, xs, tgt, c=c, pre=pre):
                ys, _ = lnjax.rnn(c, p, xs, precompute_inputs=pre)
                return jnp.mean((ys - tgt) ** 2)

            grad = jax.jit(jax.value_and_grad(loss_fn))
            compiled, cs = H.timed_compile(grad, params, xs, tgt)
            ma = compiled.memory_analysis()
            fields = {k: int(getattr(ma, k)) for k in dir(ma)
                      if k.endswith("_in_bytes") and isinstance(getattr(ma, k, None), int)}
            name = f"remat: {label}; precompute_inputs={pre}"
            mem.append(dict(name=name, remat=label, precompute_inputs=pre, compile_s=cs, **fields))
            if pre == lnjax.heuristics.default_precompute_inputs(B):  # time the default form only
                cons.append(H.Contender(name, lambda g=compiled: H.block(g(params, xs, tgt)), cs))
    H.log(f"memory T={T} B={B} H={Hd} I={I}")
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=1e-4, atol_frac=1e-4,
                           budget_s=job.get("budget_s", 30.0))
    return dict(config=dict(T=T, B=B, H=Hd, I=I), memory=mem, rows=rows, meta=meta)


if __name__ == "__main__":
    H.job_main(run)
