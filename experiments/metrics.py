"""A run's metrics: `metrics.jsonl` (one row per member per evaluation), TensorBoard, the progress note."""

import json
import os
import pathlib
import time
import warnings

import jax
import numpy as np

from experiments import sweep
from experiments.mesh import DATA
from experiments import workdir as workdir_lib

# Every row names its member and the step; the metrics are numbers (NaN/inf included).
_ROW_INTS = ("step", "member", "seed", "diverged_at")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _row_problem(row) -> str | None:
    """What makes `row` (a parsed line) no metrics row, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in (*_ROW_INTS, "learning_rate"):
        if key not in row:
            return f"no {key!r}"
        if not (_is_number(row[key]) and (key == "learning_rate" or isinstance(row[key], int))):
            return f"{key!r} is {row[key]!r}, not {'a number' if key == 'learning_rate' else 'an int'}"
    for key, value in row.items():
        if (key.startswith(("train_", "test_")) or "." in key) and not _is_number(value):  # "." : a swept value
            return f"{key!r} is {value!r}, not a number"
    return None


def read_metrics(path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a `metrics.jsonl` (up to a step, if given).

    Only an unterminated last line is dropped: the one a run killed while writing it leaves.
    Any other line that is not a metrics row (not UTF-8, not JSON, not an object, a field
    missing or of the wrong type) is a workdir_lib.WorkdirError naming the file and the line: resuming
    without it would silently lose that evaluation.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise workdir_lib.WorkdirError(f"cannot read {path}: {e.strerror or e}") from e
    rows = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # the last piece: b"" or a torn line
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except ValueError as e:
            problem = f"not JSON ({e})"
        else:
            problem = _row_problem(row)
        if problem:
            raise workdir_lib.WorkdirError(f"{path}, line {number}: not a metrics row: {problem}. Repair or delete the line "
                               "(each line is one member's evaluation, as the run wrote it).")
        if up_to_step is None or row["step"] <= up_to_step:
            rows.append(row)
    return rows


def member_name(member: dict) -> str:
    """A sweep member (or a metrics row) as `lr=0.001,seed=0`, then its other swept values by
    the last part of their keys (`...,eps=1e-05,momentum=0.9`)."""
    swept = "".join(f",{k.rsplit('.', 1)[-1]}={v:g}" for k, v in member.items() if "." in k)
    return f"lr={member['learning_rate']:g},seed={member['seed']}{swept}"


def tensorboard_writers(logdir: pathlib.Path, members, step: int, subdir: str = ""):
    """One tensorboardX writer per member, in `logdir/<index>_<member_name>/<subdir>`. Resuming at
    `step`, TensorBoard drops what an interrupted run logged after it (`purge_step`)."""
    from tensorboardX import SummaryWriter

    # tensorboardX names its file by the second and truncates it: a resume started within the
    # second of the last run would erase that run's events. Nanoseconds keep each file, in order.
    suffix = f".{time.time_ns()}"
    return [SummaryWriter(str(logdir / f"{i:03d}_{member_name(m)}" / subdir), purge_step=step + 1 if step else None,
                          filename_suffix=suffix)
            for i, m in enumerate(members)]


def hparams(cfg, member: dict) -> dict:
    """A member's hyperparameters for TensorBoard's hparams plugin: every config key (tuples as
    text, unset ones left out) with the member's seed and swept values, by dotted key."""
    values = {"optimizer.learning_rate": member["learning_rate"], "seed": member["seed"],
              **{k: v for k, v in member.items() if "." in k}}
    out = {k: v if isinstance(v, (bool, str, int, float)) else str(v)
           for k, _, v in sweep.config_keys(cfg) if not k.startswith("sweep.") and v is not None}
    return {**out, **values}


