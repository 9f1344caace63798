"""The reproduction's report, assembled from sections (`experiments/sections/`).

A `Section` declares its runs (`Run`: a configs/ module and its overrides, the quick mode's
smaller ones beside them), the Markdown of its tables, its figures and its verdicts on the
paper's claims. `write_report` numbers the sections in order, gathers their verdicts into the
Findings at the top and adds what every section shares: the diverged members, the comparison
with a disjoint seed set and the cost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from experiments.stats import ALPHA, Judge, final, fmt, mean_train_loss


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a section: a sweep over seeds (and whatever its overrides sweep),
    trained as one compiled program into `runs/<name>/`."""

    name: str
    label: str
    base: types.ModuleType  # a module of configs/: its get_config() is the starting point
    overrides: Mapping[str, Any]  # flattened keys ("model.norm") of the base config
    # Applied over `overrides` by --quick, whose cost is mostly compilation: smaller models,
    # shorter sequences, fewer steps.
    quick: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: int | None = None  # train only the first `seeds` of the reproduction's seeds

    def config(self, quick: bool, seeds: Sequence[int]) -> ml_collections.ConfigDict:
        cfg = self.base.get_config()
        cfg.sweep.seed = tuple(seeds[:self.seeds])
        cfg.update_from_flattened_dict({**self.overrides, **(self.quick if quick else {})})
        # One checkpoint, at the end: re-running the reproduction resumes or finds the run done.
        cfg.checkpoint_every = cfg.num_steps
        return cfg


@dataclasses.dataclass(frozen=True)
class Result:
    label: str
    rows: list[dict]  # its metrics.jsonl
    seconds: float  # wall-clock time of its training (compilation included)


@dataclasses.dataclass(frozen=True)
class View:
    """What a section's tables, figures and verdicts read: every run's result (a section may
    read another's runs), the seeds trained and what the sections measured before training."""

    out: pathlib.Path
    results: Mapping[str, Result]
    seeds: list[int]
    measured: Mapping[str, Any]

    def rows(self, name: str) -> list[dict]:
        return self.results[name].rows

    def label(self, name: str) -> str:
        return self.results[name].label


@dataclasses.dataclass(frozen=True)
class Figure:
    file: str  # a PNG in the report directory (curves.py writes an SVG beside it)
    alt: str
    draw: Callable[[View, pathlib.Path], None]


def _no_verdicts(view: View, judge: Judge) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Section:
    """One numbered section of the report. `intro` and `tables` return Markdown (the tables'
    lines may carry sentences computed from the results); `verdicts` returns the section's
    findings, each verdict in them taken by `judge` under a key of its own; `figures` is a list
    of lines of figures; `measure`, if any, runs before training and its result is
    `view.measured[key]`."""

    key: str
    title: str
    intro: Callable[[View], str]
    tables: Callable[[View], list[str]]
    verdicts: Callable[[View, Judge], list[str]] = _no_verdicts
    runs: Sequence[Run] = ()
    figures: Sequence[Sequence[Figure]] = ()
    measure: Callable[[], Any] | None = None


def row(*cells) -> str:
    """One line of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names) -> list[str]:
    """A Markdown table's header and rule lines."""
    return [row(*names), "|" + "---|" * len(names)]


def error(rows) -> str:
    """The final test error in %, over seeds."""
    return fmt(final(rows, "test_error"), True)


def nll(rows) -> str:
    """The final test loss, over seeds."""
    return fmt(final(rows, "test_loss"))


def speed(rows) -> str:
    """The mean training loss over the run, over seeds."""
    return fmt(mean_train_loss(rows))


