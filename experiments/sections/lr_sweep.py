"""Section: learning-rate robustness of the LSTM and LN-LSTM of the cells' section, each swept
over every rate and seed in one compiled program, and what the sweep saves over running its
members one by one."""

from experiments import curves
from experiments.report import Figure, Section, header, row
from experiments.sections import cells
from experiments.stats import at_lr, final, final_values, fmt, points, verdict

TRAINS_BELOW = 0.10  # a learning rate "trains" if every seed ends below this test error
RATES = cells.LEARNING_RATES


def _one(name):
    return f"{name}_one"


def _trains(rows):
    """The rates at which no member diverged and every seed ends below `TRAINS_BELOW`."""
    good = []
    for lr in RATES:
        r = at_lr(rows, lr)
        v = final_values(r, "test_error")
        if len(v) == len({x["seed"] for x in r}) and max(v.values()) < TRAINS_BELOW:
            good.append(lr)
    return good


def _span(lrs):
    return f"{min(lrs):g} to {max(lrs):g} ({len(lrs)} of {len(RATES)})" if lrs else "none"


def _cost(view):
    """(members of a sweep, {run: sweep seconds}, {run: one member's seconds})."""
    return (len(RATES) * len(view.seeds), {n: view.results[n].seconds for n in cells.SWEPT},
            {n: view.results[_one(n)].seconds for n in cells.SWEPT})


def _tables(view):
    lines = header("learning rate", "LSTM test error %", "LN-LSTM test error %", "LN-LSTM lower")
    for lr in RATES:
        e = {n: final(at_lr(view.rows(n), lr), "test_error") for n in cells.SWEPT}
        lines.append(row(f"{lr:g}", fmt(e["rows_lstm"], True), fmt(e["rows_ln_lstm"], True),
                         verdict(points(e["rows_ln_lstm"]), points(e["rows_lstm"]))))
    members, sweep_s, one_s = _cost(view)
    trains = {n: _trains(view.rows(n)) for n in cells.SWEPT}
    return lines + [
        "", f"Rates that train: LSTM {_span(trains['rows_lstm'])}, LN-LSTM {_span(trains['rows_ln_lstm'])}.", "",
        f"Cost on this machine (wall-clock, compilation included): the {members}-member sweep took "
        f"{sweep_s['rows_lstm']:.0f} s (LSTM) and {sweep_s['rows_ln_lstm']:.0f} s (LN-LSTM); one member "
        f"alone, trained by the same command, took {one_s['rows_lstm']:.0f} s and "
        f"{one_s['rows_ln_lstm']:.0f} s, so running the members one by one would take about "
        f"{members * one_s['rows_lstm']:.0f} s and {members * one_s['rows_ln_lstm']:.0f} s "
        f"({members * one_s['rows_lstm'] / sweep_s['rows_lstm']:.1f}x and "
        f"{members * one_s['rows_ln_lstm'] / sweep_s['rows_ln_lstm']:.1f}x the sweep)."]


def _draw(view, path):
    curves.plot_lr_sweep(path, [("LSTM", view.rows("rows_lstm"), "none"), ("LN-LSTM", view.rows("rows_ln_lstm"), "layer")],
                         "test_error", "final test error (%)", "Row-by-row digits: learning-rate sweep", scale=100)


def _verdicts(view, judge):
    members, sweep_s, one_s = _cost(view)
    trains = {n: _trains(view.rows(n)) for n in cells.SWEPT}
    return [
        f"Learning rates (row-by-row digits, {members} members per compiled sweep): LSTM trains at "
        f"{_span(trains['rows_lstm'])}, LN-LSTM at {_span(trains['rows_ln_lstm'])}; the sweep cost "
        f"{sweep_s['rows_ln_lstm']:.0f} s for the LN-LSTM where one by one would cost about "
        f"{members * one_s['rows_ln_lstm']:.0f} s."]


SECTION = Section(
    key="lr_sweep",
    title="Learning-rate robustness: one compiled sweep per model",
    intro=lambda view: (
        f"The LSTM and LN-LSTM of section 3, each trained at {len(RATES)} learning rates x "
        f"{len(view.seeds)} seeds = {len(RATES) * len(view.seeds)} members in one `vmap`ped, compiled "
        f"program. A rate *trains* if no member diverged and every seed ends below "
        f"{100 * TRAINS_BELOW:g}% test error (chance: 90%)."),
    # One member of each sweep alone, trained the same way: the one-by-one cost.
    runs=tuple(cells.run(_one(n), label, over, seeds=1) for n, label, over, _ in cells.VARIANTS if n in cells.SWEPT),
    tables=_tables,
    figures=[[Figure("lr_sweep.png", "learning-rate sweep", _draw)]],
    verdicts=_verdicts,
)
