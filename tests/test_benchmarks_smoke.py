"""`python -m benchmarks --quick` runs end to end and writes Markdown tables.

Smoke test only: tiny shapes, 1-2 repetitions, no assertion on any timing.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_tables(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    for heading in ("## Machine, versions, settings", "## Targets", "## Normalization ops",
                    "## Layer norm speed work: what was tried", "## Recurrent layers: training step",
                    "### Projection form", "## Sweeps", "## Memory",
                    "### Layer norm: memory traffic of the compiled programs",
                    "| Batch norm (training) forward never slower than Flax, every shape/dtype |",
                    "| LN overhead <= 1.15x lnjax's unnormalized LSTM",
                    "## Where lnjax is slower than Flax, and why",
                    "#### Where the step's time goes: XLA:CPU kernels",
                    "What the three layer norms add to the LSTM's step:"):
        assert heading in text, heading
    assert "`--quick` run" in text
    tables = [line for line in text.splitlines() if line.startswith("|---")]
    assert len(tables) >= 10
    for name in ("lnjax.layer_norm", "torch F.layer_norm", "flax.nnx.LayerNorm", "lnjax.batch_norm",
                 "flax nn.RNN(OptimizedLSTMCell)", "torch LN-LSTM, torch.jit.script", "jax.vmap"):
        assert name in text, name
    # The results are saved beside the Markdown, which renders from them alone.
    saved = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert report.render(saved["header"], saved["results"]) == text


def test_quick_plan_is_small():
    # The smoke run must stay a smoke run: tiny shapes and at most 2 repetitions per job.
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import plan

    jobs = plan(quick=True, only=None)
    assert jobs
    for _, _, job, _, _, _ in jobs:
        assert job.get("reps", 99) <= 2, job
        if "shape" in job:
            assert job["shape"][0] * job["shape"][1] <= 64 * 128, job


@pytest.mark.slow
def test_accelerator_benchmarks_refuse_a_cpu_and_check_their_code_paths(tmp_path):
    out = tmp_path / "BENCHMARKS-gpu.md"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
    run = lambda *extra: subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick", "--out", str(out), *extra],  # noqa: E731
                                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    refused = run()
    assert refused.returncode == 2 and "no accelerator" in refused.stderr and not out.exists()
    proc = run("--allow-cpu")
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "These numbers describe no accelerator" in text
    for heading in ("### layer 64x128 float32, forward+backward", "### rms 64x128 bfloat16, forward",
                    "### batch 64x128 float32, forward", "### Training step, T=5 B=2 H=8 I=16"):
        assert heading in text, heading
    assert "pallas ops.gpu.layer_norm" in text  # measured on a GPU, skipped with its reason here
