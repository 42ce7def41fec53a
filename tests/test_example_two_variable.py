"""examples/two_variable_deq.py runs, and its gradient matches the dense reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_variable_example_runs_and_is_exact() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "two_variable_deq.py"), "--steps", "3"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    joint = float(re.search(r"joint adjoint \(implicit\): (\S+)", out).group(1))
    hooks = float(re.search(r"one hook per variable: +(\S+)", out).group(1))
    assert joint < 1e-8
    assert hooks > 1e-3
    assert "step   2" in out
