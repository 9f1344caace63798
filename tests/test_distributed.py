"""Tests of sweeps and data parallelism on a device mesh, and of multi-process training.

* The mesh shape `config.mesh` resolves to, and the errors for bad mesh settings (in-process).
* With 8 virtual CPU devices (`--xla_force_host_platform_device_count=8`, in a subprocess,
  since the device count is fixed when JAX starts), sweep-sharded, data-parallel and mixed
  meshes give the single-device result: parameters, optimizer state, batch-norm statistics and
  metrics, to float rounding.
* Two real processes on this machine, connected by `jax.distributed.initialize` over
  127.0.0.1 (CPU collectives: gloo, JAX's default), train data-parallel through the usual
  entry point, end with bitwise identical parameters in both, match the one-process result,
  write one checkpoint and one metrics file, and resume together from that checkpoint.

Every subprocess runs under a timeout and is killed in a `finally`.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import mlp_digits
from experiments import mesh as mesh_lib
from experiments import main as cli
from experiments import tasks, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one subprocess run (the machine may be loaded)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the subprocesses: CPU, one device each unless XLA_FLAGS says otherwise,
    and a persistent compilation cache shared by this module's runs."""
    cache = tmp_path_factory.mktemp("jax_cache")
    e = dict(os.environ)
    e.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")])),
    })
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(name, None)
    return e


def tiny_config(*, seeds=(0, 1), norm="batch", batch_size=8, mesh=(0, 0)):
    """The digits MLP shrunk to 64-16-10 with batch norm: 20 steps, checkpoints at 10 and 20."""
    c = mlp_digits.get_config()
    c.model.hidden = (16,)
    c.model.norm = norm
    c.batch_size = batch_size
    c.num_steps = 20
    c.steps_per_call = 10
    c.eval_every = 10
    c.checkpoint_every = 10
    c.sweep.seed = tuple(seeds)
    c.sweep.learning_rate = ()
    c.mesh.sweep, c.mesh.data = mesh
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_close(got, want, rtol=1e-5, atol=1e-5):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def assert_rows_close(got, want):
    assert [(r["step"], r["member"], r["seed"], r["diverged_at"]) for r in got] == \
           [(r["step"], r["member"], r["seed"], r["diverged_at"]) for r in want]
    for g, w in zip(got, want):
        for k in ("train_loss", "test_loss", "test_error"):
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} of {g}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(cmds, env, logs, timeout=TIMEOUT):
    """Runs the commands concurrently; returns their exit codes (None: killed). Stops them all
    as soon as one fails (its peers would wait for it) or at `timeout`, and never leaves a
    process behind."""
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c for c in codes):
                break
            time.sleep(0.2)
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def tail(path, n=3000):
    return pathlib.Path(path).read_text()[-n:]


# --------------------------------------------------------------------------------------------
# Mesh configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh, members, batch, devices, want", [
    ((0, 0), 4, 16, 8, (4, 2)),  # sweep first (no communication), then data
    ((0, 0), 3, 128, 8, (1, 8)),  # 3 x 2 would leave 2 devices idle: data parallelism
    ((0, 0), 6, 16, 8, (2, 4)),
    ((0, 0), 5, 7, 8, (1, 7)),  # nothing uses all 8: the most devices (7 > 5)
    ((0, 0), 3, 128, 1, (1, 1)),  # one device: the 1 x 1 mesh
    ((2, 0), 4, 16, 8, (2, 4)),
    ((0, 8), 4, 16, 8, (1, 8)),
    ((1, 2), 4, 16, 8, (1, 2)),  # explicit and smaller than the machine: a subset (1 process)
])
def test_mesh_shape(mesh, members, batch, devices, want):
    cfg = tiny_config(seeds=tuple(range(members)), batch_size=batch, mesh=mesh)
    assert mesh_lib.mesh_shape(cfg, members, devices) == want


@pytest.mark.parametrize("mesh, batch, match", [
    ((3, 0), 8, r"`config.mesh.sweep`=3 must divide the number of sweep members \(4"),
    ((0, 3), 8, r"`config.mesh.data`=3 must divide `config.batch_size`=8"),
    ((0, 16), 16, r"`config.mesh` asks for sweep x data = 1 x 16 = 16 devices, but only 1 are visible"),
    ((2, 2), 8, r"asks for sweep x data = 2 x 2 = 4 devices, but only 1"),
    ((-1, 0), 8, r"`config.mesh.sweep` must be an int >= 0 \(0: automatic\), got -1"),
])
def test_bad_mesh_is_rejected_before_training(tmp_path, mesh, batch, match):
    cfg = tiny_config(seeds=(0, 1, 2, 3), batch_size=batch, mesh=mesh)
    with pytest.raises(ValueError, match=match):
        train.fit(cfg, tmp_path / "run", progress=False)  # 1 visible device (conftest)
    assert not (tmp_path / "run").exists()  # rejected before anything is written or trained


