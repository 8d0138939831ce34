"""Importing the package changes no global state: matplotlib's backend stays what the user chose."""

from __future__ import annotations

import subprocess
import sys


def test_import_leaves_the_matplotlib_backend_alone():
    """In a fresh interpreter (the test process has long imported everything): a user's non-default
    backend survives ``import lightning_patterning`` (it used to be switched to Agg)."""
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import lightning_patterning; print(matplotlib.get_backend())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "svg", out.stdout + out.stderr
