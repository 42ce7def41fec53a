"""The optimisation interface: problem forms, the System's objective methods, batched CG and MINRES."""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit._cg import cg, minres, tolerance
from implicit._krylov import Tolerance
from implicit._monitor import Monitor

D = torch.float64


def spd(n: int, batch: int = 1, shift: float = 0.5) -> torch.Tensor:
    q = torch.randn(batch, n, n, dtype=D)
    return q @ q.mT / n + shift * torch.eye(n, dtype=D)


def indefinite(n: int, batch: int = 1) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(batch, n, n, dtype=D))[0]
    eig = torch.linspace(-2.0, 3.0, n, dtype=D) + 0.17  # no eigenvalue near zero
    return q @ torch.diag_embed(eig.expand(batch, n)) @ q.mT


def apply(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


# -- problem forms ---------------------------------------------------------------------------------


def test_forms_and_defaults() -> None:
    root = implicit.ImplicitProblem(lambda z: z)
    fp = implicit.ImplicitProblem.fixed_point(lambda z: z)
    am = implicit.ImplicitProblem.argmin(lambda z: (z**2).sum())
    ls = implicit.ImplicitProblem.least_squares(lambda z: z - 1)
    assert [p.form for p in (root, fp, am, ls)] == ["root", "fixed_point", "argmin", "least_squares"]
    assert (root.default_solver, root.default_adjoint) == (None, None)
    assert (fp.default_solver, fp.default_adjoint) == (None, None)
    assert (am.default_solver, am.default_adjoint) == ("lbfgs", "cg")
    assert (ls.default_solver, ls.default_adjoint) == ("levenberg_marquardt", "cg")
    assert fp.is_fixed_point and not am.is_fixed_point and not ls.is_fixed_point
    assert am.objective is not None and ls.residuals is not None and ls.objective is not None
    assert "argmin" in repr(am) and "least_squares" in repr(ls)


@pytest.mark.parametrize("ctor", [implicit.ImplicitProblem.argmin, implicit.ImplicitProblem.least_squares])
def test_not_callable(ctor) -> None:
    with pytest.raises(TypeError, match="callable"):
        ctor(3.0)


def quadratic(batched: bool):
    """½ zᵀAz − bᵀz over a dict {"x": (2,), "y": (3,)} (per sample when batched), coupling both."""
    B = 2 if batched else 1
    A, b = spd(5, B), torch.randn(B, 5, dtype=D)

    def objective(z):
        v = torch.cat([z["x"].reshape(B, -1), z["y"].reshape(B, -1)], dim=1)
        f = 0.5 * (v * apply(A)(v)).sum(1) - (b * v).sum(1)
        return f if batched else f[0]

    shape = (B,) if batched else ()
    z0 = {"x": torch.randn(*shape, 2, dtype=D), "y": torch.randn(*shape, 3, dtype=D)}
    return objective, z0, A, b


@pytest.mark.parametrize("batched", [False, True])
def test_system_objective_methods(batched: bool) -> None:
    objective, z0, A, b = quadratic(batched)
    system = implicit.ImplicitProblem.argmin(objective, batched=batched).bind(z0)
    z = system.structure.flatten(z0)
    v = torch.randn_like(z)
    assert system.form == "argmin"
    with torch.no_grad():
        f = system.objective(z)
        f2, g = system.value_and_grad(z)
        hv = system.hvp(z, v)
        r = system.residual(z)
        m = system.map(z)
        r2, jv = system.residual_jvp(z, v)
        f3, g3, hvp = system.value_grad_hvp(z)
    want_g = apply(A)(z) - b
    assert f.shape == (z.shape[0],)
    torch.testing.assert_close(f, 0.5 * (z * apply(A)(z)).sum(1) - (b * z).sum(1))
    torch.testing.assert_close(f2, f)
    torch.testing.assert_close(g, want_g)
    torch.testing.assert_close(r, want_g)
    torch.testing.assert_close(m, z - want_g)
    torch.testing.assert_close(hv, apply(A)(v))
    torch.testing.assert_close(r2, want_g)
    torch.testing.assert_close(jv, apply(A)(v))
    torch.testing.assert_close(f3, f)
    torch.testing.assert_close(g3, want_g)
    torch.testing.assert_close(hvp(v), apply(A)(v))
    torch.testing.assert_close(hvp(2 * v), 2 * apply(A)(v))
    assert not g.requires_grad and not hv.requires_grad
    assert system.nfe == 7  # one evaluation per call; products reuse the graph


def test_system_methods_under_torch_func() -> None:
    # The torch.func route to the gradient gives the same values as plain autograd.
    objective, z0, A, b = quadratic(False)
    system = implicit.ImplicitProblem.argmin(objective).bind(z0)
    z = system.structure.flatten(z0)
    v = torch.randn_like(z)
    g = torch.func.jvp(lambda t: system.value_and_grad(t)[1], (z,), (v,))[1]
    torch.testing.assert_close(g, apply(A)(v))
    hv = torch.func.jvp(lambda t: system.hvp(t, v), (z,), (v,))[0]
    torch.testing.assert_close(hv, apply(A)(v))
    with torch.inference_mode():
        torch.testing.assert_close(system.value_and_grad(z.clone())[1], apply(A)(z) - b)
        torch.testing.assert_close(system.hvp(z.clone(), v.clone()), apply(A)(v))


@pytest.mark.parametrize("batched", [False, True])
def test_least_squares_methods(batched: bool) -> None:
    B = 3 if batched else 1
    W = torch.randn(B, 4, 2, dtype=D)
    t = torch.randn(B, 3, dtype=D)

    def residuals(z):
        x = z["x"].reshape(B, 2)
        a = z["a"].reshape(B, 1)
        out = {"lin": (W @ x.unsqueeze(-1)).squeeze(-1) - 1.0, "nl": torch.sin(a * t) - t, "s": (x**2).sum(1, keepdim=True)}
        return out if batched else {k: v[0] for k, v in out.items()}

    shape = (B,) if batched else ()
    z0 = {"x": torch.randn(*shape, 2, dtype=D), "a": torch.randn(*shape, dtype=D) if batched else torch.randn((), dtype=D)}
    problem = implicit.ImplicitProblem.least_squares(residuals, batched=batched)
    system = problem.bind(z0)
    z = system.structure.flatten(z0)
    assert system.form == "least_squares"

    def rows(zf):
        out = residuals(system.structure.unflatten(zf))
        return torch.cat([v.reshape(B, -1) for v in out.values()], dim=1)

    want_r = rows(z)
    J = torch.autograd.functional.jacobian(rows, z)  # (B, M, B, N): block diagonal
    J = torch.stack([J[i, :, i] for i in range(B)])
    v = torch.randn_like(z)
    u = torch.randn_like(want_r)
    with torch.no_grad():
        r = system.lsq_residuals(z)
        r2, jvp, vjp = system.lsq_linearize(z)
        f, g = system.value_and_grad(z)
        hv = system.hvp(z, v)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(r2, want_r)
    torch.testing.assert_close(jvp(v), (J @ v.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(vjp(u), (J.mT @ u.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(f, 0.5 * (want_r**2).sum(1))
    torch.testing.assert_close(g, (J.mT @ want_r.unsqueeze(-1)).squeeze(-1))

    def half_square(i: int):  # ½‖r_i‖² as a function of sample i alone
        return lambda zi: 0.5 * (rows(torch.cat([z[:i], zi[None], z[i + 1 :]]))[i] ** 2).sum()

    H = torch.stack([torch.autograd.functional.hessian(half_square(i), z[i]) for i in range(B)])
    torch.testing.assert_close(hv, (H @ v.unsqueeze(-1)).squeeze(-1))


def test_wrong_form_and_bad_outputs() -> None:
    root = implicit.ImplicitProblem(lambda z: z).bind(torch.zeros(2, dtype=D))
    z = torch.zeros(1, 2, dtype=D)
    for method in ("objective", "value_and_grad"):
        with pytest.raises(ValueError, match="form is 'root'"):
            getattr(root, method)(z)
    with pytest.raises(ValueError, match="form is 'root'"):
        root.hvp(z, z)
    argmin = implicit.ImplicitProblem.argmin(lambda z: (z**2).sum()).bind(torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="least_squares problems only"):
        argmin.lsq_residuals(z)
    vector = implicit.ImplicitProblem.argmin(lambda z: z**2)
    with pytest.raises(ValueError, match=r"shape \(2,\); expected a scalar"):
        implicit.solve(vector, torch.zeros(2, dtype=D), solver="newton_krylov")
    batched = implicit.ImplicitProblem.argmin(lambda z: (z**2).sum(), batched=True)
    with pytest.raises(ValueError, match=r"expected \(3,\), one value per sample"):
        batched.bind(torch.zeros(3, 2, dtype=D)).objective(torch.zeros(3, 2, dtype=D))
    ragged = implicit.ImplicitProblem.least_squares(lambda z: {"a": z, "b": z[:2]}, batched=True)
    with pytest.raises(ValueError, match=r"r\['b'\] with shape \(2, 2\); expected dim 0 of size 3"):
        ragged.bind(torch.zeros(3, 2, dtype=D)).lsq_residuals(torch.zeros(3, 2, dtype=D))

    def inplace(z):
        z.mul_(0.5)
        return (z**2).sum()

    system = implicit.ImplicitProblem.argmin(inplace).bind(torch.ones(2, dtype=D))
    with torch.no_grad(), pytest.raises(ValueError, match="modified its input in place"):
        system.objective(torch.ones(1, 2, dtype=D))


@pytest.mark.parametrize("solver", ["newton_krylov", "anderson", "broyden"])
def test_root_solvers_run_argmin(solver: str) -> None:
    # Quadratic with closed-form minimum and gradient: z* = A⁻¹ b(θ), b = θ·c.
    A = spd(4)[0] + torch.eye(4, dtype=D)
    c = torch.randn(4, dtype=D)
    theta = torch.tensor(0.7, dtype=D, requires_grad=True)
    problem = implicit.ImplicitProblem.argmin(lambda z: 0.5 * z @ A @ z - theta * c @ z)
    opts = {"m": 5} if solver == "anderson" else None
    sol = implicit.solve(problem, torch.zeros(4, dtype=D), solver=solver, adjoint="gmres", tol=1e-11, max_iter=300, solver_options=opts)
    assert sol.converged
    want = torch.linalg.solve(A, c)
    torch.testing.assert_close(sol.z, theta.detach() * want)
    (grad,) = torch.autograd.grad(sol.z.sum(), theta)
    torch.testing.assert_close(grad, want.sum())


def test_solver_none_uses_defaults() -> None:
    problem = implicit.ImplicitProblem.argmin(lambda z: ((z - 2.0) ** 2).sum())
    sol = implicit.solve(problem, torch.zeros(3, dtype=D), tol=1e-10)
    expected = "lbfgs" if "lbfgs" in implicit.available_solvers() else "newton_krylov"
    assert sol.stats.solver == expected
    torch.testing.assert_close(sol.z, torch.full((3,), 2.0, dtype=D))
    root = implicit.solve(implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + 1), torch.zeros((), dtype=D), tol=1e-10)
    assert root.stats.solver == "anderson"


# -- conjugate gradients and MINRES ---------------------------------------------------------------


@pytest.mark.parametrize("x0", [False, True])
def test_cg_batched(x0: bool) -> None:
    A = spd(7, batch=4)
    b = torch.randn(4, 7, dtype=D)
    b[2] = 0.0  # a row solved at once
    start = torch.randn_like(b) if x0 else None
    out = cg(apply(A), b, tolerance(b, 1e-12, 1e-14), x0=start)
    want = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.x, want, rtol=1e-9, atol=1e-11)
    assert out.converged.all() and not out.negative_curvature.any()
    assert out.iterations <= 7 + 2  # n steps in exact arithmetic


def test_cg_negative_curvature_flagged() -> None:
    A = torch.cat([spd(5), indefinite(5)])
    b = torch.randn(2, 5, dtype=D)
    out = cg(apply(A), b, tolerance(b, 1e-12))
    assert out.negative_curvature.tolist() == [False, True]
    assert out.converged.tolist() == [True, False]
    p = out.direction[1]
    assert float(p @ A[1] @ p) <= 0 and float(p.norm()) > 0
    torch.testing.assert_close(out.x[0], torch.linalg.solve(A[0], b[0]))


def test_cg_with_monitor() -> None:
    A = spd(6, batch=3)
    b = torch.randn(3, 6, dtype=D)
    structure = implicit.ImplicitProblem(lambda z: z, batched=True).bind(torch.zeros(3, 6, dtype=D)).structure
    monitor = Monitor(structure, tol=1e-10, atol=0.0, max_iter=50, reference=torch.linalg.vector_norm(b, dim=1))
    out = cg(apply(A), b, monitor)
    assert bool(monitor.converged.all())
    torch.testing.assert_close(out.x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1))
    stats = monitor.stats("cg", 0, True)
    assert stats.iterations == out.iterations and stats.history.shape[0] == out.iterations + 1


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_minres_batched(kind: str) -> None:
    A = spd(8, batch=3) if kind == "spd" else indefinite(8, batch=3)
    b = torch.randn(3, 8, dtype=D)
    out = minres(apply(A), b, tolerance(b, 1e-11))
    want = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    assert out.converged.all()
    torch.testing.assert_close(out.x, want, rtol=1e-8, atol=1e-9)
    true = torch.linalg.vector_norm(b - apply(A)(out.x), dim=1)
    assert (true <= 1e-11 * torch.linalg.vector_norm(b, dim=1)).all()


def test_minres_x0_and_max_iter() -> None:
    A = indefinite(10)
    b = torch.randn(1, 10, dtype=D)
    x0 = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1) + 1e-3 * torch.randn(1, 10, dtype=D)
    out = minres(apply(A), b, tolerance(b, 1e-11), x0=x0)
    assert out.converged.all()
    short = minres(apply(A), b, Tolerance(1e-14 * torch.linalg.vector_norm(b, dim=1), 2))
    assert not short.converged.any()


def test_krylov_bad_inputs() -> None:
    b = torch.ones(2, 3, dtype=D)
    for solver in (cg, minres):
        with pytest.raises(ValueError, match=r"b must be a \(B, N\) tensor"):
            solver(lambda v: v, b[0], tolerance(b))
        with pytest.raises(ValueError, match="x0 has shape"):
            solver(lambda v: v, b, tolerance(b), x0=torch.ones(3, dtype=D))