def _preamble(quick: bool, seconds: float, seeds: list[int]) -> list[str]:
    mode = ("quick (smoke test, too short to judge findings; compiled with "
            f"`XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}`)" if quick else "full")
    return [
        "# Layer Normalization (Ba, Kiros & Hinton 2016): reproduction report", "",
        f"Mode: {mode}; total time {seconds / 60:.1f} min. Every number below is computed by "
        "`python -m experiments" + (" --quick" if quick else "") + "`; raw metrics are in "
        "`runs/*/metrics.jsonl` (`metrics/*.jsonl` in the committed copy), configs in `runs/*/config.json`.", "",
        f"Statistics: each sweep trains {len(seeds)} seeds (seeds {seeds}). `a ± b` is the mean over "
        "the seeds and its standard error (sample standard deviation, ddof = 1, over sqrt(seeds)); "
        "plot lines are means and bands ± 1 standard error. A finding's verdict is Welch's "
        f"two-sided t-test at p < {ALPHA} between the two sets of seed values it compares: "
        "*agrees* if the difference is significant in the paper's direction, *disagrees* if it "
        "is significant in the other, *inconclusive* otherwise; its difference is that of the means, "
        "in the unit of the values compared (percentage points for errors and accuracies). Errors are in % in tables and "
        "figures alike; every figure has an SVG copy beside its PNG, and one colour per "
        "normalization (grey none, blue layer, orange batch, ...) across all of them.", ""]


def _section(number: int, section: Section, view: View) -> list[str]:
    lines = [f"## {number}. {section.title}", "", section.intro(view), "", *section.tables(view), ""]
    for line in section.figures:
        for figure in line:
            figure.draw(view, view.out / figure.file)
        lines += [" ".join(f"![{f.alt}]({f.file})" for f in line), ""]
    return lines


def _diverged(results: Mapping[str, Result]) -> list[str]:
    diverged = [f"{name} member {r['member']} (seed {r['seed']}, lr {r['learning_rate']:g}) at step {r['diverged_at']}"
                for name, res in results.items() for r in res.rows
                if r["diverged_at"] >= 0 and r["step"] == max(x["step"] for x in res.rows)]
    return ["## Diverged sweep members", "",
            "Members whose loss became non-finite; each is frozen at its last finite state (the "
            "others train on) and left out of the statistics.", "", *(f"- {d}" for d in diverged or ["none"]), ""]


def _compared(judge: Judge, seeds: list[int]) -> list[str]:
    other, other_seeds = judge.other, judge.other_seeds
    keys = [k for k in judge.verdicts if k in other]
    same = [k for k in keys if judge.verdicts[k].split()[0] == other[k].split()[0]]
    return ["## Verdicts under a disjoint seed set", "",
            f"The same command with seeds {other_seeds} (`--seed-offset`), compared verdict by verdict "
            f"with seeds {seeds}: {len(same)} of {len(keys)} are the same. A finding whose verdict changed "
            "is reported above as inconclusive, with both.", "",
            *header("verdict", f"seeds {seeds}", f"seeds {other_seeds}", "same"),
            *(row(k, judge.verdicts[k], other[k], "yes" if k in same else "**no**") for k in keys), ""]


def _costs(costs: Mapping[str, float]) -> list[str]:
    return ["## Cost", "", "Wall-clock seconds of each section's training runs on this machine (compilation "
            "included; a resumed run counts only what it trained this time).", "", *header("section", "seconds"),
            *(row(k, f"{v:.0f}") for k, v in costs.items()), ""]


def write_report(out: pathlib.Path, sections: Sequence[Section], results: Mapping[str, Result],
                 measured: Mapping[str, Any], quick: bool, seconds: float, costs: Mapping[str, float] | None = None,
                 compare: tuple[dict, list[int]] | None = None) -> list[str]:
    """Writes `out/report.md`, its figures (PNG and SVG) and `out/verdicts.json`; returns the
    findings. `results`: by run name; `costs`: training seconds by section key; `compare`:
    `(verdicts, seeds)` of a run with another seed set, or None."""
    seeds = sorted({r["seed"] for res in results.values() for r in res.rows})
    view = View(out, results, seeds, measured)
    judge = Judge(*(compare or (None, None)))
    body, findings = [], []
    for number, section in enumerate(sections, 1):
        body += _section(number, section, view)
        findings += section.verdicts(view, judge)
    lines = [*_preamble(quick, seconds, seeds), "## Findings", "", *(f"- {f}" for f in findings), "", *body,
             *_diverged(results), *(_compared(judge, seeds) if compare else []), *(_costs(costs) if costs else [])]
    (out / "report.md").write_text("\n".join(lines))
    (out / "verdicts.json").write_text(json.dumps({"seeds": seeds, "verdicts": judge.verdicts}, indent=1))
    return findings
