"""The paper reproduction (the main job): trains every experiment's sweep and writes a
self-contained report directory (report.md, PNG plots, the configs, the raw metrics).

    python -m experiments            # full run (README.md gives its measured duration)
    python -m experiments --quick    # ~2.5 minute smoke version, compile-bound (the test suite runs it)

Every run checkpoints; re-running the same command resumes where it stopped.
"""

import argparse
import json
import os
import pathlib
import shutil
import time

import numpy as np
from tqdm.auto import tqdm

from configs import convnet_digits, gin_graphs, mlp_digits, rnn_adding, rnn_digits
from experiments import curves, invariances, train

RNN_TARGET_MSE = 0.05  # well below the 1/6 of always predicting 1


# Chen et al. 2020's graph normalizations (lnjax.norms names), with none as the baseline.
GRAPH_NORMS = ("none", "graph_node", "graph_adjacency", "graph", "graph_batch", "graph_learned")


def _runs(quick: bool):
    """(section, run name, label, config) for every sweep of the reproduction."""
    seeds = (0, 1) if quick else (0, 1, 2)
    runs = []

    def add(section, name, label, module, **over):
        cfg = module.get_config()
        cfg.sweep.seed = seeds
        cfg.update_from_flattened_dict(over)
        runs.append((section, name, label, cfg))

    # Quick mode shrinks models and sequences too: its cost is mostly compilation.
    small = {"model.hidden": (64, 64)} if quick else {}
    for norm in ("none", "batch", "layer"):
        for bs in (128, 4):
            steps = 100 if quick else 1500
            add("mlp", f"mlp_{norm}_bs{bs}", f"{norm}, batch {bs}", mlp_digits, **{
                "model.norm": norm, "batch_size": bs, "num_steps": steps, "checkpoint_every": steps,
                "eval_every": 50, **small})
    for norm in ("switchable", "batch_layer"):  # the survey's relatives, same MLP settings
        for bs in (128, 4):
            steps = 100 if quick else 1500
            add("relatives", f"mlp_{norm}_bs{bs}", f"{norm}, batch {bs}", mlp_digits, **{
                "model.norm": norm, "batch_size": bs, "num_steps": steps, "checkpoint_every": steps,
                "eval_every": 50, **small})
    rnn_variants = [
        ("lstm", "LSTM", {"model.norm": "none"}),
        ("ln_lstm", "LN-LSTM (gain 1.0)", {"model.norm": "layer", "model.norm_args.scale_init": 1.0}),
        ("ln_lstm_g01", "LN-LSTM (gain 0.1)", {"model.norm": "layer", "model.norm_args.scale_init": 0.1}),
        ("bn_lstm", "BN-LSTM", {"model.cell": "bn_lstm"}),
    ]
    for name, label, over in rnn_variants:
        steps = 50 if quick else 1200
        small = {"model.hidden": (16,), "task.length": 20, "task.train_size": 1000} if quick else {}
        add("rnn", name, label, rnn_adding, **over, **small, num_steps=steps, checkpoint_every=steps, eval_every=50)
    for norm in ("none", "batch", "layer"):
        steps = 20 if quick else 600
        # Quick mode does not unroll: compiling 10 unrolled steps costs more than they save.
        small = {"model.hidden": (8, 16), "unroll": 1} if quick else {}
        add("convnet", f"convnet_{norm}", norm, convnet_digits, **{
            "model.norm": norm, "num_steps": steps, "checkpoint_every": steps, "eval_every": 10 if quick else 60, **small})
    for norm in ("none", "layer", "divisive"):
        steps = 100 if quick else 1000
        small = {"model.hidden": (32,)} if quick else {}
        if quick and norm == "divisive":
            small["model.norm_args.radius"] = 4  # of 32 hidden units
        add("divisive", f"tanh_rnn_{norm}", norm, rnn_digits, **{
            "model.norm": norm, "num_steps": steps, "checkpoint_every": steps,
            "eval_every": 50 if quick else 100, **small})
    for norm in GRAPH_NORMS:
        steps = 100 if quick else 1000
        add("graphs", f"gin_{norm}", norm, gin_graphs, **{"model.norm": norm, "num_steps": steps,
            "checkpoint_every": steps, "eval_every": 50 if quick else 100})
    return runs


