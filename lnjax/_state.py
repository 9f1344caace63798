"""`BatchNormState`, on its own so that `_checks` and `_stats` (which imports `_checks`) share it."""

from typing import NamedTuple

import jax


class BatchNormState(NamedTuple):
    """Running statistics of batch normalization, each of the feature shape.

    Attributes:
      mean: running average of the batch means.
      var: running average of the unbiased batch variances `m / (m - 1) * var`
        (Ioffe & Szegedy 2015, Alg. 2), used at inference.
    """

    mean: jax.Array
    var: jax.Array
