"""The benchmark's contenders and targets as data (`benchmarks/contenders.py`,
`benchmarks/targets.py`): one registry, targets checked against it, measurers apart from the
renderer."""

import ast
import pathlib

import pytest

from benchmarks import contenders as C
from benchmarks import norms, targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEASURERS = ("norms", "rnn", "rnn_builders", "torch_lstm", "contenders", "attempts", "sweep", "memory", "_harness")
RENDERER = {"benchmarks.report", "benchmarks.norm_report", "benchmarks.run_report", "benchmarks.targets",
            "benchmarks.markdown"}


def _imports(module):
    tree = ast.parse((ROOT / "benchmarks" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("module", MEASURERS)
def test_the_measurers_never_import_the_renderer(module):
    assert not _imports(module) & RENDERER


def test_an_unknown_name_in_a_target_is_an_error():
    with pytest.raises(ValueError, match="unknown contender 'lnjax.layer_nrom'"):
        targets.Target("Layer norm forward <= 1.0x torch", "worst", "layer", "forward", ("lnjax.layer_nrom",),
                       ("torch F.layer_norm",), 1.0)
    with pytest.raises(ValueError, match="unknown contender 'torch F.layernorm'"):
        targets.Target("Layer norm forward <= 1.0x torch", "worst", "layer", "forward", ("lnjax.layer_norm",),
                       ("torch F.layernorm",), 1.0)
    with pytest.raises(ValueError, match="unknown kind of target 'fastest'"):
        targets.Target("?", "fastest", "layer", "forward", ("lnjax.layer_norm",), (), 1.0)
    with pytest.raises(ValueError, match="unknown contender 'A closed form'"):
        C.get("A closed form")


def test_every_target_names_registered_contenders_of_its_op():
    for t in targets.TARGETS:
        if t.kind in ("worst", "bandwidth", "flax"):
            assert all(t.op in C.get(n).ops and t.mode in C.get(n).modes for n in (*t.contenders, *t.peers)), t
        elif t.kind != "sweep":
            assert all(C.get(n).suite == "rnn" for n in (*t.contenders, *t.peers)), t


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        C.register(C.get("lnjax.layer_norm"))


def test_a_new_contender_is_one_entry(monkeypatch):
    """Registering one entry puts it among the norm ops' measured contenders, and a target may
    name it."""
    before = list(norms.jax_fns("layer", 8, "float32"))
    monkeypatch.setattr(C, "REGISTRY", dict(C.REGISTRY))
    entry = C.register(C.Entry('lnjax.layer_norm(implementation="native")', "norms", ("layer",), C.MODES, "native",
                               lambda op, h, dtype: (lambda x, s, b: x), "a native kernel"))
    fns = norms.jax_fns("layer", 8, "float32")
    assert list(fns) == [*before, entry.name] and fns[entry.name][1] == "a native kernel"
    assert entry.name not in norms.jax_fns("rms", 8, "float32")
    assert entry.name not in norms.jax_fns("layer", 8, "float32", skip=("native",))
    targets.Target("Layer norm forward <= 1.0x torch", "worst", "layer", "forward", (entry.name,),
                   ("torch F.layer_norm",), 1.0)


def test_the_jobs_measure_the_same_contenders_as_before():
    # (and the fused XLA path, since the default on CPU became the native kernels)
    assert list(norms.jax_fns("layer", 8, "float32")) == [
        "lnjax.layer_norm", 'lnjax.layer_norm(implementation="fused")', 'lnjax.layer_norm(implementation="xla")',
        "lnjax.layer_norm(fast_variance=True)", "flax.linen.LayerNorm", "flax.nnx.LayerNorm"]
    assert list(norms.jax_fns("rms", 8, "float32", skip=("xla", "flax", "fused"))) == ["lnjax.rms_norm"]
    assert list(norms.jax_fns("layer", 8, "float32", skip=("flax",), extra=("A closed-form custom_vjp",)))[-1] == \
        "A closed-form custom_vjp"


def test_the_registry_knows_each_role():
    assert C.name("layer", "torch") == "torch F.layer_norm"
    assert C.names("batch", "flax") == ("flax.linen.BatchNorm", "flax.nnx.BatchNorm")
    assert [e.name for e in C.of("norms", "rms", "copy")] == [C.COPY_JIT, C.COPY_NUMPY, C.COPY_TORCH]
    with pytest.raises(ValueError, match="2 contenders of norms compute 'layer' as 'flax'"):
        C.name("layer", "flax")
    groups = {g: [e.name for e in C.of("rnn", g)] for g in ("LN-LSTM", "LN-GRU", "LSTM")}
    assert C.cell_name("LN-GRU", False) in groups["LN-GRU"] and C.FLAX_LSTM in groups["LSTM"]
    assert len(groups["LN-LSTM"]) == 6