class RunLog:
    """What process 0 writes while a run trains: the metrics.jsonl rows, each member's
    TensorBoard curves in `tensorboard/<member>/` (with its hyperparameters, for the hparams
    plugin) and its training loss every `config.log_every` steps in `tensorboard/<member>/steps/`.
    The other processes write nothing. Files are closed by `closing` (an ExitStack)."""

    def __init__(self, workdir: pathlib.Path, cfg, members, step: int, primary: bool, closing):
        self.workdir, self.cfg, self.members = workdir, cfg, members
        path = workdir / "metrics.jsonl"
        with workdir_lib.writing(path, "open"):
            self.file = closing.enter_context(open(path if primary else os.devnull, "a"))
        logdir = workdir / "tensorboard"
        with workdir_lib.writing(logdir, "create"):
            opened = [tensorboard_writers(logdir, members, step, sub) for sub in ("", "steps")] if primary else [[], []]
            self.writers, self.step_writers = ([closing.enter_context(w) for w in ws] for ws in opened)
            if step == 0:  # once per run: a resume would add a second session
                from tensorboardX.summary import hparams as tb_hparams

                for w, member in zip(self.writers, members):
                    for summary in tb_hparams(hparams(cfg, member), {"train/loss": 0.0, "test/loss": 0.0}):
                        w.file_writer.add_summary(summary)

    def steps(self, first: int, losses):
        """The training losses `[member, step]` of steps `first + 1, ...` at every `log_every`-th step."""
        for j in range(losses.shape[1]):
            if (first + j + 1) % self.cfg.log_every == 0:
                for w, value in zip(self.step_writers, losses[:, j]):
                    if np.isfinite(value):  # NaN: the member diverged
                        w.add_scalar("train/loss", float(value), global_step=first + j + 1)
        with workdir_lib.writing(self.workdir / "tensorboard"):
            for w in self.step_writers:
                w.flush()

    def evaluation(self, rows, step, ev, tl, div):
        """Appends each member's row at `step` to `rows`, metrics.jsonl and TensorBoard."""
        with workdir_lib.writing(self.workdir / "metrics.jsonl"):
            for i, member in enumerate(self.members):
                row = {"step": step, "member": i, **member, "train_loss": float(tl[i]),
                       **{f"test_{k}": float(v[i]) for k, v in ev.items()}, "diverged_at": int(div[i])}
                rows.append(row)
                self.file.write(json.dumps(row) + "\n")
                if self.writers and row["diverged_at"] < 0:  # a frozen member's curves end where it diverged
                    for key, value in row.items():
                        if key.startswith(("train_", "test_")):  # as train/loss, test/error, ...
                            self.writers[i].add_scalar(key.replace("_", "/", 1), value, global_step=step)
            self.file.flush()
        with workdir_lib.writing(self.workdir / "tensorboard"):
            for w in self.writers:
                w.flush()


def chunk_means(losses):
    """Each member's mean training loss over a chunk's steps (`losses`: `[member, step]`),
    NaN for a member that diverged before the chunk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's note on an all-NaN row
        return np.nanmean(losses, axis=1)


def loss_postfix(losses) -> str:
    """The progress bar's note: the training loss of the last chunk (the mean over the members
    still training, for a sweep)."""
    live = losses[np.isfinite(losses)]
    if not live.size:
        return "every member diverged"
    text = f"train loss {live.mean():.4g}"
    if losses.size == 1:
        return text
    diverged = losses.size - live.size
    return f"{text} (mean of {live.size} members" + (f"; {diverged} diverged)" if diverged else ")")


def evaluates_at(step: int, cfg) -> bool:
    return step % cfg.eval_every == 0 or step == cfg.num_steps


def start_metrics(workdir: pathlib.Path, cfg, step: int, primary: bool) -> list[dict]:
    """The metrics rows up to `step`, rewritten as the whole metrics.jsonl (an interrupted
    run's later rows go: they are computed again). Only the evaluations this config makes are
    kept: a run extended from `num_steps` 150 to 300 evaluated at 150 as its last step, which
    the longer run does not."""
    path = workdir / "metrics.jsonl"
    rows = [r for r in read_metrics(path, step) if evaluates_at(r["step"], cfg)]
    if primary:
        workdir_lib.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_metadata(cfg, members, mesh) -> dict:
    """What run.json records beside config.json: the members and the implementation choices
    lnjax takes for this run on this machine, as its own functions decide them."""
    import lnjax
    from lnjax import heuristics

    batch = cfg.batch_size // mesh.shape[DATA] if cfg.model.kind == "rnn" else None
    choices = {
        **heuristics.choices(batch),  # rnn_precompute_inputs: for each device's share of a batch
        "devices": jax.device_count(), "processes": jax.process_count(),
        "mesh": dict(mesh.shape), "lnjax": lnjax.__version__, "jax": jax.__version__,
        "norm_implementation_option": cfg.model.norm_args.get("implementation"),
        # Traced per-member options (experiments/sweep.py): lnjax's fused and native paths need
        # a Python eps, so the normalizers reading a swept eps take the XLA path.
        "traced_options": sorted(k for k in members[0] if sweep.is_traced(k)),
    }
    if cfg.model.kind != "rnn":
        del choices["rnn_precompute_inputs"]
    return {"members": members, "implementation": choices}
