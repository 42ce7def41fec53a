"""The dense Newton solver: per-sample Jacobian, direct solve, line search on ``‖F‖``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import implicit

f64 = torch.float64


def test_linear_problem_in_one_step() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 5, dtype=f64, generator=g) + 4 * torch.eye(5, dtype=f64)
    b = torch.randn(3, 5, dtype=f64, generator=g)

    def F(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([z["u"], z["v"]], dim=1)
        r = (A @ x.unsqueeze(-1)).squeeze(-1) - b
        return {"u": r[:, :2], "v": r[:, 2:]}

    z0 = {"u": torch.zeros(3, 2, dtype=f64), "v": torch.zeros(3, 3, dtype=f64)}
    sol = implicit.solve(implicit.ImplicitProblem(F, batched=True), z0, solver="newton", tol=1e-12)
    assert sol.converged and sol.stats.iterations == 1
    assert sol.stats.nfe == 2  # the start, and the full step (recorded with its graph, never re-evaluated)
    want = torch.linalg.solve(A, b)
    torch.testing.assert_close(torch.cat([sol.z["u"], sol.z["v"]], dim=1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("line_search", [True, False])
def test_nonlinear_against_scipy(line_search: bool) -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 6, 6, dtype=f64, generator=g)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)[:, None, None]
    c = torch.randn(4, 6, dtype=f64, generator=g)

    def F(z: torch.Tensor) -> torch.Tensor:
        return z + 0.3 * z**3 - torch.tanh((W @ z.unsqueeze(-1)).squeeze(-1)) - c

    sol = implicit.solve(
        implicit.ImplicitProblem(F, batched=True),
        torch.zeros(4, 6, dtype=f64),
        solver="newton",
        solver_options={"line_search": line_search},
        tol=1e-12,
    )
    assert sol.converged and sol.stats.iterations <= 12
    for i in range(4):
        Wi, ci = W[i].numpy(), c[i].numpy()
        ref = scipy.optimize.root(
            lambda x, Wi=Wi, ci=ci: x + 0.3 * x**3 - np.tanh(Wi @ x) - ci, np.zeros(6), tol=1e-14
        ).x
        torch.testing.assert_close(sol.z[i], torch.from_numpy(ref), rtol=1e-10, atol=1e-11)


def test_line_search_rescues_a_far_start() -> None:
    # arctan: the full Newton step from |z| > 1.39 overshoots further each time.
    z = implicit.root(torch.atan, torch.tensor([3.0, -5.0], dtype=f64), solver="newton", tol=1e-12, on_failure="raise")
    torch.testing.assert_close(z, torch.zeros(2, dtype=f64), rtol=0, atol=1e-12)
    with pytest.warns(implicit.ConvergenceWarning):
        implicit.root(
            torch.atan,
            torch.tensor([3.0], dtype=f64),
            solver="newton",
            solver_options={"line_search": False},
            tol=0.0,  # an absolute test: |atan| < π/2 is small next to the diverging iterate's norm
            atol=1e-10,
        )


def test_singular_jacobian_takes_the_least_squares_step() -> None:
    # A consistent singular linear system: the minimum-norm step reaches a root at once.
    A = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=f64)
    b = torch.tensor([2.0, 4.0], dtype=f64)
    sol = implicit.solve(
        implicit.ImplicitProblem(lambda z: A @ z - b), torch.zeros(2, dtype=f64), solver="newton", tol=1e-12
    )
    assert sol.converged and sol.stats.iterations == 1
    torch.testing.assert_close(sol.z, torch.ones(2, dtype=f64), rtol=1e-12, atol=1e-12)


def test_gradient_matches_the_closed_form() -> None:
    # z* = a^(1/3): dz*/da = 1 / (3 z*²)
    a = torch.tensor([8.0, 27.0], dtype=f64, requires_grad=True)
    z = implicit.root(lambda z: z**3 - a, torch.ones(2, dtype=f64), solver="newton", tol=1e-13, adjoint="exact")
    torch.testing.assert_close(z, torch.tensor([2.0, 3.0], dtype=f64), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(z.sum(), a)
    torch.testing.assert_close(grad, 1 / (3 * z.detach() ** 2), rtol=1e-10, atol=0)


def test_size_limit_points_to_newton_krylov() -> None:
    with pytest.raises(ValueError, match=r"4 x 10 x 10 = 400 entries \(max_size=100\).*newton_krylov"):
        implicit.root(
            lambda z: z - 1,
            torch.zeros(4, 10, dtype=f64),
            batched=True,
            solver="newton",
            solver_options={"max_size": 100},
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"line_search": 1}, "line_search must be a bool"),
        ({"max_backtracks": -1}, "max_backtracks must be a non-negative int"),
        ({"max_backtracks": True}, "max_backtracks"),
        ({"max_size": 0}, "max_size must be a positive int"),
        ({"max_sise": 10}, "max_size"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        implicit.root(lambda z: z - 1, torch.zeros(2, dtype=f64), solver="newton", solver_options=options)


def test_registered() -> None:
    assert "newton" in implicit.available_solvers()
    assert issubclass(implicit.get_solver("newton"), implicit.Solver)
