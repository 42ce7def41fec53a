"""States in float16 and bfloat16: solved in float32, handed to the map and returned in their own dtype."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ADJOINTS, SOLVERS

import implicit

f64 = torch.float64
HALF = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # a tolerance a little above each dtype's resolution


def _solve(dtype: torch.dtype, solver: str, adjoint: str, tol: float) -> tuple[implicit.Solution, torch.Tensor]:
    w = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    x = torch.linspace(-1, 1, 12, dtype=dtype).view(4, 3)
    problem = implicit.ImplicitProblem.fixed_point(
        lambda z: {"a": torch.tanh(w * z["a"] + x), "b": 0.5 * z["b"] + w * z["a"][:, :2, None]}, batched=True
    )
    z0 = {"a": torch.zeros(4, 3, dtype=dtype), "b": torch.zeros(4, 2, 2, dtype=dtype)}
    sol = implicit.solve(problem, z0, solver=solver, adjoint=adjoint, tol=tol, max_iter=200, on_failure="raise")
    (grad,) = torch.autograd.grad(sol.z["a"].sum() + sol.z["b"].sum(), w)
    return sol, grad


def _conditioning(sol: implicit.Solution) -> float:
    """max over samples of ‖(I - J)⁻¹‖₂ at the float64 solution: how much the errors of a solve are amplified."""
    w = torch.tensor(0.5, dtype=f64)
    x = torch.linspace(-1, 1, 12, dtype=f64).view(4, 3)

    def sample(v: torch.Tensor, b: int) -> torch.Tensor:
        a, m = v[:3], v[3:].view(2, 2)
        return torch.cat([torch.tanh(w * a + x[b]), (0.5 * m + w * a[:2, None]).reshape(-1)])

    flat = torch.cat([sol.z["a"], sol.z["b"].reshape(4, -1)], dim=1).detach()
    eye = torch.eye(7, dtype=f64)
    jacobians = [torch.autograd.functional.jacobian(lambda v, b=b: sample(v, b), flat[b]) for b in range(4)]
    return max(float(torch.linalg.matrix_norm(torch.linalg.inv(eye - j), 2)) for j in jacobians)


@pytest.fixture(scope="module")
def reference() -> tuple[float, float]:
    sol, grad = _solve(f64, "fixed_point", "exact", 1e-13)
    return float(grad), _conditioning(sol)


@pytest.mark.parametrize("dtype", list(HALF), ids=["float16", "bfloat16"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_half_precision_state_is_solved_and_differentiated(
    dtype: torch.dtype, solver: str, reference: tuple[float, float]
) -> None:
    want, kappa = reference
    tol = HALF[dtype]
    unit = torch.finfo(dtype).eps / 2
    # Forward and adjoint solve each leave a relative error of about κ·(tol + u); the
    # products and sums of f and its derivatives in half precision about as much again.
    bound = 4.0 * kappa * (tol + unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SciPy's array-API probe of torch
        for adjoint in [a for a in ADJOINTS if a != "jfb"]:
            sol, grad = _solve(dtype, solver, adjoint, tol)
            assert sol.z["a"].dtype == sol.z["b"].dtype == grad.dtype == dtype
            assert sol.stats.history.dtype == torch.float32  # the solver's arithmetic
            assert sol.converged and sol.adjoint_stats is not None
            assert abs(float(grad) - want) <= bound * abs(want), (adjoint, float(grad), want, bound)
