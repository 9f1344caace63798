"""The reproduction's statistics over seeds: each sweep member's final values, `mean ± standard
error`, and Welch verdicts on the paper's claims, recorded so that a run with a disjoint seed
set can be compared verdict by verdict.

Every function takes metrics rows (`metrics.jsonl` lines as dicts: step, member, seed,
learning_rate, diverged_at and the metrics); a diverged member (`diverged_at >= 0`) is left
out of every statistic.
"""

import numpy as np

ALPHA = 0.05  # significance level of the verdicts' Welch t-tests


def final_values(rows, key):
    """`{seed: value}` of `key` at the last evaluation, over the non-diverged members."""
    last = max(r["step"] for r in rows)
    return {r["seed"]: r[key] for r in rows if r["step"] == last and r["diverged_at"] < 0}


def final(rows, key):
    return np.array(list(final_values(rows, key).values()))


def steps_to(rows, key, target):
    """Median over members of the first evaluated step with `key <= target` (None if never)."""
    firsts = {}
    for r in sorted(rows, key=lambda r: r["step"]):
        if r[key] <= target and r["diverged_at"] < 0:
            firsts.setdefault(r["member"], r["step"])
    members = {r["member"] for r in rows}
    if len(firsts) < len(members):
        return None
    return int(np.median(list(firsts.values())))


def mean_train_loss(rows):
    """Each member's training loss averaged over its evaluations: the area under its training
    curve, which is lower for the model that trains faster."""
    by = {}
    for r in rows:
        if r["diverged_at"] < 0:
            by.setdefault(r["seed"], []).append(r["train_loss"])
    return np.array([np.mean(v) for v in by.values()])


def gaps(small, large, key):
    """Per seed: `key` at the small batch minus at the large one (seeds run in both)."""
    a, b = final_values(small, key), final_values(large, key)
    return np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])


def at_lr(rows, lr):
    """The rows of the members trained at learning rate `lr` (float32-rounded in the metrics)."""
    return [r for r in rows if np.isclose(r["learning_rate"], lr, rtol=1e-6)]


def points(values):
    """Fractions as percentages (points), the unit of errors and accuracies in the report."""
    return 100 * np.asarray(values, float)


def _se(v):
    return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def fmt(values, pct=False):
    """`mean ± standard error` over seeds (ddof=1)."""
    values = np.asarray(values, float)
    if not len(values):
        return "n/a"
    m, e, f = float(values.mean()), _se(values), (100 if pct else 1)
    return f"{f * m:.1f} ± {f * e:.1f}" if pct else f"{m:.4f} ± {e:.4f}"


def verdict(a, b, paper="<") -> str:
    """The paper says `a` < `b` (`paper="<"`) or `a` > `b` (">"), arrays over seeds. Welch's
    two-sided t-test at `ALPHA`: "agrees" if the difference is significant in the paper's
    direction, "disagrees" if in the other, else "inconclusive"; with the difference of the
    means `a - b` and the p-value."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return "inconclusive (fewer than 2 seeds)"
    diff = float(a.mean() - b.mean())
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    word = "inconclusive" if not p < ALPHA else ("agrees" if (diff < 0) == (paper == "<") else "disagrees")
    return f"{word} (difference {diff:+.4g}, Welch p = {p:.2g})"


class Judge:
    """Records every verdict of the report under a key, so that a run with a disjoint seed
    set can be compared (`verdicts.json`). With `other` (that run's verdicts), a verdict that
    differs there is reported as inconclusive, with both."""

    def __init__(self, other=None, other_seeds=None):
        self.verdicts, self.other, self.other_seeds = {}, other or {}, other_seeds

    def __call__(self, key, a, b, paper="<") -> str:
        text = verdict(a, b, paper)
        self.verdicts[key] = text
        there = self.other.get(key)
        if there is not None and there.split()[0] != text.split()[0]:
            return f"inconclusive: {text} here, but {there} with seeds {self.other_seeds}"
        return text
