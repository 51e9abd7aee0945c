"""main.py starts every command with glibc malloc tuned (srlm/allocator.py), unless the user set GLIBC_TUNABLES."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from srlm import allocator

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="glibc malloc settings apply to glibc only")


@glibc_only
def test_tuned_environ_sets_the_tunables_unless_the_user_did():
    env = allocator.tuned_environ({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": allocator.TUNABLES}
    assert allocator.tuned_environ({"GLIBC_TUNABLES": ""}) is None  # even empty: the user's choice
    assert allocator.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)


@glibc_only
def test_reexec_restarts_the_process_once_with_the_tunables():
    code = ("import os, sys; print('start', os.getpid(), flush=True); from srlm.allocator import reexec_tuned; "
            "reexec_tuned(); print('tuned', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
    lines = _run(code).stdout.split("\n")
    starts = [ln for ln in lines if ln.startswith("start")]
    assert len(starts) == 2  # the original start, then the re-executed one: once, not a loop
    pid = starts[0].split()[1]
    assert starts[1].split()[1] == pid  # the same process (a user's kill, time -v and ps see one pid)
    assert f"tuned {pid} {allocator.TUNABLES}" in lines


def test_a_users_glibc_tunables_are_kept():
    code = ("import os; from srlm.allocator import reexec_tuned; reexec_tuned(); "
            "print(repr(os.environ.get('GLIBC_TUNABLES')))")
    assert _run(code, GLIBC_TUNABLES="").stdout.strip() == "''"


@glibc_only
def test_main_py_runs_tuned():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    assert out.returncode == 0 and "usage: main.py" in out.stdout  # arguments survive the re-execution


def test_trim_is_safe_to_call_anywhere():
    allocator.trim()  # a no-op off glibc
