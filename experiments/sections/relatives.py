"""Section: the survey's relatives, switchable and batch-layer normalization, on the MLP of
the §6.6 analogue at batch size 128 and 4."""

from experiments import curves
from experiments.report import Figure, Section
from experiments.sections import mlp
from experiments.stats import final, fmt, points

NORMS = ("batch", "layer", "switchable", "batch_layer")  # BN and LN are the MLP section's runs


def _draw(view, path):
    curves.plot_means(path, [(n, view.rows(f"mlp_{n}_bs4"), n) for n in NORMS],
                      "test_error", "test error (%)", "MLP on digits, batch size 4: LN, BN and relatives", scale=100)


def _verdicts(view, judge):
    err = {n: final(view.rows(f"mlp_{n}_bs4"), "test_error") for n in NORMS}
    gap = mlp.batch_gaps(view, NORMS)
    return [
        f"Switchable norm: batch 128 -> 4 changes test error by {fmt(gap['switchable'], True)} points vs "
        f"{fmt(gap['batch'], True)} for BN; less than BN (Luo et al.: SN much less sensitive to small "
        f"batches): {judge('switchable_batch_size', points(gap['switchable']), points(gap['batch']))}.",
        f"Batch-layer norm at batch 4: test error {fmt(err['batch_layer'], True)}% vs BN {fmt(err['batch'], True)}% "
        f"(LN {fmt(err['layer'], True)}%); better than BN (Ziaee & Cano, at small batch sizes): "
        f"{judge('batch_layer_vs_bn', points(err['batch_layer']), points(err['batch']))}."]


SECTION = Section(
    key="relatives",
    title="The survey's relatives on the §6.6 analogue: batch size 128 vs 4",
    intro=lambda view: (
        "The MLP of section 2 with switchable normalization (Luo et al. 2018; no spatial axes, "
        "so the LN/BN mix of the authors' SwitchNorm1d) and batch-layer normalization (Ziaee & "
        "Cano 2022) on the hidden layers, beside section 2's BN and LN."),
    runs=mlp.runs(("switchable", "batch_layer")),
    tables=lambda view: mlp.table(view, NORMS),
    figures=[[Figure("relatives_bs4.png", "relatives, batch 4", _draw)]],
    verdicts=_verdicts,
)
