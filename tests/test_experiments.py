"""Tests of experiments/: the config CLI, vmapped sweeps, divergence handling, checkpoint
resume, the models, the Table 1 invariances and the quick reproduction end to end.

The training code is meant to run with JAX's defaults, while tests/conftest.py turns on x64 and
strict dtype/rank promotion (Optax itself does not run under strict promotion), so in-process
training runs inside `jax_defaults`; the CLI and the reproduction run in subprocesses.

Compilation dominates the cost of these tiny runs, so every training run here shares one
persistent XLA compilation cache (in-process and, through the environment, in subprocesses):
a second run of the same program loads its executable instead of compiling it again.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lnjax
from configs import base, char_lm, convnet_digits, gin_graphs, mlp_digits, rnn_adding, rnn_copying, rnn_digits
from experiments import checkpoints, checks, invariances, metrics, models, optim, sweep, tasks, train
from experiments import main as cli
from experiments import workdir as workdir_lib
from lnjax import norms

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 300  # seconds for one tiny training subprocess (the machine may be loaded)

# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's training runs."""
    path = tmp_path_factory.mktemp("jax_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    with contextlib.suppress(ImportError, AttributeError):
        from jax._src import compilation_cache

        compilation_cache.reset_cache()


@pytest.fixture
def jax_defaults(compile_cache):
    """JAX's default numerics (no x64, standard promotion), as the training code expects."""
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture
def subprocess_env(compile_cache):
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    return env


def tiny_config(seeds=(0,), lrs=(1e-3,), *, num_steps=40, norm="layer", checkpoint_every=None):
    """The digits MLP shrunk to 64-16-10, batch 8: compiles and runs in about a second."""
    c = mlp_digits.get_config()
    c.model.hidden = (16,)
    c.model.norm = norm
    c.batch_size = 8
    c.num_steps = num_steps
    c.steps_per_call = 10
    c.eval_every = 10
    c.checkpoint_every = checkpoint_every or num_steps
    c.sweep.seed = tuple(seeds)
    c.sweep.learning_rate = tuple(lrs)
    return c


_TASKS = {}


def tiny_task(norm="layer"):
    """`build_task` of `tiny_config`, built once per norm (loading the data takes a while)."""
    if norm not in _TASKS:
        _TASKS[norm] = tasks.build_task(tiny_config(norm=norm))
    return _TASKS[norm]


def member(state, i):
    """Member `i` of a stacked state, as NumPy."""
    return jax.tree.map(lambda a: np.asarray(a[i]), state)


def assert_trees_equal(a, b, exact=True, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def bitwise_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def solo_runs(tmp_path_factory, compile_cache):
    """`solo(seed, lr)`: the final state and metrics of a one-member fit (cached per module)."""
    cache = {}

    def solo(seed, lr):
        if (seed, lr) not in cache:
            workdir = tmp_path_factory.mktemp(f"solo_{seed}_{lr:g}")
            with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
                state, rows, members = train.fit(tiny_config((seed,), (lr,)), workdir, progress=False, task=tiny_task())
            assert members == [{"seed": seed, "learning_rate": lr}]
            cache[seed, lr] = (member(state, 0), rows)
        return cache[seed, lr]

    return solo


def read_rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def finalized_steps(ckpt_dir):
    """Steps of the checkpoints orbax has finalized (in-progress ones have a tmp suffix)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def restore(ckpt_dir, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir) as manager:
        return jax.tree.map(np.asarray, manager.restore(step, args=ocp.args.StandardRestore()))


def train_cmd(workdir, *overrides, config="configs/mlp_digits.py"):
    return [sys.executable, "-m", "experiments.main", f"--config={config}", *overrides, f"--workdir={workdir}"]


TINY_FLAGS = ("--config.model.hidden=(16,)", "--config.batch_size=8", "--config.sweep.seed=(0,1)")


def run(cmd, env, timeout=RUN_TIMEOUT):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Configs and the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_overrides_are_parsed_saved_and_used(tmp_path, subprocess_env):
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, *TINY_FLAGS, "--config.optimizer.learning_rate=3e-4", "--config.num_steps=20",
                    "--config.steps_per_call=10", "--config.eval_every=10", "--config.checkpoint_every=10")
    proc = run(cmd, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"^[IW]\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]  # quiet: no absl INFO logs
    assert "train loss " in proc.stderr  # on the progress bar

    saved = json.loads((workdir / "config.json").read_text())
    assert saved["optimizer"]["learning_rate"] == 3e-4
    assert saved["num_steps"] == 20 and saved["checkpoint_every"] == 10
    assert saved["model"]["hidden"] == [16] and saved["sweep"]["seed"] == [0, 1]
    assert saved["optimizer"]["name"] == "adam"  # untouched defaults are kept

    rows = read_rows(workdir / "metrics.jsonl")
    assert [(r["step"], r["member"]) for r in rows] == [(10, 0), (10, 1), (20, 0), (20, 1)]
    assert all(r["learning_rate"] == 3e-4 for r in rows)  # no sweep.learning_rate: the override
    assert [r["seed"] for r in rows] == [0, 1, 0, 1]
    assert finalized_steps(workdir / "checkpoints") == [10, 20]
    final = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(f["seed"], f["learning_rate"]) for f in final] == [(0, 3e-4), (1, 3e-4)]
    assert all(np.isfinite(f["test_loss"]) and f["diverged_at"] == -1 for f in final)

    # The same workdir with another config is refused, and left as it was.
    before = (workdir / "config.json").read_text(), (workdir / "metrics.jsonl").read_text()
    proc = run([c.replace("learning_rate=3e-4", "learning_rate=1e-3") for c in cmd], subprocess_env)
    assert proc.returncode != 0
    assert "different config" in proc.stderr
    assert ((workdir / "config.json").read_text(), (workdir / "metrics.jsonl").read_text()) == before
    assert finalized_steps(workdir / "checkpoints") == [10, 20]


@pytest.mark.parametrize("flag, expected", [
    ("--config.optimizer.learnin_rate=1",
     "error: unknown config key 'learnin_rate'; Did you mean \"learning_rate\" instead of \"learnin_rate\"?"),
    ("--config.modle.norm=layer", "error: unknown config key 'modle'; Did you mean \"model\""),
    ("--config.num_steps=abc", "error: flag --config.num_steps=abc: invalid literal for int()"),
    # An option the normalizer (layer norm, the config's) does not take: before training.
    ("--config.model.norm_args.radius=3", "error: config.model: `norm`='layer' with norm_args {'radius': 3}: `radius` is not an option"),
    ("--config.model.norm_args.epsilon=1e-6", "error: unknown config key 'epsilon'"),  # not declared (configs/base.py)
    ("--config=configs/no_such_config.py", "error: --config=configs/no_such_config.py does not load: [Errno 2]"),
])
def test_cli_rejects_unknown_keys_and_wrong_types(tmp_path, subprocess_env, flag, expected):
    proc = run(train_cmd(tmp_path / "run", flag), subprocess_env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]  # one line, no traceback
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_cli_help_lists_the_config_keys_with_types_and_defaults(subprocess_env):
    proc = run([sys.executable, "-m", "experiments.main", "--config=configs/rnn_adding.py", "--help"],
               subprocess_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in proc.stdout.splitlines()
            if line.startswith("  --config.")}
    keys = {f"--config.{k}": (t, v) for k, t, v in sweep.config_keys(rnn_adding.get_config())}
    assert rows.keys() == keys.keys() and len(rows) > 40
    assert rows["--config.optimizer.learning_rate"] == ["float", "0.003"]
    assert rows["--config.model.hidden"] == ["tuple", "(64,)"]
    assert rows["--config.model.norm_args.eps"] == ["float", "None"]  # declared, unset
    assert rows["--config.task.name"] == ["str", "'adding'"]
    assert "--workdir" in proc.stdout  # and absl's own flags


def test_loss_postfix():
    assert metrics.loss_postfix(np.array([0.5])) == "train loss 0.5"
    assert metrics.loss_postfix(np.array([1.0, 2.0, np.nan])) == "train loss 1.5 (mean of 2 members; 1 diverged)"
    assert metrics.loss_postfix(np.array([1.0, 2.0])) == "train loss 1.5 (mean of 2 members)"
    assert metrics.loss_postfix(np.array([np.nan])) == "every member diverged"


@pytest.mark.parametrize("module", [mlp_digits, convnet_digits, rnn_adding, rnn_copying, rnn_digits, char_lm, gin_graphs])
def test_shipped_configs_are_valid(module):
    cfg = module.get_config()
    checks.check_config(cfg)
    assert cfg.num_steps % cfg.steps_per_call == 0
    assert sorted(cfg.model.norm_args) == sorted(base.NORM_OPTIONS)  # declared, all unset
    assert all(v is None for v in cfg.model.norm_args.values())


def parse_cli(module, *overrides):
    """The config `experiments.main`'s command line gives (its own `--config` flag, locked)."""
    from absl import flags

    argv = ["train", f"--config={ROOT / 'configs' / (module.__name__.rsplit('.', 1)[1] + '.py')}", *overrides]
    flag_values = flags.FlagValues()
    cli.define_config_flag(flag_values, argv)
    flag_values(argv)
    return flag_values.config


def test_any_float_key_of_the_model_or_optimizer_is_a_sweep_axis():
    cfg = parse_cli(rnn_adding, "--config.sweep.model.norm_args.eps=(1e-5,1e-3)", "--config.sweep.seed=(0,1)",
                    "--config.sweep.model.forget_bias=(0.0,1.0)")
    floats = {k for k, t, _ in sweep.config_keys(cfg)
              if t == "float" and k.startswith(("model.", "optimizer.")) and ".norm_defaults." not in k}
    declared = {k.removeprefix("sweep.") for k, _, _ in sweep.config_keys(cfg) if k.startswith("sweep.")}
    assert floats - {"optimizer.learning_rate"} <= declared  # (norm_args overrides norm_defaults)
    assert {"model.norm_args.momentum", "model.norm_args.scale_init", "optimizer.weight_decay"} <= declared
    assert sweep.axes(cfg) == {"model.forget_bias": (0.0, 1.0), "model.norm_args.eps": (1e-5, 1e-3)}
    members = sweep.sweep_members(cfg)
    assert len(members) == 8 and members[1] == {"seed": 1, "learning_rate": cfg.optimizer.learning_rate,
                                                "model.forget_bias": 0.0, "model.norm_args.eps": 1e-5}
    assert metrics.member_name(members[-1]) == "lr=0.003,seed=1,forget_bias=1,eps=0.001"
    cfg = tiny_config(norm="batch")
    cfg.sweep.model.norm_args.eps = (1e-5, -1.0)  # each value is checked as the config's own
    with pytest.raises(checks.ConfigError, match="`eps` must be >= 0, got -1.0"):
        checks.check_config(cfg, task=tiny_task("batch"))
    cfg = mlp_digits.get_config()
    cfg.sweep.task = ml_collections.ConfigDict({"length": (10, 20)})
    with pytest.raises(checks.ConfigError, match=r"`config.sweep.task.length`: a sweep varies float keys"):
        checks.check_config(cfg)


def test_normalizer_options_come_from_the_config():
    """The experiments' settings of each normalizer are in the config (configs/base.py), and
    `model.norm_args` entries that are set go over them."""
    def options(module, **model):
        cfg = module.get_config()
        for k, v in model.items():
            cfg.model[k] = v
        return tasks.norm_options(cfg.model)

    assert options(mlp_digits) == {} and options(convnet_digits) == {}  # layer norm: lnjax's defaults
    for norm in ("batch", "switchable", "batch_layer"):  # batch statistics: momentum 0.9
        assert options(mlp_digits, norm=norm) == options(convnet_digits, norm=norm) == {"momentum": 0.9}
    assert options(mlp_digits, norm="divisive") == {"radius": 16}
    assert options(rnn_adding, norm="divisive") == {"radius": 30}  # Ren et al.'s window
    assert options(rnn_digits, norm="divisive") == {"radius": 15}
    assert options(rnn_adding, norm="rms") == {"eps": 1e-5}  # the RNN cells' eps
    assert options(rnn_adding, cell="bn_lstm") == {}  # the cell's own: Cooijmans et al.'s gains 0.1
    cfg = mlp_digits.get_config()
    cfg.model.norm = "batch"
    cfg.model.norm_args.momentum, cfg.model.norm_args.eps = 0.5, 1e-3
    assert tasks.norm_options(cfg.model) == {"momentum": 0.5, "eps": 1e-3}


def _init_apply(model, x, training=True):
    params, state = model.init(jax.random.PRNGKey(0))
    return params, np.asarray(model.apply(params, state, x, training=training)[0])


def _mlp_output(cfg, x):
    return _init_apply(tasks.build_model(cfg, input_size=x.shape[1], num_outputs=10), x)[1]


@pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")  # config_flags
def test_cli_norm_args_reach_the_normalizer():
    """`--config.model.norm_args.<option>` parses against the locked config and reaches the
    normalizer: the model computes what the normalizer built with that option gives."""
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    cfg = parse_cli(mlp_digits, "--config.model.norm_args.eps=1e-6")
    assert cfg.model.norm_args.eps == 1e-6 and tasks.norm_options(cfg.model) == {"eps": 1e-6}
    got = _mlp_output(cfg, x)
    np.testing.assert_array_equal(got, _init_apply(models.mlp((64, 256, 256, 10), norm=norms.layer(eps=1e-6)), x)[1])
    assert not np.array_equal(got, _mlp_output(parse_cli(mlp_digits), x))  # eps 1e-5

    # A factory argument (divisive norm's radius) over the config's default (16).
    cfg = parse_cli(mlp_digits, "--config.model.norm=divisive", "--config.model.norm_args.radius=2")
    assert tasks.norm_options(cfg.model) == {"radius": 2}
    got = _mlp_output(cfg, x)
    np.testing.assert_array_equal(got, _init_apply(models.mlp((64, 256, 256, 10), norm=norms.divisive(2)), x)[1])
    assert not np.array_equal(got, _mlp_output(parse_cli(mlp_digits, "--config.model.norm=divisive"), x))

    # The RNN cells' terms: the initial gains of the recurrent and cell norms (input: none).
    cfg = parse_cli(rnn_adding, "--config.model.norm_args.scale_init=0.1")
    params, _ = tasks.build_model(cfg, input_size=2, num_outputs=1, max_steps=5).init(jax.random.PRNGKey(0))
    rnn = params["rnn"]
    assert set(rnn["n_x"]) == {"bias"}  # input_norm="none": W_x x + b
    np.testing.assert_array_equal(rnn["n_h"]["scale"], np.float32(0.1))
    np.testing.assert_array_equal(rnn["n_c"]["scale"], np.float32(0.1))


def test_unknown_normalizer_options_are_rejected_before_training(tmp_path):
    cfg = tiny_config()
    cfg.model.norm_args.radius = 3  # layer norm has no radius
    with pytest.raises(ValueError, match=r"config\.model.*`radius` is not an option.*norm_args"):
        checks.check_config(cfg)
    with pytest.raises(ValueError, match="`radius` is not an option"):
        train.fit(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    cfg = tiny_config(norm="none")
    cfg.model.norm_args.eps = 1e-6  # no normalizer, so no options
    with pytest.raises(ValueError, match="takes no options"):
        checks.check_config(cfg)
    cfg = tiny_config(norm="bogus")
    with pytest.raises(ValueError, match=r"`config\.model\.norm` must be one of \('none', 'layer'.*got 'bogus'"):
        checks.check_config(cfg)
    cfg = rnn_adding.get_config()
    cfg.model.norm_defaults.layer = {"momentum": 0.9}  # a wrong default is caught alike
    with pytest.raises(ValueError, match="`momentum` is not an option"):
        checks.check_config(cfg)


@pytest.mark.parametrize("key, value", [
    ("num_steps", 25),  # not a multiple of steps_per_call = 10
    ("eval_every", 15),
    ("checkpoint_every", 5),
    ("num_steps", 0),
    ("steps_per_call", 0),
    ("batch_size", 0),
])
def test_check_config_rejects_bad_schedules(key, value):
    cfg = tiny_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=f"`config.{key}`"):
        checks.check_config(cfg)


def test_fit_rejects_bad_settings_before_training(tmp_path, jax_defaults):
    cfg = tiny_config()
    cfg.batch_size = 10_000
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(cfg, tmp_path / "big_batch", progress=False, task=tiny_task())

    # A workdir that holds another run is refused in-process too (and not overwritten).
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny_config(lrs=(3e-4,)).to_json(sort_keys=True))
    with pytest.raises(ValueError, match="different config"):
        train.fit(tiny_config(), workdir, progress=False, task=tiny_task())
    assert json.loads((workdir / "config.json").read_text())["sweep"]["learning_rate"] == [3e-4]

    cfg = tiny_config()
    cfg.model.kind = "transformer"
    with pytest.raises(ValueError, match="model.kind"):
        tasks.build_task(cfg)
    cfg = tiny_config()
    cfg.task.name = "imagenet"
    with pytest.raises(ValueError, match="task.name"):
        tasks.build_task(cfg)
    cfg.optimizer.name = "lamb"
    with pytest.raises(ValueError, match="optimizer.name"):
        optim.make_optimizer(cfg.optimizer)


def test_fit_builds_the_task_and_its_model_once(tmp_path, jax_defaults, monkeypatch):
    """The model the config is checked with (traced on a batch) is the one that trains."""
    built = []
    real = tasks.build_model
    monkeypatch.setattr(tasks, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train.fit(tiny_config(num_steps=10), tmp_path, progress=False)
    assert len(built) == 1


def test_tasks_are_a_registry(tmp_path, jax_defaults, monkeypatch):
    """An unknown task's error lists the registry; a new task is one entry (and a config)."""
    with pytest.raises(ValueError, match=re.escape(f"`task.name` must be one of {', '.join(tasks.TASKS)}, "
                                                   "got 'imagenet'.")):
        tasks.build_task(types.SimpleNamespace(task=types.SimpleNamespace(name="imagenet")))
    assert {"digits", "mnist", "adding", "copying", "char_lm", "colour_graphs"} <= set(tasks.TASKS)
    def parity(cfg):  # digits, labelled odd or even
        ds = tasks.TASKS["digits"].data(cfg)
        return ds._replace(y_train=ds.y_train % 2, y_test=ds.y_test % 2, num_classes=2)

    monkeypatch.setitem(tasks.TASKS, "digit_parity", tasks.TaskSpec(parity, tasks.classification_loss,
                                                                    lambda ds: ds.num_classes))
    cfg = tiny_config(num_steps=10)
    cfg.task.name = "digit_parity"
    task = tasks.build_task(cfg)
    assert task.model.apply(*task.model.init(jax.random.PRNGKey(0)), task.data.x_test, training=False)[0].shape[-1] == 2
    _, rows, _ = train.fit(cfg, tmp_path, progress=False, task=task)
    assert [r["step"] for r in rows] == [10]


def test_a_finished_run_extends_with_more_steps_only(tmp_path, jax_defaults, solo_runs):
    workdir = tmp_path / "run"
    train.fit(tiny_config(num_steps=20, checkpoint_every=20), workdir, progress=False, task=tiny_task())
    # Anything but more steps is refused, naming what changed.
    for key, value, text in (("batch_size", 16, "batch_size: 8 -> 16"), ("num_steps", 10, "num_steps: 20 -> 10")):
        cfg = tiny_config(num_steps=20, checkpoint_every=20)
        cfg[key] = value
        with pytest.raises(ValueError, match=f"different config \\({re.escape(text)}\\)"):
            train.fit(cfg, workdir, progress=False, task=tiny_task())
    state, rows, _ = train.fit(tiny_config(num_steps=40, checkpoint_every=20), workdir, progress=False,
                               task=tiny_task())
    # Going on from step 20 ends where an uninterrupted 40-step run ends.
    want, want_rows = solo_runs(0, 1e-3)
    assert_trees_equal(member(state, 0).params, want.params, exact=False)
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == [10, 20, 30, 40]
    np.testing.assert_allclose([r["test_loss"] for r in rows], [r["test_loss"] for r in want_rows], rtol=1e-5)


def test_sweep_members_order():
    cfg = tiny_config(seeds=(3, 4), lrs=(1e-3, 1e-2))
    assert sweep.sweep_members(cfg) == [
        {"seed": 3, "learning_rate": 1e-3}, {"seed": 4, "learning_rate": 1e-3},
        {"seed": 3, "learning_rate": 1e-2}, {"seed": 4, "learning_rate": 1e-2}]
    cfg = tiny_config(seeds=(), lrs=())
    assert sweep.sweep_members(cfg) == [{"seed": 0, "learning_rate": cfg.optimizer.learning_rate}]


# --------------------------------------------------------------------------------------------
# Configs validated before anything is written; verified checkpoints
# --------------------------------------------------------------------------------------------


def _set(cfg, key, value):
    *path, last = key.split(".")
    for k in path:
        cfg = cfg[k]
    cfg[last] = value


IMPOSSIBLE = [  # (key, value, what the error must say)
    ("batch_size", 10_000, r"`config\.batch_size` must be at most the number of training examples \(\d+\)"),
    ("model.hidden", (0,), r"`config\.model\.hidden` must be a tuple of ints >= 1"),
    ("sweep.seed", (-1,), r"`config\.sweep\.seed` must be a tuple of ints in \[0, 2\*\*32\)"),
    ("eval_every", 0, r"`config\.eval_every` must be an int >= 1"),
    ("checkpoint_every", 0, r"`config\.checkpoint_every` must be an int >= 1"),
    ("optimizer.learning_rate", -1e-3, r"`config\.optimizer\.learning_rate` must be a number > 0"),
    ("optimizer.learning_rate", 0.0, r"`config\.optimizer\.learning_rate` must be a number > 0"),
    ("sweep.learning_rate", (1e-3, 0.0), r"`config\.sweep\.learning_rate` must be a tuple of numbers > 0"),
    ("optimizer.name", "lamb", r"`config\.optimizer\.name` must be one of \('adam', 'sgd', 'adamw'\)"),
    ("model.norm", "lyer", r"`config\.model\.norm` must be one of \('none', 'layer'"),
]


@pytest.mark.parametrize("key, value, message", IMPOSSIBLE, ids=[f"{k}={v}" for k, v, _ in IMPOSSIBLE])
def test_impossible_config_values_are_rejected_before_anything_is_written(tmp_path, jax_defaults, key, value, message):
    cfg = tiny_config()
    if key == "sweep.learning_rate" or key == "optimizer.learning_rate":
        cfg.sweep.learning_rate = ()  # the optimizer's own rate is the sweep's
    _set(cfg, key, value)
    workdir = tmp_path / "run"
    with pytest.raises(checks.ConfigError, match=message) as info:
        train.fit(cfg, workdir, progress=False, task=tiny_task())
    assert "\n" not in str(info.value)  # one line
    assert not workdir.exists()  # nothing written, so the corrected command runs there


def _rnn_config(**model):
    cfg = rnn_digits.get_config()
    cfg.model.hidden, cfg.batch_size, cfg.sweep.seed = (8,), 8, (0,)
    for k, v in model.items():
        cfg.model[k] = v
    return cfg


def _bad_option(norm, **options):
    cfg = tiny_config(norm=norm)
    for k, v in options.items():
        cfg.model.norm_args[k] = v
    return cfg


def _bad_task(**task):
    cfg = tiny_config()
    for k, v in task.items():
        cfg.task[k] = v
    return cfg


def _bad_option_rnn():
    cfg = _rnn_config(cell="bn_lstm", forget_bias=1.0)
    cfg.model.norm_args.bias = False
    return cfg


BAD_NORMALIZERS_AND_TASKS = [  # (id, config, what the error must say)
    ("eps=-1", lambda: _bad_option("layer", eps=-1.0), r"config\.model: `eps` must be >= 0, got -1\.0"),
    ("eps=nan", lambda: _bad_option("layer", eps=float("nan")), r"`eps` must be >= 0, got nan"),
    ("momentum=1.5", lambda: _bad_option("batch", momentum=1.5), r"`momentum` must be in \[0, 1\], got 1\.5"),
    ("groups=3", lambda: _bad_option("layer", groups=3), r"`groups`=3 does not divide"),
    ("implementation=cuda", lambda: _bad_option("layer", implementation="cuda"), r"`implementation` must be"),
    ("radius=-1", lambda: _bad_option("divisive", radius=-1), r"`radius` must be"),
    ("sigma=-1", lambda: _bad_option("divisive", sigma=-1.0), r"`sigma` must be >= 0"),
    ("batch_size=0", lambda: _bad_option("batch_layer", batch_size=0), r"`batch_size` must be a positive int"),
    ("graph_norm_on_mlp", lambda: tiny_config(norm="graph_batch"), r"`model\.norm`='graph_batch' normalizes over graphs"),
    ("mnist_without_data_dir", lambda: _bad_task(name="mnist"), r"`task\.name`='mnist' needs `task\.data_dir`"),
    ("mnist_missing_data_dir", lambda: _bad_task(name="mnist", data_dir="/nonexistent/mnist"),
     r"`config\.task\.data_dir`='/nonexistent/mnist': MNIST file not found"),
    ("char_lm_missing_path", lambda: _bad_task(name="char_lm", path="/nonexistent/text.txt"),
     r"`config\.task\.path`='/nonexistent/text\.txt': text file not found"),
    ("bias=False_forget_bias", lambda: _bad_option_rnn(), r"`forget_bias`=1\.0 needs a bias"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in BAD_NORMALIZERS_AND_TASKS],
                         ids=[c[0] for c in BAD_NORMALIZERS_AND_TASKS])
def test_normalizer_values_and_missing_data_are_rejected_before_anything_is_written(tmp_path, jax_defaults, make,
                                                                                    message):
    """Checked by tracing the task's own model (built once) on a batch of its data."""
    workdir = tmp_path / "run"
    with pytest.raises(checks.ConfigError, match=message) as info:
        train.fit(make(), workdir, progress=False)
    assert "\n" not in str(info.value)
    assert not workdir.exists()


def test_a_tuple_flag_given_twice_is_refused(tmp_path, subprocess_env):
    """ml_collections joins a repeated tuple flag's values; every other flag takes the last."""
    workdir = tmp_path / "run"
    proc = run(train_cmd(workdir, "--config.model.hidden=(16,)", "--config.batch_size=8", "--config.num_steps=10",
                         "--config.steps_per_call=10", "--config.eval_every=10", "--config.checkpoint_every=10",
                         "--config.sweep.seed=(0,)", "--config.sweep.seed=(1,)"), subprocess_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --config.sweep.seed is given 2 times: give the tuple once (all of them: --config.sweep.seed='(0,1)')"]
    assert not workdir.exists()


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.learning_rate=-1.0", "`config.optimizer.learning_rate` must be a number > 0"),
    ("--config.model.norm=lyer", "`config.model.norm` must be one of"),
    ("--config.model.norm_args.eps=-1", "config.model: `eps` must be >= 0, got -1.0"),
    ("--config.sweep.model.norm_args.eps=(1e-5,-1.0)", "config.model: `eps` must be >= 0, got -1.0"),
    ("--config.sweep.optimizer.weight_decay=(-1.0,)",
     "`config.sweep.optimizer.weight_decay` must be a tuple of finite numbers >= 0, got (-1.0,)"),
])
def test_cli_reports_an_impossible_config_in_one_line(tmp_path, subprocess_env, flag, message):
    workdir = tmp_path / "run"
    result = run(train_cmd(workdir, *TINY_FLAGS, "--config.sweep.learning_rate=()", flag), subprocess_env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-3000:]
    assert not workdir.exists()


def _trained_run(tmp_path, jax_defaults):
    """A 20-step run with checkpoints at steps 10 and 20, and its final state."""
    workdir = tmp_path / "run"
    state, rows, _ = train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir, progress=False,
                               task=tiny_task())
    assert finalized_steps(workdir / "checkpoints") == [10, 20]
    return workdir, member(state, 0), rows


