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
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, check=True, env=env,
    ).stdout  # fmt: skip


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


@pytest.mark.parametrize("solver", ["lbfgs", "newton_cg"])
def test_logistic_hypergradient_example(solver: str) -> None:
    out = run("logistic_hypergradient.py", "--solver", solver)
    assert number("hypergradient relative error:", out) < 1e-6  # against float64 central differences
    assert number("validation loss after:", out) < number("validation loss before:", out)


@pytest.mark.parametrize("solver", ["levenberg_marquardt", "gauss_newton"])
def test_curve_fit_example(solver: str) -> None:
    out = run("curve_fit.py", "--solver", solver)
    assert number("largest relative difference:", out) < 1e-7  # the fit against scipy.optimize.least_squares
    assert number(r"d\(fit\)/d\(data\) vs central differences, largest relative error:", out) < 1e-5


def test_logistic_hypergradient_is_the_dense_ift_one() -> None:
    """dL/dθ = −(∂L/∂z)ᵀ H⁻¹ ∂²f/∂z∂θ with the Hessian H of the training objective materialised, at uneven θ."""
    ex = load("logistic_hypergradient.py")
    data = ex.load(seed=1)
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    _, grad, sol = ex.hypergradient(theta, data, "lbfgs", 1e-12)

    n = data.X.shape[1]
    flat = torch.cat([sol.z["w"].detach(), sol.z["b"].detach()[None]])
    split = lambda v: {"w": v[:n], "b": v[n]}  # noqa: E731
    objective = lambda v, t: ex.training_objective(split(v), t, data)  # noqa: E731
    hessian = torch.func.hessian(objective)(flat, theta)
    mixed = torch.func.jacrev(torch.func.grad(objective), argnums=1)(flat, theta)  # ∂²f/∂z∂θ, (n + 1, 3)
    dloss = torch.func.grad(lambda v: ex.validation_loss(split(v), data))(flat)
    reference = -mixed.T @ torch.linalg.solve(hessian, dloss)
    assert torch.linalg.vector_norm(grad - reference) < 1e-9 * torch.linalg.vector_norm(reference)
