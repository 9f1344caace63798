"""The tasks: a model, a loss and the data it trains on, built from a config."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import models


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, a loss and the data it trains on (arrays kept on the host until `fit`)."""

    model: models.Model
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]
    data: data_lib.Dataset


def classification_loss(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"error": jnp.mean(jnp.argmax(logits, -1).astype(labels.dtype) != labels)}


def regression_loss(outputs, targets):
    return jnp.mean((outputs[..., 0] - targets) ** 2), {}


def build_task(cfg) -> Task:
    """Builds the task that `cfg.task` and `cfg.model` describe."""
    name = cfg.task.name
    if name in ("digits", "digits_rows", "digits_pixels", "mnist"):
        if name == "mnist":
            if not cfg.task.data_dir:  # "" would read the current directory
                raise ValueError("`task.name`='mnist' needs `task.data_dir`: the directory of MNIST's IDX files.")
            ds = data_lib.mnist_idx(cfg.task.data_dir)
        else:
            seq = {"digits": None, "digits_rows": "row", "digits_pixels": "pixel"}[name]
            flat = cfg.model.kind == "mlp"
            ds = data_lib.digits(as_sequence=seq, flatten=flat, permute=cfg.task.permute)
            if cfg.model.kind == "convnet":
                ds = ds._replace(x_train=ds.x_train[..., None], x_test=ds.x_test[..., None])
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "adding":
        xtr, ytr = data_lib.adding_problem(cfg.task.seed, cfg.task.train_size, cfg.task.length)
        xte, yte = data_lib.adding_problem(cfg.task.seed + 1, cfg.task.test_size, cfg.task.length)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, 0)
        loss_fn, n_out = regression_loss, 1
    elif name == "copying":
        xtr, ytr = data_lib.copying_memory(cfg.task.seed, cfg.task.train_size, cfg.task.length)
        xte, yte = data_lib.copying_memory(cfg.task.seed + 1, cfg.task.test_size, cfg.task.length)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, data_lib.COPY_VOCAB_SIZE)
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "colour_graphs":
        ds = data_lib.colour_graph_data(cfg.task.seed, num_train=cfg.task.train_size, num_test=cfg.task.test_size)
        loss_fn, n_out = classification_loss, ds.num_classes
    elif name == "char_lm":
        if cfg.task.path:
            text, source = data_lib.read_text(cfg.task.path), f"text file {cfg.task.path!r}"
        else:
            text, source = data_lib.bible_text(), "the bundled corpus"
        n_train, n_val = cfg.task.train_size, cfg.task.test_size
        if len(text) < n_train + n_val:
            raise ValueError(f"`task.train_size` + `task.test_size` = {n_train + n_val} characters, "
                             f"but {source} has {len(text)}.")
        corpus = data_lib.text_corpus(text[: n_train + n_val], cfg.task.length, n_val, source=source)
        xtr, ytr = data_lib.windows(corpus.train, cfg.task.length)
        xte, yte = data_lib.windows(corpus.val, cfg.task.length) if corpus.val.size else (xtr, ytr)
        ds = data_lib.Dataset(xtr, ytr, xte, yte, len(corpus.vocab))
        loss_fn, n_out = classification_loss, ds.num_classes
    else:
        raise ValueError(
            "`task.name` must be digits, digits_rows, digits_pixels, mnist, adding, copying, "
            f"char_lm or colour_graphs, got {name!r}."
        )

    tokens = name in ("copying", "char_lm")  # int tokens in, one prediction per step out
    if isinstance(ds.x_train, data_lib.Graphs):
        if cfg.model.kind != "gin":
            raise ValueError(f"`task.name`={name!r} needs `model.kind`='gin', got {cfg.model.kind!r}.")
        input_size = in_channels = ds.x_train.nodes.shape[-1]  # node features
        max_steps = None
    else:
        if cfg.model.kind == "gin":
            raise ValueError(f"`model.kind`='gin' needs `task.name`='colour_graphs', got {name!r}.")
        if cfg.model.kind == "rnn":
            input_size = ds.num_classes if tokens else ds.x_train.shape[-1]
        else:
            input_size = int(np.prod(ds.x_train.shape[1:]))  # the MLP's flattened input
        in_channels, max_steps = ds.x_train.shape[-1], ds.x_train.shape[1]
    model = build_model(cfg, input_size=input_size, num_outputs=n_out, in_channels=in_channels,
                        max_steps=max_steps, tokens=tokens)  # fmt: skip
    return Task(model, loss_fn, ds)


def _defaults_key(model_cfg):
    return "bn_lstm" if model_cfg.kind == "rnn" and model_cfg.cell == "bn_lstm" else model_cfg.norm


def norm_options(model_cfg) -> dict:
    """The factory options of the model's normalizers (configs/base.py): the experiment's
    `model.norm_defaults` for `model.norm` (for the BN-LSTM cell: its entry "bn_lstm"), updated
    by every entry of `model.norm_args` that is set (not None)."""
    defaults = model_cfg.get("norm_defaults", {}).get(_defaults_key(model_cfg))
    options = defaults.to_dict() if hasattr(defaults, "to_dict") else dict(defaults or {})
    args = model_cfg.get("norm_args")
    args = args.to_dict() if hasattr(args, "to_dict") else dict(args or {})
    options.update({k: v for k, v in args.items() if v is not None})
    return options


def build_model(cfg, *, input_size, num_outputs, in_channels=1, max_steps=None, tokens=False) -> models.Model:
    """The model `cfg.model` describes, for inputs of `input_size` features (flattened for the
    MLP; the vocabulary size with `tokens`), `in_channels` channels (ConvNet) and sequences of
    at most `max_steps` steps (RNN); for the GIN, `input_size` node features. Its normalizers get `norm_options(cfg.model)`.

    Raises ValueError for an unknown `model.kind`, `model.norm` or `model.cell`, and for an
    option the normalizer does not take (naming `config.model.norm_args`), and for a graph
    normalization outside the GIN."""
    m = cfg.model
    options = norm_options(m)
    if m.kind != "gin" and isinstance(m.norm, str) and m.norm.startswith("graph"):
        raise ValueError(f"`model.norm`={m.norm!r} normalizes over graphs: it needs `model.kind`='gin', "
                         f"got {m.kind!r}.")
    try:
        if m.kind == "mlp":
            return models.mlp((input_size, *m.hidden, num_outputs), norm=m.norm, norm_args=options,
                              batch_size=cfg.batch_size)  # fmt: skip
        if m.kind == "convnet":
            return models.convnet(num_outputs, tuple(m.hidden), norm=m.norm, in_channels=in_channels,
                                  norm_args=options)  # fmt: skip
        if m.kind == "rnn":
            return models.sequence_model(
                input_size, num_outputs, m.hidden[0], cell=m.cell, norm=m.norm, norm_args=options,
                input_norm=m.get("input_norm"), max_steps=max_steps, forget_bias=m.get("forget_bias"),
                tokens=tokens, readout="all" if tokens else "last",
            )
        if m.kind == "gin":
            return models.gin((input_size, *m.hidden), num_outputs, norm=m.norm, readout=m.readout,
                              norm_args=options)  # fmt: skip
    except TypeError as e:  # an option the normalizer does not take
        raise ValueError(f"config.model: {e} ({options_hint(m)})") from None
    raise ValueError(f"`model.kind` must be mlp, convnet, rnn or gin, got {m.kind!r}.")


def options_hint(model_cfg) -> str:
    return ("the normalizer's options: the entries of `config.model.norm_args` that are set, over "
            f"`config.model.norm_defaults.{_defaults_key(model_cfg)}`")