def test_cli_rejects_a_mesh_larger_than_the_machine(tmp_path, env):
    cmd = [sys.executable, "-m", "experiments.main", "--config=configs/mlp_digits.py", "--config.mesh.data=4",
           f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "error: `config.mesh` asks for sweep x data = 1 x 4 = 4 devices, but only 1 are visible" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_multi_process_mesh_must_use_every_device():
    """Every process feeds its own devices, so a multi-process mesh leaves none out."""
    cfg = tiny_config(seeds=(0, 1, 2), batch_size=2)
    assert mesh_lib.mesh_shape(cfg, 3, 4) == (3, 1)  # one process: 3 of the 4 devices is fine
    with pytest.raises(ValueError, match=r"`config.mesh` resolves to sweep x data = 3 x 1 = 3 devices, but a run "
                                         r"over 2 processes must use all 4 devices"):
        mesh_lib.mesh_shape(cfg, 3, 4, num_processes=2)
    cfg.batch_size = 8
    assert mesh_lib.mesh_shape(cfg, 3, 4, num_processes=2) == (1, 4)


def test_init_distributed_is_a_no_op_without_settings(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: called.append(a))
    assert cli.init_distributed() is False and not called
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    assert cli.init_distributed(process_id=3) is True
    assert called == [("host0:1234", 4, 3)]  # flags first, then the environment
    assert cli.init_distributed(auto=True, coordinator_address="h:1") and called[-1] == ("h:1", 4, None)


# --------------------------------------------------------------------------------------------
# 8 virtual devices, one process
# --------------------------------------------------------------------------------------------

MESHES = [(1, 1), (1, 8), (0, 0)]  # one device; data-parallel; automatic: 4 sweep x 2 data

EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_distributed import tiny_config, MESHES
    from experiments import tasks, train

    assert jax.device_count() == 8, jax.devices()
    out = {out!r}
    task = tasks.build_task(tiny_config())
    for mesh in MESHES:
        name = f"{{mesh[0]}}x{{mesh[1]}}"
        cfg = tiny_config(seeds=(0, 1, 2, 3), batch_size=16, mesh=mesh)
        cfg.checkpoint_every = cfg.num_steps
        state, rows, _ = train.fit(cfg, f"{{out}}/run_{{name}}", progress=False, task=task)
        shape = state.step.sharding.mesh.shape
        for part in ("params", "model_state", "opt_state"):
            np.savez(f"{{out}}/{{part}}_{{name}}.npz", *[np.asarray(x) for x in jax.tree.leaves(getattr(state, part))])
        with open(f"{{out}}/rows_{{name}}.json", "w") as f:
            json.dump({{"mesh": [shape["sweep"], shape["data"]], "rows": rows}}, f)
""")


@pytest.mark.slow
def test_sharded_sweep_and_data_parallel_match_one_device(tmp_path, env):
    """4 members x batch 16 with batch norm, trained on 8 CPU devices as a 1x1 mesh (one
    device), 1x8 (data-parallel) and the automatic 4x2 (sweep-sharded and data-parallel): the
    same parameters, optimizer states, BN running statistics and metrics, to float rounding.
    (The 1437 digits don't split evenly over 8 devices: the padding path is exercised too.)"""
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICE_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    eight = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    log = tmp_path / "log.txt"
    assert run_all([[sys.executable, str(script)]], eight, [log]) == [0], tail(log)

    def load(mesh):
        name = f"{mesh[0]}x{mesh[1]}"
        state = {}
        for part in ("params", "model_state", "opt_state"):
            with np.load(tmp_path / f"{part}_{name}.npz") as z:
                state[part] = [z[f"arr_{i}"] for i in range(len(z.files))]
        saved = json.loads((tmp_path / f"rows_{name}.json").read_text())
        return saved["mesh"], state, saved["rows"]

    assert [load(m)[0] for m in MESHES] == [[1, 1], [1, 8], [4, 2]]
    _, ref, ref_rows = load((1, 1))
    # Not vacuous: the members trained, and the BN running statistics (mean and var of two
    # layers, initially 0 and 1) moved.
    assert len(ref["model_state"]) == 4
    for i, stat in enumerate(ref["model_state"]):
        assert stat.shape[0] == 4 and not np.allclose(stat, i % 2)
    assert len(ref_rows) == 8  # 4 members at steps 10 and 20
    assert np.mean([r["test_loss"] for r in ref_rows[4:]]) < np.mean([r["test_loss"] for r in ref_rows[:4]])
    for mesh in MESHES[1:]:
        _, got, rows = load(mesh)
        assert_close(got["model_state"], ref["model_state"])  # BN statistics of the whole batch
        assert_close(got["params"], ref["params"])
        assert_close(got["opt_state"], ref["opt_state"])
        assert_rows_close(rows, ref_rows)


# --------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------

TWO_PROCESS_FLAGS = ("--config.model.hidden=(16,)", "--config.model.norm=batch", "--config.batch_size=8",
                     "--config.num_steps=20", "--config.steps_per_call=10", "--config.eval_every=10",
                     "--config.checkpoint_every=10", "--config.sweep.seed=(0,1)", "--config.mesh.data=2")


def two_processes(workdir, env, tag):
    """Runs the training entry point as 2 processes over 127.0.0.1; returns each one's summary
    lines (one JSON object per member)."""
    port = free_port()
    cmds = [[sys.executable, "-m", "experiments.main", "--config=configs/mlp_digits.py", *TWO_PROCESS_FLAGS,
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"] for i in range(2)]
    logs = [workdir.parent / f"{tag}_{i}.log" for i in range(2)]
    codes = run_all(cmds, env, logs)
    assert codes == [0, 0], "\n".join(f"--- process {i}:\n{tail(log)}" for i, log in enumerate(logs))
    return [[json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")] for log in logs]


def restore(ckpt_dir, step, like):
    """Checkpoint `step`, restored onto this process's device in the structure of `like`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.CheckpointManager(ckpt_dir) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def read_rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_data_parallel_like_one_and_resume_together(tmp_path, env):
    # The reference: one process, one device, the whole batch of 8.
    cfg = tiny_config(mesh=(0, 0))
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        ref, ref_rows, members = train.fit(cfg, tmp_path / "one", progress=False)
    assert dict(ref.step.sharding.mesh.shape) == {"sweep": 1, "data": 1}

    workdir = tmp_path / "two"
    summaries = two_processes(workdir, env, "first")
    # Both processes end with bitwise identical parameters (their own copies, replicated over
    # the data axis), and report the same metrics.
    assert len(summaries[0]) == len(summaries[1]) == 2
    assert summaries[0] == summaries[1]
    assert [(s["seed"], s["diverged_at"]) for s in summaries[0]] == [(0, -1), (1, -1)]

    # Written once: one metrics file without duplicate rows, one set of checkpoints.
    rows = read_rows(workdir / "metrics.jsonl")
    assert [(r["step"], r["member"]) for r in rows] == [(10, 0), (10, 1), (20, 0), (20, 1)]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
    assert json.loads((workdir / "config.json").read_text())["mesh"] == {"sweep": 0, "data": 2}

    # The same result as one process with the whole batch: state (BN statistics included) and metrics.
    saved = restore(workdir / "checkpoints", 20, ref)
    assert_close(saved.model_state, ref.model_state)  # BN statistics, synchronized over the processes
    assert_close(saved, ref)  # and everything else
    np.testing.assert_array_equal(saved.step, [20, 20])
    assert_rows_close(rows, ref_rows)
    for s, r in zip(summaries[0], ref_rows[-2:]):
        np.testing.assert_allclose(s["test_loss"], r["test_loss"], rtol=1e-5)

    # Resume: drop the last checkpoint; both processes restore step 10 and finish with exactly
    # the uninterrupted run's parameters and metrics. The step-10 rows are marked: a resumed
    # run keeps them as they are (a run started afresh would write them again, unmarked).
    shutil.rmtree(workdir / "checkpoints" / "20")
    marked = [dict(r, resumed_from_here=True) if r["step"] == 10 else r for r in rows]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    resumed = two_processes(workdir, env, "resumed")
    assert resumed[0] == resumed[1] == summaries[0]
    assert read_rows(workdir / "metrics.jsonl") == marked
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
