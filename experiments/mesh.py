"""The device mesh of a run, and moving arrays onto it and back.

Axes ("sweep", "data") (`config.mesh`): the stacked sweep members are split over "sweep";
within a member the batch is split over "data", and so is the training set (each device,
and so each process, holds one contiguous slice of the examples; `local_batch` gathers a
batch from the slices with a reduce-scatter). One device is the 1 x 1 mesh of the same code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SWEEP, DATA = "sweep", "data"  # the mesh axes: sweep members, and the batch within a member


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_mesh_config(cfg, num_members: int):
    """The device-independent checks of `config.mesh` (types and divisibility)."""
    share = {SWEEP: (num_members, f"the number of sweep members ({num_members}: the product of the swept values)"),
             DATA: (cfg.batch_size, f"`config.batch_size`={cfg.batch_size}")}
    for axis, (total, what) in share.items():
        size = cfg.mesh[axis]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"`config.mesh.{axis}` must be an int >= 0 (0: automatic), got {size!r}.")
        if size and total % size:
            raise ValueError(
                f"`config.mesh.{axis}`={size} must divide {what}: every device along the "
                f"{axis!r} mesh axis gets an equal share (choose a divisor of {total}, or 0 for automatic)."
            )


def mesh_shape(cfg, num_members: int, num_devices: int, *, num_processes: int = 1) -> tuple[int, int]:
    """The `(sweep, data)` mesh shape for `config.mesh` on `num_devices` devices.

    A positive `config.mesh.sweep` / `config.mesh.data` is used as given; 0 is automatic: among
    the sizes that divide the number of members (sweep) and the batch size (data), the pair
    using the most devices, then the largest sweep size (sweep members need no communication).
    Raises a ValueError naming the config key for a size that does not divide, for more devices
    than are visible, and, with several processes, for a mesh that leaves some devices out.
    """
    check_mesh_config(cfg, num_members)
    fixed_s, fixed_d = cfg.mesh[SWEEP], cfg.mesh[DATA]
    wanted = (fixed_s or 1) * (fixed_d or 1)
    if wanted > num_devices:
        raise ValueError(
            f"`config.mesh` asks for sweep x data = {fixed_s or 1} x {fixed_d or 1} = {wanted} devices, "
            f"but only {num_devices} are visible (jax.device_count()); use at most {num_devices}, or 0 for automatic."
        )
    candidates = [
        (s, d)
        for s in ([fixed_s] if fixed_s else _divisors(num_members))
        for d in ([fixed_d] if fixed_d else _divisors(cfg.batch_size))
        if s * d <= num_devices
    ]
    s, d = max(candidates, key=lambda sd: (sd[0] * sd[1], sd[0]))
    if num_processes > 1 and s * d != num_devices:
        raise ValueError(
            f"`config.mesh` resolves to sweep x data = {s} x {d} = {s * d} devices, but a run over "
            f"{num_processes} processes must use all {num_devices} devices (each process feeds its "
            f"own devices): set `config.mesh.sweep` x `config.mesh.data` = {num_devices} (the "
            f"{num_members} members divisible by sweep, `config.batch_size`={cfg.batch_size} by data)."
        )
    return s, d


def make_mesh(cfg, num_members: int) -> Mesh:
    """The ("sweep", "data") mesh `config.mesh` describes, over the visible devices."""
    s, d = mesh_shape(cfg, num_members, jax.device_count(), num_processes=jax.process_count())
    return jax.make_mesh((s, d), (SWEEP, DATA), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[: s * d])


def single_device_mesh() -> Mesh:
    """The 1 x 1 mesh: what a run on one device uses."""
    return jax.make_mesh((1, 1), (SWEEP, DATA), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])


def put_on_mesh(tree, mesh: Mesh, spec: P, *, pad_to=1):
    """Global arrays from the host arrays of `tree` (the same on every process), laid out as `spec`.

    Each process supplies only the shards of its own devices (`make_array_from_callback`), so
    with `spec=P("data")` a process materializes just its slice of the examples. The leading
    axis is zero-padded to a multiple of `pad_to` (an even split); padding is never sampled.
    """

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % pad_to:
            x = np.concatenate([x, np.zeros((pad_to - x.shape[0] % pad_to, *x.shape[1:]), x.dtype)])
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree.map(put, tree)


@functools.lru_cache
def _replicate(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def fetch(tree, mesh: Mesh):
    """`tree` as NumPy on every process (arrays sharded over other processes are gathered)."""
    return jax.tree.map(np.asarray, _replicate(mesh)(tree))


def local_batch(shards, idx):
    """This device's part of the global batch `x[idx]` of every array of `shards`, inside
    `shard_map` over "data".

    The examples are split into contiguous slices along "data" (`shard` is this device's).
    Every device contributes the rows of the global batch it holds, zeros elsewhere, and a
    reduce-scatter sums the contributions (each row has one owner, so the sum is exact) and
    hands device k the k-th block of `len(idx) / data` rows.
    """

    def local(shard):
        rows = idx - lax.axis_index(DATA) * shard.shape[0]
        held = (rows >= 0) & (rows < shard.shape[0])
        part = shard[jnp.clip(rows, 0, shard.shape[0] - 1)]
        part = jnp.where(held.reshape(-1, *(1,) * (shard.ndim - 1)), part, jnp.zeros((), shard.dtype))
        return lax.psum_scatter(part, DATA, scatter_dimension=0, tiled=True)

    return jax.tree.map(local, shards)
