"""Section: pixel-by-pixel digits (T = 64), in order and under a fixed permutation: the
sMNIST/pMNIST analogue, LSTM vs LN-LSTM vs BN-LSTM."""

from configs import pixel_digits
from experiments import curves
from experiments.report import Figure, Run, Section, error, header, nll, row, speed
from experiments.stats import final, fmt, mean_train_loss, points

ORDERS = {"seq": "sequential", "perm": "permuted"}
# (model, label, overrides, colour); the LN-LSTM is the config's own model.
MODELS = (("lstm", "LSTM", {"model.norm": "none"}, "none"), ("ln_lstm", "LN-LSTM", {}, "layer"),
          ("bn_lstm", "BN-LSTM", {"model.cell": "bn_lstm"}, "batch"))


def _name(order, model):
    return f"pixel_{order}_{model}"


def _table(view):
    return [*header("order", "model", "test error %", "test NLL", "mean training loss"),
            *(row(word, view.label(_name(o, m)), error(view.rows(_name(o, m))), nll(view.rows(_name(o, m))),
                  speed(view.rows(_name(o, m)))) for o, word in ORDERS.items() for m, *_ in MODELS)]


def _figure(order):
    def draw(view, path):
        curves.plot_means(path, [(view.label(_name(order, m)), view.rows(_name(order, m)), c) for m, _, _, c in MODELS],
                          "test_error", "test error (%)", f"Pixel-by-pixel digits ({ORDERS[order]})", scale=100)
    return Figure(f"pixel_{order}.png", ORDERS[order], draw)


def _verdicts(view, judge):
    findings = []
    for o, word in ORDERS.items():
        e = {m: final(view.rows(_name(o, m)), "test_error") for m, *_ in MODELS}
        sp = {m: mean_train_loss(view.rows(_name(o, m))) for m, *_ in MODELS}
        findings.append(
            f"Pixel-by-pixel digits ({word}): LN-LSTM trains faster than LSTM (mean training loss "
            f"{fmt(sp['ln_lstm'])} vs {fmt(sp['lstm'])}): {judge(f'pixel_{o}_speed', sp['ln_lstm'], sp['lstm'])}; "
            f"ends better (test error {fmt(e['ln_lstm'], True)}% vs {fmt(e['lstm'], True)}%): "
            f"{judge(f'pixel_{o}_error', points(e['ln_lstm']), points(e['lstm']))}; BN-LSTM better than LSTM "
            f"(Cooijmans et al.; {fmt(e['bn_lstm'], True)}%): "
            f"{judge(f'pixel_{o}_bn', points(e['bn_lstm']), points(e['lstm']))}.")
    return findings


SECTION = Section(
    key="pixel",
    title="Pixel-by-pixel digits, sequential and permuted (the sMNIST/pMNIST analogue)",
    intro=lambda view: (
        "Each digit is read one pixel per step, T = 64, in row-major order or under one fixed "
        "random permutation; hidden 64, Adam 3e-3, batch 64. With one input feature, LN(W_x x_t) "
        "would keep only the sign of x_t (Table 1's single-case invariance), so the LN-LSTM "
        "normalizes the recurrent term and the cell state only (eq. 20-22 without LN on the input "
        "term); BN-LSTM as in section 3. Cooijmans et al. (MNIST, T = 784, 100 units) report "
        "test accuracy LSTM 98.9 / 90.2 and BN-LSTM 99.0 / 95.4 (sequential / permuted); no "
        "LN-LSTM figure is published."),
    runs=tuple(
        Run(_name(o, m), label, pixel_digits,
            {**over, "task.permute": o == "perm", "num_steps": 500, "eval_every": 50, "steps_per_call": 50},
            quick={"num_steps": 40, "eval_every": 20, "steps_per_call": 20, "model.hidden": (16,)})
        for o in ORDERS for m, label, over, _ in MODELS),
    tables=_table,
    figures=[[_figure(o) for o in ORDERS]],
    verdicts=_verdicts,
)
