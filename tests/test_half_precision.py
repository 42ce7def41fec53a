"""States in float16 and bfloat16: solved in float32, handed to the map and returned in their own dtype."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ADJOINTS, SOLVERS

import implicit

# Every adjoint that solves the adjoint equation of a general (non-symmetric) problem.
GENERAL_ADJOINTS = [a for a in ADJOINTS if a != "jfb" and not implicit.get_adjoint(a).symmetric]

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
        for adjoint in GENERAL_ADJOINTS:
            sol, grad = _solve(dtype, solver, adjoint, tol)
            assert sol.z["a"].dtype == sol.z["b"].dtype == grad.dtype == dtype
            assert sol.stats.history.dtype == torch.float32  # the solver's arithmetic
            assert sol.converged and sol.adjoint_stats is not None
            assert abs(float(grad) - want) <= bound * abs(want), (adjoint, float(grad), want, bound)


def _mlp(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=g, dtype=f64)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
    return w, torch.randn(4, 8, generator=g, dtype=f64)


def _mlp_map(w: torch.Tensor, x: torch.Tensor):
    def f(z: torch.Tensor) -> torch.Tensor:
        # the solver's iterate keeps the state's dtype, whatever autocast does inside f
        assert z.dtype == w.dtype
        return torch.tanh(torch.nn.functional.linear(z, w) + x)  # bfloat16 under autocast

    return f


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_float32_state_under_autocast(solver: str) -> None:
    """The map runs under the caller's autocast (its output in bfloat16), the solvers' arithmetic does not."""
    w64, x64 = _mlp()
    ref = implicit.fixed_point(_mlp_map(w64.requires_grad_(), x64), torch.zeros(4, 8, dtype=f64), batched=True,
                               solver="fixed_point", adjoint="exact", tol=1e-13, max_iter=500)
    (want,) = torch.autograd.grad(ref.sum(), w64)
    kappa = 1.0 / (1.0 - 0.5)  # ‖J‖ ≤ ‖w‖ = 0.5, so ‖(I - J)⁻¹‖ ≤ 2
    tol, unit = 1e-2, torch.finfo(torch.bfloat16).eps / 2
    w, x = w64.detach().float().requires_grad_(), x64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SciPy's array-API probe of torch
        for adjoint in GENERAL_ADJOINTS:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sol = implicit.solve(implicit.ImplicitProblem.fixed_point(_mlp_map(w, x), batched=True),
                                     torch.zeros(4, 8), solver=solver, adjoint=adjoint, tol=tol, on_failure="raise")
                (grad,) = torch.autograd.grad(sol.z.sum(), w)  # the adjoint solve under autocast too
            assert sol.z.dtype == grad.dtype == torch.float32 and sol.stats.history.dtype == torch.float32
            err = float((grad.double() - want).norm() / want.norm())
            assert err <= 4.0 * kappa * (tol + unit), (adjoint, err)
