"""The project's two entry points, each doing its own set-up on a fresh machine.

    python3 tasks.py reproduce [ARGS...]   # the paper reproduction (the main job)
    python3 tasks.py test [PYTEST ARGS...] # the whole test suite
    python3 tasks.py mintest [PYTEST ARGS...]  # the fast tests at the declared minimum versions

The first two create `.venv/` on first use and install the project into it (again whenever
pyproject.toml, CMakeLists.txt or the kernels' sources in csrc/ change: the install compiles
them); `mintest` does the same in `.venv-min/`, with every `>=` bound of
pyproject.toml pinned to `==`. Only the Python standard library is used here.
"""

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tomllib
import venv

ROOT = pathlib.Path(__file__).resolve().parent


def _python(env: pathlib.Path) -> pathlib.Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


PY = _python(ROOT / ".venv")


def minimum_pins() -> list[str]:
    """Every `name>=version` requirement of pyproject.toml (dependencies and extras) as `name==version`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return sorted({f"{m[1]}=={m[2]}" for r in reqs if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", r))})


def ensure_venv(extras: str, env: pathlib.Path = ROOT / ".venv", constraints: list[str] = ()) -> None:
    py, stamp = _python(env), env / ".lnjax-installed"
    # The native kernels are compiled at install time: their sources are part of the key.
    sources = [ROOT / "pyproject.toml", ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").glob("*"))]
    key = b"".join(p.read_bytes() for p in sources) + extras.encode() + "\n".join(constraints).encode()
    want = hashlib.sha256(key).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    if not py.exists():
        print(f"creating {env} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(env)
    print(f"installing lnjax[{extras}] into {env} ...", flush=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    pins = env / "constraints.txt"
    pins.write_text("".join(f"{c}\n" for c in constraints))
    subprocess.run([py, "-m", "pip", "install", "--quiet", "-c", pins, "-e", f".[{extras}]"], cwd=ROOT, check=True)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("reproduce", "test", "mintest"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "mintest":
        env = ROOT / ".venv-min"
        ensure_venv("test", env, minimum_pins())
        return subprocess.run([_python(env), "-m", "pytest", "-m", "not slow", *rest], cwd=ROOT).returncode
    # One venv with every extra, so that switching commands never reinstalls.
    ensure_venv("test,bench")
    if command == "test":
        cmd = [PY, "-m", "pytest", *rest]
    else:
        cmd = [PY, "-m", "experiments", *rest]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
