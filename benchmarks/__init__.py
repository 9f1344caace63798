"""lnjax's benchmark suite: `python -m benchmarks [--quick] [--only SECTION] [--out BENCHMARKS.md]`.

Sections: `norms` (layer/RMS/batch norm vs Flax, PyTorch and a copy of the same bytes),
`attempts` (the layer-norm VJPs tried), `rnn` (training-step throughput of normalized RNNs),
`sweep` (`jax.vmap` of training runs vs sequential) and `memory` (remat vs none at T=1000).
Each comparison runs in its own process; see `benchmarks/__main__.py` and BENCHMARKS.md.

The contenders of `norms` and `rnn` are registered once each in `benchmarks/contenders.py`
(name, suite, ops, modes, role, builder): the measurers iterate the registry, and a new
contender is one entry there. The targets are data in `benchmarks/targets.py`, checked against
the registry. The measurers never import the report (`report.py`, `norm_report.py`,
`run_report.py`, `targets.py`, `markdown.py`).
"""
