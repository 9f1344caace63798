"""Section: divisive normalization (Ren et al. 2017) vs layer norm vs none in a tanh RNN on
sequential digits."""

from configs import rnn_digits
from experiments import curves
from experiments.report import Figure, Run, Section, error, header, nll, row
from experiments.stats import final, fmt

NORMS = ("none", "layer", "divisive")


def _draw(view, path):
    curves.plot_means(path, [(n, view.rows(f"tanh_rnn_{n}"), n) for n in NORMS],
                      "test_loss", "test NLL", "tanh RNN on sequential digits", log=True)


def _verdicts(view, judge):
    nl = {n: final(view.rows(f"tanh_rnn_{n}"), "test_loss") for n in NORMS}
    return [
        f"Divisive norm (tanh RNN, test NLL): none {fmt(nl['none'])}, LN {fmt(nl['layer'])}, DN "
        f"{fmt(nl['divisive'])}; as Ren et al., DN better than LN: {judge('dn_vs_ln', nl['divisive'], nl['layer'])}; "
        f"DN better than none: {judge('dn_vs_none', nl['divisive'], nl['none'])}; LN worse than none: "
        f"{judge('ln_vs_none_tanh', nl['layer'], nl['none'], '>')}."]


SECTION = Section(
    key="divisive",
    title="Divisive vs layer normalization in a tanh RNN",
    intro=lambda view: (
        "Sequential digits: a tanh RNN (eq. 4, hidden 128) reads each 8x8 digit one row per step "
        "and classifies from its last state; Adam 1e-3, batch 64. Divisive normalization (Ren et "
        "al. 2017) replaces LN of the summed input by `v / sqrt(sigma^2 + E_B[v^2])`, "
        "`v = z - E_A[z]`, with A = B a window of radius 15 over neighbouring units and sigma = 1 "
        "(their DN* setting). They report, on PTB word-level language modelling, perplexity "
        "149.4 without normalization, 154.3 with LN and 123.7 with DN*."),
    runs=tuple(
        Run(f"tanh_rnn_{n}", n, rnn_digits, {"model.norm": n, "num_steps": 1000, "eval_every": 100},
            # The quick run's radius is of its 32 hidden units.
            quick={"num_steps": 100, "eval_every": 50, "model.hidden": (32,),
                   **({"model.norm_args.radius": 4} if n == "divisive" else {})})
        for n in NORMS),
    tables=lambda view: [*header("normalization", "test error %", "test NLL"),
                         *(row(n, error(view.rows(f"tanh_rnn_{n}")), nll(view.rows(f"tanh_rnn_{n}"))) for n in NORMS)],
    figures=[[Figure("tanh_rnn.png", "tanh RNN", _draw)]],
    verdicts=_verdicts,
)