def _largest_array_file(step_dir):
    files = [f for f in (step_dir / "default").rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("damage", ["flipped_bytes", "other_arrays"])
def test_corrupt_array_bytes_are_detected_and_the_previous_checkpoint_used(tmp_path, jax_defaults, damage):
    workdir, final, rows = _trained_run(tmp_path, jax_defaults)
    if damage == "flipped_bytes":  # whatever orbax makes of them, they are detected
        data = _largest_array_file(workdir / "checkpoints" / "20")
        raw = bytearray(data.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])  # flip 64 bytes in place
        data.write_bytes(bytes(raw))
    else:  # arrays that orbax reads without complaint, but not those saved at step 20
        shutil.rmtree(workdir / "checkpoints" / "20" / "default")
        shutil.copytree(workdir / "checkpoints" / "10" / "default", workdir / "checkpoints" / "20" / "default")
    with pytest.warns(RuntimeWarning, match=r"corrupt checkpoint step 20: .*checkpoints/20"):
        state, resumed_rows, _ = train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir,
                                           progress=False, task=tiny_task())
    # Resumed from step 10: exactly the uninterrupted run's state and metrics.
    assert_trees_equal(member(state, 0), final)
    assert resumed_rows == rows
    assert finalized_steps(workdir / "checkpoints") == [10, 20]
    assert (workdir / "corrupt_checkpoints" / "20").is_dir()  # set aside, not deleted

    # Every checkpoint corrupt: an error naming them, and nothing overwritten.
    for step in (10, 20):
        data = _largest_array_file(workdir / "checkpoints" / str(step))
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning), pytest.raises(checkpoints.CheckpointError, match=r"no valid checkpoint.*step 20.*step 10"):
        train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir, progress=False, task=tiny_task())
    assert finalized_steps(workdir / "checkpoints") == [10, 20]


