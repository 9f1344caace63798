"""Section: the paper's Table 1 (which transformations leave the normalized summed inputs
unchanged), measured rather than trained."""

from experiments import invariances
from experiments.report import Section

TOL = 1e-4  # a relative change below it counts as invariant (the intro says so)


def _agree(view):
    inv = view.measured["table1"]
    return sum((inv[m, t] < TOL) == e for m, exp in invariances.PAPER.items() for t, e in zip(invariances.TRANSFORMS, exp))


SECTION = Section(
    key="table1",
    title="Table 1: invariances, measured",
    intro=lambda view: (
        "Relative change of the normalized summed inputs `max|y'-y|/max|y|` (float32, eps = 0, "
        "worst of 5 random trials); *invariant* when below 1e-4."),
    tables=lambda view: [invariances.table(view.measured["table1"], TOL).rstrip("\n")],
    verdicts=lambda view, judge: [f"Table 1: {_agree(view)} of 18 cells agree with the paper."],
    measure=invariances.measure,
)
