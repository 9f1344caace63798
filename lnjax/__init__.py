"""lnjax: layer normalization and its relatives, and normalized RNNs, in JAX.

Pure functions live at the top level (`lnjax.layer_norm`, ...), normalizers as values in
`lnjax.norms`; Flax wrappers in `lnjax.nnx` and `lnjax.linen` (imported, with flax, on first
use).
"""

from lnjax.normalization import (
    BatchNormState,
    batch_norm,
    batch_norm_state,
    group_norm,
    instance_norm,
    layer_norm,
    moments,
    rms_norm,
    weight_norm,
)
from lnjax import heuristics, native, norms  # noqa: I001  (after the ops they wrap)
from lnjax.recurrent import (
    BNLSTMCell,
    BNLSTMState,
    GRUCell,
    LSTMCarry,
    LSTMCell,
    RNNCell,
    bidirectional_rnn,
    bn_lstm_rnn,
    rnn,
    stacked_rnn,
)
from lnjax.relatives import (
    GRAPH_NORM_KINDS,
    SwitchableControl,
    batch_layer_norm,
    batch_layer_norm_state,
    divisive_norm,
    domain_agnostic_batch_norm,
    graph_adjacency_norm,
    graph_batch_norm,
    graph_learned_norm,
    graph_learned_weights,
    graph_node_norm,
    graph_norm,
    proxy_norm,
    proxy_quantiles,
    switchable_control,
    switchable_norm,
    switchable_norm_state,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The Flax frontends load flax on first use, so that `import lnjax` costs jax alone.
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"lnjax.{name}")
    raise AttributeError(f"module 'lnjax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "linen", "nnx"])