@pytest.mark.parametrize("name", ["default/_METADATA", "_CHECKPOINT_METADATA"])
def test_a_truncated_metadata_file_is_reported_by_name(tmp_path, jax_defaults, name):
    workdir, final, rows = _trained_run(tmp_path, jax_defaults)
    bad = workdir / "checkpoints" / "20" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=f"corrupt checkpoint step 20: file {re.escape(str(bad))}: unreadable"):
        state, resumed_rows, _ = train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir,
                                           progress=False, task=tiny_task())
    assert_trees_equal(member(state, 0), final)
    assert resumed_rows == rows


def test_a_step_directory_holding_another_steps_state_is_not_resumed(tmp_path, jax_defaults):
    """A step directory renamed or copied verifies as saved (its record travels with it); the
    state's own step counter tells, and it is handled as any corrupt checkpoint."""
    workdir, final, rows = _trained_run(tmp_path, jax_defaults)
    ckpt = workdir / "checkpoints"
    shutil.rmtree(ckpt / "20")
    shutil.copytree(ckpt / "10", ckpt / "20")  # step 10's state under step 20's name
    with pytest.warns(RuntimeWarning, match=r"corrupt checkpoint step 20: files under .*checkpoints/20: "
                                            r"hold the state of step 10, not of step 20"):
        state, resumed_rows, _ = train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir,
                                           progress=False, task=tiny_task())
    assert_trees_equal(member(state, 0), final)  # resumed from step 10, not finished at "20"
    assert resumed_rows == rows
    assert (workdir / "corrupt_checkpoints" / "20").is_dir()

    # Both swapped: neither is valid, and the error names both (nothing is moved).
    os.rename(ckpt / "10", ckpt / "tmp")
    os.rename(ckpt / "20", ckpt / "10")
    os.rename(ckpt / "tmp", ckpt / "20")
    with pytest.warns(RuntimeWarning), pytest.raises(
            checkpoints.CheckpointError, match=r"step 20: .*hold the state of step 10.*step 10: .*hold the state of step 20"):
        train.fit(tiny_config(num_steps=20, checkpoint_every=10), workdir, progress=False, task=tiny_task())
    assert finalized_steps(ckpt) == [10, 20]


