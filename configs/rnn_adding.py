"""§6.2/§6.5 analogue: LSTM variants on the adding problem (MSE; predicting 1 scores 1/6).

The input has 2 features per step, so `LN(W_x x_t)` would discard most of it (the caveat in
the paper's Table 1: single-case re-scaling invariance); the LN cells normalize only the
recurrent terms here (`model.input_norm="none"`: `W_x x_t + b`).
"""

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "rnn_adding"
    c.task.name = "adding"
    c.task.length = 50
    c.model.cell = "lstm"  # lstm | gru | rnn | bn_lstm
    c.model.norm = "layer"
    c.model.input_norm = "none"
    c.model.hidden = (64,)
    c.batch_size = 64
    c.num_steps = 1500
    c.optimizer.learning_rate = 3e-3
    return c
