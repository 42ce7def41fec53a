"""The optimisation examples run with --quick, and their checks against independent references hold."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, check=True, env=env,
    ).stdout


def number(pattern: str, out: str) -> float:
    match = re.search(pattern + r" *(\S+)", out)
    assert match is not None, f"{pattern!r} not in the output:\n{out}"
    return float(match.group(1))


def load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "examples" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("constraint", ["simplex", "box"])
def test_qp_layer_example_trains(constraint: str) -> None:
    out = run("qp_layer.py", "--constraint", constraint)
    assert number("relative error:", out) < 1e-8
    assert number(r"\bratio", out) < 1e-2  # the loss falls by two orders of magnitude


@pytest.mark.parametrize("constraint", ["simplex", "box"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qp_layer_gradient_is_the_active_set_one(constraint: str, seed: int) -> None:
    qp = load("qp_layer.py")
    assert qp.gradient_check(constraint, seed=seed) < 1e-8
