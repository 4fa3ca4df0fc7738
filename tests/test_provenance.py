"""A row's `git_commit` says `+dirty` when kvbench's code differs from the commit, not when a committed result
store does: resuming a store in results/ rewrites its tracked run.json before the rows are made."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvbench.harness.provenance import git_commit


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("harness/cache.py", "pyproject.toml", "results/store/run.json", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("one\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "c")
    return tmp_path


def test_a_clean_checkout_is_its_commit(checkout):
    assert git_commit(checkout / "harness") == _git(checkout, "rev-parse", "HEAD")


@pytest.mark.parametrize("data", ["results/store/run.json", "README.md"])
def test_changed_results_or_prose_leave_the_commit_clean(checkout, data):
    (checkout / data).write_text("two\n")
    (checkout / "harness" / "new_untracked.py").write_text("x = 1\n")
    assert git_commit(checkout / "harness") == _git(checkout, "rev-parse", "HEAD")


@pytest.mark.parametrize("code", ["harness/cache.py", "pyproject.toml"])
def test_changed_code_makes_it_dirty(checkout, code):
    (checkout / code).write_text("two\n")
    assert git_commit(checkout / "harness") == _git(checkout, "rev-parse", "HEAD") + "+dirty"


def test_kvbench_below_the_repository_top_looks_at_its_own_code(tmp_path):
    for name in ("harness/other.py", "vendor/kvbench/harness/cache.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("one\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "c")
    head = _git(tmp_path, "rev-parse", "HEAD")
    ours = tmp_path / "vendor" / "kvbench" / "harness"
    (tmp_path / "harness" / "other.py").write_text("two\n")  # the repository's, not kvbench's
    assert git_commit(ours) == head
    (ours / "cache.py").write_text("two\n")
    assert git_commit(ours) == head + "+dirty"
