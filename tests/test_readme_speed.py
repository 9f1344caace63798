"""Each figure of README's Speed paragraph against BENCHMARKS.md, the committed run it quotes:
the ranges and ratios are recomputed from BENCHMARKS.md's tables (whose milliseconds are
rounded to 3-4 digits, hence the tolerance of one unit in the last place of README's figure)
and the sentences it copies are found in it."""

import json
import pathlib
import re

import pytest

from benchmarks import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = (ROOT / "BENCHMARKS.md").read_text()
README = (ROOT / "README.md").read_text()
OPS = {"layer": "Layer norm", "rms": "RMS norm", "batch": "Batch norm (training)"}
LIB = {"layer": "layer_norm", "rms": "rms_norm", "batch": "batch_norm"}


def _speed():
    """README's Speed paragraph, its lines joined."""
    start = README.index("**Speed**")
    return " ".join(README[start:README.index("\n\n", start)].split())


def _table(heading):
    """The first table under `heading` in BENCHMARKS.md, as one dict per row."""
    lines = BENCH[BENCH.index(f"\n{heading}\n"):].splitlines()[2:]
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")):]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[:next(
        (i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]]
    return [dict(zip(rows[0], row)) for row in rows[2:]]


def _ms(cell):
    return float(cell.split()[0])


def _over_autodiff(op, dtype=None):
    """{shape dtype: autodiff's forward+backward time over lnjax's default}."""
    rows = _table(f"### {OPS[op]}, forward+backward")
    return {r["shape dtype"]: _ms(r[f'lnjax.{LIB[op]}(implementation="xla")']) / _ms(r[f"lnjax.{LIB[op]}"])
            for r in rows if dtype is None or r["shape dtype"].endswith(dtype)}


def _range(text, before):
    """The `a–b×` range that README's Speed paragraph gives right before `before`."""
    m = re.search(r"(\d+\.\d+)–(\d+\.\d+)× " + re.escape(before), text)
    assert m, before
    return float(m[1]), float(m[2])


def _close(got, want):
    decimals = len(str(want).split(".")[1]) if "." in str(want) else 0
    return abs(got - want) <= 1.01 * 10 ** -decimals


@pytest.mark.parametrize("op, dtype, before", [
    ("layer", "f32", "faster than autodiff of the formula for layer norm in float32"),
    ("layer", "bf16", "in bfloat16"),
    ("rms", None, "for RMS norm"),
    ("batch", None, "for batch norm"),
])
def test_forward_backward_against_autodiff(op, dtype, before):
    ratios = _over_autodiff(op, dtype).values()
    lo, hi = _range(_speed(), before)
    assert _close(min(ratios), lo) and _close(max(ratios), hi), (op, dtype, min(ratios), max(ratios))


def test_layer_norm_forward_backward_against_flax():
    rows = _table("### Layer norm, forward+backward")
    ratios = [min(_ms(r["flax.linen.LayerNorm"]), _ms(r["flax.nnx.LayerNorm"])) / _ms(r["lnjax.layer_norm"]) for r in rows]
    lo, hi = _range(_speed(), "faster than Flax's")
    assert _close(min(ratios), lo) and _close(max(ratios), hi), ratios


def test_the_cells_below_one_and_the_same_program_spread():
    below = {cell for op in OPS for cell, r in _over_autodiff(op).items() if r < 1}
    speed = _speed()
    assert "the two cells below 1× are 512×8192 ones" in speed
    assert len(below) == 2 and all(c.startswith("512x8192") for c in below), below
    spread = re.search(r"within the (\d+\.\d+)× by which identical programs measured apart", speed)[1]
    assert f"measured up to {spread}x apart in this run" in BENCH


def test_the_lstm_figures():
    heading = re.search(r"^### T=\d+, B=32, .*$", BENCH, re.M)[0]
    rows = {r["layer"]: r for r in _table(heading)}
    steps = {name: float(r["step ms (median)"]) for name, r in rows.items()}
    plain = rows["lnjax LSTM (no norm)"]
    default = plain["note"].removesuffix(" (default)")  # the projection form rnn picks at this batch size
    speed = _speed()
    faster = float(re.search(r"an LN-LSTM training step (\d+\.\d+)× faster", speed)[1])
    assert _close(steps[f'lnjax LN-LSTM(implementation="xla"), {default}'] / steps[f"lnjax LN-LSTM, {default}"], faster)
    cost = float(re.search(r"An LN-LSTM training step costs (\d+\.\d+)× lnjax's plain LSTM", speed)[1])
    assert _close(steps[f"lnjax LN-LSTM, {default}"] / steps["lnjax LSTM (no norm)"], cost)
    flax = re.search(r"which ran at (\d+\.\d+)× the speed of Flax's `OptimizedLSTMCell`", speed)[1]
    assert plain["speed vs Flax OptimizedLSTM"] == f"{flax}x"
    kernels = int(re.search(r"its three layer norms add (\d+) small XLA:CPU kernels", speed)[1])
    added = re.search(r"What the three layer norms add to the LSTM's step: (\d+) kernels to each forward step and "
                      r"(\d+) to each backward step", BENCH)
    assert kernels == int(added[1]) + int(added[2])


def test_the_exactness_and_one_pass_figures():
    rows = [r for r in _table("## Where lnjax is slower than Flax, and why") if r["op"] != "RMS norm"]
    flax = [float(r["Flax (linen): max error / max abs(y)"]) for r in rows]
    mine = max(float(r["lnjax: max error / max abs(y)"]) for r in rows)
    speed = _speed()
    lo, hi = (int(v) for v in re.search(r"was (\d+)–(\d+)% of the output there", speed).groups())
    assert (round(100 * min(flax)), round(100 * max(flax))) == (lo, hi)
    assert f"(lnjax's: {mine:.0e})".replace("e-0", "e-") in speed
    shifted = re.search(r"took (\d+\.\d+)–(\d+\.\d+)× the two-pass's time", speed).groups()
    assert f"Its forward took {shifted[0]}x to {shifted[1]}x the time of lnjax's default" in BENCH


def test_the_machine():
    assert "a 2-core AVX-512 AMD EPYC" in _speed()
    assert "| cores available | 2 |" in BENCH and re.search(r"\| CPU \| AMD EPYC \(.*avx512f", BENCH)


def test_benchmarks_md_renders_from_its_json():
    """BENCHMARKS.md is what `python -m benchmarks --render BENCHMARKS.json` writes."""
    saved = ROOT / "BENCHMARKS.json"
    if not saved.exists():  # the runs before the JSON was kept beside the Markdown
        pytest.skip("no BENCHMARKS.json: the next full run (python -m benchmarks) writes it; commit it with BENCHMARKS.md")
    results = json.loads(saved.read_text())
    assert report.render(results["header"], results["results"]) == BENCH
