"""A run's metrics: `metrics.jsonl` (one row per member per evaluation), TensorBoard, the progress note."""

import json
import pathlib
import time

import numpy as np

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


def tensorboard_writers(logdir: pathlib.Path, members, step: int):
    """One tensorboardX writer per member, in `logdir/<index>_<member_name>`. Resuming at `step`,
    TensorBoard drops what an interrupted run logged after it (`purge_step`)."""
    from tensorboardX import SummaryWriter

    # tensorboardX names its file by the second and truncates it: a resume started within the
    # second of the last run would erase that run's events. Nanoseconds keep each file, in order.
    suffix = f".{time.time_ns()}"
    return [SummaryWriter(str(logdir / f"{i:03d}_{member_name(m)}"), purge_step=step + 1 if step else None,
                          filename_suffix=suffix)
            for i, m in enumerate(members)]


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


def log_evaluation(workdir: pathlib.Path, members, log, writers, rows, step, ev, tl, div):
    """Appends each member's row at `step` to metrics.jsonl (the open file `log`) and TensorBoard."""
    with workdir_lib.writing(workdir / "metrics.jsonl"):
        for i, member in enumerate(members):
            row = {"step": step, "member": i, **member, "train_loss": float(tl[i]),
                   **{f"test_{k}": float(v[i]) for k, v in ev.items()}, "diverged_at": int(div[i])}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            if writers and row["diverged_at"] < 0:  # a frozen member's curves end where it diverged
                for key, value in row.items():
                    if key.startswith(("train_", "test_")):  # as train/loss, test/error, ...
                        writers[i].add_scalar(key.replace("_", "/", 1), value, global_step=step)
        log.flush()
    with workdir_lib.writing(workdir / "tensorboard"):
        for w in writers:
            w.flush()
