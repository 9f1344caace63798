"""The paper's Table 1, measured: which transformations of the weights or data leave the
normalized summed inputs unchanged, for batch, weight and layer normalization."""

import jax
import jax.numpy as jnp
import numpy as np

import lnjax

TRANSFORMS = (
    "weight matrix re-scaling",
    "weight matrix re-centering",
    "weight vector re-scaling",
    "dataset re-scaling",
    "dataset re-centering",
    "single training case re-scaling",
)
# Ba et al. 2016, Table 1 (True = invariant).
PAPER = {
    "batch norm": (True, False, True, True, True, False),
    "weight norm": (True, False, True, False, False, False),
    "layer norm": (True, True, False, True, False, True),
}


def _outputs(method, w, x):
    """The normalized summed inputs of `a = x @ w` (x: [cases, in], w: [in, units])."""
    if method == "batch norm":
        y, _ = lnjax.batch_norm(x @ w, None, None, lnjax.batch_norm_state(w.shape[1]), training=True, eps=0.0)
        return y
    if method == "weight norm":
        return x @ lnjax.weight_norm(w, jnp.ones(w.shape[1], w.dtype), eps=0.0)
    return lnjax.layer_norm(x @ w, eps=0.0)


def _transform(name, w, x, rng):
    delta = rng.uniform(0.2, 5.0)
    if name == "weight matrix re-scaling":
        return delta * w, x
    if name == "weight matrix re-centering":  # the same vector added to every unit's weights
        return w + rng.normal(size=(w.shape[0], 1)).astype(w.dtype), x
    if name == "weight vector re-scaling":  # one unit's incoming weights scaled by its own delta
        return w * rng.uniform(0.2, 5.0, size=(1, w.shape[1])).astype(w.dtype), x
    if name == "dataset re-scaling":
        return w, delta * x
    if name == "dataset re-centering":
        return w, x + rng.normal(size=(1, x.shape[1])).astype(x.dtype)
    return w, x * rng.uniform(0.2, 5.0, size=(x.shape[0], 1)).astype(x.dtype)


def measure(seed=0, cases=64, inputs=20, units=30, trials=5):
    """Relative change `max|y' - y| / max|y|` (worst over trials) per method and transform."""
    rng = np.random.default_rng(seed)
    fn = jax.jit(_outputs, static_argnums=0)
    out = {}
    for method in PAPER:
        for name in TRANSFORMS:
            worst = 0.0
            for _ in range(trials):
                w = rng.normal(size=(inputs, units)).astype(np.float32)
                x = rng.normal(size=(cases, inputs)).astype(np.float32)
                y = np.asarray(fn(method, w, x))
                y2 = np.asarray(fn(method, *_transform(name, w, x, rng)))
                worst = max(worst, float(np.max(np.abs(y2 - y)) / np.max(np.abs(y))))
            out[method, name] = worst
    return out


def table(changes, tol=1e-4) -> str:
    """Markdown table like the paper's, each cell the measured verdict and change."""
    head = "| | " + " | ".join(TRANSFORMS) + " |\n|---|" + "---|" * len(TRANSFORMS) + "\n"
    rows = []
    for method, paper in PAPER.items():
        cells = []
        for name, expected in zip(TRANSFORMS, paper):
            change = changes[method, name]
            verdict = "invariant" if change < tol else "no"
            agree = "" if (change < tol) == expected else " (paper disagrees)"
            cells.append(f"{verdict} ({change:.0e}){agree}")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
