import sys

from experiments import xla_flags

if "--quick" in sys.argv[1:]:
    # The quick run trains tiny models for a few steps: its time is XLA:CPU compilation, most of
    # it LLVM's optimization passes. Without them it compiles ~3x faster (before jax loads).
    xla_flags.add("--xla_backend_optimization_level=0")

from experiments.reproduce import main  # noqa: E402

main()
