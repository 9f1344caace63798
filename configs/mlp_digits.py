"""§6.6 analogue: permutation-invariant MLP on scikit-learn's digits (8x8, flattened).

The paper uses 784-1000-1000-10 on MNIST; `--config.task.name=mnist
--config.task.data_dir=DIR` runs that data (set `--config.model.hidden=(1000,1000)`).
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.name = "mlp_digits"
    c.model.kind = "mlp"
    c.model.hidden = (256, 256)
    c.model.norm = "layer"  # none | batch | layer | rms | switchable | batch_layer | divisive (any lnjax.norms name)
    c.batch_size = 128
    c.num_steps = 1000
    return c
