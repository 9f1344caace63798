"""Copying memory (Hochreiter & Schmidhuber 1997; PAPER.md): recall 10 symbols after a delay.

Per-step cross-entropy over T + 20 steps; the memoryless baseline scores
`10 log 8 / (T + 20)` (`experiments.data.copying_baseline`), 0.42 nats at T = 30.
Tokens are fed one-hot; the model predicts a token at every step.
"""

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "rnn_copying"
    c.task.name = "copying"
    c.task.length = 30  # the delay T
    c.task.train_size = 4096
    c.task.test_size = 512
    c.model.cell = "lstm"  # lstm | gru | rnn | bn_lstm
    c.model.norm = "layer"
    c.model.hidden = (64,)
    c.batch_size = 64
    c.num_steps = 2000
    c.optimizer.learning_rate = 3e-3
    return c