def _final(rows, key):
    last = max(r["step"] for r in rows)
    vals = np.array([r[key] for r in rows if r["step"] == last and r["diverged_at"] < 0])
    return (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"), float("nan"))


def _steps_to(rows, key, target):
    """Median over members of the first evaluated step with `key <= target` (None if never)."""
    firsts = {}
    for r in sorted(rows, key=lambda r: r["step"]):
        if r[key] <= target and r["diverged_at"] < 0:
            firsts.setdefault(r["member"], r["step"])
    members = {r["member"] for r in rows}
    if len(firsts) < len(members):
        return None
    return int(np.median(list(firsts.values())))


def _fmt(mean_std, pct=False):
    m, s = mean_std
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.4f} ± {s:.4f}"


def write_report(out: pathlib.Path, results, inv, quick: bool, seconds: float):
    by = {name: (section, label, rows) for section, name, label, rows in results}
    lines = ["# Layer Normalization (Ba, Kiros & Hinton 2016): reproduction report", ""]
    mode = ("quick (smoke test, too short to judge findings; compiled with "
            f"`XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}`)" if quick else "full")
    lines += [f"Mode: {mode}; "
              f"total time {seconds / 60:.1f} min. Every number below is computed by "
              "`python -m experiments" + (" --quick" if quick else "") + "`; raw metrics are in "
              "`runs/*/metrics.jsonl`, configs in `runs/*/config.json`.", ""]
    findings = []

    lines += ["## 1. Table 1: invariances, measured", "",
              "Relative change of the normalized summed inputs `max|y'-y|/max|y|` (float32, eps = 0, "
              "worst of 5 random trials); *invariant* when below 1e-4.", "", invariances.table(inv)]
    agree = sum((inv[m, t] < 1e-4) == e for m, exp in invariances.PAPER.items() for t, e in zip(invariances.TRANSFORMS, exp))
    findings.append(f"Table 1: {agree} of 18 cells agree with the paper.")

    lines += ["## 2. §6.6 analogue: permutation-invariant MLP, batch size 128 vs 4", "",
              "scikit-learn digits (1,437 train / 360 test, 64 inputs), MLP 64-256-256-10, Adam 1e-3; "
              "LN on the hidden layers, BN on every layer (inference with running averages).", "",
              "| normalization | batch | test error % | test NLL |", "|---|---|---|---|"]
    for norm in ("none", "batch", "layer"):
        for bs in (128, 4):
            rows = by[f"mlp_{norm}_bs{bs}"][2]
            lines.append(f"| {norm} | {bs} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} |")
    for bs in (128, 4):
        curves.plot_means(out / f"mlp_bs{bs}.png", [(n, by[f"mlp_{n}_bs{bs}"][2]) for n in ("none", "batch", "layer")],
              "test_error", "test error", f"MLP on digits, batch size {bs}")
    lines += ["", "![MLP, batch 128](mlp_bs128.png) ![MLP, batch 4](mlp_bs4.png)", ""]
    gap = {n: _final(by[f"mlp_{n}_bs4"][2], "test_error")[0] - _final(by[f"mlp_{n}_bs128"][2], "test_error")[0]
           for n in ("batch", "layer")}
    ok = gap["layer"] < gap["batch"]
    findings.append(
        f"§6.6: going from batch 128 to 4 changes test error by {100 * gap['layer']:+.1f} points with LN and "
        f"{100 * gap['batch']:+.1f} with BN: {'agrees' if ok else 'does not agree'} with the paper "
        "(LN robust to batch size, BN degrades at batch 4).")

    lines += ["## 3. RNN analogue of §6.2/§6.5: LSTM vs LN-LSTM vs BN-LSTM on the adding problem", "",
              "Adding problem, T = 50, 10,000 training sequences (quick mode: T = 20, 1,000), hidden 64, Adam 3e-3, clip 10; MSE "
              "(predicting 1 scores 0.1667). LN cells normalize the recurrent term only (2 input "
              "features: see the caveat on LN(W_x x)). BN-LSTM: per-step statistics, gains 1.0 as the LN "
              "cells' (Cooijmans et al. use 0.1), forget bias 0.", "",
              f"| model | final test MSE | steps to MSE ≤ {RNN_TARGET_MSE} (median) |", "|---|---|---|"]
    rnn_names = ("lstm", "ln_lstm", "ln_lstm_g01", "bn_lstm")
    reach = {}
    for name in rnn_names:
        label, rows = by[name][1], by[name][2]
        reach[name] = _steps_to(rows, "test_loss", RNN_TARGET_MSE)
        lines.append(f"| {label} | {_fmt(_final(rows, 'test_loss'))} | {reach[name] if reach[name] else 'not reached'} |")
    curves.plot_means(out / "rnn_adding.png", [(by[n][1], by[n][2]) for n in rnn_names], "test_loss", "test MSE",
          "Adding problem (T=50)", log=True)
    lines += ["", "![adding problem](rnn_adding.png)", ""]
    ln_final, lstm_final = _final(by["ln_lstm"][2], "test_loss")[0], _final(by["lstm"][2], "test_loss")[0]
    g1, g01 = ln_final, _final(by["ln_lstm_g01"][2], "test_loss")[0]
    findings.append(
        f"RNN: LN-LSTM final MSE {ln_final:.4f} vs LSTM {lstm_final:.4f} "
        f"({'agrees' if ln_final < lstm_final else 'does not agree'} with the paper: LN trains faster and ends better); "
        f"gain init 1.0 {g1:.4f} vs 0.1 {g01:.4f} ({'agrees' if g1 < g01 else 'does not agree'}: 1.0 better).")

    lines += ["## 4. §6.7 analogue: ConvNet", "",
              "digits as 8x8x1 images; conv 3x3 (32) and 3x3 stride 2 (64), normalization, ReLU, global "
              "average pooling, softmax; Adam 3e-3, batch 64. LN over each example's channels and "
              "positions with per-channel gain and bias.", "",
              "| normalization | test error % | test NLL |", "|---|---|---|"]
    for norm in ("none", "batch", "layer"):
        rows = by[f"convnet_{norm}"][2]
        lines.append(f"| {norm} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} |")
    curves.plot_means(out / "convnet.png", [(n, by[f"convnet_{n}"][2]) for n in ("none", "batch", "layer")],
          "test_error", "test error", "ConvNet on digits")
    lines += ["", "![ConvNet](convnet.png)", ""]
    e = {n: _final(by[f"convnet_{n}"][2], "test_error")[0] for n in ("none", "batch", "layer")}
    findings.append(
        f"§6.7: test error none {100 * e['none']:.1f}%, BN {100 * e['batch']:.1f}%, LN {100 * e['layer']:.1f}%: "
        f"BN best {'agrees' if e['batch'] <= min(e.values()) else 'does not agree'}; LN better than none "
        f"{'agrees' if e['layer'] < e['none'] else 'does not agree'}.")

    mlp_norms = ("batch", "layer", "switchable", "batch_layer")
    lines += ["## 5. The survey's relatives on the §6.6 analogue: batch size 128 vs 4", "",
              "The MLP of section 2 with switchable normalization (Luo et al. 2018; no spatial axes, "
              "so the LN/BN mix of the authors' SwitchNorm1d) and batch-layer normalization (Ziaee & "
              "Cano 2022) on the hidden layers, beside section 2's BN and LN.", "",
              "| normalization | batch | test error % | test NLL |", "|---|---|---|---|"]
    for norm in mlp_norms:
        for bs in (128, 4):
            rows = by[f"mlp_{norm}_bs{bs}"][2]
            lines.append(f"| {norm} | {bs} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} |")
    curves.plot_means(out / "relatives_bs4.png", [(n, by[f"mlp_{n}_bs4"][2]) for n in mlp_norms],
          "test_error", "test error", "MLP on digits, batch size 4: LN, BN and relatives")
    lines += ["", "![relatives, batch 4](relatives_bs4.png)", ""]
    err = {(n, bs): _final(by[f"mlp_{n}_bs{bs}"][2], "test_error")[0] for n in mlp_norms for bs in (128, 4)}
    gap = {n: err[n, 4] - err[n, 128] for n in mlp_norms}
    findings.append(
        f"Switchable norm: batch 128 -> 4 changes test error by {100 * gap['switchable']:+.1f} points vs "
        f"{100 * gap['batch']:+.1f} for BN: {'agrees' if gap['switchable'] < gap['batch'] else 'does not agree'} "
        "with Luo et al. (SN much less sensitive to small batches than BN).")
    findings.append(
        f"Batch-layer norm at batch 4: {100 * err['batch_layer', 4]:.1f}% vs BN {100 * err['batch', 4]:.1f}% and "
        f"LN {100 * err['layer', 4]:.1f}%: {'agrees' if err['batch_layer', 4] < err['batch', 4] else 'does not agree'} "
        "with Ziaee & Cano (BLN better than BN at small batch sizes).")

    dn_norms = ("none", "layer", "divisive")
    lines += ["## 6. Divisive vs layer normalization in a tanh RNN", "",
              "Sequential digits: a tanh RNN (eq. 4, hidden 128) reads each 8x8 digit one row per step "
              "and classifies from its last state; Adam 1e-3, batch 64. Divisive normalization (Ren et "
              "al. 2017) replaces LN of the summed input by `v / sqrt(sigma^2 + E_B[v^2])`, "
              "`v = z - E_A[z]`, with A = B a window of radius 15 over neighbouring units and sigma = 1 "
              "(their DN* setting). They report, on PTB word-level language modelling, perplexity "
              "149.4 without normalization, 154.3 with LN and 123.7 with DN*.", "",
              "| normalization | test error % | test NLL |", "|---|---|---|"]
    for norm in dn_norms:
        rows = by[f"tanh_rnn_{norm}"][2]
        lines.append(f"| {norm} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} |")
    curves.plot_means(out / "tanh_rnn.png", [(n, by[f"tanh_rnn_{n}"][2]) for n in dn_norms],
          "test_loss", "test NLL", "tanh RNN on sequential digits", log=True)
    lines += ["", "![tanh RNN](tanh_rnn.png)", ""]
    nll = {n: _final(by[f"tanh_rnn_{n}"][2], "test_loss")[0] for n in dn_norms}
    findings.append(
        f"Divisive norm (tanh RNN, test NLL): none {nll['none']:.3f}, LN {nll['layer']:.3f}, DN {nll['divisive']:.3f}: "
        f"DN best {'agrees' if nll['divisive'] <= min(nll.values()) else 'does not agree'} with Ren et al.; "
        f"LN worse than none {'agrees' if nll['layer'] > nll['none'] else 'does not agree'}.")

    lines += ["## 7. Graph normalizations on a graph-classification task", "",
              "Synthetic \"denser colour\" graphs (`experiments/data.py`: 8-20 nodes, half red and half "
              "blue; is the red-red or the blue-blue edge count larger? Features alone are at chance), "
              "the 3-layer GIN-style network of `configs/gin_graphs.py` with each normalization of Chen "
              "et al. 2020 after every layer, Adam 1e-2, batches of 64 graphs; final test accuracy over seeds.", "",
              "| normalization | test accuracy % | per seed |", "|---|---|---|"]
    acc = {}
    for norm in GRAPH_NORMS:
        rows = by[f"gin_{norm}"][2]
        err_mean, err_std = _final(rows, "test_error")
        acc[norm] = 1 - err_mean
        last = max(r["step"] for r in rows)
        per = ", ".join(f"{100 * (1 - r['test_error']):.1f}" for r in rows if r["step"] == last)
        lines.append(f"| {norm} | {_fmt((1 - err_mean, err_std), True)} | {per} |")
    lines.append("")
    best_single = max(v for n, v in acc.items() if n not in ("graph_learned", "none"))
    findings.append(
        "Graph norms (test accuracy): " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in acc.items()) +
        f": the learned combination at least as good as the best single norm "
        f"{'agrees' if acc['graph_learned'] >= best_single - 0.01 else 'does not agree'} with Chen et al.; "
        f"graph-wise better than node-wise {'agrees' if acc['graph'] > acc['graph_node'] else 'does not agree'}.")

    diverged = [f"{name} member {r['member']} (seed {r['seed']}, lr {r['learning_rate']}) at step {r['diverged_at']}"
                for _, name, _, rows in results for r in rows
                if r["diverged_at"] >= 0 and r["step"] == max(x["step"] for x in rows)]
    lines += ["## Diverged sweep members", "", *(f"- {d}" for d in diverged or ["none"]), ""]
    lines[4:4] = ["## Findings", "", *(f"- {f}" for f in findings), ""]
    (out / "report.md").write_text("\n".join(lines))
    return findings


