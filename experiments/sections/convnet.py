"""Section: the paper's §6.7 analogue, a small ConvNet on digits as 8x8 images with no
normalization, batch norm and layer norm."""

from configs import convnet_digits
from experiments import curves
from experiments.report import Figure, Run, Section, error, header, nll, row, speed
from experiments.stats import final, fmt, mean_train_loss, points

NORMS = ("none", "batch", "layer")


def _table(view):
    return [*header("normalization", "test error %", "test NLL", "mean training loss"),
            *(row(n, error(view.rows(f"convnet_{n}")), nll(view.rows(f"convnet_{n}")), speed(view.rows(f"convnet_{n}")))
              for n in NORMS)]


def _figure(file, alt, key, ylabel, title, **kwargs):
    def draw(view, path):
        curves.plot_means(path, [(n, view.rows(f"convnet_{n}"), n) for n in NORMS], key, ylabel, title, **kwargs)
    return Figure(file, alt, draw)


def _verdicts(view, judge):
    e = {n: final(view.rows(f"convnet_{n}"), "test_error") for n in NORMS}
    sp = {n: mean_train_loss(view.rows(f"convnet_{n}")) for n in NORMS}
    return [
        f"§6.7: LN speeds up ConvNet training over no normalization (mean training loss over the run, LN "
        f"{fmt(sp['layer'])} vs none {fmt(sp['none'])}): {judge('convnet_speed', sp['layer'], sp['none'])}; "
        f"BN ends better than LN (test error {fmt(e['batch'], True)}% vs {fmt(e['layer'], True)}%): "
        f"{judge('convnet_bn_vs_ln', points(e['batch']), points(e['layer']))}."]


SECTION = Section(
    key="convnet",
    title="§6.7 analogue: ConvNet",
    intro=lambda view: (
        "digits as 8x8x1 images; conv 3x3 (32) and 3x3 stride 2 (64), normalization, ReLU, global "
        "average pooling, softmax; Adam 3e-3, batch 64. LN over each example's channels and "
        "positions with per-channel gain and bias."),
    # Quick mode does not unroll: compiling 10 unrolled steps costs more than they save.
    runs=tuple(Run(f"convnet_{n}", n, convnet_digits, {"model.norm": n, "num_steps": 600, "eval_every": 60},
                   quick={"num_steps": 20, "eval_every": 10, "model.hidden": (8, 16), "unroll": 1})
               for n in NORMS),
    tables=_table,
    figures=[[_figure("convnet.png", "ConvNet", "test_error", "test error (%)", "ConvNet on digits", scale=100)],
             [_figure("convnet_train.png", "ConvNet training loss", "train_loss", "training loss (NLL)",
                      "ConvNet on digits: training", log=True)]],
    verdicts=_verdicts,
)
