"""Section: Chen et al. 2020's graph normalizations in a GIN-style network on a synthetic
graph-classification task."""

from configs import gin_graphs
from experiments.report import Run, Section, header, row
from experiments.stats import final, fmt, points

# lnjax.norms names, with none as the baseline.
NORMS = ("none", "graph_node", "graph_adjacency", "graph", "graph_batch", "graph_learned")


def _accuracy(view):
    return {n: 1 - final(view.rows(f"gin_{n}"), "test_error") for n in NORMS}


def _table(view):
    acc = _accuracy(view)
    return [*header("normalization", "test accuracy %", "per seed"),
            *(row(n, fmt(acc[n], True), ", ".join(f"{100 * a:.1f}" for a in acc[n])) for n in NORMS)]


def _verdicts(view, judge):
    acc = _accuracy(view)
    best = max((n for n in NORMS if n not in ("graph_learned", "none")), key=lambda n: acc[n].mean())
    return [
        "Graph norms (test accuracy %): " + ", ".join(f"{n} {fmt(v, True)}" for n, v in acc.items()) +
        f"; the learned combination better than the best single norm ({best}; Chen et al.: at least as "
        f"good, so only \"disagrees\" contradicts them): "
        f"{judge('graph_learned_vs_best', points(acc['graph_learned']), points(acc[best]), '>')}; "
        f"graph-wise better than node-wise: {judge('graph_vs_node', points(acc['graph']), points(acc['graph_node']), '>')}."]


SECTION = Section(
    key="graphs",
    title="Graph normalizations on a graph-classification task",
    intro=lambda view: (
        "Synthetic \"denser colour\" graphs (`experiments/data.py`: 8-20 nodes, half red and half "
        "blue; is the red-red or the blue-blue edge count larger? Features alone are at chance), "
        "the 3-layer GIN-style network of `configs/gin_graphs.py` with each normalization of Chen "
        "et al. 2020 after every layer, Adam 1e-2, batches of 64 graphs; final test accuracy over seeds."),
    runs=tuple(Run(f"gin_{n}", n, gin_graphs, {"model.norm": n, "num_steps": 700, "eval_every": 100},
                   quick={"num_steps": 100, "eval_every": 50}) for n in NORMS),
    tables=_table,
    verdicts=_verdicts,
)
