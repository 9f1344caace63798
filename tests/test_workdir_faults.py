"""Fault injection for `python -m experiments.main`: a workdir that cannot hold the run (not
a directory, a file or directory where the run keeps the other, a file it cannot read back,
another run holding it, no permission, a full disk) ends in one `error:` line naming the
file, exit status 1 and no traceback, and leaves every file it held as it was.

Each case starts from a copy of one finished 20-step run (checkpoints at steps 10 and 20) made
by the command line itself. A full disk and a read-only workdir are simulated in the run's
own process (as root, permissions do not stop a write): `INJECT` runs the command with
Python's file writes under the workdir failing with ENOSPC, or its opens for writing with
EACCES.
"""

import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one subprocess (the machine may be loaded)
FLAGS = (f"--config={ROOT / 'configs' / 'mlp_digits.py'}", "--config.model.hidden=(16,)", "--config.batch_size=8",
         "--config.sweep.seed=(0,)", "--config.num_steps=20", "--config.steps_per_call=10",
         "--config.eval_every=10", "--config.checkpoint_every=10")

INJECT = r"""
import builtins, errno, io, os, runpy, sys

mode, root = sys.argv[1], os.path.abspath(sys.argv[2])
sys.argv = ["experiments.main", *sys.argv[3:]]
real_open, real_os_open = io.open, os.open


def inside(file):
    return isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(root + os.sep)


class Full:
    # An open file on a full disk: opening works, writing does not.
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fake_open(file, mode_="r", *args, **kwargs):
    if inside(file) and any(c in mode_ for c in "wax+"):
        if mode == "read_only":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        if mode == "full" or (mode == "full_on_append" and "a" in mode_):
            return Full(real_open(file, mode_, *args, **kwargs))
    return real_open(file, mode_, *args, **kwargs)


def fake_os_open(path, flags, *args, **kwargs):
    if mode == "read_only" and inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return real_os_open(path, flags, *args, **kwargs)


io.open = builtins.open = fake_open
os.open = fake_os_open
runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    return env


def train(workdir, env, *extra, inject=None, cwd=ROOT):
    argv = [*FLAGS, *extra, f"--workdir={workdir}"]
    cmd = [sys.executable, "-m", "experiments.main", *argv]
    if inject:
        cmd = [sys.executable, "-c", INJECT, inject, str(workdir), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("saved") / "run"
    proc = train(workdir, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
    return workdir


def snapshot(top: pathlib.Path) -> dict:
    return {p: p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------------------
# The faults: each damages a copy of the saved run (or names another workdir) and returns the
# workdir, the text the error line must contain, and how to run the command.
# --------------------------------------------------------------------------------------------


def _replace_by_dir(path):
    path.unlink()
    path.mkdir()
    (path / "x").write_text("not the run's\n")


def _replace_by_file(path):
    shutil.rmtree(path)
    path.write_text("not the run's\n")


def _interrupted_after_step_10(run):
    """The run as a kill after step 10 was saved leaves it."""
    shutil.rmtree(run / "checkpoints" / "20")
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(True) if '"step": 20' not in line))


def fault_setup(name, run: pathlib.Path, scene: pathlib.Path):
    if name == "empty_workdir":
        return "", "--workdir must name a directory, got ''", None
    if name == "workdir_is_a_file":
        (scene / "file").write_text("a file\n")
        return scene / "file", f"--workdir {scene / 'file'} is not a directory", None
    if name == "workdir_is_dev_null":
        return pathlib.Path("/dev/null"), "--workdir /dev/null is not a directory", None
    if name == "config_json_garbage":
        (run / "config.json").write_bytes(b"\x00\xffgarbage{")
        return run, f"{run / 'config.json'} is not a run's config", None
    if name in ("config_json_is_a_dir", "metrics_jsonl_is_a_dir"):
        path = run / name.split("_is_")[0].replace("_", ".")
        _replace_by_dir(path)
        return run, f"{path} must be a regular file", None
    if name in ("checkpoints_is_a_file", "tensorboard_is_a_file"):
        path = run / name.split("_is_")[0]
        _replace_by_file(path)
        return run, f"{path} must be a directory", None
    if name == "garbage_metrics_line":
        lines = (run / "metrics.jsonl").read_text().splitlines(True)
        (run / "metrics.jsonl").write_text("".join([lines[0], "garbage\n", *lines[1:]]))
        return run, f"{run / 'metrics.jsonl'}, line 2: not a metrics row", None
    if name == "swapped_step_directories":
        ckpt = run / "checkpoints"
        os.rename(ckpt / "10", ckpt / "tmp")
        os.rename(ckpt / "20", ckpt / "10")
        os.rename(ckpt / "tmp", ckpt / "20")
        return run, f"{ckpt / '20'}: hold the state of step 10", None
    if name == "in_use_by_another_run":
        return run, f"is in use by another run (it holds {run / '.lock'})", None
    if name == "read_only":
        return run, f"cannot open {run / '.lock'}: Permission denied", "read_only"
    if name == "disk_full":
        return run, f"cannot write {run / 'config.json'}: No space left on device", "full"
    if name == "disk_full_while_training":
        _interrupted_after_step_10(run)
        return run, f"cannot write {run / 'metrics.jsonl'}: No space left on device", "full_on_append"
    raise AssertionError(name)


FAULTS = ["empty_workdir", "workdir_is_a_file", "workdir_is_dev_null", "config_json_garbage", "config_json_is_a_dir",
          "metrics_jsonl_is_a_dir", "checkpoints_is_a_file", "tensorboard_is_a_file", "garbage_metrics_line",
          "swapped_step_directories", "in_use_by_another_run", "read_only", "disk_full",
          "disk_full_while_training"]
# Lines a failing run may print before its error: the progress bar of a run that trained, the
# warnings and notes of corrupt checkpoints (restore_latest_valid's convention).
NOISY = {"disk_full_while_training", "swapped_step_directories"}
BAR = re.compile(r"^\S+:\s+\d+%\|")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_workdir_fault_is_one_error_line_and_loses_nothing(tmp_path, env, saved_run, fault):
    scene, cwd = tmp_path / "scene", tmp_path / "cwd"
    scene.mkdir()
    cwd.mkdir()
    shutil.copytree(saved_run, scene / "run")
    workdir, message, inject = fault_setup(fault, scene / "run", scene)
    before = snapshot(scene)
    held = None
    if fault == "in_use_by_another_run":
        held = open(workdir / ".lock", "a")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = train(workdir, env, inject=inject, cwd=cwd)
    finally:
        if held:
            held.close()

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    if fault not in NOISY:
        assert lines == errors, proc.stderr[-3000:]
    else:
        others = [line for line in lines[:-1] if not BAR.match(line)]
        # a warning, and the source line Python shows under it
        assert all("RuntimeWarning: corrupt checkpoint" in line or line.startswith(" ") for line in others), \
            proc.stderr[-3000:]
    after = snapshot(scene)
    assert {p: after.get(p) for p in before} == before  # every file saved is there, unchanged
    assert not any(cwd.iterdir())  # nothing written where the command ran


def test_the_fault_cases_start_from_a_run_that_resumes(tmp_path, env, saved_run):
    """The control: the same copy of the saved run, undamaged, extends without an error."""
    shutil.copytree(saved_run, tmp_path / "run")
    proc = train(tmp_path / "run", env, "--config.num_steps=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
