"""Recurrent layers: training-step throughput (tokens/s) of LN-LSTM / LN-GRU and baselines.

A training step is: run the layer over `[B, T, I]` inputs, loss = mean squared error against
a fixed random target `[B, T, H]`, gradients of every parameter, and an SGD update in place
(JAX: `jax.jit` with the parameters donated; PyTorch: `p -= lr * p.grad`). Tokens/s is
`B * T / median step time`.

Contenders (the registry's `rnn` suite, `benchmarks.contenders`; built by
`benchmarks.rnn_builders`), all in one process per configuration, timed interleaved:

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

from benchmarks import _harness as H
from benchmarks import contenders as C
from benchmarks import rnn_builders

CONFIGS = ({"T": 100, "B": 32, "H": 256, "I": 128}, {"T": 200, "B": 1, "H": 128, "I": 128})


def run(job):
    import jax

    import lnjax

    T, B = job["T"], job["B"]
    reps, warmup = job.get("reps", 10), job.get("warmup", 1)
    ctx = rnn_builders.context(T, B, job["H"], job["I"])
    skip = () if job.get("xla", True) else ("xla",)
    cons = [e.build(ctx) for e in C.REGISTRY.values() if e.suite == "rnn" and e.role not in skip]
    H.log(f"rnn T={T} B={B} H={ctx.H} I={ctx.I}")
    # float32 through T steps of a recurrence: rounding differences of ~1e-7 (a matmul blocked
    # differently) grow; gradient entries near zero then differ by up to ~0.5% of the largest.
    # An error in the equations shows as O(1) differences everywhere.
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=1e-2, atol_frac=1e-2,
                           budget_s=job.get("budget_s", 60.0))
    for r in rows:
        r["tokens_per_s"] = B * T / r["median_s"]
    default = lnjax.heuristics.default_precompute_inputs(B)
    profile = {}
    if job.get("profile") and jax.default_backend() == "cpu":
        for name in (C.cell_name("LN-LSTM", default), C.PLAIN_LSTM, C.FLAX_LSTM):
            H.log(f"rnn T={T} B={B}: kernel profile of {name}")
            profile[name] = H.kernel_profile(*ctx.profiled[name], steps=T)
    return dict(config=dict(T=T, B=B, H=ctx.H, I=ctx.I), rows=rows, meta=meta, default_precompute_inputs=default,
                profile=profile)


if __name__ == "__main__":
    H.job_main(run)