_ROW = {"step": 10, "member": 0, "seed": 0, "learning_rate": 1e-3, "train_loss": 0.5, "test_loss": 0.4,
        "diverged_at": -1}


@pytest.mark.parametrize("line, problem", [
    (b"garbage", "not JSON"),
    (b'\xff\xfe{"step": 10}', "not UTF-8"),
    (b"[1, 2]", "a JSON list, not an object"),
    (json.dumps({k: v for k, v in _ROW.items() if k != "member"}).encode(), "no 'member'"),
    (json.dumps({**_ROW, "train_loss": "0.5"}).encode(), "'train_loss' is '0.5', not a number"),
    (json.dumps({**_ROW, "step": 10.5}).encode(), "'step' is 10.5, not an int"),
])
def test_a_line_of_metrics_that_is_not_a_row_is_an_error_naming_it(tmp_path, line, problem):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps(_ROW).encode() + b"\n"
    path.write_bytes(good + line + b"\n" + good)
    with pytest.raises(workdir_lib.WorkdirError, match=f"{re.escape(str(path))}, line 2: not a metrics row: {re.escape(problem)}"):
        metrics.read_metrics(path)
    # Unterminated and last, it is the line a run killed while writing leaves: dropped.
    path.write_bytes(good + line)
    assert metrics.read_metrics(path) == [_ROW]


def test_extending_a_finished_run_logs_the_rows_of_an_uninterrupted_run(tmp_path, jax_defaults):
    """A run evaluates at its last step, on the schedule or not; extended, that evaluation is
    not one the longer run makes, and goes."""
    def config(num_steps):
        cfg = tiny_config(num_steps=num_steps, checkpoint_every=30)
        cfg.eval_every = 20
        return cfg

    _, rows, _ = train.fit(config(30), tmp_path / "extended", progress=False, task=tiny_task())
    assert [r["step"] for r in rows] == [20, 30]
    _, extended, _ = train.fit(config(60), tmp_path / "extended", progress=False, task=tiny_task())
    _, whole, _ = train.fit(config(60), tmp_path / "whole", progress=False, task=tiny_task())
    assert [r["step"] for r in extended] == [r["step"] for r in whole] == [20, 40, 60]
    assert metrics.read_metrics(tmp_path / "extended" / "metrics.jsonl") == extended
    for a, b in zip(extended, whole):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)


def test_checkpoints_keep_their_config(tmp_path, jax_defaults):
    """Without config.json, the checkpoints' own record of the config refuses another one."""
    workdir, _, _ = _trained_run(tmp_path, jax_defaults)
    (workdir / "config.json").unlink()
    other = tiny_config(lrs=(3e-4,), num_steps=20, checkpoint_every=10)
    with pytest.raises(checks.ConfigError, match=r"different config \(sweep\.learning_rate: \[0\.001\] -> \[0\.0003\]\) "
                                                r"according to its checkpoint step 20"):
        train.fit(other, workdir, progress=False, task=tiny_task())
    assert not (workdir / "config.json").exists()  # nothing written under the new label
    # The run's own config still resumes (and extends) it.
    state, rows, _ = train.fit(tiny_config(num_steps=30, checkpoint_every=10), workdir, progress=False,
                               task=tiny_task())
    assert [r["step"] for r in rows] == [10, 20, 30]


# --------------------------------------------------------------------------------------------
# Viewing a run: TensorBoard events and the curves command
# --------------------------------------------------------------------------------------------


def _tensorboard_scalars(run_dir):
    """{tag: [(step, value)]} as TensorBoard's own event reader sees `run_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_shows_every_member_once_per_step_after_a_resume(tmp_path, jax_defaults, monkeypatch):
    from tensorboardX import event_file_writer

    # Both runs start within one second (a fast machine does): the resume must not erase the first.
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1796635757.0))
    workdir = tmp_path / "run"
    cfg = tiny_config(seeds=(0, 1), num_steps=30, checkpoint_every=10)
    train.fit(cfg, workdir, progress=False, task=tiny_task())
    # An interruption after step 30 was logged but before it was saved: the run resumes at 20
    # and logs step 30 again, which TensorBoard must show once.
    shutil.rmtree(workdir / "checkpoints" / "30")
    _, rows, members = train.fit(cfg, workdir, progress=False, task=tiny_task())
    assert len(list((workdir / "tensorboard").glob("*/events.out.tfevents.*"))) == 4  # two runs x two members
    runs = sorted(p.name for p in (workdir / "tensorboard").iterdir())
    assert runs == ["000_lr=0.001,seed=0", "001_lr=0.001,seed=1"]
    for i, name in enumerate(runs):
        seen = _tensorboard_scalars(workdir / "tensorboard" / name)
        mine = [r for r in rows if r["member"] == i]
        assert sorted(seen) == ["test/error", "test/loss", "train/loss"]
        for tag, events in seen.items():
            key = tag.replace("/", "_")
            assert [s for s, _ in events] == [r["step"] for r in mine] == [10, 20, 30]
            np.testing.assert_allclose([v for _, v in events], [r[key] for r in mine], rtol=1e-6)


def test_the_training_loss_of_every_step_reaches_tensorboard_once(tmp_path, jax_defaults):
    """`log_every` steps apart (default 1), from the losses each chunk returns; after a resume
    each step is still shown once. Each member's hyperparameters go to the hparams plugin."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    workdir = tmp_path / "run"
    cfg = tiny_config(seeds=(0, 1), num_steps=30, checkpoint_every=10)
    train.fit(cfg, workdir, progress=False, task=tiny_task())
    shutil.rmtree(workdir / "checkpoints" / "30")  # resumes at 20 and logs 21..30 again
    _, rows, members = train.fit(cfg, workdir, progress=False, task=tiny_task())
    for i, member in enumerate(members):
        run_dir = workdir / "tensorboard" / f"{i:03d}_{metrics.member_name(member)}"
        steps = _tensorboard_scalars(run_dir / "steps")["train/loss"]
        assert [s for s, _ in steps] == list(range(1, 31))
        for row in (r for r in rows if r["member"] == i):  # a row's train_loss: its chunk's mean
            chunk = [v for s, v in steps if row["step"] - 10 < s <= row["step"]]
            np.testing.assert_allclose(np.mean(chunk), row["train_loss"], rtol=1e-5)
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["seed"].number_value == member["seed"]
        assert start.hparams["model.norm"].string_value == "layer"
        assert start.hparams["optimizer.learning_rate"].number_value == pytest.approx(1e-3)
    cfg.log_every = 4
    train.fit(cfg, tmp_path / "every_4", progress=False, task=tiny_task())
    steps = _tensorboard_scalars(tmp_path / "every_4" / "tensorboard" / "000_lr=0.001,seed=0" / "steps")
    assert [s for s, _ in steps["train/loss"]] == [4, 8, 12, 16, 20, 24, 28]


def test_run_json_records_the_implementation_choices_taken(tmp_path, jax_defaults):
    """run.json: the members, and what lnjax's own functions decide for this run and machine."""
    from lnjax import heuristics, native

    cfg = tiny_config(num_steps=10, norm="batch")
    cfg.sweep.model.norm_args.eps = (1e-5, 1e-3)
    train.fit(cfg, tmp_path / "run", progress=False, task=tiny_task("batch"))
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["members"] == sweep.sweep_members(cfg)
    choices = meta["implementation"]
    assert choices["native_kernels"] == native.available() and choices["fused_block_bytes"] == heuristics.block_bytes()
    assert choices["backend"] == jax.default_backend() and choices["mesh"] == {"sweep": 1, "data": 1}
    assert choices["traced_options"] == ["model.norm_args.eps"] and "rnn_precompute_inputs" not in choices
    cfg = rnn_adding.get_config()
    cfg.batch_size = 8
    got = metrics.run_metadata(cfg, sweep.sweep_members(cfg), jax.make_mesh((1, 1), ("sweep", "data")))
    assert got["implementation"]["rnn_precompute_inputs"] == heuristics.default_precompute_inputs(8)


