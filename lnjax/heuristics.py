"""The choices lnjax makes from the hardware, in one place, each a function of what it depends on:

* `native_kernels()`: whether layer, RMS and batch norm and the LSTM step run in the native CPU
  kernels (`lnjax.native`) by default; the choice between them and the fused XLA path is made
  per platform when a program is lowered (CPU: native, others: fused);
* `block_bytes()`: the working set of one block of rows in the fused XLA path's backward (the
  L2 cache's size, from sysfs);
* `default_precompute_inputs(batch_size)`: `lnjax.rnn`'s projection form;
* `choices(batch_size)`: all of them, as the experiment runner records them in each run.

No constant here is tuned to one machine: the measured rules (BENCHMARKS.md) are stated with
their reasons, and the machine's own facts (its backend, its cache) are read from it.
"""

import functools
import glob
import pathlib

import jax

from lnjax import native

__all__ = ["block_bytes", "choices", "default_precompute_inputs", "l2_bytes", "native_kernels", "parse_cache_size"]


def native_kernels() -> bool:
    """Whether the native CPU kernels are loaded (`lnjax.native.available`); `implementation=None`
    then uses them on CPU."""
    return native.available()


# Where the OS does not report the L2 size: the per-core L2 of the machine the rule was
# measured on (a 2-core AMD EPYC, BENCHMARKS.md "what was tried").
_DEFAULT_BLOCK_BYTES = 1 << 20


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache `size` entry ("1024K", "2M", "512")."""
    text = text.strip().upper()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if unit > 1 else text) * unit


def l2_bytes(cache_dir="/sys/devices/system/cpu/cpu0/cache") -> int:
    """The L2 cache size Linux's sysfs reports under `cache_dir` (`index*/level`, `size`), or
    `_DEFAULT_BLOCK_BYTES` where it reports none."""
    for level in sorted(glob.glob(f"{cache_dir}/index*/level")):
        path = pathlib.Path(level)
        try:
            if path.read_text().strip() == "2":
                return parse_cache_size((path.parent / "size").read_text())
        except (OSError, ValueError):
            break
    return _DEFAULT_BLOCK_BYTES


@functools.cache
def block_bytes() -> int:
    """Working-set size of one block of rows (float32 bytes of one operand): this machine's
    per-core L2 cache (`l2_bytes`), so that a block's temporaries stay in it."""
    return l2_bytes()


def default_precompute_inputs(batch_size: int | None = None) -> bool:
    """Whether `rnn` hoists `project_inputs` out of the scan by default.

    On accelerators, one large matmul before the scan wins. On CPU (BENCHMARKS.md, "projection
    form") the hoisted form measured faster or equal for batches of 1 to 8 sequences and the
    per-step form faster for 16 and 32, so it depends on `batch_size` (the number of sequences
    per batch; None counts as large).
    """
    if jax.default_backend() != "cpu":
        return True
    return batch_size is not None and batch_size <= 8


def choices(batch_size: int | None = None) -> dict:
    """The choices above on this machine, for sequences batched `batch_size` at a time."""
    return {"backend": jax.default_backend(), "native_kernels": native_kernels(), "fused_block_bytes": block_bytes(),
            "rnn_precompute_inputs": default_precompute_inputs(batch_size)}
