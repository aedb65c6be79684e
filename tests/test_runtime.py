"""common/runtime.py: what a run folder records about the code that ran."""

import os
import shutil
import subprocess

import pytest

from common import runtime
from conftest import ROOT


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_environment_records_the_commit_and_whether_tracked_files_changed():
    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    info = runtime.environment(runtime.Runtime("cpu", "float32"))
    assert info["git_commit"] == head
    assert isinstance(info["git_dirty"], bool)
    assert info["git_dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))


def test_dirty_means_a_tracked_file_changed(tmp_path):
    def repo_git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True
        )

    (tmp_path / "a.py").write_text("x = 1\n")
    repo_git("init", "-q")
    repo_git("add", "a.py")
    repo_git("commit", "-q", "-m", "a")
    commit, dirty = runtime.git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "b.py").write_text("new\n")  # untracked: not dirty
    assert runtime.git_state(tmp_path) == (commit, False)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert runtime.git_state(tmp_path) == (commit, True)


def test_outside_git_the_commit_is_none_and_the_run_goes_on(tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "common"), copy / "common", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repo above the copy either
    monkeypatch.setattr(runtime, "ROOT", str(copy))
    info = runtime.environment(runtime.Runtime("cpu", "float32"))
    assert info["git_commit"] is None and info["git_dirty"] is None
    monkeypatch.setenv("PATH", "")  # no git at all
    assert runtime.git_state() == (None, None)


def test_due_is_every_multiple_and_the_last_step():
    """The one rule the four training loops log, validate and save by; `step` is 1-based, the steps done."""
    steps = range(1, 11)
    assert [s for s in steps if runtime.due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in steps if runtime.due(s, 4)] == [4, 8]
    assert [s for s in steps if runtime.due(s, 0, 10)] == [10]  # 0: at none of the multiples
    assert [s for s in steps if runtime.due(s, 0)] == []
    assert [s for s in steps if runtime.due(s, 4, 10, first=True)] == [1, 4, 8, 10]  # the loss lines (LOG_EVERY)
    assert [s for s in steps if runtime.due(s, 0, 10, first=True)] == [10]
    assert [s for s in steps if runtime.due(s, 1, 10, first=True)] == list(steps)