def test_curves_command_draws_every_member_and_rejects_bad_arguments(tmp_path, jax_defaults, capsys):
    from experiments import curves

    workdir = tmp_path / "sweep"
    train.fit(tiny_config(seeds=(0, 1), lrs=(1e-3, 1e38), num_steps=20), workdir, progress=False,
              task=tiny_task())
    rows = metrics.read_metrics(workdir / "metrics.jsonl")
    assert curves.metric_keys(rows) == ["train_loss", "test_error", "test_loss"]
    assert {r["member"] for r in rows if r["diverged_at"] >= 0} == {2, 3}  # the lr=1e38 members
    assert curves.main([str(workdir), "--log"]) == 0
    data = (workdir / "curves.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert capsys.readouterr().out.strip() == str(workdir / "curves.png")
    for argv, message in (([str(workdir), "--metrics=test_los"], "no metric 'test_los'; the runs have train_loss"),
                          ([str(tmp_path)], "holds no metrics.jsonl")):
        with pytest.raises(SystemExit) as e:
            curves.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_curves_reports_what_it_cannot_draw_in_one_line(tmp_path, capsys):
    from experiments import curves

    good = [json.dumps({**_ROW, "step": s}) for s in (10, 20)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "metrics.jsonl"
    no_test_loss = json.dumps({k: v for k, v in _ROW.items() if k != "test_loss"} | {"step": 20})
    cases = [  # (metrics lines, extra arguments, exit status, what the error line must say)
        ([good[0], no_test_loss], [], 1, f"{path}, line 2: the metrics train_loss where line 1 has train_loss, test_loss"),
        ([good[0], '{"step": 20}'], [], 1, f"{path}, line 2: not a metrics row: no 'member'"),
        ([good[0], "[1, 2]"], [], 1, f"{path}, line 2: not a metrics row: a JSON list, not an object"),
        ([good[0], json.dumps({**_ROW, "train_loss": "0.5"})], [], 1,
         f"{path}, line 2: not a metrics row: 'train_loss' is '0.5', not a number"),
        (good, [f"--out={tmp_path / 'no_such_dir' / 'c.png'}"], 2, f"no directory {tmp_path / 'no_such_dir'}"),
        (good, [f"--out={tmp_path / 'c.foo'}"], 2, "the file name must end in an image format matplotlib writes"),
    ]
    for lines, extra, status, message in cases:
        path.write_text("".join(line + "\n" for line in lines))
        try:
            code = curves.main([str(run_dir), *extra])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == status and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
    path.write_bytes(good[0].encode() + b"\n\xff\xfe\n")
    assert curves.main([str(run_dir)]) == 1
    assert f"{path}, line 2: not a metrics row: not UTF-8" in capsys.readouterr().err
    assert not (run_dir / "curves.png").exists()
    path.write_text("".join(line + "\n" for line in good))
    assert curves.main([str(run_dir), f"--out={tmp_path / 'c.svg'}"]) == 0
    assert (tmp_path / "c.svg").read_text().startswith("<?xml")


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20, 1e37])
def test_clip_by_global_norm_is_exact_for_every_finite_gradient(scale, jax_defaults):
    """optax's global norm overflows float32 beyond ~1e19 (and loses tiny gradients to
    underflow); the project's clip keeps the float64 direction and length at every scale, and
    equals optax's where optax's norm is representable."""
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=(3,)) * 1e-3}
    g32 = jax.tree.map(lambda g: jnp.asarray(g * scale, jnp.float32), grads)
    for max_norm in (1e-3, 10.0):
        got, _ = optim.clip_by_global_norm(max_norm).update(g32, ())
        g64 = jax.tree.map(lambda g: np.asarray(g, np.float64), g32)
        norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(g64)))
        want = jax.tree.map(lambda g: g * min(1.0, max_norm / norm), g64)
        for k in grads:
            np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=2e-6, atol=0)
        if scale == 1.0:
            ref, _ = optax.clip_by_global_norm(max_norm).update(g32, ())
            assert_trees_equal(got, ref, exact=False, rtol=2e-6, atol=0)
    assert (scale > 1e19) == (not np.isfinite(optax.tree.norm(g32)))  # the case is exercised


