"""The tasks: a model, a loss and the data it trains on, built from a config."""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import models, sweep


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, a loss and the data it trains on (arrays kept on the host until `fit`)."""

    model: models.Model
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]
    data: data_lib.Dataset
    # The model with some config keys set otherwise (`{dotted key: value}`, traced or not), for
    # a sweep's members (see experiments/sweep.py).
    model_with: Callable[[dict], models.Model]

    def model_for(self, values: dict) -> models.Model:
        """The model with a member's swept model options; `model` itself for none."""
        return self.model_with(values) if values else self.model


def classification_loss(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"error": jnp.mean(jnp.argmax(logits, -1).astype(labels.dtype) != labels)}


def regression_loss(outputs, targets):
    return jnp.mean((outputs[..., 0] - targets) ** 2), {}


def _digits(as_sequence):
    """scikit-learn's digits: whole images (`as_sequence` None), rows or pixels as the steps."""

    def load(cfg):
        ds = data_lib.digits(as_sequence=as_sequence, flatten=cfg.model.kind == "mlp", permute=cfg.task.permute)
        if cfg.model.kind == "convnet":  # one channel
            ds = ds._replace(x_train=ds.x_train[..., None], x_test=ds.x_test[..., None])
        return ds

    return load


def _mnist(cfg):
    if not cfg.task.data_dir:  # "" would read the current directory
        raise ValueError("`task.name`='mnist' needs `task.data_dir`: the directory of MNIST's IDX files.")
    return data_lib.mnist_idx(cfg.task.data_dir)


def _sequences(make, num_classes):
    """A synthetic sequence task: `make(seed, size, length)` for the train and test sets, from
    seeds `task.seed` and `task.seed + 1`."""

    def load(cfg):
        t = cfg.task
        return data_lib.Dataset(*make(t.seed, t.train_size, t.length), *make(t.seed + 1, t.test_size, t.length),
                                num_classes)

    return load


def _colour_graphs(cfg):
    return data_lib.colour_graph_data(cfg.task.seed, num_train=cfg.task.train_size, num_test=cfg.task.test_size)


def _char_lm(cfg):
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
    return data_lib.Dataset(xtr, ytr, xte, yte, len(corpus.vocab))


class TaskSpec(NamedTuple):
    """What a task declares: its data, its loss, its output size and its input layout."""

    data: Callable[[Any], data_lib.Dataset]  # the config -> the train and test arrays
    loss: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]
    num_outputs: Callable[[data_lib.Dataset], int]
    # "features": arrays of features (the MLP flattens them, the RNN reads the last axis per
    # step); "tokens": int tokens in, one prediction per step out; "graphs": for the GIN.
    layout: str = "features"
    data_file: str | None = None  # the `config.task` key naming a file the data is read from


def _classes(ds):
    return ds.num_classes


# Each task, in one place; a config names one (`config.task.name`) and sets its `config.task` keys.
TASKS = {
    "digits": TaskSpec(_digits(None), classification_loss, _classes),
    "digits_rows": TaskSpec(_digits("row"), classification_loss, _classes),
    "digits_pixels": TaskSpec(_digits("pixel"), classification_loss, _classes),
    "mnist": TaskSpec(_mnist, classification_loss, _classes, data_file="data_dir"),
    "adding": TaskSpec(_sequences(data_lib.adding_problem, 0), regression_loss, lambda ds: 1),
    "copying": TaskSpec(_sequences(data_lib.copying_memory, data_lib.COPY_VOCAB_SIZE), classification_loss,
                        _classes, layout="tokens"),
    "char_lm": TaskSpec(_char_lm, classification_loss, _classes, layout="tokens", data_file="path"),
    "colour_graphs": TaskSpec(_colour_graphs, classification_loss, _classes, layout="graphs"),
}


def task_spec(name) -> TaskSpec:
    """The registry's entry `name`; an unknown name is a ValueError listing the registry."""
    if name not in TASKS:
        raise ValueError(f"`task.name` must be one of {', '.join(TASKS)}, got {name!r}.")
    return TASKS[name]


def _model_inputs(spec: TaskSpec, ds: data_lib.Dataset, cfg) -> dict:
    """`build_model`'s input arguments for the task's data, checking that the model reads its layout."""
    kind, name = cfg.model.kind, cfg.task.name
    if (spec.layout == "graphs") != (kind == "gin"):
        if kind == "gin":
            graphs = [k for k, v in TASKS.items() if v.layout == "graphs"]
            raise ValueError(f"`model.kind`='gin' needs a task of graphs ({', '.join(graphs)}), got {name!r}.")
        raise ValueError(f"`task.name`={name!r} needs `model.kind`='gin', got {kind!r}.")
    if spec.layout == "graphs":
        nodes = ds.x_train.nodes.shape[-1]  # node features
        return {"input_size": nodes, "in_channels": nodes, "max_steps": None}
    tokens = spec.layout == "tokens"
    if kind == "rnn":
        input_size = ds.num_classes if tokens else ds.x_train.shape[-1]
    else:
        input_size = int(np.prod(ds.x_train.shape[1:]))  # the MLP's flattened input
    return {"input_size": input_size, "in_channels": ds.x_train.shape[-1], "max_steps": ds.x_train.shape[1],
            "tokens": tokens}


def build_task(cfg) -> Task:
    """Builds the task that `cfg.task` and `cfg.model` describe (its data read once)."""
    spec = task_spec(cfg.task.name)
    ds = spec.data(cfg)
    inputs = {"num_outputs": spec.num_outputs(ds), **_model_inputs(spec, ds, cfg)}

    def model_with(values):
        return build_model(sweep.with_values(cfg, values), **inputs)

    return Task(model_with({}), spec.loss, ds, model_with)


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
