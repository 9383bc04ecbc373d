"""Shared test set-up: the repository root is importable and runs go to a temporary folder."""
import sys
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