def test_ln_lstm_from_the_zero_state_trains_despite_a_global_norm_beyond_float32(jax_defaults):
    """Permuted pixel digits open with runs of 0 pixels; from h = c = 0, the LN-LSTM's
    recurrent and cell-state LNs see zero vectors, each step's Jacobian is ~1 / (4 eps) and
    the finite gradient's norm overflows float32. That is not divergence: training goes on."""
    from configs import pixel_digits
    cfg = pixel_digits.get_config()
    cfg.task.permute, cfg.model.hidden = True, (16,)
    task = tasks.build_task(cfg)
    params, _ = task.model.init(jax.random.key(0))
    x, y = jnp.asarray(task.data.x_train[:64]), jnp.asarray(task.data.y_train[:64])
    grads = jax.grad(lambda p: task.loss_fn(task.model.apply(p, None, x, training=True)[0], y)[0])(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert not np.isfinite(optax.tree.norm(grads))  # the case is exercised

    opt = optim.make_optimizer(cfg.optimizer)
    members = sweep.sweep_members(cfg)
    state = train.init_state(task, opt, members)
    chunk = train.make_train_chunk(task, opt, cfg.batch_size, 2)
    state, loss = chunk(state, jnp.asarray(task.data.x_train), jnp.asarray(task.data.y_train))
    assert np.isfinite(loss).all() and (np.asarray(state.diverged_at) == -1).all()


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def test_init_and_evaluate_work_under_strict_promotion():
    """Outside the Optax update (which needs standard promotion), the training code is
    dtype-clean: the stacked init and the evaluation run with x64 and strict promotion on
    (conftest) and agree with JAX's defaults."""
    cfg = tiny_config(seeds=(0, 1))
    task, members = tiny_task(), sweep.sweep_members(cfg)
    x, y = jnp.asarray(task.data.x_test), jnp.asarray(task.data.y_test)
    state = train.init_state(task, optim.make_optimizer(cfg.optimizer), members)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    metrics = jax.tree.map(np.asarray, train.make_evaluate(task)(state, x, y))
    assert set(metrics) == {"loss", "error"}
    assert all(v.shape == (2,) and np.isfinite(v).all() for v in metrics.values())
    assert ((metrics["error"] >= 0) & (metrics["error"] <= 1)).all()
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        default = jax.tree.map(np.asarray, train.make_evaluate(task)(state, x, y))
    for k in metrics:
        np.testing.assert_allclose(metrics[k], default[k], rtol=1e-6)


@pytest.mark.slow
def test_vmapped_sweep_equals_members_trained_one_at_a_time(tmp_path, jax_defaults, solo_runs):
    """2 seeds x 2 learning rates in one vmapped fit vs four one-member fits. (On XLA:CPU they
    are bitwise equal; the assertion allows float rounding, which vmap may legitimately change.)"""
    cfg = tiny_config(seeds=(0, 1), lrs=(1e-3, 3e-3))
    state, rows, members = train.fit(cfg, tmp_path, progress=False, task=tiny_task())
    assert [(m["seed"], m["learning_rate"]) for m in members] == [(0, 1e-3), (1, 1e-3), (0, 3e-3), (1, 3e-3)]
    np.testing.assert_array_equal(state.step, 40)
    np.testing.assert_array_equal(state.diverged_at, -1)

    bitwise = []
    for i, m in enumerate(members):
        got = member(state, i)
        want, solo_rows = solo_runs(m["seed"], m["learning_rate"])
        assert_trees_equal(got.params, want.params, exact=False)
        assert_trees_equal(got.opt_state, want.opt_state, exact=False)
        assert_trees_equal((got.key, got.step, got.diverged_at), (want.key, want.step, want.diverged_at))
        bitwise.append(bitwise_equal(got, want))
        mine = [r for r in rows if r["member"] == i]
        assert [r["step"] for r in mine] == [r["step"] for r in solo_rows] == [10, 20, 30, 40]
        for r, s in zip(mine, solo_rows):
            assert (r["seed"], r["learning_rate"], r["diverged_at"]) == (s["seed"], s["learning_rate"], -1)
            for k in ("train_loss", "test_loss", "test_error"):
                np.testing.assert_allclose(r[k], s[k], rtol=1e-5, atol=1e-6)
    # Not vacuous: the members did train, and differently.
    p = [member(state, i).params for i in range(4)]
    assert not bitwise_equal(p[0], p[1]) and not bitwise_equal(p[0], p[2])
    assert rows[-4]["test_loss"] < 2.3 or rows[-1]["test_loss"] < 2.3
    print(f"sweep members bitwise equal to their solo runs: {bitwise}")


def _set(cfg, key, value):
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def _sweep_equals_single_runs(tmp_path, cfg, axes, changed):
    """Trains `cfg` with the sweep `axes` ({dotted key: values}) as one fit, and each member
    alone with its values set in the config; asserts that each member equals its single run,
    and that the values changed the leaves `changed(state)` of the members."""
    swept = cfg.copy_and_resolve_references()
    for key, values in axes.items():
        _set(swept.sweep, key, tuple(values))
    state, rows, members = train.fit(swept, tmp_path / "sweep", progress=False)
    assert [tuple(m[k] for k in axes) for m in members] == list(itertools.product(*axes.values()))
    for i, m in enumerate(members):
        single = cfg.copy_and_resolve_references()
        for key in axes:
            _set(single, key, m[key])
        want, single_rows, _ = train.fit(single, tmp_path / f"single_{i}", progress=False)
        got, want = member(state, i), member(want, 0)
        assert_trees_equal((got.params, got.model_state), (want.params, want.model_state), exact=False,
                           rtol=1e-5, atol=1e-6)
        # The leaves only: a single run without clipping has no clipping stage (stateless) at all.
        assert_trees_equal(jax.tree.leaves(got.opt_state.inner_state), jax.tree.leaves(want.opt_state.inner_state),
                           exact=False, rtol=1e-5, atol=1e-6)
        mine = [r for r in rows if r["member"] == i]
        assert [r["step"] for r in mine] == [r["step"] for r in single_rows]
        for r, w in zip(mine, single_rows):
            assert {k: r[k] for k in axes} == {k: m[k] for k in axes}
            for k in ("train_loss", "test_loss", "test_error"):
                np.testing.assert_allclose(r[k], w[k], rtol=1e-5, atol=1e-6)
    leaves = [jax.tree.leaves(changed(member(state, i))) for i in range(len(members))]
    assert all(not bitwise_equal(leaves[0], other) for other in leaves[1:])  # not vacuous
    return state


@pytest.mark.slow
def test_an_eps_by_momentum_sweep_is_one_program_equal_to_its_single_runs(tmp_path, jax_defaults):
    """Batch norm's eps x momentum as sweep axes: traced per-member values in one compiled
    program (`TrainState.hparams`), each member equal to the run with that setting."""
    axes = {"model.norm_args.eps": (1e-5, 1e-1), "model.norm_args.momentum": (0.9, 0.5)}
    state = _sweep_equals_single_runs(tmp_path, tiny_config(num_steps=20, norm="batch"), axes,
                                      lambda s: (s.params, s.model_state))
    np.testing.assert_array_equal(state.hparams["model.norm_args.eps"], np.float32([1e-5, 1e-5, 1e-1, 1e-1]))
    np.testing.assert_array_equal(state.hparams["model.norm_args.momentum"], np.float32([0.9, 0.5, 0.9, 0.5]))


@pytest.mark.slow
def test_gain_init_and_optimizer_sweeps_equal_their_single_runs(tmp_path, jax_defaults):
    """The gain init (read by `init`, per member), weight decay and the gradient clip (the
    optimizer's injected hyperparameters) as sweep axes."""
    cfg = tiny_config(num_steps=20, norm="batch")
    cfg.optimizer.name = "adamw"
    axes = {"model.norm_args.scale_init": (1.0, 0.1), "optimizer.grad_clip": (0.0, 0.05),
            "optimizer.weight_decay": (0.0, 0.5)}  # in the config's order, the members' order
    state = _sweep_equals_single_runs(tmp_path, cfg, axes, lambda s: s.params)
    assert state.hparams == {}
    np.testing.assert_array_equal(state.opt_state.hyperparams["grad_clip"], np.float32([0, 0, 0.05, 0.05] * 2))
    np.testing.assert_array_equal(state.opt_state.hyperparams["weight_decay"], np.float32([0, 0.5] * 4))


@pytest.mark.slow
def test_diverged_member_is_frozen_and_isolated(tmp_path, jax_defaults, solo_runs):
    """lr 1e38 makes the loss NaN at step 1; lr inf makes the first update itself non-finite
    (from a finite loss and gradient). Four members: the sweep test's compiled programs."""
    lrs = (1e-3, 3e-3, 1e38, float("inf"))
    cfg = tiny_config(seeds=(0,), lrs=lrs)
    task = tiny_task()
    state, rows, members = train.fit(cfg, tmp_path, progress=False, task=task)
    assert [m["learning_rate"] for m in members] == list(lrs)
    diverged = np.asarray(state.diverged_at)
    assert diverged[0] == diverged[1] == -1
    assert diverged[2] >= 0 and diverged[3] == 0
    np.testing.assert_array_equal(state.step, 40)  # frozen members still count steps

    # Frozen at the last finite state: finite parameters (and, for the member that diverged
    # at step 0, exactly its initial state).
    for i in (2, 3):
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(member(state, i).params))
    init = train.init_state(task, optim.make_optimizer(cfg.optimizer), members)
    assert_trees_equal(member(state, 3).params, member(init, 3).params)
    assert_trees_equal(member(state, 3).opt_state, member(init, 3).opt_state)
    assert not bitwise_equal(member(state, 2).params, member(init, 2).params)  # one step was taken

    # Marked in the metrics: every row after the divergence carries diverged_at.
    for i in (2, 3):
        mine = [r for r in rows if r["member"] == i]
        assert [r["step"] for r in mine] == [10, 20, 30, 40]
        assert all(r["diverged_at"] == diverged[i] for r in mine)
    # The healthy members are unaffected: the same as training each alone.
    for i in (0, 1):
        healthy = [r for r in rows if r["member"] == i]
        assert all(r["diverged_at"] == -1 and np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"])
                   for r in healthy)
        want, solo_rows = solo_runs(0, lrs[i])
        assert_trees_equal(member(state, i).params, want.params, exact=False)
        assert_trees_equal(member(state, i).opt_state, want.opt_state, exact=False)
        for r, s in zip(healthy, solo_rows):
            np.testing.assert_allclose(r["test_loss"], s["test_loss"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_norm_state_is_carried_and_checkpointed(tmp_path, jax_defaults):
    """BN running statistics change during training, are saved, and restoring them mid-run
    gives exactly the uninterrupted result."""
    cfg = tiny_config(seeds=(0, 1), norm="batch", checkpoint_every=20)
    task = tiny_task("batch")
    full, rows, members = train.fit(cfg, tmp_path / "full", progress=False, task=task)
    init = train.init_state(task, optim.make_optimizer(cfg.optimizer), members)
    assert len(jax.tree.leaves(init.model_state)) == 4  # mean and var of both BN layers
    for got, start in zip(jax.tree.leaves(full.model_state), jax.tree.leaves(init.model_state)):
        assert np.isfinite(got).all()
        assert not np.allclose(got, start)  # the running statistics moved
    saved = restore(tmp_path / "full" / "checkpoints", 40)["model_state"]
    assert [sorted(s) for s in saved] == [["mean", "var"], ["mean", "var"]]
    for s, bn in zip(saved, full.model_state):
        assert_trees_equal((s["mean"], s["var"]), (np.asarray(bn.mean), np.asarray(bn.var)))

    # Resume from the step-20 checkpoint (the step-40 one and its metrics rows discarded).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "40")
    resumed, resumed_rows, _ = train.fit(cfg, resumed_dir, progress=False, task=task)
    assert_trees_equal(jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))
    assert resumed_rows == rows == read_rows(resumed_dir / "metrics.jsonl")


def _stop(pid, timeout=5.0):
    """SIGSTOPs `pid` and waits until it is stopped (so that its files no longer change)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


def _metric_steps(path):
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                steps.append(json.loads(line)["step"])
    return steps


# The graph experiment with running statistics (graph_batch), shrunk as TINY_FLAGS shrink the MLP.
TINY_GRAPH_FLAGS = ("--config.model.norm=graph_batch", "--config.model.hidden=(16,16)", "--config.batch_size=16",
                    "--config.task.train_size=200", "--config.task.test_size=100", "--config.sweep.seed=(0,1)")


@pytest.mark.slow
@pytest.mark.parametrize("config, tiny", [("configs/mlp_digits.py", TINY_FLAGS),
                                          ("configs/gin_graphs.py", TINY_GRAPH_FLAGS)], ids=["mlp", "graphs"])
def test_kill_and_resume_gives_identical_results(tmp_path, subprocess_env, config, tiny):
    """`kill -9` mid-run, then the same command: the final checkpoint and metrics.jsonl are
    exactly those of an uninterrupted run."""
    num_steps = 200
    flags = (*tiny, f"--config.num_steps={num_steps}", "--config.steps_per_call=10",
             "--config.eval_every=10", "--config.checkpoint_every=20")
    train_cmd = functools.partial(globals()["train_cmd"], config=config)
    ref_dir, dir_ = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref = run(train_cmd(ref_dir, *flags, "-v"), subprocess_env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert re.search(r"^I\d{4} .*checkpoint", ref.stderr, re.M)  # -v: absl's INFO logs, orbax's among them

    # Kill once a checkpoint exists and metrics have been logged past it (so that resuming must
    # drop those rows); the process is stopped while inspecting, so the check is exact.
    log = open(tmp_path / "interrupted.log", "w")
    proc = subprocess.Popen(train_cmd(dir_, *flags), cwd=ROOT, env=subprocess_env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            assert proc.poll() is None, "the run finished before it could be interrupted"
            assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
            if finalized_steps(dir_ / "checkpoints"):
                _stop(proc.pid)
                ckpt, logged = finalized_steps(dir_ / "checkpoints")[-1], _metric_steps(dir_ / "metrics.jsonl")
                if max(logged, default=0) > ckpt:
                    proc.send_signal(signal.SIGKILL)
                    break
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        print(f"killed with checkpoints {finalized_steps(dir_ / 'checkpoints')} and metrics up to step {max(logged)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()
    assert ckpt < num_steps and finalized_steps(dir_ / "checkpoints")[-1] == ckpt
    assert max(_metric_steps(dir_ / "metrics.jsonl")) > ckpt
    with open(dir_ / "metrics.jsonl", "a") as f:  # as if killed in the middle of a write
        f.write('{"step": 9999, "member"')

    resumed = run(train_cmd(dir_, *flags), subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    rows, ref_rows = read_rows(dir_ / "metrics.jsonl"), read_rows(ref_dir / "metrics.jsonl")
    keys = [(r["step"], r["member"]) for r in rows]
    assert keys == [(s, m) for s in range(10, num_steps + 1, 10) for m in (0, 1)]  # none missing or repeated
    assert rows == ref_rows
    assert finalized_steps(dir_ / "checkpoints") == finalized_steps(ref_dir / "checkpoints") == [num_steps - 20, num_steps]
    final, ref_final = restore(dir_ / "checkpoints", num_steps), restore(ref_dir / "checkpoints", num_steps)
    assert_trees_equal(final, ref_final)  # params, optimizer state, keys, steps: bitwise
    np.testing.assert_array_equal(final["step"], num_steps)
    assert resumed.stdout.splitlines()[-2:] == ref.stdout.splitlines()[-2:]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _check_apply(model, x, out_shape, stateful):
    # Eagerly: XLA:CPU compiles a jitted ConvNet for ~5 s, op by op it reuses cached ops.
    params, state = model.init(jax.random.PRNGKey(0))
    for training in (True, False):
        y, new_state = model.apply(params, state, x, training=training)
        assert y.shape == out_shape and y.dtype == jnp.float32
        assert np.isfinite(np.asarray(y)).all()
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        changed = not bitwise_equal(new_state, state)
        assert changed == (stateful and training)


MLP_NORMS = ("none", "batch", "layer", "rms", "switchable", "batch_layer", "divisive")
CONV_NORMS = ("none", "batch", "layer", "rms", "switchable")
STATEFUL = ("batch", "switchable", "batch_layer")  # running batch statistics


@pytest.mark.parametrize("norm", MLP_NORMS)
def test_mlp_and_convnet_output_shapes(norm):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 12)).astype(np.float32)
    args = {"radius": 4} if norm == "divisive" else {}
    _check_apply(models.mlp((12, 16, 8, 3), norm=norm, norm_args=args), x, (5, 3), norm in STATEFUL)
    if norm in CONV_NORMS:
        images = rng.normal(size=(5, 8, 8, 2)).astype(np.float32)
        _check_apply(models.convnet(4, (6, 8), norm=norm, in_channels=2, norm_args=args), images, (5, 4),
                     norm in STATEFUL)


def test_mlp_layers_normalized_and_biases():
    """BN normalizes every layer, the output included; the other norms the hidden layers.
    A layer has a linear bias only where its normalizer has none."""
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    sizes = (12, 16, 8, 3)
    for norm, normed in (("batch", [True] * 3), ("layer", [True, True, False]), ("none", [False] * 3)):
        params, _ = models.mlp(sizes, norm=norm).init(jax.random.PRNGKey(0))
        assert ["norm" in p for p in params] == normed, norm
        assert ["b" in p for p in params] == [not n for n in normed], norm
    # Without a bias in the normalizer, the layer keeps its own (added after normalizing).
    params, _ = models.mlp(sizes, norm="layer", norm_args={"bias": False}).init(jax.random.PRNGKey(0))
    assert [sorted(p) for p in params] == [["b", "norm", "w"], ["b", "norm", "w"], ["b", "w"]]
    assert sorted(params[0]["norm"]) == ["scale"]
    # A name with options and the Normalizer value it names are the same model.
    _, by_name = _init_apply(models.mlp(sizes, norm="rms", norm_args={"eps": 1e-3}), x)
    _, by_value = _init_apply(models.mlp(sizes, norm=norms.rms(eps=1e-3)), x)
    np.testing.assert_array_equal(by_name, by_value)
    # batch_layer's m is the MLP's batch_size unless norm_args sets it.
    assert models.normalizer("batch_layer", {"batch_size": 4}) is norms.batch_layer(batch_size=4)
    _, m8 = _init_apply(models.mlp(sizes, norm="batch_layer", batch_size=8), x)
    _, m5 = _init_apply(models.mlp(sizes, norm="batch_layer", batch_size=8, norm_args={"batch_size": 5}), x)
    _, default = _init_apply(models.mlp(sizes, norm="batch_layer"), x)  # m = 5, the batch
    np.testing.assert_array_equal(m5, default)
    assert not np.array_equal(m8, default)


def test_convnet_layer_norm_is_group_norm_with_one_group():
    """The ConvNet's "layer" is the paper's ConvNet LN: statistics over each example's
    channels and positions (group norm, one group), not per position over the channels."""
    images = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
    assert models.conv_normalizer("layer") is norms.group(1)
    assert models.conv_normalizer("layer", {"eps": 1e-3}) is norms.group(1, eps=1e-3)
    _, by_name = _init_apply(models.convnet(4, (6, 8), norm="layer", in_channels=2), images)
    _, group = _init_apply(models.convnet(4, (6, 8), norm=norms.group(1), in_channels=2), images)
    _, per_position = _init_apply(models.convnet(4, (6, 8), norm=norms.layer(), in_channels=2), images)
    np.testing.assert_array_equal(by_name, group)
    assert not np.allclose(by_name, per_position)


def test_mlp_switchable_norm_mixes_only_layer_and_batch_statistics():
    # Hidden layers have no spatial axes: the IN branch is pinned off whatever its logit, and a
    # dominant LN (or BN) logit makes the switchable norm that norm.
    a = np.random.default_rng(1).normal(size=(6, 16)).astype(np.float32)
    model = models.mlp((16, 16, 16), norm="switchable", norm_args={"momentum": 0.9})
    params, state = model.init(jax.random.PRNGKey(0))
    eye = jnp.eye(16, dtype=jnp.float32)
    params[0]["w"], params[1]["w"] = eye, eye  # the hidden layer normalizes `a` itself
    for branch, want in ((1, lnjax.layer_norm(a)),
                         (2, lnjax.batch_norm(a, None, None, lnjax.batch_norm_state(16), training=True)[0])):
        logits = jnp.full(3, -50.0).at[branch].set(50.0).at[0].set(100.0)  # IN "preferred": ignored
        params[0]["norm"]["control"] = lnjax.SwitchableControl(logits, logits)
        y, _ = model.apply(params, state, a, training=True)
        np.testing.assert_allclose(y, jax.nn.relu(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell, norm", [(c, n) for c in ("lstm", "gru", "rnn") for n in ("none", "layer", "rms")]
                         + [("bn_lstm", "layer")])
def test_sequence_model_output_shapes(cell, norm):
    x = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    model = models.sequence_model(3, 2, 8, cell=cell, norm=norm, max_steps=7)
    _check_apply(model, x, (5, 2), cell == "bn_lstm")


def test_sequence_model_builds_its_cell_terms_as_normalizer_values():
    """`norm` is every term's, built with `norm_args`; `input_norm` overrides the input terms;
    each goes to the cell as a Normalizer value, so a few input features only warn when the
    cell is given a name, never here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.sequence_model(1, 2, 8, norm="layer", norm_args={"scale_init": 0.1})  # 1 input feature
        params, _ = model.init(jax.random.PRNGKey(0))
    rnn = params["rnn"]
    for term in ("n_x", "n_h", "n_c"):
        assert sorted(rnn[term]) == ["bias", "scale"]
        np.testing.assert_array_equal(rnn[term]["scale"], np.float32(0.1))
    # input_norm="none": W_x x + b (recurrent-only), and the options are not its.
    params, _ = models.sequence_model(2, 2, 8, norm="layer", input_norm="none",
                                      norm_args={"scale_init": 0.1}).init(jax.random.PRNGKey(0))
    assert set(params["rnn"]["n_x"]) == {"bias"} and "scale" in params["rnn"]["n_h"]
    params, _ = models.sequence_model(2, 2, 8, cell="gru", norm="layer", input_norm="rms").init(jax.random.PRNGKey(0))
    assert set(params["rnn"]["n_x_gates"]) == {"scale", "bias"}
    # norm="none": the standard cell (biases only, c_t itself).
    params, _ = models.sequence_model(2, 2, 8, norm="none").init(jax.random.PRNGKey(0))
    assert [sorted(params["rnn"].get(t, {})) for t in ("n_x", "n_h", "n_c")] == [["bias"], ["bias"], []]
    # A Normalizer value, and the divisive norm's options (Ren et al.'s radius and sigma).
    x = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(np.float32)
    a = models.sequence_model(2, 2, 8, cell="rnn", norm="divisive", norm_args={"radius": 3, "sigma": 0.5})
    b = models.sequence_model(2, 2, 8, cell="rnn", norm=norms.divisive(3, sigma=0.5))
    np.testing.assert_array_equal(_init_apply(a, x)[1], _init_apply(b, x)[1])
    assert not np.array_equal(_init_apply(a, x)[1], _init_apply(models.sequence_model(
        2, 2, 8, cell="rnn", norm="divisive", norm_args={"radius": 3}), x)[1])


def test_bn_lstm_uses_the_cells_defaults_and_norm_args_options():
    cell_defaults = {f.name: f.default for f in dataclasses.fields(lnjax.BNLSTMCell)}
    for term, options in models.BN_LSTM_TERMS.items():  # the table equals the cell's defaults
        assert norms.batch(**options) is cell_defaults[term], term
    x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    default = models.sequence_model(3, 2, 8, cell="bn_lstm", max_steps=5)
    params, state = default.init(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(params["rnn"]["n_h"]["scale"], np.float32(0.1))  # Cooijmans et al.
    assert "bias" not in params["rnn"]["n_h"]
    np.testing.assert_array_equal(params["rnn"]["n_x"]["bias"][8:16], 1.0)  # forget bias 1
    # norm_args: options of each of its batch normalizers (here the momentum of their
    # statistics and the initial gains); `norm` and `input_norm` do not apply.
    fast = models.sequence_model(3, 2, 8, cell="bn_lstm", norm="rms", input_norm="none", max_steps=5,
                                 norm_args={"momentum": 0.5, "scale_init": 1.0}, forget_bias=0.0)
    p2, _ = fast.init(jax.random.PRNGKey(0))
    assert jax.tree.structure(p2) == jax.tree.structure(params) and "bias" not in p2["rnn"]["n_h"]
    np.testing.assert_array_equal(p2["rnn"]["n_h"]["scale"], 1.0)
    np.testing.assert_array_equal(p2["rnn"]["n_x"]["bias"], 0.0)
    _, s1 = default.apply(params, state, x, training=True)
    _, s2 = fast.apply(params, state, x, training=True)
    # One step of running averages from (mean 0, var 1): new = momentum * old + (1 - momentum) * batch.
    np.testing.assert_allclose(np.asarray(s2.x.mean[0]), np.asarray(s1.x.mean[0]) * 0.5 / 0.01, rtol=1e-4, atol=1e-6)


def test_sequence_model_tokens_and_per_step_readout():
    tokens = np.random.default_rng(0).integers(0, 6, size=(5, 7)).astype(np.int32)
    model = models.sequence_model(6, 4, 8, cell="lstm", tokens=True, readout="all")
    _check_apply(model, tokens, (5, 7, 4), False)
    # Tokens are fed one-hot: the same parameters on one-hot floats give the same outputs.
    dense = models.sequence_model(6, 4, 8, cell="lstm", readout="all")
    params, _ = model.init(jax.random.PRNGKey(1))
    want, _ = dense.apply(params, None, np.eye(6, dtype=np.float32)[tokens], training=False)
    got, _ = model.apply(params, None, tokens, training=False)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Per-step outputs end with what the last-state readout gives.
    last = models.sequence_model(6, 4, 8, cell="lstm", tokens=True)
    np.testing.assert_allclose(last.apply(params, None, tokens, training=False)[0], got[:, -1], rtol=1e-6)


def _token_config(module, **over):
    c = module.get_config()
    c.model.hidden = (16,)
    c.batch_size, c.num_steps, c.steps_per_call, c.eval_every, c.checkpoint_every = 16, 60, 20, 20, 60
    c.sweep.seed = (0,)
    for k, v in over.items():
        c.task[k] = v
    return c


@pytest.mark.slow
def test_copying_and_char_lm_tasks_train(tmp_path, jax_defaults):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    for name, cfg in [
        ("copying", _token_config(rnn_copying, length=5, train_size=256, test_size=64)),
        ("char_lm", _token_config(char_lm, path=str(text), length=16, train_size=1600, test_size=200)),
    ]:
        task = tasks.build_task(cfg)
        assert task.data.x_train.dtype == np.int32 and task.data.y_train.shape == task.data.x_train.shape
        _, rows, _ = train.fit(cfg, tmp_path / name, progress=False, task=task)
        first, last = rows[0], rows[-1]
        assert last["step"] == 60 and last["diverged_at"] == -1
        # Per-step cross-entropy, starting near log(vocab) and falling as the model learns.
        assert last["test_loss"] < first["test_loss"] < 1.2 * np.log(task.data.num_classes), (name, rows)
    assert last["test_loss"] < 0.8 * np.log(task.data.num_classes)  # a repeated sentence is learnable


def test_char_lm_task_reports_a_missing_file(tmp_path):
    cfg = _token_config(char_lm, path=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tasks.build_task(cfg)
    text = tmp_path / "short.txt"
    text.write_text("too short for a million characters", encoding="utf-8")
    with pytest.raises(ValueError, match=r"`task.train_size` \+ `task.test_size` = 1100000 characters, but text file .*short.txt.* has 34"):
        tasks.build_task(_token_config(char_lm, path=str(text)))


def test_models_reject_bad_names():
    with pytest.raises(ValueError, match="`norm`='instance'.*unknown normalizer"):
        models.mlp((4, 8, 2), norm="instance")
    with pytest.raises(TypeError, match="`norm`='group'.*num_groups"):  # needs its number of groups
        models.mlp((4, 8, 2), norm="group")
    with pytest.raises(ValueError, match="norm"):
        models.convnet(3, norm="instance")
    with pytest.raises(TypeError, match="`radius` is not an option"):
        models.convnet(3, norm="layer", norm_args={"radius": 3})
    with pytest.raises(TypeError, match="only apply to a normalizer given by name"):
        models.mlp((4, 8, 2), norm=norms.layer(), norm_args={"eps": 1e-3})
    with pytest.raises(TypeError, match='norm "none" takes no options'):
        models.mlp((4, 8, 2), norm="none", norm_args={"eps": 1e-3})
    with pytest.raises(ValueError, match="cell"):
        models.sequence_model(3, 2, 8, cell="transformer")
    with pytest.raises(ValueError, match="norm"):
        models.sequence_model(3, 2, 8, cell="lstm", norm="batch")  # BN is the bn_lstm cell
    with pytest.raises(TypeError, match="`input_norm`='divisive'"):
        models.sequence_model(3, 2, 8, cell="lstm", input_norm="divisive")  # needs a radius
    with pytest.raises(ValueError, match="max_steps"):
        models.sequence_model(3, 2, 8, cell="bn_lstm")


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------


def test_invariances_agree_with_the_paper():
    changes = invariances.measure()
    assert len(changes) == 18
    for method, expected in invariances.PAPER.items():
        for name, invariant in zip(invariances.TRANSFORMS, expected):
            change = changes[method, name]
            if invariant:
                assert change < 1e-4, (method, name, change)
            else:  # clearly not invariant, not a rounding-level verdict
                assert change > 1e-2, (method, name, change)
    table = invariances.table(changes)
    assert "paper disagrees" not in table
    assert table.count("invariant (") == sum(sum(v) for v in invariances.PAPER.values())


# --------------------------------------------------------------------------------------------
# The quick reproduction
# --------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path, subprocess_env):
    """The quick mode twice, as the report's seed check runs it: seeds 2-3 first, then seeds
    0-1 compared with them (the second run's programs come from the compilation cache)."""
    from experiments import reproduce

    other, out = tmp_path / "seeds23", tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    for argv in (["--seed-offset", "2", "--out", str(other)], ["--out", str(out), "--fresh", "--compare", str(other)]):
        proc = subprocess.run([sys.executable, "-m", "experiments", "--quick", *argv], cwd=ROOT, env=subprocess_env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-5000:]
    assert not (out / "stale.txt").exists()  # --fresh

    report = (out / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("#")]
    for section in ("Table 1", "§6.6", "paper's cells", "Learning-rate", "Pixel-by-pixel", "Character-level",
                    "adding problem", "§6.7", "relatives", "Divisive", "Graph", "Findings", "Diverged",
                    "disjoint seed set", "Cost"):
        assert any(section in h for h in headings), (section, headings)
    pngs = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", report)
    assert sorted(set(pngs)) == [
        "cells_train.png", "char_lm.png", "convnet.png", "convnet_train.png", "lr_sweep.png", "mlp_bs128.png",
        "mlp_bs4.png", "pixel_perm.png", "pixel_seq.png", "relatives_bs4.png", "rnn_adding.png", "tanh_rnn.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR", name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 0 and height > 0
        assert (out / name).with_suffix(".svg").read_text().lstrip().startswith(("<?xml", "<svg"))

    findings = json.loads((out / "findings.json").read_text())
    assert len(findings) == 16 and all(f in report for f in findings)
    assert "Table 1: 18 of 18 cells agree with the paper." in findings

    # Every verdict is recorded, under the same keys in both runs, and the comparison table
    # reports each one; a verdict that differs is inconclusive in the findings.
    mine, theirs = (json.loads((d / "verdicts.json").read_text()) for d in (out, other))
    assert (mine["seeds"], theirs["seeds"]) == ([0, 1], [2, 3])
    assert set(mine["verdicts"]) == set(theirs["verdicts"]) and len(mine["verdicts"]) >= 20
    table = report[report.index("## Verdicts under a disjoint seed set"):]
    for key, text in mine["verdicts"].items():
        there = theirs["verdicts"][key]
        same = text.split()[0] == there.split()[0]
        assert f"| {key} | {text} | {there} | {'yes' if same else '**no**'} |" in table
        if not same:
            assert f"inconclusive: {text} here, but {there} with seeds [2, 3]" in report

    runs = reproduce.plan(quick=True)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(name for _, name, _, _ in runs)
    for _, name, _, cfg in runs:
        run_dir = out / "runs" / name
        assert json.loads((run_dir / "config.json").read_text()) == json.loads(cfg.to_json())
        rows = read_rows(run_dir / "metrics.jsonl")
        assert (out / "metrics" / f"{name}.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
        members = len(sweep.sweep_members(cfg))
        steps = sorted({r["step"] for r in rows})
        assert steps[-1] == cfg.num_steps
        assert len(rows) == len({(r["step"], r["member"]) for r in rows}) == len(steps) * members
        assert finalized_steps(run_dir / "checkpoints")[-1] == cfg.num_steps

    # --compare refuses a run whose seeds overlap this one's, before training anything.
    proc = subprocess.run([sys.executable, "-m", "experiments", "--quick", "--out", str(tmp_path / "x"),
                           "--compare", str(out)], cwd=ROOT, env=subprocess_env, capture_output=True, text=True)
    assert proc.returncode == 2 and "not disjoint" in proc.stderr and not (tmp_path / "x").exists()


def test_report_statistics():
    """The report's machinery: mean ± standard error (ddof=1), Welch verdicts, paired gaps."""
    from experiments import reproduce
    from experiments import stats as seed_stats  # scipy's `stats` is used here too

    assert seed_stats.fmt([1.0, 2.0, 3.0]) == f"2.0000 ± {np.std([1, 2, 3], ddof=1) / np.sqrt(3):.4f}"
    assert seed_stats.fmt([0.1, 0.2], pct=True) == "15.0 ± 5.0"
    low, high = [1.0, 1.1, 0.9, 1.05, 0.95], [2.0, 2.1, 1.9, 2.05, 1.95]
    assert seed_stats.verdict(low, high).startswith("agrees (difference -1, Welch p = ")
    assert seed_stats.verdict(high, low).startswith("disagrees")
    assert seed_stats.verdict(high, low, ">").startswith("agrees")
    assert seed_stats.verdict(low, [1.0, 1.2, 0.8, 1.1, 0.9]).startswith("inconclusive")
    assert seed_stats.verdict([1.0], high).startswith("inconclusive (fewer than 2 seeds)")
    from scipy import stats

    p = stats.ttest_ind(low, high, equal_var=False).pvalue
    assert f"p = {p:.2g}" in seed_stats.verdict(low, high)

    def rows(values, step=10):
        return [{"step": step, "seed": s, "member": i, "diverged_at": -1, "test_error": v}
                for i, (s, v) in enumerate(values.items())]

    # gaps pair the seeds both runs have; a diverged member is left out
    small, large = rows({0: 0.5, 1: 0.7, 2: 0.9}), rows({1: 0.2, 0: 0.1, 3: 0.0})
    np.testing.assert_allclose(seed_stats.gaps(small, large, "test_error"), [0.4, 0.5])
    small[0]["diverged_at"] = 3
    np.testing.assert_allclose(seed_stats.gaps(small, large, "test_error"), [0.5])
    # another seed offset gives disjoint seeds
    seeds = lambda off: {s for _, _, _, cfg in reproduce.plan(False, off) for s in cfg.sweep.seed}  # noqa: E731
    assert seeds(0) == set(range(reproduce.SEEDS)) and not seeds(0) & seeds(reproduce.SEEDS)


def test_xla_flags_are_appended_unless_the_user_set_them(monkeypatch):
    from experiments import xla_flags

    level = "--xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    xla_flags.add(level)
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {level}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    xla_flags.add(level)  # the user's choice stands
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"
    monkeypatch.delenv("XLA_FLAGS")
    xla_flags.add("--a=1", "--b=2")
    assert os.environ["XLA_FLAGS"] == "--a=1 --b=2"


def test_reproduce_help_states_the_whole_summary(capsys):
    from experiments import reproduce

    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "writes a self-contained report directory (report.md, PNG plots, the configs, the raw metrics)." in text
