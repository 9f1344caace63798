"""Section: the adding problem, LSTM vs an LN-LSTM that normalizes the recurrent term and the
cell state only."""

from configs import rnn_adding
from experiments import curves
from experiments.report import Figure, Run, Section, header, row, speed
from experiments.stats import final, fmt, mean_train_loss, steps_to

TARGET_MSE = 0.05  # well below the 1/6 of always predicting 1
MODELS = (("lstm", "LSTM", {"model.norm": "none"}, "none"), ("ln_lstm", "LN-LSTM", {"model.norm": "layer"}, "layer"))


def _table(view):
    lines = header("model", "final test MSE", f"steps to MSE ≤ {TARGET_MSE} (median)", "mean training MSE")
    for name, *_ in MODELS:
        rows = view.rows(name)
        reach = steps_to(rows, "test_loss", TARGET_MSE)
        lines.append(row(view.label(name), fmt(final(rows, "test_loss")), reach if reach else "not reached", speed(rows)))
    return lines


def _draw(view, path):
    curves.plot_means(path, [(view.label(n), view.rows(n), c) for n, _, _, c in MODELS],
                      "test_loss", "test MSE", "Adding problem (T=50)", log=True)


def _verdicts(view, judge):
    fin = {n: final(view.rows(n), "test_loss") for n, *_ in MODELS}
    sp = {n: mean_train_loss(view.rows(n)) for n, *_ in MODELS}
    return [
        f"Adding problem: LN-LSTM trains faster than LSTM (mean training MSE over the run "
        f"{fmt(sp['ln_lstm'])} vs {fmt(sp['lstm'])}): {judge('adding_speed', sp['ln_lstm'], sp['lstm'])}; "
        f"and ends better (test MSE {fmt(fin['ln_lstm'])} vs {fmt(fin['lstm'])}): "
        f"{judge('adding_mse', fin['ln_lstm'], fin['lstm'])}."]


SECTION = Section(
    key="adding",
    title="The adding problem: LSTM vs LN-LSTM with the recurrent term normalized",
    intro=lambda view: (
        "Adding problem, T = 50, 10,000 training sequences (quick mode: T = 20, 1,000), hidden 64, Adam 3e-3, clip 10; MSE "
        "(predicting 1 scores 0.1667). The LN-LSTM normalizes the recurrent term and the cell state "
        "only: with 2 input features LN(W_x x_t) would discard most of the input (Table 1)."),
    runs=tuple(
        Run(name, label, rnn_adding, {**over, "num_steps": 600, "eval_every": 50},
            quick={"num_steps": 50, "model.hidden": (16,), "task.length": 20, "task.train_size": 1000})
        for name, label, over, _ in MODELS),
    tables=_table,
    figures=[[Figure("rnn_adding.png", "adding problem", _draw)]],
    verdicts=_verdicts,
)
