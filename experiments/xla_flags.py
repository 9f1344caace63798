"""XLA flags that the experiments' entry points set for themselves, before JAX starts its backend.

XLA:CPU in jaxlib 0.10.2 deadlocks intermittently in vmapped LN-LSTM training: the host waits
in `block_until_ready` while every XLA worker thread waits for work (seen in the full
reproduction and, every time, in `python -m benchmarks.sweep '{"model": "ln_lstm"}'`). Turning
off XLA:CPU's concurrency-optimized scheduler avoids it: that sweep then completed 3 runs out
of 3, against 3 hangs out of 3 without the flag (see BENCHMARKS.md, "Sweeps"). The flag only
changes the order of independent operations, not what is computed.
"""

import os

CPU_DEADLOCK_WORKAROUND = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def add(*flags: str) -> None:
    """Appends `flags` to `$XLA_FLAGS`, except those whose name the user already set there."""
    current = os.environ.get("XLA_FLAGS", "")
    new = [f for f in flags if f.split("=")[0] not in current]
    if new:
        os.environ["XLA_FLAGS"] = " ".join([current, *new]).strip()
