"""The norm and RNN benchmarks on an accelerator, as one command: writes BENCHMARKS-gpu.md.

    python -m benchmarks.gpu [--out BENCHMARKS-gpu.md] [--quick]

Runs where `jax.default_backend()` is a GPU (or TPU); on a CPU it refuses, unless
`--allow-cpu` (a check of the code paths, whose numbers describe no accelerator). JAX
contenders only, all on the device: lnjax's default and `implementation="xla"`, Flax linen,
and for layer norm the Pallas kernel `jax.experimental.pallas.ops.gpu.layer_norm` (Triton;
skipped, with the reason, where it does not run). Every norm contender is checked against
a float64 NumPy reference first (`benchmarks.norms.reference`); the training steps are the
functions whose agreement `benchmarks.rnn` checks, timed only.

Bandwidth is measured, not looked up: a jitted copy (`x + 0`, read x and write y) is the
device's achievable HBM bandwidth, and each op's bytes over its time are given as a fraction
of it. The bytes an op must move: forward, read x and write y; forward+backward, also read x
and dy and write dx (5 arrays), plus the column reductions into dscale and dbias (negligible).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import numpy as np

from benchmarks import _harness as H
from benchmarks import contenders as C
from benchmarks import norms as N
from benchmarks import rnn as R
from benchmarks import rnn_builders
from benchmarks.markdown import FLAX, ms, table

PALLAS = "pallas ops.gpu.layer_norm"


def _pallas(op):
    """The Pallas layer norm as a contender `(fn, note)`, or `(None, reason)`."""
    if op != "layer":
        return None, "no Pallas kernel for this op"
    try:
        from jax.experimental.pallas.ops.gpu import layer_norm as pl_ln
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return None, f"import failed: {type(e).__name__}: {e}"
    return (lambda x, s, b: pl_ln.layer_norm(x, s, b, eps=C.EPS["layer"])), "Triton kernel, its own VJP"


def norm_job(op, shape, dtype, *, reps, warmup):
    """Forward and forward+backward of one (op, shape, dtype): rows per mode."""
    import jax
    import jax.numpy as jnp

    x, g, s, b = N.data(shape, dtype)
    dt = jnp.dtype(dtype)
    xj, gj, sj, bj = (jnp.asarray(a, dt) for a in (x, g, s, b))
    rounded = [np.asarray(a.astype(jnp.float32)) for a in (xj, gj, sj, bj)]
    fns = N.jax_fns(op, shape[1], dtype, roles=("lnjax", "xla"), extra=(FLAX[op][0],))
    pallas, why = _pallas(op)
    skipped = {}
    if pallas is not None:
        fns[PALLAS] = (pallas, why)
    elif op == "layer":
        skipped[PALLAS] = why
    first = (lambda o: o[0]) if op == "batch" else (lambda o: o)
    rtol, atol_frac = N.TOL[dtype]
    nbytes = x.size * dt.itemsize
    out = {}
    for mode in ("forward", "forward+backward"):
        cons = [H.Contender("float64 reference", lambda mode=mode: N.reference(
            op, *rounded, backward=mode != "forward"), reference=True, timed=False)]
        for name, (fn, note) in fns.items():
            if mode == "forward":
                f, args, view = jax.jit(fn), (xj, sj, bj), first
            else:
                def fb(x, s, b, g, fn=fn):
                    if op == "rms":
                        y, vjp = jax.vjp(lambda x, s: first(fn(x, s, None)), x, s)
                    else:
                        y, vjp = jax.vjp(lambda x, s, b: first(fn(x, s, b)), x, s, b)
                    return (y, *vjp(g))

                f, args, view = jax.jit(fb), (xj, sj, bj, gj), lambda o: o
            try:
                compiled, cs = H.timed_compile(f, *args)
            except Exception as e:  # noqa: BLE001 - e.g. a Triton kernel that does not build here
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            cons.append(H.Contender(name, lambda c=compiled, a=args, v=view: H.block(v(c(*a))), cs, note=note))
        copy, cs = H.timed_compile(jax.jit(lambda a: a + 0), xj)
        cons.append(H.Contender("copy: jax.jit(x + 0)", lambda: H.block(copy(xj)), cs, check=False))
        labels = ["y"] if mode == "forward" else ["y", "dx", "dscale"] + ([] if op == "rms" else ["dbias"])
        rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=rtol, atol_frac=atol_frac, labels=labels,
                               gap_s=0.0)
        out[mode] = dict(rows=rows, meta=meta)
    return dict(op=op, shape=list(shape), dtype=dtype, nbytes=nbytes, modes=out, skipped=skipped)


def rnn_job(cfg, *, reps, warmup):
    """Training-step time of the registry's lnjax LN-LSTM and plain LSTM and Flax's
    OptimizedLSTMCell (no agreement check: the GPU's matmuls may round differently)."""
    import dataclasses

    ctx = rnn_builders.context(cfg["T"], cfg["B"], cfg["H"], cfg["I"])
    cons = [dataclasses.replace(e.build(ctx), check=False)
            for group in ("LN-LSTM", "LSTM") for e in C.of("rnn", group, "lnjax", "flax")]
    rows, meta = H.compare(cons, warmup=warmup, reps=reps, rtol=0.0, atol_frac=0.0, gap_s=0.0)
    return dict(config=cfg, rows=rows, meta=meta)


def render(header, norms, rnns) -> str:
    lines = [
        "# Benchmarks on an accelerator",
        "",
        f"Generated by `{header['command']}` on {header['date']}; {header['wall_s'] / 60:.1f} min. "
        f"Device: **{header['device']}** (JAX backend `{header['backend']}`), jax {header['jax']}, "
        f"flax {header['flax']}. Medians of interleaved calls; see `benchmarks/gpu.py` for the method.",
        "",
    ]
    if header["backend"] == "cpu":
        lines += ["**Run on a CPU with `--allow-cpu`: a check of the code paths. These numbers describe "
                  "no accelerator.**", ""]
    for res in norms:
        k = f"{res['op']} {'x'.join(map(str, res['shape']))} {res['dtype']}"
        for mode, least in (("forward", 2), ("forward+backward", 5)):
            rr = {r["name"]: r for r in res["modes"][mode]["rows"]}
            copy = rr.pop("copy: jax.jit(x + 0)")["median_s"]
            bw = 2 * res["nbytes"] / copy
            rows = [[name, ms(r["median_s"]), f"{least * res['nbytes'] / r['median_s'] / 1e9:.0f}",
                     f"{100 * least * res['nbytes'] / r['median_s'] / bw:.0f}%"] for name, r in rr.items()]
            rows += [[name, "skipped", why, ""] for name, why in res["skipped"].items()]
            lines += [f"### {k}, {mode}", "",
                      f"A jitted copy moves {bw / 1e9:.0f} GB/s here; the op must move {least} arrays of x.", "",
                      table(["contender", "median ms", "GB/s (least bytes / time)", "of the copy's bandwidth"],
                             rows), ""]
    for res in rnns:
        c = res["config"]
        rr = {r["name"]: r for r in res["rows"]}
        flax = rr[C.FLAX_LSTM]["median_s"]
        rows = [[name, ms(r["median_s"]), f"{c['B'] * c['T'] / r['median_s']:.0f}", f"{flax / r['median_s']:.2f}x"]
                for name, r in rr.items()]
        lines += [f"### Training step, T={c['T']} B={c['B']} H={c['H']} I={c['I']}", "",
                  table(["contender", "median ms", "tokens/s", "speed vs Flax"], rows), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS-gpu.md")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions (smoke test)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on a CPU too (code paths only)")
    args = ap.parse_args(argv)
    import flax
    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not args.allow_cpu:
        print("benchmarks.gpu: no accelerator (jax.default_backend() is 'cpu'); nothing measured. "
              "Pass --allow-cpu to check the code paths.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    reps, warmup = (2, 1) if args.quick else (30, 3)
    shapes = ((64, 128),) if args.quick else N.SHAPES
    norms = [norm_job(op, shape, dt, reps=reps, warmup=warmup)
             for op in C.OPS for shape in shapes for dt in N.DTYPES]
    configs = (dict(T=5, B=2, H=8, I=16),) if args.quick else R.CONFIGS
    rnns = [rnn_job(cfg, reps=max(reps // 3, 2), warmup=warmup) for cfg in configs]
    header = dict(command="python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  device=jax.devices()[0].device_kind, backend=backend, jax=jax.__version__,
                  flax=flax.__version__, wall_s=time.perf_counter() - started)
    with open(args.out, "w") as f:
        f.write(render(header, norms, rnns))
    H.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
