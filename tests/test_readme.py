"""README's code examples run as written (so the documentation cannot rot)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    # Users run README code with JAX's default settings, not the suite's strict ones.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {})


def test_readme_links_point_to_tracked_files():
    # A link to an untracked (e.g. git-ignored) file would work here and break in a clone.
    import subprocess

    root = README.parent
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    if not tracked:
        pytest.skip("not a git checkout")
    links = re.findall(r"\]\(([^)#\s]+)", README.read_text())
    local = [l for l in links if "://" not in l]
    assert local
    missing = [l for l in local if l not in tracked]
    assert not missing, f"README links to files git does not track: {missing}"
