"""Shared test set-up: the repository root is importable and runs go to a temporary folder."""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """A private runs root for one test (via MPN_RUNS_DIR, as a user would set it)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("MPN_RUNS_DIR", str(root))
    return root


@pytest.fixture(autouse=True)
def fused_uncompiled(request, monkeypatch):
    """Engine "fused" runs its step functions as plain torch in the CPU tests: the same
    equations in seconds, without a compile per option set. tests/test_engine.py compiles
    them on purpose (`fused_compiled`); the `cuda` tests always compile."""
    if request.node.get_closest_marker("cuda") is None:
        import mpn_fused
        monkeypatch.setattr(mpn_fused, "COMPILE", False)


@pytest.fixture
def still_running():
    """still_running(pid, wait_s=0) -> whether the process still runs after waiting up to
    wait_s seconds for it to stop (a zombie awaiting its reaper counts as stopped). Every
    process asked about is killed after the test, so an orphan a test creates never lingers."""
    asked = []

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def check(pid, wait_s=0.0):
        asked.append(pid)
        deadline = time.time() + wait_s
        while running(pid) and time.time() < deadline:
            time.sleep(0.05)
        return running(pid)

    yield check
    for pid in asked:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
