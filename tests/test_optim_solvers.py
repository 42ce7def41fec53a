"""lbfgs, newton_cg, gauss_newton and levenberg_marquardt against closed forms, scipy and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares as scipy_least_squares

import implicit

f64 = torch.float64
ARGMIN = ["lbfgs", "newton_cg"]
LSQ = ["gauss_newton", "levenberg_marquardt"]
ALL = ARGMIN + LSQ
ADJOINTS = [a for a in ("cg", "exact", "gmres") if a in implicit.available_adjoints()]


def solve(problem, z0, solver, adjoint="exact", **kw):  # noqa: ANN001, ANN201
    kw.setdefault("tol", 1e-12)
    kw.setdefault("max_iter", 500)
    return implicit.solve(problem, z0, solver=solver, adjoint=adjoint, on_failure="raise",
                          adjoint_options={"tol": 1e-12, "max_iter": 500} if adjoint != "exact" else None, **kw)


def ridge_data(batch: int = 3, n: int = 20, d: int = 5, seed: int = 0):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, d, dtype=f64, generator=g) * torch.logspace(0, 1, d, dtype=f64)  # ill-conditioned
    y = torch.randn(batch, n, dtype=f64, generator=g)
    lam = torch.tensor([0.1, 1.0, 10.0][:batch], dtype=f64)
    return X, y, lam


def ridge_closed_form(X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    d = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam[:, None, None] * torch.eye(d, dtype=f64)
    return torch.linalg.solve(A, (X.transpose(1, 2) @ y[..., None]))[..., 0]


def ridge_problem(solver: str, X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> implicit.ImplicitProblem:
    if solver in LSQ:
        def residuals(w: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"fit": torch.einsum("bnd,bd->bn", X, w) - y, "penalty": lam.sqrt()[:, None] * w}

        return implicit.ImplicitProblem.least_squares(residuals, batched=True)

    def objective(w: torch.Tensor) -> torch.Tensor:
        r = torch.einsum("bnd,bd->bn", X, w) - y
        return 0.5 * (r * r).sum(1) + 0.5 * lam * (w * w).sum(1)

    return implicit.ImplicitProblem.argmin(objective, batched=True)


@pytest.mark.parametrize("solver", ALL)
def test_batched_ridge_matches_closed_form_per_sample(solver: str) -> None:
    X, y, lam = ridge_data()
    sol = solve(ridge_problem(solver, X, y, lam), torch.zeros(3, 5, dtype=f64), solver, tol=1e-11)
    ref = ridge_closed_form(X, y, lam)
    assert bool(sol.stats.converged.all())
    assert torch.allclose(sol.z, ref, rtol=1e-8, atol=1e-9)
    # The tolerance is on the gradient, per sample, checked here independently of the monitor.
    A = X.transpose(1, 2) @ X + lam[:, None, None] * torch.eye(5, dtype=f64)
    grad = (A @ sol.z[..., None])[..., 0] - (X.transpose(1, 2) @ y[..., None])[..., 0]
    assert bool((grad.norm(dim=1) <= 1e-11 * sol.z.norm(dim=1) + 1e-10).all())
    assert sol.stats.residual.shape == (3,) and sol.stats.history.shape[1] == 3


@pytest.mark.parametrize("solver", ALL)
def test_converged_samples_are_frozen(solver: str) -> None:
    # Sample 0 starts at its solution: it converges at the first check and must not move.
    X, y, lam = ridge_data()
    ref = ridge_closed_form(X, y, lam)
    z0 = torch.zeros(3, 5, dtype=f64)
    z0[0] = ref[0]
    sol = solve(ridge_problem(solver, X, y, lam), z0, solver, tol=1e-9)
    assert torch.equal(sol.z[0], ref[0])
    assert sol.stats.history[0, 0] <= 1e-9 * ref[0].norm() + 1e-10 and sol.stats.iterations > 0
    assert torch.allclose(sol.z[1:], ref[1:], rtol=1e-7, atol=1e-8)


def rosenbrock_objective(z: torch.Tensor) -> torch.Tensor:
    a, b = z[:, :-1], z[:, 1:]
    return (100 * (b - a**2) ** 2 + (1 - a) ** 2).sum(1)


def rosenbrock_residuals(z: torch.Tensor) -> torch.Tensor:
    a, b = z[:, :-1], z[:, 1:]
    return torch.cat([10 * (b - a**2), 1 - a], dim=1)  # ½Σr² = ½ rosenbrock


@pytest.mark.parametrize("solver", ALL)
def test_batched_rosenbrock(solver: str) -> None:
    z0 = torch.tensor([[-1.2, 1.0, -0.5], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [-1.5, 2.0, 1.0]], dtype=f64)
    if solver in LSQ:
        problem = implicit.ImplicitProblem.least_squares(rosenbrock_residuals, batched=True)
    else:
        problem = implicit.ImplicitProblem.argmin(rosenbrock_objective, batched=True)
    sol = solve(problem, z0, solver, tol=1e-10, max_iter=1000)
    assert bool(sol.stats.converged.all())
    assert torch.allclose(sol.z, torch.ones(4, 3, dtype=f64), atol=1e-8)


def test_lbfgs_memory_and_options_change_the_path_not_the_answer() -> None:
    X, y, lam = ridge_data()
    ref = ridge_closed_form(X, y, lam)
    for options in ({"m": 1}, {"m": 3, "c2": 0.5}, {"max_linesearch": 5}):
        sol = implicit.solve(ridge_problem("lbfgs", X, y, lam), torch.zeros(3, 5, dtype=f64), solver="lbfgs",
                             adjoint="exact", tol=1e-11, max_iter=2000, solver_options=options, on_failure="raise")
        assert torch.allclose(sol.z, ref, rtol=1e-8, atol=1e-9), options


def test_newton_cg_on_an_indefinite_start_uses_descent() -> None:
    # f = Σ (z² − 1)²: indefinite Hessian where |z| < 1/√3; minima at ±1 (sign of the start here).
    problem = implicit.ImplicitProblem.argmin(lambda z: ((z**2 - 1) ** 2).sum(1), batched=True)
    z0 = torch.tensor([[0.1, -0.2, 0.3], [0.05, 0.5, -0.01]], dtype=f64)
    sol = solve(problem, z0, "newton_cg", tol=1e-12)
    assert torch.allclose(sol.z, torch.sign(z0), atol=1e-10)


def curve_data(batch: int = 3, seed: int = 0):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, 25, dtype=f64)
    true = torch.tensor([[2.0, 1.3, 0.5], [1.0, 0.4, -0.2], [3.0, 2.5, 0.1]][:batch], dtype=f64)
    y = true[:, :1] * torch.exp(-true[:, 1:2] * t) + true[:, 2:3] + 0.05 * torch.randn(batch, 25, dtype=f64, generator=g)
    return t, y


def curve_residuals(t: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    def residuals(p: torch.Tensor) -> torch.Tensor:
        return p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:3] - y

    return residuals


def scipy_fit(t: np.ndarray, y: np.ndarray, p0: np.ndarray) -> np.ndarray:
    res = scipy_least_squares(
        lambda p: p[0] * np.exp(-p[1] * t) + p[2] - y, p0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    return res.x


@pytest.mark.parametrize("solver", ALL)
def test_nonlinear_curve_fit_matches_scipy(solver: str) -> None:
    t, y = curve_data()
    residuals = curve_residuals(t, y)
    if solver in LSQ:
        problem = implicit.ImplicitProblem.least_squares(residuals, batched=True)
    else:
        problem = implicit.ImplicitProblem.argmin(lambda p: 0.5 * (residuals(p) ** 2).sum(1), batched=True)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=f64)
    sol = solve(problem, p0, solver, tol=1e-10, max_iter=2000)
    for b in range(3):
        ref = scipy_fit(t.numpy(), y[b].numpy(), p0[b].numpy())
        np.testing.assert_allclose(sol.z[b].numpy(), ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("solver", LSQ)
def test_linear_least_squares_matches_lstsq(solver: str) -> None:
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 30, 6, dtype=f64, generator=g)
    b = torch.randn(4, 30, dtype=f64, generator=g)
    problem = implicit.ImplicitProblem.least_squares(lambda x: torch.einsum("bmn,bn->bm", A, x) - b, batched=True)
    sol = solve(problem, torch.zeros(4, 6, dtype=f64), solver)
    ref = torch.linalg.lstsq(A, b[..., None]).solution[..., 0]
    assert torch.allclose(sol.z, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("solver", ALL)
def test_gradient_through_ridge_solution_matches_closed_form(solver: str, adjoint: str) -> None:
    X, y, lam0 = ridge_data()
    lam = lam0.clone().requires_grad_()
    yy = y.clone().requires_grad_()
    sol = solve(ridge_problem(solver, X, yy, lam), torch.zeros(3, 5, dtype=f64), solver, adjoint=adjoint)
    c = torch.randn(3, 5, dtype=f64)
    dlam, dy = torch.autograd.grad((c * sol.z).sum(), (lam, yy))
    # Closed form: w = A⁻¹ Xᵀy, dw/dλ = −A⁻¹ w, dw/dy = A⁻¹ Xᵀ, A symmetric.
    A = X.transpose(1, 2) @ X + lam0[:, None, None] * torch.eye(5, dtype=f64)
    w = ridge_closed_form(X, y, lam0)
    u = torch.linalg.solve(A, c[..., None])[..., 0]
    assert torch.allclose(dlam, -(u * w).sum(1), rtol=1e-7, atol=1e-10)
    assert torch.allclose(dy, torch.einsum("bnd,bd->bn", X, u), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("solver", LSQ + ["lbfgs"])
def test_gradient_through_curve_fit_matches_finite_differences(solver: str, adjoint: str) -> None:
    t, y = curve_data(batch=2)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 2, dtype=f64)

    def fit(data: torch.Tensor) -> torch.Tensor:
        residuals = curve_residuals(t, data)
        if solver in LSQ:
            problem = implicit.ImplicitProblem.least_squares(residuals, batched=True)
        else:
            problem = implicit.ImplicitProblem.argmin(lambda p: 0.5 * (residuals(p) ** 2).sum(1), batched=True)
        return solve(problem, p0, solver, adjoint=adjoint, tol=1e-13, max_iter=3000).z

    data = y.clone().requires_grad_()
    c = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]], dtype=f64)
    (grad,) = torch.autograd.grad((c * fit(data)).sum(), data)
    h = 1e-6
    fd = torch.zeros_like(y)
    with torch.no_grad():
        for b in range(2):
            for i in range(0, 25, 4):
                e = torch.zeros_like(y)
                e[b, i] = h
                fd[b, i] = ((c * fit(y + e)).sum() - (c * fit(y - e)).sum()) / (2 * h)
    idx = torch.arange(0, 25, 4)
    assert torch.allclose(grad[:, idx], fd[:, idx], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", ALL)
def test_dict_states(solver: str) -> None:
    # Ridge with an unpenalised intercept, the state {"w": (B, d), "c": (B,)}.
    X, y, lam = ridge_data()

    def residuals(z: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("bnd,bd->bn", X, z["w"]) + z["c"][:, None] - y, lam.sqrt()[:, None] * z["w"]

    if solver in LSQ:
        problem = implicit.ImplicitProblem.least_squares(residuals, batched=True)
    else:
        problem = implicit.ImplicitProblem.argmin(
            lambda z: 0.5 * sum((r * r).sum(1) for r in residuals(z)), batched=True  # type: ignore[misc]
        )
    z0 = {"w": torch.zeros(3, 5, dtype=f64), "c": torch.zeros(3, dtype=f64)}
    sol = solve(problem, z0, solver)
    Xa = torch.cat([X, torch.ones(3, 20, 1, dtype=f64)], dim=2)
    D = torch.diag_embed(torch.cat([lam[:, None].expand(3, 5), torch.zeros(3, 1, dtype=f64)], dim=1))
    ref = torch.linalg.solve(Xa.transpose(1, 2) @ Xa + D, (Xa.transpose(1, 2) @ y[..., None]))[..., 0]
    assert set(sol.z) == {"w", "c"}
    assert torch.allclose(sol.z["w"], ref[:, :5], rtol=1e-8, atol=1e-9)
    assert torch.allclose(sol.z["c"], ref[:, 5], rtol=1e-8, atol=1e-9)


def test_unbatched_problems() -> None:
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=f64)
    b = torch.tensor([1.0, 2.0], dtype=f64)
    ref = torch.linalg.solve(A, b)
    for solver in ARGMIN:
        sol = solve(implicit.ImplicitProblem.argmin(lambda z: 0.5 * z @ A @ z - b @ z), torch.zeros(2, dtype=f64), solver)
        assert torch.allclose(sol.z, ref) and sol.stats.residual.dim() == 0
    L = torch.linalg.cholesky(A)  # ½‖Lᵀz − L⁻¹b‖² has the same minimiser
    rhs = torch.linalg.solve_triangular(L, b[:, None], upper=False)[:, 0]
    for solver in LSQ:
        sol = solve(implicit.ImplicitProblem.least_squares(lambda z: L.T @ z - rhs), torch.zeros(2, dtype=f64), solver)
        assert torch.allclose(sol.z, ref)


@pytest.mark.parametrize("solver", ALL)
def test_wrong_problem_form_is_a_clear_error(solver: str) -> None:
    with pytest.raises(ValueError, match=rf"solver '{solver}' solves .*form 'root'.*use a root solver"):
        implicit.solve(implicit.ImplicitProblem(lambda z: z - 1), torch.zeros(2), solver=solver, adjoint="exact")
    with pytest.raises(ValueError, match=r"form 'fixed_point'"):
        implicit.solve(implicit.ImplicitProblem.fixed_point(torch.cos), torch.zeros(2), solver=solver, adjoint="exact")
    with pytest.raises(ValueError, match=r"form 'linear \(an adjoint equation\)'.*'gmres'"):
        z = torch.zeros(2, requires_grad=True)
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(lambda x: 0.5 * x + z), torch.zeros(2), adjoint=solver)
        sol.z.sum().backward()


@pytest.mark.parametrize("solver", LSQ)
def test_least_squares_solvers_refuse_argmin(solver: str) -> None:
    problem = implicit.ImplicitProblem.argmin(lambda z: (z * z).sum())
    with pytest.raises(ValueError, match=r"solves least-squares problems.*form 'argmin'.*lbfgs"):
        implicit.solve(problem, torch.ones(2), solver=solver, adjoint="exact")


@pytest.mark.parametrize("solver", ALL)
def test_non_convergence_is_reported(solver: str) -> None:
    problem = implicit.ImplicitProblem.least_squares(rosenbrock_residuals, batched=True)
    if solver in ARGMIN:
        problem = implicit.ImplicitProblem.argmin(rosenbrock_objective, batched=True)
    z0 = torch.tensor([[-1.2, 1.0]], dtype=f64)
    with pytest.warns(implicit.ConvergenceWarning):
        sol = implicit.solve(problem, z0, solver=solver, adjoint="exact", tol=1e-12, max_iter=2)
    assert not bool(sol.stats.converged.any())
    with pytest.raises(implicit.ConvergenceError):
        implicit.solve(problem, z0, solver=solver, adjoint="exact", tol=1e-12, max_iter=2, on_failure="raise")


@pytest.mark.parametrize(
    ("solver", "options", "message"),
    [
        ("lbfgs", {"m": 0}, "m must be a positive int; got 0"),
        ("lbfgs", {"c1": 0.0}, r"c1 must lie in \(0, 1\); got 0.0"),
        ("lbfgs", {"c2": 1e-5}, r"c2 must lie in \(0.0001, 1\); got 1e-05"),
        ("lbfgs", {"curvature_eps": -1.0}, "curvature_eps must be a positive number"),
        ("lbfgs", {"max_linesearch": True}, "max_linesearch must be a positive int"),
        ("newton_cg", {"eta_max": 1.0}, r"eta_max must lie in \(0, 1\); got 1.0"),
        ("newton_cg", {"max_inner": 0}, "max_inner must be a positive int"),
        ("gauss_newton", {"eta_max": 0}, r"eta_max must lie in \(0, 1\)"),
        ("gauss_newton", {"max_linesearch": 0}, "max_linesearch must be a positive int"),
        ("levenberg_marquardt", {"tau": 0.0}, "tau must be a positive number; got 0.0"),
        ("levenberg_marquardt", {"max_inner": 1.5}, "max_inner must be a positive int"),
    ],
)
def test_bad_options(solver: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        implicit.get_solver(solver)(**options)


def test_forms_are_declared() -> None:
    from implicit._registry import forms_of

    for name in ARGMIN:
        assert forms_of(implicit.get_solver(name)) == ("argmin", "least_squares")
        assert forms_of(implicit.get_adjoint(name)) == ("argmin", "least_squares")
    for name in LSQ:
        assert forms_of(implicit.get_solver(name)) == ("least_squares",)
    assert "root" in forms_of(implicit.get_solver("anderson"))
