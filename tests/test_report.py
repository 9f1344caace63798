"""The reproduction report as sections (`experiments/report.py`, `experiments/sections/`),
rendered from synthetic metrics: no training, so fast."""

import json

import numpy as np
import pytest

from configs import mlp_digits
from experiments import curves, reproduce
from experiments.report import Figure, Result, Run, Section, write_report
from experiments.sections import SECTIONS
from experiments.stats import final, fmt


def _rows(cfg, rng):
    """Metrics rows shaped like `fit`'s: every member (seed x learning rate) at every evaluation."""
    lrs = cfg.sweep.get("learning_rate") or (cfg.optimizer.learning_rate,)
    members = [(s, lr) for lr in lrs for s in cfg.sweep.seed]
    steps = range(cfg.eval_every, cfg.num_steps + 1, cfg.eval_every)
    return [{"step": t, "member": m, "seed": s, "learning_rate": lr, "diverged_at": -1,
             "train_loss": float(rng.uniform(0.1, 2)), "test_loss": float(rng.uniform(0.01, 2)),
             "test_error": float(rng.uniform(0, 0.2))}
            for t in steps for m, (s, lr) in enumerate(members)]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report asked curves.py to draw (by file name), none drawn."""
    files = []
    for name in ("plot_means", "plot_lr_sweep"):
        monkeypatch.setattr(curves, name, lambda path, *args, **kwargs: files.append(path.name))
    return files


def _render(tmp_path, sections, quick=True, seed_offset=0, compare=None):
    rng = np.random.default_rng(0)
    runs = reproduce.plan(quick, seed_offset, sections)
    results = {name: Result(label, _rows(cfg, rng), 1.0) for _, name, label, cfg in runs}
    measured = {s.key: s.measure() for s in sections if s.measure}
    costs = {key: 2.0 for key, *_ in runs}
    findings = write_report(tmp_path, sections, results, measured, quick, 60.0, costs, compare)
    return findings, (tmp_path / "report.md").read_text(), json.loads((tmp_path / "verdicts.json").read_text())


def _extra_section():
    """A section as a contributor would add one: one unit, whose run is a configs/ module
    with its overrides."""
    def verdicts(view, judge):
        err = final(view.rows("extra_layer"), "test_error")
        return [f"Extra: LN error {fmt(err, True)}%, below 100%: {judge('extra_below_all', err, [1.0, 1.1])}."]

    return Section(
        key="extra",
        title="An extra section",
        intro=lambda view: f"The MLP with layer norm, {len(view.seeds)} seeds.",
        runs=(Run("extra_layer", "layer", mlp_digits, {"model.norm": "layer", "num_steps": 300, "eval_every": 100},
                  quick={"num_steps": 20, "eval_every": 10}),),
        tables=lambda view: [f"final error {fmt(final(view.rows('extra_layer'), 'test_error'), True)}"],
        figures=[[Figure("extra.png", "extra", lambda view, path: curves.plot_means(
            path, [("layer", view.rows("extra_layer"), "layer")], "test_error", "test error (%)", "extra", scale=100))]],
        verdicts=verdicts,
    )


def test_the_sections_render_every_table_figure_and_verdict(tmp_path, drawn):
    findings, report, verdicts = _render(tmp_path, SECTIONS)
    numbered = [line for line in report.splitlines() if line.startswith("## ") and line[3].isdigit()]
    assert [h.split(".")[0] for h in numbered] == [f"## {i}" for i in range(1, len(SECTIONS) + 1)]
    assert [h.split(". ", 1)[1] for h in numbered] == [s.title for s in SECTIONS]
    linked = {f.file for s in SECTIONS for line in s.figures for f in line}
    assert sorted(drawn) == sorted(linked) and all(f"]({name})" in report for name in linked)
    assert len(findings) == 16 and all(f"- {f}" in report for f in findings)
    assert len(verdicts["verdicts"]) >= 20 and verdicts["seeds"] == [0, 1]
    assert "| key |" not in report and all(f"| {s.key} | 2 |" in report for s in SECTIONS if s.runs)


def test_a_new_section_is_one_unit(tmp_path, drawn):
    """Appending one `Section` adds its runs (under the quick mode's overrides and the seed
    offset), its numbered heading, table, figure and verdict, and its row in the seed check
    and the cost table, with no other edit."""
    sections = (*SECTIONS, _extra_section())
    runs = {name: cfg for _, name, _, cfg in reproduce.plan(True, 4, sections)}
    cfg = runs["extra_layer"]
    assert (cfg.num_steps, cfg.eval_every, cfg.checkpoint_every, cfg.model.norm) == (20, 10, 20, "layer")
    assert tuple(cfg.sweep.seed) == (4, 5)
    assert reproduce.plan(False, 0, sections)[-1][3].num_steps == 300
    other = {"extra_below_all": "disagrees (difference +1, Welch p = 0.001)"}
    findings, report, verdicts = _render(tmp_path, sections, compare=(other, [7, 8]))
    assert f"## {len(sections)}. An extra section" in report and "The MLP with layer norm, 2 seeds." in report
    assert "extra.png" in drawn and "![extra](extra.png)" in report
    assert findings[-1].startswith("Extra: LN error") and "inconclusive: agrees" in findings[-1]
    assert verdicts["verdicts"]["extra_below_all"].startswith("agrees")
    assert "| extra_below_all | agrees" in report and "| extra | 2 |" in report


def test_run_names_are_unique_across_sections():
    clash = Section(key="clash", title="clash", intro=lambda view: "", tables=lambda view: [],
                    runs=(Run("mlp_none_bs4", "none", mlp_digits, {}),))
    with pytest.raises(ValueError, match="mlp_none_bs4"):
        reproduce.plan(True, 0, (*SECTIONS, clash))
