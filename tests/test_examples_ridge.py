"""examples/ridge_hypergradient.py runs, and its hypergradients match the closed forms it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import implicit

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    # The example imports this checkout's package, not another installed copy.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ridge_hypergradient.py"), "--quick", *args],
        capture_output=True, text=True, timeout=300, check=True, env=env,
    ).stdout


def number(pattern: str, out: str) -> float:
    match = re.search(pattern + r" *(\S+)", out)
    assert match is not None, f"{pattern!r} not in the output:\n{out}"
    return float(match.group(1))


def check(out: str) -> None:
    assert number("hypergradient relative error:", out) < 1e-8
    assert number("second derivative relative error:", out) < 1e-6
    assert number("largest hypergradient error along the descent, relative to the first:", out) < 1e-7
    # The tuned lambda sits within one grid step of the grid optimum, and is no worse than it.
    spacing = number(r"\(log-spacing", out.replace(")", " "))
    assert number("log-lambda gap to grid search:", out) < spacing
    assert number("validation loss gap to grid search:", out) < 1e-9


def test_ridge_example_default_solver() -> None:
    out = run()
    assert re.search(r"solver: (\w+)", out).group(1) in implicit.available_solvers()
    check(out)


@pytest.mark.parametrize(
    ("solver", "adjoint"), [("newton_cg", "gmres"), ("newton_krylov", "cg"), ("lbfgs", "exact")]
)
def test_ridge_example_other_solvers_and_adjoints(solver: str, adjoint: str) -> None:
    out = run("--solver", solver, "--adjoint", adjoint)
    assert f"solver: {solver}" in out and f"adjoint: {adjoint}" in out
    check(out)
