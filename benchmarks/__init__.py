"""lnjax's benchmark suite: `python -m benchmarks [--quick] [--only SECTION] [--out BENCHMARKS.md]`.

Sections: `norms` (layer/RMS/batch norm vs Flax, PyTorch and a copy of the same bytes),
`attempts` (the layer-norm VJPs tried), `rnn` (training-step throughput of normalized RNNs),
`sweep` (`jax.vmap` of training runs vs sequential) and `memory` (remat vs none at T=1000).
Each comparison runs in its own process; see `benchmarks/__main__.py` and BENCHMARKS.md.
"""
