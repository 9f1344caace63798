"""The project's two entry points, each doing its own set-up on a fresh machine.

    python3 tasks.py reproduce [ARGS...]   # the paper reproduction (the main job)
    python3 tasks.py test [PYTEST ARGS...] # the whole test suite

Both create `.venv/` on first use and install the project into it (again whenever
pyproject.toml changes). Only the Python standard library is used here.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".lnjax-installed"


def ensure_venv(extras: str) -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not PY.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"installing lnjax[{extras}] into {VENV} ...", flush=True)
    subprocess.run([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]"], cwd=ROOT, check=True)
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("reproduce", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    # One venv with every extra, so that switching commands never reinstalls.
    ensure_venv("test,bench")
    if command == "test":
        cmd = [PY, "-m", "pytest", *rest]
    else:
        cmd = [PY, "-m", "experiments", *rest]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
