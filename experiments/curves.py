"""Training curves of runs and sweeps: every member's metrics against the training step.

    python -m experiments.curves WORKDIR [WORKDIR ...] [--out curves.png] [--metrics test_loss,...] [--log]

draws one panel per metric (by default every `train_*` and `test_*` column of the runs'
`metrics.jsonl`) with one line per member, labelled with the run's directory name and the
member's seed and learning rate; a diverged member's line ends in a cross at its last
evaluation before it diverged, and its label gives the step. The same metrics are also in `WORKDIR/tensorboard/` (`tensorboard --logdir WORKDIR`).
"""

import argparse
import pathlib
import sys

import numpy as np

from experiments import metrics


# One colour per normalization, in every figure of the report (matplotlib's tab10/tab20).
NORM_COLOURS = {
    "none": "#7f7f7f", "layer": "#1f77b4", "batch": "#ff7f0e", "rms": "#9467bd",
    "divisive": "#2ca02c", "switchable": "#d62728", "batch_layer": "#8c564b",
    "graph_node": "#e377c2", "graph_adjacency": "#bcbd22", "graph": "#17becf",
    "graph_batch": "#ffbb78", "graph_learned": "#000000",
}


def metric_keys(rows) -> list[str]:
    """The metric columns of `rows`, training ones first."""
    keys = {k for r in rows for k in r if k.startswith(("train_", "test_"))}
    return sorted(keys, key=lambda k: (not k.startswith("train_"), k))


