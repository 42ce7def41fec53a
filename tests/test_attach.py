"""Solutions computed elsewhere: implicit.attach and implicit.custom_root, against closed forms and dense references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import implicit

D = torch.float64


def smooth_problem():
    """argmin_z Σ ½(z - a)² + θ Σ z⁴/4 + ¼ (z₀ z₁)² over z ∈ R³, parameters a (3,) and θ."""
    a = torch.tensor([0.5, -1.0, 2.0], dtype=D, requires_grad=True)
    theta = torch.tensor(0.7, dtype=D, requires_grad=True)

    def objective(z, a=a, theta=theta):
        return 0.5 * ((z - a) ** 2).sum() + theta * (z**4).sum() / 4 + 0.25 * (z[0] * z[1]) ** 2

    return objective, (a, theta)


def scipy_minimum(objective) -> torch.Tensor:
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        z = torch.tensor(x, dtype=D, requires_grad=True)
        with torch.enable_grad():
            f = objective(z)
            (g,) = torch.autograd.grad(f, z)
        return float(f.detach()), g.numpy()

    found = scipy.optimize.minimize(fun, np.zeros(3), jac=True, method="BFGS", options={"gtol": 1e-10})
    # BFGS stops short of the accuracy finite differences need: polish on the gradient (hybr)
    polished = scipy.optimize.root(lambda x: fun(x)[1], found.x, tol=1e-15)
    return torch.as_tensor(polished.x, dtype=D)


def dense_ift(objective, params, z_star: torch.Tensor) -> torch.Tensor:
    """dz*/dθ for every parameter: −H⁻¹ ∂²f/∂z∂θ, as one (3, P) matrix, from dense autograd."""
    z = z_star.detach().requires_grad_()
    (g,) = torch.autograd.grad(objective(z), z, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], z, retain_graph=True)[0] for i in range(3)])
    cross = torch.stack(
        [torch.cat([c.reshape(-1) for c in torch.autograd.grad(g[i], params, retain_graph=True)]) for i in range(3)]
    )
    return -torch.linalg.solve(H, cross)


@pytest.mark.parametrize("adjoint", ["cg", "gmres", "exact", "minres"])
def test_attach_scipy_minimum_gradient(adjoint: str) -> None:
    objective, params = smooth_problem()
    z_star = scipy_minimum(lambda z: objective(z, *(p.detach() for p in params)))
    problem = implicit.ImplicitProblem.argmin(objective)
    sol = implicit.attach(problem, z_star, adjoint=adjoint, tol=1e-8, adjoint_options={"tol": 1e-12})
    assert sol.converged and sol.stats.iterations == 0 and sol.stats.nfe == 1 and sol.stats.solver == "attach"
    torch.testing.assert_close(sol.z.detach(), z_star)
    assert sol.z is not z_star
    w = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    grads = torch.autograd.grad(sol.z @ w, params)
    jac = dense_ift(objective, params, z_star)
    want = w @ jac
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), want, rtol=1e-8, atol=1e-10)
    assert sol.adjoint_stats is not None and sol.adjoint_stats.solver == adjoint


def test_attach_gradient_matches_finite_differences() -> None:
    objective, (a, theta) = smooth_problem()
    problem = implicit.ImplicitProblem.argmin(objective)

    def solution(a_val: torch.Tensor, t_val: float) -> torch.Tensor:
        return scipy_minimum(lambda z: objective(z, a_val, torch.tensor(t_val, dtype=D)))

    z_star = solution(a.detach(), float(theta.detach()))
    sol = implicit.attach(problem, z_star, tol=1e-8, adjoint_options={"tol": 1e-12})
    (g_theta,) = torch.autograd.grad(sol.z.sum(), theta)
    h = 1e-5
    fd = (solution(a.detach(), float(theta.detach()) + h).sum() - solution(a.detach(), float(theta.detach()) - h).sum()) / (2 * h)
    torch.testing.assert_close(g_theta, fd, rtol=1e-6, atol=1e-8)


def test_attach_unconverged_warns_or_raises() -> None:
    objective, _ = smooth_problem()
    problem = implicit.ImplicitProblem.argmin(objective)
    rough = torch.zeros(3, dtype=D)
    with pytest.warns(implicit.ConvergenceWarning, match=r"attached solution \(attach\).*not within tol=1e-06"):
        sol = implicit.attach(problem, rough)
    assert not sol.converged and sol.stats.iterations == 0 and sol.stats.nfe == 1
    with pytest.raises(implicit.ConvergenceError, match="not within tol"):
        implicit.attach(problem, rough, on_failure="raise")
    sol = implicit.attach(problem, rough, on_failure="ignore", name="my_solver")
    assert sol.stats.solver == "my_solver" and not sol.converged
    nan = torch.full((3,), float("nan"), dtype=D)
    with pytest.raises(implicit.SolverError, match="non-finite"):
        implicit.attach(problem, nan, on_failure="raise")


def test_attach_batched_reports_per_sample() -> None:
    c = torch.tensor([[1.0], [2.0]], dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem(lambda z: z**2 - c, batched=True)
    z_star = torch.tensor([[1.0], [1.5]], dtype=D)  # the second sample is off by 0.1
    with pytest.warns(implicit.ConvergenceWarning, match="not within tol") as caught:
        sol = implicit.attach(problem, z_star, adjoint="gmres")
    warning = caught[0].message
    assert (warning.unconverged, warning.samples) == (1, 2)  # figures are attributes, not message text
    assert sol.stats.converged.tolist() == [True, False]
    assert sol.stats.residual.shape == (2,)


def test_attach_double_backward_and_jvp_against_dense() -> None:
    # Root problem F(z, θ) = A z + θ z³ − b, solved by SciPy; derivatives of L = Σ z*².
    A = torch.tensor([[3.0, 0.5], [0.2, 2.0]], dtype=D)
    b = torch.tensor([1.0, -0.5], dtype=D)
    theta = torch.tensor(0.3, dtype=D, requires_grad=True)

    def F(z, theta=theta):
        return A @ z + theta * z**3 - b

    def solve_np(t: float) -> torch.Tensor:
        found = scipy.optimize.root(lambda x: (A.numpy() @ x + t * x**3 - b.numpy()), np.zeros(2), tol=1e-14)
        return torch.as_tensor(found.x, dtype=D)

    problem = implicit.ImplicitProblem(F)
    z_star = solve_np(float(theta.detach()))
    sol = implicit.attach(problem, z_star, adjoint="exact", tol=1e-10)
    loss = (sol.z**2).sum()
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    (gg,) = torch.autograd.grad(g, theta)

    # Dense reference: dz/dθ = −(∂F/∂z)⁻¹ ∂F/∂θ; d²z/dθ² by differentiating the dense formula.
    def dz(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        J = A + 3 * t * torch.diag(z**2)
        return -torch.linalg.solve(J, z**3)

    z0 = z_star.clone()
    t = theta.detach()
    d1 = dz(t, z0)
    tt = t.clone().requires_grad_()
    zz = z0.clone().requires_grad_()
    # total derivative of dz along the solution path: ∂/∂θ + ∂/∂z · dz/dθ
    out = dz(tt, zz)
    d2 = torch.stack(
        [
            torch.autograd.grad(out[i], tt, retain_graph=True)[0]
            + torch.autograd.grad(out[i], zz, retain_graph=True)[0] @ d1
            for i in range(2)
        ]
    )
    torch.testing.assert_close(g.detach(), 2 * z0 @ d1)
    torch.testing.assert_close(gg, 2 * (d1 @ d1 + z0 @ d2))

    # Forward mode through an attached solution: torch.func.jvp in θ.
    def attached(t: torch.Tensor) -> torch.Tensor:
        return implicit.attach(implicit.ImplicitProblem(lambda z: F(z, t)), z_star, adjoint="gmres", tol=1e-10).z

    _, tangent = torch.func.jvp(attached, (theta.detach(),), (torch.ones((), dtype=D),))
    torch.testing.assert_close(tangent, d1)


def test_custom_root_with_a_closure_parameter() -> None:
    a = torch.tensor([2.0, 3.0], dtype=D, requires_grad=True)

    @implicit.custom_root(lambda z: {"x": z["x"] ** 2 - a, "y": z["y"] - z["x"]}, tol=1e-10, adjoint="gmres")
    def newton(z0, steps=40):
        x = z0["x"].detach().clone()
        for _ in range(steps):
            x = x - (x**2 - a.detach()) / (2 * x)
        return {"x": x, "y": x.clone()}

    z0 = {"x": torch.ones(2, dtype=D), "y": torch.zeros(2, dtype=D)}
    z = newton(z0, steps=50)
    assert newton.__name__ == "newton" and set(z) == {"x", "y"}
    torch.testing.assert_close(z["x"].detach(), a.detach().sqrt())
    (g,) = torch.autograd.grad(z["y"].sum(), a)
    torch.testing.assert_close(g, 0.5 / a.detach().sqrt())
    # An unconverged answer is reported, not passed off.
    with pytest.warns(implicit.ConvergenceWarning, match=r"attached solution \(newton\)"):
        newton(z0, steps=1)


def test_custom_root_with_a_problem_and_numpy_code() -> None:
    X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 1.0]], dtype=D)
    y = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.least_squares(lambda z: X @ z - y)

    @implicit.custom_root(problem, tol=1e-10)
    def lstsq(z0):
        return torch.as_tensor(np.linalg.lstsq(X.numpy(), y.detach().numpy(), rcond=None)[0], dtype=D)

    z = lstsq(torch.zeros(2, dtype=D))
    pinv = torch.linalg.pinv(X)
    torch.testing.assert_close(z.detach(), pinv @ y.detach())
    (g,) = torch.autograd.grad(z[1], y)
    torch.testing.assert_close(g, pinv[1])


def test_attach_and_custom_root_bad_input() -> None:
    problem = implicit.ImplicitProblem(lambda z: z - 1)
    with pytest.raises(TypeError, match="problem must be an implicit.ImplicitProblem"):
        implicit.attach(lambda z: z, torch.ones(2))
    with pytest.raises(TypeError, match=r"z_star must be a tensor.*got ndarray.*torch.as_tensor"):
        implicit.attach(problem, np.ones(2))
    with pytest.raises(ValueError, match="on_failure"):
        implicit.attach(problem, torch.ones(2), on_failure="loud")
    with pytest.raises(ValueError, match="tol must be"):
        implicit.attach(problem, torch.ones(2), tol=-1.0)
    with pytest.raises(TypeError, match="custom_root needs"):
        implicit.custom_root(3)
    with pytest.raises(TypeError, match="batched is for a callable"):
        implicit.custom_root(problem, batched=True)

    @implicit.custom_root(problem)
    def wrong_shape(z0):
        return torch.ones(3, dtype=z0.dtype)

    with pytest.raises(ValueError, match=r"wrong_shape returned z with shape \(3,\); expected \(2,\)"):
        wrong_shape(torch.zeros(2))

    @implicit.custom_root(lambda z: {"x": z["x"] - 1})
    def wrong_keys(z0):
        return {"y": z0["x"]}

    with pytest.raises(ValueError, match=r"wrong_keys returned a dict with variables \[\"z\['y'\]\"\]"):
        wrong_keys({"x": torch.zeros(2)})


def test_solve_and_attach_share_one_path() -> None:
    # attach() of solve()'s own answer gives the same derivatives as solve().
    theta = torch.tensor(0.4, dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * torch.tanh(z) + theta)
    sol = implicit.solve(problem, torch.zeros(3, dtype=D), solver="anderson", tol=1e-12)
    again = implicit.attach(problem, sol.z.detach(), tol=1e-10)
    (g1,) = torch.autograd.grad(sol.z.sum(), theta)
    (g2,) = torch.autograd.grad(again.z.sum(), theta)
    torch.testing.assert_close(g1, g2)
