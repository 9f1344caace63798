"""Pixel-by-pixel digits (T = 64, one pixel per step), sequential or permuted
(`task.permute=True`): the analogue of Cooijmans et al.'s sMNIST/pMNIST on scikit-learn's
8x8 digits, classified from the last hidden state.

One feature per step makes `W_x x_t` a fixed vector times a scalar, which layer norm maps to
`sign(x_t) LN(w)`: it would discard the pixel's value (Table 1: LN is invariant to re-scaling
a single case). The LN cells therefore normalize the recurrent term and the cell state only
(`model.input_norm="none"`: `W_x x_t + b`), the form the paper's eq. 20-22 take for a
one-dimensional input.
"""

from configs.base import base_config, recurrent


def get_config():
    c = recurrent(base_config())
    c.name = "pixel_digits"
    c.task.name = "digits_pixels"
    c.task.permute = False
    c.model.cell = "lstm"  # lstm | gru | bn_lstm
    c.model.norm = "layer"
    c.model.input_norm = "none"
    c.model.hidden = (64,)
    c.batch_size = 64
    c.num_steps = 500
    c.optimizer.learning_rate = 3e-3
    return c
