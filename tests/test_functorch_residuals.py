"""Residuals written with ``torch.func.grad``: the optimality condition of an objective.

``torch.func.grad`` refuses to run while saved-tensor hooks are installed, so a
solver that records a graph of ``F`` must not install any around it unless it
can. Every solver and adjoint is run on the stationarity condition of a ridge
objective, whose solution ``w = 1 / (1 + λ)`` and derivative
``dw/dλ = -1 / (1 + λ)²`` are known in closed form.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADJOINTS, SOLVERS

import implicit

f64 = torch.float64


def _objective(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w**2).sum()


def _stationarity(lam: torch.Tensor):  # noqa: ANN202
    return lambda w: torch.func.grad(_objective)(w, lam)


@pytest.mark.parametrize("solver", SOLVERS)
def test_forward_under_no_grad(solver: str) -> None:
    lam = torch.tensor(0.5, dtype=f64)
    with torch.no_grad():
        w = implicit.root(_stationarity(lam), torch.zeros(3, dtype=f64), solver=solver, tol=1e-10, max_iter=200)
    torch.testing.assert_close(w, torch.full((3,), 1 / 1.5, dtype=f64), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_solution_and_gradient(solver: str, adjoint: str) -> None:
    lam = torch.tensor(0.5, dtype=f64, requires_grad=True)
    sol = implicit.solve(
        implicit.ImplicitProblem(_stationarity(lam)),
        torch.zeros(3, dtype=f64),
        solver=solver,
        adjoint=adjoint,
        tol=1e-10,
        max_iter=200,
        adjoint_options={"tol": 1e-10} if not implicit.get_adjoint(adjoint).approximate else None,
    )
    assert sol.converged
    torch.testing.assert_close(sol.z, torch.full((3,), 1 / 1.5, dtype=f64), rtol=1e-8, atol=1e-9)
    (grad,) = torch.autograd.grad(sol.z.sum(), lam)
    if implicit.get_adjoint(adjoint).approximate:
        # Jacobian-free backprop: -∂F/∂λ summed, i.e. -Σ w, with no solve.
        torch.testing.assert_close(grad, -sol.z.detach().sum(), rtol=1e-8, atol=1e-10)
        return
    torch.testing.assert_close(grad, torch.tensor(-3 / 1.5**2, dtype=f64), rtol=1e-7, atol=1e-9)