def main(argv=None):
    # The docstring's whole first paragraph: its first line alone stops mid-sentence.
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="python -m experiments", description=summary)
    parser.add_argument("--quick", action="store_true", help="~2.5 minute smoke version (compile-bound)")
    parser.add_argument("--out", default=None, help="report directory (default: report/ or report-quick/)")
    parser.add_argument("--fresh", action="store_true", help="delete the report directory first")
    parser.add_argument("-v", "--verbose", action="store_true", help="show absl's INFO logs (orbax's among them)")
    args = parser.parse_args(argv)
    train.set_verbosity(args.verbose)
    out = pathlib.Path(args.out or ("report-quick" if args.quick else "report"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    inv = invariances.measure()
    results = []
    runs = _runs(args.quick)
    # One bar over the runs (run k of N, elapsed, ETA), each run's own bar nested below it.
    with tqdm(runs, desc="reproduction", unit="run") as bar:
        for section, name, label, cfg in bar:
            _, rows, _ = train.fit(cfg, out / "runs" / name, desc=name)
            results.append((section, name, label, rows))
    findings = write_report(out, results, inv, args.quick, time.time() - start)
    print(f"\nreport written to {out / 'report.md'}")
    for f in findings:
        print(" -", f)
    (out / "findings.json").write_text(json.dumps(findings, indent=1))
