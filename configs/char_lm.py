"""Character-level language modelling on any local UTF-8 text file.

    python -m experiments.train --config=configs/char_lm.py --workdir=runs/lm \
        --config.task.path=/path/to/text.txt

The last 10% of the file is the validation part; training cuts non-overlapping windows of
`task.length` characters. The loss is the per-character cross-entropy (nats; divide by ln 2
for bits per character). By default the file is this repository's README.md.
"""

import pathlib

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "char_lm"
    c.task.name = "char_lm"
    c.task.path = str(pathlib.Path(__file__).resolve().parents[1] / "README.md")
    c.task.length = 64
    c.model.cell = "lstm"
    c.model.norm = "layer"
    c.model.hidden = (128,)
    c.batch_size = 32
    c.num_steps = 1000
    c.optimizer.learning_rate = 3e-3
    c.sweep.seed = (0,)
    return c
