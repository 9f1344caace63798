"""A run's workdir: its layout, its lock, and writes that fail as a `WorkdirError` naming the file."""

import contextlib
import json
import os
import pathlib

from experiments import checks


class WorkdirError(ValueError):
    """A workdir that cannot hold the run: not a directory, in use by another run, one of its
    files or directories not what the run wrote there, or a read or write that failed (a full
    disk, no permission). The message names the file; nothing the run saved is changed."""


def first_line(e: BaseException, limit=300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


@contextlib.contextmanager
def writing(path, what="write"):
    """An OSError inside (a full disk, a read-only workdir) as a WorkdirError naming the file
    (`path`, unless the error names another)."""
    try:
        yield
    except OSError as e:
        raise WorkdirError(f"cannot {what} {e.filename or path}: {e.strerror or e}") from e


def write_atomic(path: pathlib.Path, text: str):
    """Replaces `path` by `text` whole or not at all (a failed write leaves the old file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def workdir_path(workdir) -> pathlib.Path:
    if not str(workdir).strip():  # pathlib would take "" for the current directory
        raise WorkdirError(f"--workdir must name a directory, got {str(workdir)!r}.")
    return pathlib.Path(workdir).absolute()


LOCK_FILE = ".lock"
# What a run keeps in its workdir, as a file (False) or a directory (True).
_WORKDIR_ENTRIES = {"config.json": False, "run.json": False, "metrics.jsonl": False, LOCK_FILE: False, "checkpoints": True,
                    "corrupt_checkpoints": True, "tensorboard": True}


def check_workdir(workdir: pathlib.Path):
    """Refuses a workdir that is not a directory, or whose entries are not what a run writes
    there (a WorkdirError naming the entry), before anything in it is read or written."""
    with writing(workdir, "read"):
        if workdir.exists() and not workdir.is_dir():
            raise WorkdirError(f"--workdir {workdir} is not a directory; name a new directory or a run's.")
        for name, is_dir in _WORKDIR_ENTRIES.items():
            path = workdir / name
            if (path.exists() or path.is_symlink()) and not (path.is_dir() if is_dir else path.is_file()):
                kind = "a directory" if is_dir else "a regular file"
                raise WorkdirError(f"{path} must be {kind}, as a run writes it; move it away or use another --workdir.")


@contextlib.contextmanager
def lock(workdir: pathlib.Path):
    """Holds `workdir/.lock` exclusively, so that a second run on the workdir is refused
    rather than interleaving its checkpoints and metrics with this one's. flock: the kernel
    releases it when the process ends, even on kill -9, so a stale lock cannot block a resume."""
    import fcntl

    path = workdir / LOCK_FILE
    with writing(workdir, "create"):
        workdir.mkdir(parents=True, exist_ok=True)
    with writing(path, "open"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(f"--workdir {workdir} is in use by another run (it holds {path}); wait for that "
                               "run to end or use another --workdir.") from None
        except OSError as e:
            raise WorkdirError(f"cannot lock {path}: {e.strerror or e}") from e
        yield
    finally:
        os.close(fd)


def check_saved_config(path: pathlib.Path, config: dict, workdir):
    """Refuses a config.json that is not a run's config, or that holds another run's."""
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_bytes())
        why = None if isinstance(saved, dict) else f"a JSON {type(saved).__name__}, not an object"
    except OSError as e:
        raise WorkdirError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:  # not UTF-8, or not JSON
        why = f"not JSON: {first_line(e)}"
    if why:
        raise WorkdirError(f"{path} is not a run's config ({why}). Delete it to resume from the checkpoints, "
                           "which record their config, or use another --workdir.")
    checks.check_extension(saved, config, workdir)
