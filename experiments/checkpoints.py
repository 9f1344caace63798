"""Verified orbax checkpoints: each step records its config and the SHA-256 of every array.

A corrupt or unreadable latest checkpoint is reported (a RuntimeWarning naming the step and
the file), set aside into `<workdir>/corrupt_checkpoints/` and the previous valid one used;
with none valid, `CheckpointError` names every file. A step directory holding another step's
state (renamed or copied) counts as corrupt. Resuming under another config is refused.
"""

import hashlib
import json
import pathlib
import shutil
import sys
import warnings

import jax
import numpy as np
from jax.sharding import Mesh

from experiments import checks
from experiments import mesh as mesh_lib
from experiments import workdir as workdir_lib


class CheckpointError(ValueError):
    """No checkpoint of the workdir can be restored as saved (each one is corrupt)."""


# Each step's orbax `custom_metadata` (in its _CHECKPOINT_METADATA, written and finalized with
# the step) records the run's config and the SHA-256 of every array of the state: a step is
# bound to the config that produced it, and its arrays are verified when restored. (Orbax
# checksums only the index of its zarr3 shards, not the array bytes, and has no option to
# verify what it restores.)
RECORD_KEY = "lnjax_checkpoint"


_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def state_digests(state, mesh: Mesh) -> dict[str, str]:
    """SHA-256 of each array of `state` (dtype, shape and bytes; host copies, gathered from
    every process), keyed by its path in the tree."""
    host = mesh_lib.fetch(state, mesh)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
        a = np.ascontiguousarray(leaf)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


class _Corrupt(Exception):
    """One step that cannot be restored as saved: the file (or array) at fault, and why."""

    def __init__(self, step, where, why):
        super().__init__(f"checkpoint step {step}: {where}: {why}")
        self.step = step


def _bad_json_file(step_dir: pathlib.Path):
    """The first of orbax's JSON files under `step_dir` that does not parse, with the error."""
    files = [f for f in sorted(step_dir.rglob("*")) if f.is_file()
             and (f.name in _JSON_FILES or f.parent.name == "array_metadatas")]
    for f in files:
        try:
            json.loads(f.read_bytes())
        except (ValueError, OSError) as e:
            return f, e
    return None, None


def _corrupt_from(step, step_dir: pathlib.Path, e: BaseException) -> _Corrupt:
    bad, err = _bad_json_file(step_dir)
    if bad is not None:
        return _Corrupt(step, f"file {bad}", f"unreadable ({workdir_lib.first_line(err)})")
    return _Corrupt(step, f"files under {step_dir}", f"restore failed ({workdir_lib.first_line(e)})")


def _restore_verified(manager, step, abstract, mesh, config: dict, workdir):
    """Step `step`'s state, after checking its record: the config it was saved under may only
    differ in a smaller `num_steps` (else ConfigError), and every array's SHA-256 must match
    (else `_Corrupt`, naming the array and the step directory)."""
    import orbax.checkpoint as ocp

    step_dir = pathlib.Path(str(manager.directory)) / str(step)
    try:
        record = (manager.metadata(step).custom_metadata or {}).get(RECORD_KEY)
    except Exception as e:  # noqa: BLE001 (orbax raises what its readers raise: JSON, OS, ValueError)
        raise _corrupt_from(step, step_dir, e) from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or not isinstance(record.get("sha256"), dict):
        bad, err = _bad_json_file(step_dir)
        where = f"file {bad}" if bad is not None else f"file {step_dir / '_CHECKPOINT_METADATA'}"
        why = f"unreadable ({workdir_lib.first_line(err)})" if bad is not None else f"has no {RECORD_KEY!r} record (config and checksums)"
        raise _Corrupt(step, where, why)
    checks.check_extension(record["config"], config, workdir, source=f"checkpoint step {step}")
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001
        raise _corrupt_from(step, step_dir, e) from None
    got = state_digests(state, mesh)
    if got.keys() != record["sha256"].keys():
        raise _Corrupt(step, f"files under {step_dir / 'default'}", "the arrays restored are not those recorded")
    wrong = [k for k in got if got[k] != record["sha256"][k]]
    if wrong:
        raise _Corrupt(step, f"files under {step_dir / 'default'}",
                       f"SHA-256 mismatch of {len(wrong)} array(s), first `state{wrong[0]}`")
    # A whole step directory moved or copied under another step's name verifies as saved:
    # the state's own step counter tells, or the run would resume at a step it never reached.
    held = sorted({int(s) for s in mesh_lib.fetch(state.step, mesh)})
    if held != [step]:
        raise _Corrupt(step, f"files under {step_dir}", f"hold the state of step {', '.join(map(str, held))}, "
                       f"not of step {step} (a step directory renamed or copied)")
    return state


