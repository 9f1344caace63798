"""Sequential digits: a tanh RNN (eq. 4) reads scikit-learn's 8x8 digits one row per step
(8 steps of 8 pixels) and classifies from its last hidden state.

The report compares `model.norm` = none, layer and divisive here (Ren et al. 2017: a local
window of `model.norm_defaults.divisive.radius` = 15 units on each side and divisive_norm's
smoothing sigma 1; `--config.model.norm_args.radius=...`, `...sigma=...` set others).
"""

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "rnn_digits"
    c.task.name = "digits_rows"
    c.model.cell = "rnn"  # lstm | gru | rnn | bn_lstm
    c.model.norm = "layer"  # none | layer | rms | divisive
    c.model.hidden = (128,)
    c.model.norm_defaults.divisive.radius = 15  # of 128 hidden units
    c.batch_size = 64
    c.num_steps = 1000
    c.optimizer.learning_rate = 1e-3
    return c
