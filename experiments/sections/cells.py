"""Section: the paper's own cells (LN-LSTM eq. 20-22, LN-GRU eq. 26-28) beside the plain
LSTM and GRU and Cooijmans et al.'s BN-LSTM, on row-by-row digits."""

from configs import rnn_digits
from experiments import curves
from experiments.report import Figure, Run, Section, error, header, nll, row, speed
from experiments.stats import at_lr, final, fmt, mean_train_loss, points

# The variants: (run name, label, config overrides of configs/rnn_digits.py, line style).
VARIANTS = (
    ("rows_lstm", "LSTM", {"model.cell": "lstm", "model.norm": "none"}, "-"),
    ("rows_ln_lstm", "LN-LSTM (gain 1.0)", {"model.cell": "lstm", "model.norm": "layer"}, "-"),
    ("rows_ln_lstm_g01", "LN-LSTM (gain 0.1)",
     {"model.cell": "lstm", "model.norm": "layer", "model.norm_args.scale_init": 0.1}, "--"),
    ("rows_gru", "GRU", {"model.cell": "gru", "model.norm": "none"}, ":"),
    ("rows_ln_gru", "LN-GRU (gain 1.0)", {"model.cell": "gru", "model.norm": "layer"}, ":"),
    ("rows_ln_gru_g01", "LN-GRU (gain 0.1)",
     {"model.cell": "gru", "model.norm": "layer", "model.norm_args.scale_init": 0.1}, "-."),
    ("rows_bn_lstm", "BN-LSTM", {"model.cell": "bn_lstm"}, "-"),
)
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # of the LSTM and LN-LSTM runs
SWEPT = ("rows_lstm", "rows_ln_lstm")  # their members at the config's rate are the cells' runs
STEPS = {"num_steps": 600, "eval_every": 25, "steps_per_call": 25, "model.hidden": (64,)}
QUICK = {"num_steps": 60, "eval_every": 20, "steps_per_call": 20, "model.hidden": (16,)}


def run(name, label, overrides, **kwargs) -> Run:
    """A row-by-row digits run with the section's steps and sizes."""
    return Run(name, label, rnn_digits, {**overrides, **STEPS}, quick=QUICK, **kwargs)


def _lr0():
    return rnn_digits.get_config().optimizer.learning_rate


def _rows(view):
    """Each variant's rows at the config's learning rate (the swept ones hold every rate)."""
    return {n: at_lr(view.rows(n), _lr0()) for n, *_ in VARIANTS}


def _table(view):
    rows = _rows(view)
    return [*header("model", "test error %", "test NLL", "mean training loss"),
            *(row(label, error(rows[n]), nll(rows[n]), speed(rows[n])) for n, label, *_ in VARIANTS)]


def _draw(view, path):
    norm_of = lambda n: "batch" if "bn_" in n else ("layer" if "_ln_" in n else "none")  # noqa: E731
    rows = _rows(view)
    curves.plot_means(path, [(label, rows[n], norm_of(n), style) for n, label, _, style in VARIANTS],
                      "train_loss", "training loss (NLL)", "The paper's cells on row-by-row digits: training", log=True)


def _verdicts(view, judge):
    rows = _rows(view)
    sp = {n: mean_train_loss(r) for n, r in rows.items()}
    err = {n: final(r, "test_error") for n, r in rows.items()}
    nl = {n: final(r, "test_loss") for n, r in rows.items()}
    findings = [
        f"Row-by-row digits, {cell}: LN-{cell} trains faster than {cell} (mean training loss "
        f"{fmt(sp[ln])} vs {fmt(sp[plain])}): {judge(f'rows_{cell}_speed', sp[ln], sp[plain])}; "
        f"ends better (test NLL {fmt(nl[ln])} vs {fmt(nl[plain])}): {judge(f'rows_{cell}_nll', nl[ln], nl[plain])}; "
        f"gain init 1.0 better than 0.1 (test NLL {fmt(nl[ln])} vs {fmt(nl[g01])}): "
        f"{judge(f'rows_{cell}_gain', nl[ln], nl[g01])}."
        for cell, plain, ln, g01 in (("LSTM", "rows_lstm", "rows_ln_lstm", "rows_ln_lstm_g01"),
                                     ("GRU", "rows_gru", "rows_ln_gru", "rows_ln_gru_g01"))]
    return findings + [
        f"Row-by-row digits: LN-LSTM ends better than BN-LSTM (test error {fmt(err['rows_ln_lstm'], True)}% vs "
        f"{fmt(err['rows_bn_lstm'], True)}%; §6.2): "
        f"{judge('rows_ln_vs_bn', points(err['rows_ln_lstm']), points(err['rows_bn_lstm']))}."]


SECTION = Section(
    key="cells",
    title="The paper's cells: LSTM, LN-LSTM, GRU, LN-GRU and BN-LSTM on row-by-row digits",
    intro=lambda view: (
        "Each 8x8 digit is read one row (8 pixels) per step, T = 8, and classified from the last "
        f"hidden state; hidden 64, Adam {_lr0():g}, batch 64, clip 10. The LN cells are the paper's: "
        "LN-LSTM eq. 20-22 (input and recurrent terms normalized separately over all four gates, "
        "and the cell state's read-out), LN-GRU eq. 26-28 (`h_t = (1 - z) h_{t-1} + z h~_t`). "
        "Gains start at 1.0 or 0.1 (§6.2: 1.0 is clearly better). BN-LSTM: Cooijmans et al.'s cell "
        "with per-step statistics and their initial gains 0.1. Every LSTM's forget bias starts at 0. \"Mean training "
        "loss\" averages each seed's training loss over its evaluations (every 25 steps): the "
        "model that trains faster has the lower one."),
    # The LSTM and LN-LSTM are learning-rate sweeps (one compiled program each) for the
    # learning-rate section; the comparisons here use their members at the config's rate.
    runs=tuple(run(n, label, {**over, **({"sweep.learning_rate": LEARNING_RATES} if n in SWEPT else {})})
               for n, label, over, _ in VARIANTS),
    tables=_table,
    figures=[[Figure("cells_train.png", "the paper's cells, training loss", _draw)]],
    verdicts=_verdicts,
)
