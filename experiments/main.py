"""The command line: `python -m experiments.main --config=configs/mlp_digits.py --workdir=runs/mlp`.

Flags, then `train.fit(config, workdir)`; a config, checkpoint or workdir the user must fix is
one `error: ...` line (exit status 1), a flag that does not parse one too (exit status 2).
"""

import hashlib
import json
import os
import pathlib
import sys

import jax
import ml_collections
import numpy as np

from experiments import checkpoints, checks, sweep, train
from experiments import mesh as mesh_lib
from experiments import workdir as workdir_lib


def init_distributed(coordinator_address=None, num_processes=None, process_id=None, *, auto=False) -> bool:
    """Calls `jax.distributed.initialize` for a multi-process run; returns whether it did.

    Each setting falls back to an environment variable (`JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); one left unset after that is auto-detected by JAX
    on the clusters it knows (Cloud TPU, SLURM, Open MPI, Kubernetes). Nothing is set and
    `auto` is False: a single-process run, no initialization.
    """
    env = os.environ.get
    address = coordinator_address or env("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else env("JAX_PROCESS_ID")
    if not auto and address is None and count is None and index is None:
        return False
    jax.distributed.initialize(
        address, None if count is None else int(count), None if index is None else int(index)
    )
    return True


def _params_digest(params, i) -> str:
    """SHA-256 of member `i`'s parameters (host copies), to compare processes and runs."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(leaf[i]).tobytes())
    return h.hexdigest()


def define_config_flag(flag_values=None, sys_argv=None):
    """Defines `--config`, a config file from configs/, and its `--config.<key>=<value>`
    overrides (on `flag_values`, default absl's FLAGS). The config is locked: an override must
    name an existing key (so the normalizer options one can set are those `model.norm_args`
    declares, see configs/base.py). `sys_argv`: the command line, if not `sys.argv`."""
    from absl import flags
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True,
                                           flag_values=flags.FLAGS if flag_values is None else flag_values,
                                           sys_argv=sys_argv)  # fmt: skip


_HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def _config_path(argv) -> str:
    """The `--config` file named on the command line (configs/base.py if none)."""
    paths = [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
             for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]
    if paths:
        return paths[-1]  # as absl: the last one counts
    return str(pathlib.Path(__file__).parents[1] / "configs" / "base.py")


def _print_help(argv):
    import runpy

    from absl import app

    app.usage(shorthelp=True, writeto_stdout=True)
    path = _config_path(argv)
    file, *arg = path.split(":", 1)  # ml_collections' `file.py:argument` form
    module = runpy.run_path(file)
    cfg = module["get_config"](*arg) if "get_config" in module else module["base_config"]()
    rows = [(f"--config.{k}", t, repr(v)) for k, t, v in sweep.config_keys(cfg)]
    width = max(len(r[0]) for r in rows)
    print(f"\nconfig keys of {path} (set with --config.<key>=<value>; None: unset):")
    for key, t, v in rows:
        print(f"  {key:<{width}}  {t:<6} {v}")


def _repeated_tuple_flag(flag_values, argv) -> str | None:
    """The error for a tuple config key given more than once in `argv`, or None.
    ml_collections joins the values of a repeated tuple flag (`--config.sweep.seed='(0,)'
    --config.sweep.seed='(1,)'` trains both seeds), where every other flag takes the last
    value: either reading would surprise someone, so neither is guessed."""
    from absl import flags

    names = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    for name in dict.fromkeys(names):
        count = names.count(name)
        if count > 1 and name in flag_values and isinstance(flag_values[name], flags.MultiFlag):
            joined = str(tuple(flag_values[name].value)).replace(" ", "")
            return f"--{name} is given {count} times: give the tuple once (all of them: --{name}='{joined}')"
    return None


def parse_flags(argv):
    """absl's flag parsing for the command line, made friendlier: `--help` also lists the config
    keys (of `--config`, else configs/base.py) with their types and defaults; a bare `-v` is
    `--verbosity=0` (INFO logs; absl's `-v` takes a level); an unknown key, a value that does
    not parse, a tuple key given twice or a config file that does not load is one
    `error: ...` line (exit status 2)."""
    from absl import flags

    argv = list(argv)
    if any(a in _HELP for a in argv[1:]):
        _print_help(argv)
        sys.exit(0)
    for i, a in enumerate(argv):
        if a == "-v" and not (i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit()):
            argv[i] = "--verbosity=0"
    try:
        rest = flags.FLAGS(argv)
        cfg = flags.FLAGS.config
        if cfg is not None and not isinstance(cfg, ml_collections.ConfigDict):
            cfg.name  # ml_collections defers a failed load to the first access: raises it
        message = _repeated_tuple_flag(flags.FLAGS, argv)
        if message is None:
            return rest
    except (KeyError, AttributeError) as e:  # ml_collections: a key the config does not have
        while e.args and isinstance(e.args[0], KeyError):  # AttributeError(KeyError(...))
            e = e.args[0]
        key, *hint = str(e.args[0] if e.args else e).splitlines()
        message = f"unknown config key {key.strip(chr(34))}" + "".join(f"; {h}" for h in hint)
    except OSError as e:  # the config file does not load (missing, or raising)
        message = f"--config={_config_path(argv)} does not load: {str(e).strip().splitlines()[-1].strip()}"
    except flags.Error as e:
        message = str(e)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _exit_with_error(e: BaseException):
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        train.set_verbosity(False)
    init_distributed(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
    cfg = f.config
    try:
        state, rows, members = train.fit(cfg, f.workdir)
    except (checks.ConfigError, checkpoints.CheckpointError, workdir_lib.WorkdirError) as e:  # the user's to fix: one line, no traceback
        _exit_with_error(e)
    except OSError as e:  # an I/O failure `fit` does not wrap: its str() names the file
        _exit_with_error(e)
    params = mesh_lib.fetch(state.params, state.step.sharding.mesh)
    last = {r["member"]: r for r in rows}
    for i, m in enumerate(members):
        r = last.get(i, {})
        print(json.dumps({**m, **{k: v for k, v in r.items() if k.startswith("test_") or k == "diverged_at"},
                          "params_sha256": _params_digest(params, i)}))


if __name__ == "__main__":
    from absl import app, flags

    define_config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process runs: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes (else $JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (else $JAX_PROCESS_ID).")
    flags.DEFINE_bool("distributed", False,
                      "Call jax.distributed.initialize() even without the settings above, letting JAX "
                      "auto-detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