def _figure(num_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    # SVG text as text (small files) and fixed element ids (the same figure, the same file).
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "lnjax"})
    import matplotlib.pyplot as plt

    cols = min(num_panels, 2)
    rows = -(-num_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _finish(plt, fig, ax_list, path, log, xlabel="training step"):
    for ax in ax_list:
        ax.set_xlabel(xlabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path):
    fig.savefig(path, dpi=110)
    if str(path).endswith(".png"):  # and a vector copy beside it
        fig.savefig(pathlib.Path(path).with_suffix(".svg"), metadata={"Date": None})


def plot_members(path, runs, keys=None, log=False):
    """Draws every member of every run. `runs`: `[(name, metrics rows)]`; `keys`: the metrics
    (default: `metric_keys` of all rows). Writes the figure to `path`."""
    keys = list(keys or metric_keys([r for _, rows in runs for r in rows]))
    plt, fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for name, rows in runs:
            for i in sorted({r["member"] for r in rows}):
                mine = sorted((r for r in rows if r["member"] == i), key=lambda r: r["step"])
                if key not in mine[0]:  # runs of other tasks (regression: no error rate)
                    continue
                label, diverged = f"{name} {metrics.member_name(mine[0])}", mine[-1]["diverged_at"]
                if diverged >= 0:  # a frozen member's later rows repeat its last finite state
                    mine = [r for r in mine if r["step"] <= diverged]
                    label += f" (diverged at step {diverged})"
                steps, values = [r["step"] for r in mine], [r[key] for r in mine]
                (line,) = ax.plot(steps, values, label=label)
                if diverged >= 0:
                    ax.plot(steps[-1:], values[-1:], "x", color=line.get_color(), markersize=9)
        ax.set_ylabel(key)
        ax.legend(fontsize="small")
    _finish(plt, fig, axes, path, log)


def plot_means(path, series, key, ylabel, title, log=False, scale=1.0):
    """Draws one line per sweep: the mean over its non-diverged members, in a band of ± 1
    standard error of that mean (ddof=1), the values times `scale` (100: a fraction as %).
    `series`: `[(label, metrics rows, normalization)]` or `[(..., linestyle)]`: the line's
    colour is `NORM_COLOURS[normalization]`. Writes `path` and, for a PNG, an SVG beside it."""
    plt, fig, (ax,) = _figure(1)
    for label, rows, norm, *style in series:
        by_step = {}
        for r in rows:
            if r["diverged_at"] < 0:
                by_step.setdefault(r["step"], []).append(scale * r[key])
        steps = sorted(by_step)
        vals = [np.array(by_step[s]) for s in steps]
        mean = np.array([v.mean() for v in vals])
        se = np.array([v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in vals])
        colour = NORM_COLOURS[norm]
        ax.plot(steps, mean, label=label, color=colour, linestyle=style[0] if style else "-")
        ax.fill_between(steps, mean - se, mean + se, alpha=0.2, color=colour)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _finish(plt, fig, [ax], path, log)


def plot_lr_sweep(path, series, key, ylabel, title, scale=1.0):
    """Draws each learning-rate sweep's final `key` (times `scale`) against the learning rate:
    the mean over the seeds at each rate, with ± 1 standard error bars; a rate at which a
    member diverged is drawn at the mean of the others and marked with a cross. `series`:
    `[(label, metrics rows, normalization)]`. Writes `path` and, for a PNG, an SVG beside it."""
    plt, fig, (ax,) = _figure(1)
    for label, rows, norm in series:
        last = max(r["step"] for r in rows)
        final = [r for r in rows if r["step"] == last]
        lrs = sorted({r["learning_rate"] for r in final})
        mean, se, bad = [], [], []
        for lr in lrs:
            v = np.array([scale * r[key] for r in final if r["learning_rate"] == lr and r["diverged_at"] < 0])
            mean.append(v.mean() if v.size else np.nan)
            se.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
            bad.append(any(r["diverged_at"] >= 0 for r in final if r["learning_rate"] == lr))
        colour = NORM_COLOURS[norm]
        ax.errorbar(lrs, mean, yerr=se, label=label, color=colour, marker="o", capsize=3)
        crosses = [(lr, m) for lr, m, b in zip(lrs, mean, bad) if b]
        if crosses:
            ax.plot(*zip(*crosses), "x", color=colour, markersize=10)
    ax.set_xscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _finish(plt, fig, [ax], path, log=False, xlabel="learning rate")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error: ...` line (exit status 2), as
    experiments.main's flags."""

    def error(self, message):
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _image_format_problem(out: pathlib.Path) -> str | None:
    """Why matplotlib could not write the figure to `out`, or None."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        return f"--out={out}: the file name must end in an image format matplotlib writes ({', '.join(sorted(formats))})"
    if not out.parent.is_dir():
        return f"--out={out}: no directory {out.parent}"
    return None


def _read_runs(parser, workdirs):
    """`[(name, rows)]` of each workdir's metrics.jsonl."""
    runs = []
    for workdir in workdirs:
        path = workdir / "metrics.jsonl"
        if not path.is_file():
            parser.error(f"{workdir} holds no metrics.jsonl (is it a run's --workdir?)")
        rows = metrics.read_metrics(path)  # a row that is not a run's is a ValueError naming its line
        if not rows:
            parser.error(f"{path} holds no evaluation yet")
        _check_same_metrics(path, rows)
        runs.append((workdir.absolute().name, rows))
    return runs


def _check_same_metrics(path, rows):
    """Every row of a run has the same metrics (row i is line i + 1: `read_metrics` drops no
    line but an unterminated last one)."""
    first = metric_keys(rows[:1])
    for number, row in enumerate(rows, 1):
        keys = metric_keys([row])
        if keys != first:
            raise ValueError(f"{path}, line {number}: the metrics {', '.join(keys) or 'none'} where line 1 has "
                             f"{', '.join(first) or 'none'}; each row of a run has the same ones")


def main(argv=None) -> int:
    """The command line: 0 when drawn; a bad argument is one `error:` line and exit status 2,
    a metrics file that is not a run's or a figure that cannot be written one line and 1."""
    parser = _Parser(prog="python -m experiments.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path, metavar="WORKDIR",
                        help="a run's directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="the image to write (default: WORKDIR/curves.png for one run, else ./curves.png)")
    parser.add_argument("--metrics", default=None, help="comma-separated metric names (default: all of them)")
    parser.add_argument("--log", action="store_true", help="logarithmic y axes")
    args = parser.parse_args(argv)
    out = args.out or (args.workdirs[0] / "curves.png" if len(args.workdirs) == 1 else pathlib.Path("curves.png"))
    problem = _image_format_problem(out)
    if problem:
        parser.error(problem)
    try:
        runs = _read_runs(parser, args.workdirs)
    except (ValueError, OSError) as e:
        return _fail(e)
    available = metric_keys([r for _, rows in runs for r in rows])
    keys = args.metrics.split(",") if args.metrics else available
    unknown = [k for k in keys if k not in available]
    if unknown:
        parser.error(f"--metrics: no metric {', '.join(map(repr, unknown))}; the runs have {', '.join(available)}")
    try:
        plot_members(out, runs, keys, log=args.log)
    except OSError as e:
        return _fail(f"cannot write {e.filename or out}: {e.strerror or e}")
    print(out)
    return 0


def _fail(e) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
