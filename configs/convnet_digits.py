"""§6.7 analogue: a small ConvNet on scikit-learn's digits (8x8x1 images)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.name = "convnet_digits"
    c.model.kind = "convnet"
    c.model.hidden = (32, 64)  # channels of the 3x3 conv layers
    c.model.norm = "layer"
    c.batch_size = 64
    c.num_steps = 600
    c.optimizer.learning_rate = 3e-3
    # XLA:CPU runs conv gradients inside a while loop ~10x slower than unrolled.
    c.steps_per_call = 10
    c.unroll = 10
    c.eval_every = 50
    c.checkpoint_every = 300
    return c
