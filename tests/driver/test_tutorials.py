"""Every tutorial runs (fast mode: tiny models), so the walk-throughs never rot."""

import glob
import os
import subprocess
import sys

import pytest

TUTORIALS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "tutorials", "*.py")))


@pytest.mark.parametrize("path", TUTORIALS, ids=[os.path.basename(p) for p in TUTORIALS])
def test_tutorial_runs(path):
    env = dict(os.environ, HETCOMP_FAST="1", MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
