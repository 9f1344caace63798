"""XLA flags that the experiments' entry points set for themselves, before JAX starts its backend.

(Until commit 9aaa517 the entry points also turned off XLA:CPU's concurrency-optimized
scheduler, against a hang of vmapped LN-LSTM training on 2 cores. Its cause was two or more
batched LAPACK QR calls in one program, the per-gate orthogonal inits, which deadlock
XLA:CPU's thread pool in jaxlib 0.10.2; a cell's init now does one QR, and the flag is gone.)
"""

import os


def add(*flags: str) -> None:
    """Appends `flags` to `$XLA_FLAGS`, except those whose name the user already set there."""
    current = os.environ.get("XLA_FLAGS", "")
    new = [f for f in flags if f.split("=")[0] not in current]
    if new:
        os.environ["XLA_FLAGS"] = " ".join([current, *new]).strip()
