"""argmin and least squares: closed forms, finite differences, the symmetric adjoints, saddle points."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import SYMMETRIC_ADJOINTS
from hypothesis import given
from hypothesis import strategies as st

import implicit

D = torch.float64
SOLVER = "newton_krylov"  # a root solver: the optimisation solvers are tested with their own files
ADJOINTS = ["cg", "minres", "exact", "gmres"]
TIGHT = {"tol": 1e-12}


def ridge_data():
    X = torch.randn(8, 3, dtype=D)
    y = torch.randn(8, dtype=D)
    return X, y


def ridge_closed_form(X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=D), X.T @ y)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_ridge_regression(adjoint: str) -> None:
    X, y = ridge_data()
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    z = implicit.argmin(
        lambda z: 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z**2).sum(),
        torch.zeros(3, dtype=D),
        solver=SOLVER,
        adjoint=adjoint,
        tol=1e-12,
        adjoint_options=TIGHT,
    )
    want = ridge_closed_form(X, y, lam.detach())
    torch.testing.assert_close(z.detach(), want)
    w = torch.tensor([1.0, -1.0, 2.0], dtype=D)
    (g,) = torch.autograd.grad(z @ w, lam)
    # dz*/dλ = −(XᵀX + λI)⁻¹ z*
    dz = -torch.linalg.solve(X.T @ X + lam.detach() * torch.eye(3, dtype=D), want)
    torch.testing.assert_close(g, w @ dz)
    h = 1e-6
    fd = (ridge_closed_form(X, y, lam.detach() + h) - ridge_closed_form(X, y, lam.detach() - h)) @ w / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


def test_default_adjoint_is_cg() -> None:
    X, y = ridge_data()
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.argmin(lambda z: 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z**2).sum())
    sol = implicit.solve(problem, torch.zeros(3, dtype=D), solver=SOLVER, tol=1e-12)
    sol.z.sum().backward()
    assert sol.adjoint_stats is not None and sol.adjoint_stats.solver == "cg" and sol.adjoint_stats.all_converged
    lsq = implicit.ImplicitProblem.least_squares(lambda z: X @ z - y)
    sol = implicit.solve(lsq, torch.zeros(3, dtype=D, requires_grad=False), solver=SOLVER, tol=1e-12)
    assert sol.stats.solver == SOLVER


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_quadratic_objective(adjoint: str) -> None:
    S = torch.randn(5, 5, dtype=D, requires_grad=True)
    b = torch.randn(5, dtype=D, requires_grad=True)

    def objective(z):
        A = S @ S.T + torch.eye(5, dtype=D)
        return 0.5 * z @ A @ z - b @ z

    z = implicit.argmin(objective, torch.zeros(5, dtype=D), solver=SOLVER, adjoint=adjoint, tol=1e-12, adjoint_options=TIGHT)
    w = torch.randn(5, dtype=D)
    got = torch.autograd.grad(z @ w, (S, b))
    ref = torch.linalg.solve(S @ S.T + torch.eye(5, dtype=D), b)
    want = torch.autograd.grad(ref @ w, (S, b))
    torch.testing.assert_close(z.detach(), ref.detach())
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("batched", [False, True])
def test_linear_least_squares(adjoint: str, batched: bool) -> None:
    B = 3 if batched else 1
    X = torch.randn(B, 7, 3, dtype=D, requires_grad=True)
    y = torch.randn(B, 7, dtype=D, requires_grad=True)

    def residuals(z):
        zz = z["w"].reshape(B, 3)
        r = {"fit": (X @ zz.unsqueeze(-1)).squeeze(-1) - y, "ridge": 0.1 * zz}
        return r if batched else {k: v[0] for k, v in r.items()}

    z0 = {"w": torch.zeros(B, 3, dtype=D) if batched else torch.zeros(3, dtype=D)}
    z = implicit.least_squares(
        residuals, z0, batched=batched, solver=SOLVER, adjoint=adjoint, tol=1e-12, adjoint_options=TIGHT
    )
    A = X.mT @ X + 0.01 * torch.eye(3, dtype=D)
    ref = torch.linalg.solve(A, (X.mT @ y.unsqueeze(-1))).squeeze(-1)
    ref = ref if batched else ref[0]
    torch.testing.assert_close(z["w"].detach(), ref.detach())
    w = torch.randn_like(ref)
    got = torch.autograd.grad((z["w"] * w).sum(), (X, y))
    want = torch.autograd.grad((ref * w).sum(), (X, y))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_symmetric_adjoints_agree_with_exact_and_gmres() -> None:
    theta = torch.tensor([0.4, -0.2, 1.1], dtype=D, requires_grad=True)

    def objective(z):
        return (torch.cosh(z - theta)).sum() + 0.3 * (z[0] * z[1] + z[1] * z[2]) ** 2 + 0.5 * (z**2).sum()

    grads = {}
    for adjoint in ADJOINTS:
        z = implicit.argmin(objective, torch.zeros(3, dtype=D), solver=SOLVER, adjoint=adjoint, tol=1e-12, adjoint_options=TIGHT)
        (grads[adjoint],) = torch.autograd.grad((z**2).sum(), theta)
    for adjoint in ADJOINTS:
        torch.testing.assert_close(grads[adjoint], grads["exact"], rtol=1e-9, atol=1e-11)


# -- random dict states --------------------------------------------------------------------------


@st.composite
def dict_quadratics(draw):
    batched = draw(st.booleans())
    count = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))) for _ in range(count)]
    batch = draw(st.integers(1, 3)) if batched else 1
    seed = draw(st.integers(0, 2**16))
    return batched, shapes, batch, seed


@given(dict_quadratics())
def test_random_dict_quadratic(case) -> None:
    batched, shapes, batch, seed = case
    gen = torch.Generator().manual_seed(seed)
    names = [f"v{i}" for i in range(len(shapes))]
    sizes = [int(torch.tensor(s).prod()) if s else 1 for s in shapes]
    n = sum(sizes)
    Q = torch.randn(batch, n, n, dtype=D, generator=gen)
    A = Q @ Q.mT / n + 0.5 * torch.eye(n, dtype=D)  # SPD; couples every variable
    b = torch.randn(batch, n, dtype=D, generator=gen).requires_grad_()

    def stack(z):
        parts = [z[k].reshape(batch, -1) if batched else z[k].reshape(1, -1) for k in names]
        return torch.cat(parts, dim=1)

    def objective(z):
        v = stack(z)
        f = 0.5 * (v * (A @ v.unsqueeze(-1)).squeeze(-1)).sum(1) - (b * v).sum(1)
        return f if batched else f[0]

    lead = (batch,) if batched else ()
    z0 = {k: torch.zeros((*lead, *s), dtype=D) for k, s in zip(names, shapes)}
    for adjoint in ("cg", "minres"):
        z = implicit.argmin(objective, z0, batched=batched, solver=SOLVER, adjoint=adjoint, tol=1e-11, adjoint_options=TIGHT)
        ref = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(stack(z).detach(), ref.detach(), rtol=1e-8, atol=1e-10)
        w = torch.randn(batch, n, dtype=D, generator=gen)
        (g,) = torch.autograd.grad((stack(z) * w).sum(), b)
        (want,) = torch.autograd.grad((ref * w).sum(), b)
        torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-10)


# -- a stationary point that is not a minimum -----------------------------------------------------


def saddle():
    q = torch.linalg.qr(torch.randn(4, 4, dtype=D))[0]
    A = q @ torch.diag(torch.tensor([2.0, 1.0, -1.5, 0.7], dtype=D)) @ q.T  # indefinite
    b = torch.randn(4, dtype=D, requires_grad=True)
    z_saddle = torch.linalg.solve(A, b.detach())
    problem = implicit.ImplicitProblem.argmin(lambda z: 0.5 * z @ A @ z - b @ z)
    start = z_saddle + 1e-2 * torch.randn(4, dtype=D)
    return A, b, problem, start


def test_saddle_point_minres_matches_dense() -> None:
    A, b, problem, start = saddle()
    sol = implicit.solve(problem, start, solver=SOLVER, adjoint="minres", tol=1e-12, adjoint_options=TIGHT)
    torch.testing.assert_close(sol.z.detach(), torch.linalg.solve(A, b.detach()))
    w = torch.randn(4, dtype=D)
    (g,) = torch.autograd.grad(sol.z @ w, b)
    torch.testing.assert_close(g, torch.linalg.solve(A, w))  # A symmetric: d(wᵀA⁻¹b)/db = A⁻¹w
    assert sol.adjoint_stats is not None and sol.adjoint_stats.all_converged


def test_saddle_point_cg_failure_is_reported() -> None:
    A, b, problem, start = saddle()
    w = torch.randn(4, dtype=D)
    sol = implicit.solve(problem, start, solver=SOLVER, adjoint="cg", tol=1e-12)
    with pytest.warns(implicit.ConvergenceWarning, match="negative curvature: the Hessian is not positive definite"):
        torch.autograd.grad(sol.z @ w, b)
    assert sol.adjoint_stats is not None and not sol.adjoint_stats.all_converged
    assert "minres" in sol.adjoint_stats.message
    sol = implicit.solve(problem, start, solver=SOLVER, adjoint="cg", tol=1e-12, on_failure="raise")
    with pytest.raises(implicit.ConvergenceError, match=r"negative curvature.*use adjoint='minres' or 'gmres'"):
        torch.autograd.grad(sol.z @ w, b)


def test_cg_negative_curvature_only_in_some_samples() -> None:
    # Batched: sample 0 at a minimum, sample 1 at a saddle. Only sample 1 is reported.
    A = torch.stack([torch.diag(torch.tensor([1.0, 2.0], dtype=D)), torch.diag(torch.tensor([1.0, -2.0], dtype=D))])
    b = torch.randn(2, 2, dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.argmin(
        lambda z: 0.5 * (z * (A @ z.unsqueeze(-1)).squeeze(-1)).sum(1) - (b * z).sum(1), batched=True
    )
    start = torch.linalg.solve(A, b.detach().unsqueeze(-1)).squeeze(-1) + 1e-3
    sol = implicit.solve(problem, start, solver=SOLVER, adjoint="cg", tol=1e-12)
    with pytest.warns(implicit.ConvergenceWarning, match="negative curvature") as caught:
        (g,) = torch.autograd.grad(sol.z.sum(), b)
    assert (caught[0].message.unconverged, caught[0].message.samples) == (1, 2)
    assert sol.adjoint_stats.converged.tolist() == [True, False]
    torch.testing.assert_close(g[0], 1 / torch.diagonal(A[0]))


# -- the derivative contract for symmetric adjoints, on symmetric problems -------------------------


def smooth_argmin(adjoint: str, batched: bool = False):
    theta = torch.tensor([0.3, -0.5], dtype=D, requires_grad=True)
    B = 2 if batched else 1

    def objective(z):
        x = z.reshape(B, 2)
        f = (torch.cosh(x - theta) + 0.25 * x**4).sum(1) + 0.2 * (x[:, 0] * x[:, 1]) ** 2
        return f if batched else f[0]

    z0 = torch.zeros(B, 2, dtype=D) if batched else torch.zeros(2, dtype=D)

    def solve(t: torch.Tensor | None = None):
        f = objective if t is None else (lambda z: objective_at(z, t))
        return implicit.argmin(f, z0, batched=batched, solver=SOLVER, adjoint=adjoint, tol=1e-12, adjoint_options=TIGHT)

    def objective_at(z, t):
        x = z.reshape(B, 2)
        f = (torch.cosh(x - t) + 0.25 * x**4).sum(1) + 0.2 * (x[:, 0] * x[:, 1]) ** 2
        return f if batched else f[0]

    return theta, solve


@pytest.mark.parametrize("adjoint", SYMMETRIC_ADJOINTS)
def test_symmetric_adjoint_higher_order_and_forward_mode(adjoint: str) -> None:
    theta, solve = smooth_argmin(adjoint)
    _, solve_exact = smooth_argmin("exact")
    z = solve()
    (g,) = torch.autograd.grad((z**2).sum(), theta, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), theta)
    z_ref = solve_exact(theta)
    (g_ref,) = torch.autograd.grad((z_ref**2).sum(), theta, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), theta)
    torch.testing.assert_close(g.detach(), g_ref.detach())
    torch.testing.assert_close(gg, gg_ref, rtol=1e-7, atol=1e-9)
    v = torch.tensor([1.0, 0.5], dtype=D)
    _, tangent = torch.func.jvp(lambda t: solve(t), (theta.detach(),), (v,))
    _, tangent_ref = torch.func.jvp(lambda t: solve_exact(t), (theta.detach(),), (v,))
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-8, atol=1e-10)
    jac = torch.func.jacrev(lambda t: solve(t))(theta.detach())
    jac_ref = torch.func.jacrev(lambda t: solve_exact(t))(theta.detach())
    torch.testing.assert_close(jac, jac_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("adjoint", SYMMETRIC_ADJOINTS)
def test_symmetric_adjoint_batched_against_dense(adjoint: str) -> None:
    theta, solve = smooth_argmin(adjoint, batched=True)
    _, solve_exact = smooth_argmin("exact", batched=True)
    (g,) = torch.autograd.grad((solve() ** 3).sum(), theta)
    (g_ref,) = torch.autograd.grad((solve_exact(theta) ** 3).sum(), theta)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("adjoint", SYMMETRIC_ADJOINTS)
def test_symmetric_adjoint_options_and_failure(adjoint: str) -> None:
    cls = implicit.get_adjoint(adjoint)
    assert cls.symmetric and not cls.approximate and issubclass(cls, implicit.AdjointSolver)
    with pytest.raises(ValueError, match="tol must be a finite non-negative number"):
        cls(tol=-1.0)
    theta, solve = smooth_argmin(adjoint)
    S = torch.randn(30, 30, dtype=D)
    A = S @ S.T + 1e-3 * torch.eye(30, dtype=D)  # ill-conditioned: one step is far from enough
    b = torch.randn(30, dtype=D, requires_grad=True)
    z = implicit.argmin(
        lambda z: 0.5 * z @ A @ z - b @ z, torch.zeros(30, dtype=D), solver=SOLVER, adjoint=adjoint, tol=1e-10,
        max_iter=500, adjoint_options={"max_iter": 1}, on_failure="raise",
    )
    with pytest.raises(implicit.ConvergenceError, match=f"adjoint solve \\({adjoint}\\) did not converge"):
        torch.autograd.grad(z.sum(), b)


def test_demo_marks_symmetric_adjoints() -> None:
    # The demo's equilibrium is not symmetric: cg runs, is marked, and is not judged by --check.
    from implicit._cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            ["demo", "--solvers", "fixed_point", "--adjoints", "exact,cg", "--repeat", "1", "-q", "--check"],
            stdout=out,
            stderr=err,
        )
    text = out.getvalue()
    assert code == 0, text
    statuses = {line.split()[1]: line.split()[2] for line in text.splitlines() if line.startswith("fixed_point ")}
    assert statuses == {"exact": "ok", "cg": "symmetric"}
    assert "adjoint for symmetric Jacobians" in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("adjoint", SYMMETRIC_ADJOINTS)
def test_half_precision_argmin(dtype: torch.dtype, adjoint: str) -> None:
    # Hessian diag(cosh(z - θ)) + I, separable: κ = ‖H⁻¹‖·‖∂²f/∂z∂θ‖ ≤ 1, so the error is about tol + u.
    def run(dt: torch.dtype, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        theta = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=dt, requires_grad=True)
        z = implicit.argmin(
            lambda z: (torch.cosh(z - theta) + 0.5 * z**2).sum(),
            torch.zeros(4, dtype=dt),
            solver=SOLVER,
            adjoint=adjoint,
            tol=tol,
            on_failure="raise",
        )
        (g,) = torch.autograd.grad(z.sum(), theta)
        return z, g

    _, want = run(D, 1e-12)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    z, got = run(dtype, tol)
    assert z.dtype == got.dtype == dtype
    unit = torch.finfo(dtype).eps / 2
    assert float((got.double() - want).norm() / want.norm()) <= 4.0 * (tol + unit)


@pytest.mark.parametrize("adjoint", SYMMETRIC_ADJOINTS)
def test_empty_batch_and_no_grad(adjoint: str) -> None:
    theta = torch.tensor(0.5, dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.argmin(lambda z: ((z - theta) ** 2).sum(1), batched=True)
    sol = implicit.solve(problem, torch.zeros(0, 3, dtype=D), solver=SOLVER, adjoint=adjoint, on_failure="raise")
    assert sol.converged and sol.z.shape == (0, 3)
    (g,) = torch.autograd.grad(sol.z.sum(), theta)
    assert g.item() == 0.0
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            z = implicit.argmin(lambda z: ((z - theta) ** 2).sum(), torch.zeros(3, dtype=D), solver=SOLVER, adjoint=adjoint)
        assert not z.requires_grad
        torch.testing.assert_close(z, torch.full((3,), 0.5, dtype=D))


def test_inference_mode_with_inference_tensors_in_the_objective() -> None:
    with torch.inference_mode():
        target = torch.linspace(-1, 1, 4, dtype=D)  # an inference tensor: autograd cannot save it
        z = implicit.argmin(lambda z: (torch.cosh(z - target) * target.exp()).sum(), torch.zeros(4, dtype=D), solver=SOLVER, tol=1e-12)
        torch.testing.assert_close(z, target)