def restore_latest_valid(manager, abstract, mesh, config: dict, workdir):
    """`(step, state, bad)`: the newest checkpoint that restores as saved (`(0, None, [])` for
    none at all), and the steps found corrupt on the way, each reported with a warning naming
    the step and the file. Raises CheckpointError naming every file if no checkpoint is valid,
    and ConfigError if the newest readable one was saved under another config."""
    bad = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, _restore_verified(manager, step, abstract, mesh, config, workdir), bad
        except _Corrupt as e:
            bad.append(e)
            warnings.warn(f"corrupt {e}; falling back to the previous checkpoint.", RuntimeWarning, stacklevel=2)
    if bad:
        raise CheckpointError(f"no valid checkpoint in {manager.directory}: " + "; ".join(map(str, bad))
                              + ". Delete the workdir's checkpoints to train afresh.")
    return 0, None, bad


def set_aside(ckpt_dir: pathlib.Path, steps, primary: bool):
    """Moves the corrupt steps out of `ckpt_dir` (into `corrupt_checkpoints/` next to it) so
    that they are saved again; every process waits for it."""
    if primary:
        dest = ckpt_dir.parent / "corrupt_checkpoints"
        with workdir_lib.writing(dest, "move a corrupt checkpoint to"):
            dest.mkdir(exist_ok=True)
            for step in steps:
                target = dest / str(step)
                n = 1
                while target.exists():
                    target, n = dest / f"{step}.{n}", n + 1
                shutil.move(str(ckpt_dir / str(step)), str(target))
                print(f"moved corrupt checkpoint step {step} to {target}", file=sys.stderr)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lnjax: corrupt checkpoints set aside")


def checkpoint_manager(ckpt_dir: pathlib.Path, cfg):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    save_steps = [policies.FixedIntervalPolicy(cfg.checkpoint_every), policies.SpecificStepsPolicy((cfg.num_steps,)),
                  policies.PreemptionCheckpointingPolicy()]  # the last one: JAX's preemption notice
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False,
                                           save_decision_policy=policies.AnySavePolicy(save_steps))
    with workdir_lib.writing(ckpt_dir, "open"):
        return ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=ocp.StandardCheckpointHandler())


def resume(ckpt_dir: pathlib.Path, cfg, state, config: dict, mesh: Mesh, workdir, primary: bool):
    """`(manager, step, state)` of the newest valid checkpoint (`(None, 0, state)` without a
    checkpoint directory); the corrupt ones met on the way are set aside (by process 0,
    `primary`)."""
    import orbax.checkpoint as ocp

    if not ckpt_dir.is_dir():
        return None, 0, state
    manager = checkpoint_manager(ckpt_dir, cfg)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    step, restored, bad = restore_latest_valid(manager, abstract, mesh, config, workdir)
    if bad:
        set_aside(ckpt_dir, [e.step for e in bad], primary)
        manager.reload()
    return manager, step, state if restored is None else restored


def save(manager, step, state, config, mesh):
    """Saves `state` as step `step`, with its record (the config and every array's SHA-256)."""
    import orbax.checkpoint as ocp

    record = {"config": config, "sha256": state_digests(state, mesh)}
    try:
        manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={RECORD_KEY: record})
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore wrap I/O errors in their own types)
        raise workdir_lib.WorkdirError(f"cannot save checkpoint step {step} in {manager.directory}: {workdir_lib.first_line(e)}") from e
