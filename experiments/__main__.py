import os
import sys

if "--quick" in sys.argv[1:] and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # The quick run trains tiny models for a few steps: its time is XLA:CPU compilation, most of
    # it LLVM's optimization passes. Without them it compiles ~3x faster (before jax loads).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from experiments.reproduce import main  # noqa: E402

main()
