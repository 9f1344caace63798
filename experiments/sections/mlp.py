"""Section: the paper's §6.6 analogue, a permutation-invariant MLP on digits at batch size 128
and 4, with no normalization, batch norm and layer norm."""

from configs import mlp_digits
from experiments import curves
from experiments.report import Figure, Run, Section, header, nll, row, error
from experiments.stats import fmt, gaps, points

NORMS = ("none", "batch", "layer")
BATCHES = (128, 4)


def runs(norms):
    """The MLP at each batch size with each of `norms`: run `mlp_<norm>_bs<batch>`."""
    return tuple(
        Run(f"mlp_{norm}_bs{bs}", f"{norm}, batch {bs}", mlp_digits,
            {"model.norm": norm, "batch_size": bs, "num_steps": 1500, "eval_every": 50},
            quick={"num_steps": 100, "model.hidden": (64, 64)})
        for norm in norms for bs in BATCHES)


def table(view, norms) -> list[str]:
    """Final test error and NLL of each of `norms` at each batch size."""
    return [*header("normalization", "batch", "test error %", "test NLL"),
            *(row(n, bs, error(view.rows(f"mlp_{n}_bs{bs}")), nll(view.rows(f"mlp_{n}_bs{bs}")))
              for n in norms for bs in BATCHES)]


def batch_gaps(view, norms):
    """Per norm, each seed's test error at batch 4 minus at batch 128."""
    return {n: gaps(view.rows(f"mlp_{n}_bs4"), view.rows(f"mlp_{n}_bs128"), "test_error") for n in norms}


def _figure(bs):
    def draw(view, path):
        curves.plot_means(path, [(n, view.rows(f"mlp_{n}_bs{bs}"), n) for n in NORMS],
                          "test_error", "test error (%)", f"MLP on digits, batch size {bs}", scale=100)
    return Figure(f"mlp_bs{bs}.png", f"MLP, batch {bs}", draw)


def _verdicts(view, judge):
    gap = batch_gaps(view, ("batch", "layer"))
    return [
        f"§6.6: going from batch 128 to 4 changes test error by {fmt(gap['layer'], True)} points with LN and "
        f"{fmt(gap['batch'], True)} with BN; LN less affected than BN (the paper: LN robust to batch size, "
        f"BN degrades at batch 4): {judge('mlp_batch_size', points(gap['layer']), points(gap['batch']))}."]


SECTION = Section(
    key="mlp",
    title="§6.6 analogue: permutation-invariant MLP, batch size 128 vs 4",
    intro=lambda view: (
        "scikit-learn digits (1,437 train / 360 test, 64 inputs), MLP 64-256-256-10, Adam 1e-3; "
        "LN on the hidden layers, BN on every layer (inference with running averages)."),
    runs=runs(NORMS),
    tables=lambda view: table(view, NORMS),
    figures=[[_figure(bs) for bs in BATCHES]],
    verdicts=_verdicts,
)
