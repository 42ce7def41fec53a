"""Batched GMRES, the ``gmres`` adjoint, ``newton_krylov`` and the ``scipy`` bridge.

Every answer is compared with an independent dense float64 reference written
here: Newton's method with Jacobians from ``torch.func.jacrev`` and dense
solves, and the implicit function theorem with ``torch.linalg.solve``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit._krylov import gmres
from implicit._monitor import Monitor
from implicit._structure import Structure

DT = torch.float64


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def dense_newton(F, z0: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """Root of ``F`` (one sample, flat float64 vector) by Newton with a materialised Jacobian."""
    z = z0.detach().clone()
    for _ in range(steps):
        r = F(z)
        if float(r.norm()) <= 1e-15 * (1 + float(z.norm())):
            break
        J = torch.func.jacrev(F)(z)
        z = z - torch.linalg.solve(J, r)
    assert float(F(z).norm()) <= 1e-13 * (1 + float(z.norm())), "reference Newton did not converge"
    return z


def bmv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A_b v_b`` for every row ``b``."""
    return (A * v[:, None, :]).sum(-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------
# Batched GMRES
# ---------------------------------------------------------------------------


def _block_system(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 2 I + E with ‖E‖ about 1: nonsymmetric and well conditioned.
    A = 2 * torch.eye(size, dtype=DT) + 0.5 * torch.randn(batch, size, size, generator=g, dtype=DT) / size**0.5
    b = torch.randn(batch, size, generator=g, dtype=DT)
    return A, b


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    size=st.integers(1, 12),
    restart=st.integers(1, 15),
    seed=st.integers(0, 2**16),
    warm=st.booleans(),
)
def test_gmres_matches_dense_solve(batch: int, size: int, restart: int, seed: int, warm: bool) -> None:
    A, b = _block_system(batch, size, seed)
    x0 = torch.randn(batch, size, dtype=DT) if warm else None
    result = gmres(lambda v: bmv(A, v), b, x0, restart=restart, tol=1e-12, max_iter=2000)
    reference = torch.linalg.solve(A, b)
    assert bool(result.converged.all())
    assert rel_err(result.x, reference) < 1e-10
    true_residual = torch.linalg.vector_norm(b - bmv(A, result.x), dim=1)
    assert bool((true_residual <= 1e-12 * b.norm(dim=1) * 1.0001).all())
    torch.testing.assert_close(result.residual, true_residual, rtol=1e-6, atol=1e-30)


def test_gmres_restarted_nonnormal_and_per_sample_tolerance() -> None:
    torch.manual_seed(1)
    batch, size = 3, 40
    A = torch.eye(size, dtype=DT) * 1.5 + torch.randn(batch, size, size, dtype=DT) / size**0.5
    A[1] += torch.diag(torch.full((size - 1,), 0.8, dtype=DT), 1)  # a non-normal sample
    b = torch.randn(batch, size, dtype=DT)
    tol = torch.tensor([1e-4, 1e-12, 1e-8], dtype=DT)
    result = gmres(lambda v: bmv(A, v), b, restart=7, tol=tol, max_iter=5000)
    assert bool(result.converged.all())
    residual = torch.linalg.vector_norm(b - bmv(A, result.x), dim=1)
    assert bool((residual <= tol * b.norm(dim=1) * 1.0001).all())
    # The loose sample stopped early: it is far less accurate than the tight one.
    errors = (result.x - torch.linalg.solve(A, b)).norm(dim=1) / torch.linalg.solve(A, b).norm(dim=1)
    assert errors[1] < 1e-10 and errors[0] > 1e-9


def test_gmres_converged_samples_stop_changing() -> None:
    torch.manual_seed(2)
    size = 12
    A = torch.eye(size, dtype=DT).repeat(2, 1, 1)
    A[1] += torch.randn(size, size, dtype=DT) / size**0.5
    b = torch.randn(2, size, dtype=DT)
    seen: list[torch.Tensor] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.clone())
        return bmv(A, v)

    monitor = Monitor(Structure(b, True), tol=1e-12, atol=0.0, max_iter=100, reference=b.norm(dim=1))
    x = gmres(matvec, b, restart=30, monitor=monitor).x
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-11, atol=0)
    history = monitor.history
    # Sample 0 (A = I) converges after one step; sample 1 needs many more.
    assert float(history[1, 0]) <= 1e-12 * float(b[0].norm())
    assert len(history) > 5
    # Afterwards its residual and its Krylov vectors are frozen.
    assert bool((history[1:-1, 0] == history[1, 0]).all())
    assert all(bool((v[0] == 0).all()) for v in seen[1:-1])
    assert monitor.iterations == len(seen) - 1  # one Arnoldi step per product, plus the final confirmation


def test_gmres_happy_breakdown_and_zero_rhs() -> None:
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=DT)).repeat(3, 1, 1)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=DT)
    result = gmres(lambda v: bmv(A, v), b, restart=10, tol=1e-14)
    assert bool(torch.isfinite(result.x).all())
    torch.testing.assert_close(result.x, b / torch.tensor([2.0, 3.0, 4.0], dtype=DT), rtol=1e-14, atol=0)
    assert result.iterations <= 3


def test_gmres_input_validation() -> None:
    mv = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="restart"):
        gmres(mv, torch.ones(2, 3, dtype=DT), restart=0)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        gmres(mv, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="x0 has shape"):
        gmres(mv, torch.ones(2, 3, dtype=DT), torch.ones(3, 2, dtype=DT))
    b = torch.ones(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="reference=None"):
        gmres(mv, b, monitor=Monitor(Structure(b, True), tol=1e-6, atol=0.0, max_iter=10))


def test_gmres_non_finite_product_is_named() -> None:
    """A product that turns NaN stops the solve at the next true residual, named by variable."""
    A, b = _block_system(3, 10, seed=4)
    z0 = {"x": torch.zeros(3, 4, dtype=DT), "y": torch.zeros(3, 6, dtype=DT)}

    def matvec(v: torch.Tensor) -> torch.Tensor:
        out = bmv(A, v)
        out[1, 5] = float("nan")  # sample 1, first entry of z['y']
        return out

    monitor = Monitor(Structure(z0, True), tol=1e-10, atol=0.0, max_iter=100, reference=b.norm(dim=1))
    result = gmres(matvec, b, restart=6, monitor=monitor)
    assert monitor.nonfinite == ["z['y']"]
    assert monitor.iterations == 6  # the first cycle's last step computes the true residual
    assert bool(torch.isfinite(result.x).all())


# ---------------------------------------------------------------------------
# Problem 1: z = A z + b + 0.1 tanh(z), A with eigenvalues 1.5 and -1.3
# ---------------------------------------------------------------------------

N1, B1 = 6, 3


def _expanding_params(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N1, N1, generator=g, dtype=DT))
    eig = torch.tensor([1.5, -1.3, 0.5, 0.2, -0.4, 0.7], dtype=DT)
    A = (Q @ torch.diag(eig) @ Q.T).requires_grad_()
    b = torch.randn(B1, N1, generator=g, dtype=DT).requires_grad_()
    return A, b


def _expanding_map(A: torch.Tensor, b: torch.Tensor):
    return lambda z: z @ A.T + b + 0.1 * torch.tanh(z)


def _expanding_reference(A: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fixed points and the gradient of ``Σ w·z*`` w.r.t. ``(A, b)`` by the dense IFT."""
    A0, b0 = A.detach(), b.detach()
    zs, grad_A, grad_b = [], torch.zeros_like(A0), torch.zeros_like(b0)
    for i in range(B1):

        def F(z, A_=A0, b_=b0[i]):
            return A_ @ z + b_ + 0.1 * torch.tanh(z) - z

        z = dense_newton(F, torch.zeros(N1, dtype=DT))
        J = torch.func.jacrev(F)(z)
        # ∂z*/∂θ = -J⁻¹ ∂F/∂θ, so the gradient is -(J⁻ᵀ w)ᵀ ∂F/∂θ.
        u = torch.linalg.solve(J.T, w[i])
        J_A = torch.func.jacrev(lambda A_, z_=z, i_=i: F(z_, A_, b0[i_]))(A0)  # (N, N, N)
        grad_A -= torch.einsum("i,ijk->jk", u, J_A)
        grad_b[i] = -u  # ∂F/∂b_i = I
        zs.append(z)
    return torch.stack(zs), [grad_A, grad_b]


def _spectral_radius_at(A: torch.Tensor, z: torch.Tensor) -> float:
    J = A.detach() + 0.1 * torch.diag(1 - torch.tanh(z) ** 2)
    return float(torch.linalg.eigvals(J).abs().max())


SOLVERS = [
    ("newton_krylov", {}),
    ("scipy", {"method": "hybr"}),
    ("scipy", {"method": "krylov"}),
]


@pytest.mark.parametrize(("solver", "options"), SOLVERS, ids=["newton_krylov", "scipy-hybr", "scipy-krylov"])
@pytest.mark.parametrize("adjoint", ["exact", "gmres"])
def test_expanding_fixed_point_solution_and_gradient(solver: str, options: dict, adjoint: str) -> None:
    A, b = _expanding_params()
    w = torch.randn(B1, N1, generator=torch.Generator().manual_seed(5), dtype=DT)
    z_ref, grads_ref = _expanding_reference(A, b, w)
    assert min(_spectral_radius_at(A, z) for z in z_ref) > 1.4  # Picard cannot converge here
    problem = implicit.ImplicitProblem.fixed_point(_expanding_map(A, b), batched=True)
    sol = implicit.solve(
        problem,
        torch.zeros(B1, N1, dtype=DT),
        solver=solver,
        adjoint=adjoint,
        tol=1e-12,
        max_iter=100,
        solver_options=options,
        on_failure="raise",
    )
    assert sol.converged and sol.stats.solver == solver
    assert rel_err(sol.z, z_ref) < 1e-11
    grads = torch.autograd.grad((w * sol.z).sum(), (A, b))
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-8
    assert sol.adjoint_stats is not None and bool(sol.adjoint_stats.converged.all())


def test_expanding_fixed_point_defeats_picard_and_neumann() -> None:
    # Controls for the test above: the plain iterations do diverge on this problem.
    A, b = _expanding_params()
    problem = implicit.ImplicitProblem.fixed_point(_expanding_map(A, b), batched=True)
    with pytest.warns(implicit.ConvergenceWarning):
        implicit.solve(problem, torch.zeros(B1, N1, dtype=DT), solver="fixed_point", tol=1e-10, max_iter=50)
    sol = implicit.solve(
        problem,
        torch.zeros(B1, N1, dtype=DT),
        solver="newton_krylov",
        adjoint="neumann",
        tol=1e-12,
        adjoint_options={"max_iter": 50},
    )
    with pytest.warns(implicit.ConvergenceWarning):
        sol.z.sum().backward()


def test_gmres_adjoint_stats_and_restart() -> None:
    A, b = _expanding_params()
    w = torch.randn(B1, N1, generator=torch.Generator().manual_seed(5), dtype=DT)
    _, grads_ref = _expanding_reference(A, b, w)
    problem = implicit.ImplicitProblem.fixed_point(_expanding_map(A, b), batched=True)
    # restart=4 forces several restart cycles on a 6-dimensional system.
    sol = implicit.solve(
        problem,
        torch.zeros(B1, N1, dtype=DT),
        solver="newton_krylov",
        adjoint="gmres",
        tol=1e-12,
        adjoint_options={"restart": 4, "max_iter": 500},
    )
    grads = torch.autograd.grad((w * sol.z).sum(), (A, b))
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-8
    stats = sol.adjoint_stats
    assert stats is not None and stats.solver == "gmres"
    assert stats.iterations > 6  # more than one cycle was needed
    # Products with M: one per Arnoldi step plus one true residual per restart and at the end.
    assert stats.nfe >= stats.iterations
    assert stats.history.shape[1] == B1 and bool(stats.converged.all())
    assert bool((stats.history[-1] == stats.residual).all())


def test_gmres_adjoint_forward_mode() -> None:
    A, b = _expanding_params()
    problem = lambda A_, b_: (
        implicit.solve(  # noqa: E731
            implicit.ImplicitProblem.fixed_point(_expanding_map(A_, b_), batched=True),
            torch.zeros(B1, N1, dtype=DT),
            solver="newton_krylov",
            adjoint="gmres",
            tol=1e-12,
        ).z
    )
    tangent = torch.randn(B1, N1, dtype=DT, generator=torch.Generator().manual_seed(3))
    _, out = torch.func.jvp(lambda b_: problem(A.detach(), b_), (b.detach(),), (tangent,))
    # Reference: dz/db = (I - ∂f/∂z)⁻¹ per sample.
    z_ref, _ = _expanding_reference(A, b, torch.ones(B1, N1, dtype=DT))
    for i in range(B1):
        J = A.detach() + 0.1 * torch.diag(1 - torch.tanh(z_ref[i]) ** 2)
        assert rel_err(out[i], torch.linalg.solve(torch.eye(N1, dtype=DT) - J, tangent[i])) < 1e-9


@pytest.mark.parametrize("solver", ["newton_krylov", "scipy"])
def test_second_derivative_through_gmres_adjoint(solver: str) -> None:
    A, b = _expanding_params()
    A, b = A.detach(), b.detach()[0]
    w = torch.randn(N1, generator=torch.Generator().manual_seed(5), dtype=DT)
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    z = implicit.fixed_point(
        lambda z: A @ z + s * b + 0.1 * torch.tanh(z),
        torch.zeros(N1, dtype=DT),
        solver=solver,
        adjoint="gmres",
        tol=1e-13,
    )
    (d1,) = torch.autograd.grad(w @ z, s, create_graph=True)
    (d2,) = torch.autograd.grad(d1, s)
    # Closed form: F(z, s) = (A - I) z + s b + 0.1 tanh z = 0, so J z' = -b and
    # J z'' = -0.1 tanh''(z) z'² with tanh'' = -2 tanh sech².
    z_ref = dense_newton(lambda z: A @ z + 0.7 * b + 0.1 * torch.tanh(z) - z, torch.zeros(N1, dtype=DT))
    t = torch.tanh(z_ref)
    J = A - torch.eye(N1, dtype=DT) + 0.1 * torch.diag(1 - t**2)
    z1 = torch.linalg.solve(J, -b)
    z2 = torch.linalg.solve(J, -0.1 * (-2 * t * (1 - t**2)) * z1**2)
    assert abs(float(d1.detach()) - float(w @ z1)) <= 1e-8 * abs(float(w @ z1))
    assert abs(float(d2) - float(w @ z2)) <= 1e-8 * abs(float(w @ z2))


# ---------------------------------------------------------------------------
# Problem 2: a coupled dict state {x: (4, 3), y: (4, 5)}
# ---------------------------------------------------------------------------

B2, NX, NY = 4, 3, 5


def _dict_params(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {
        "Wxx": 0.4 * torch.randn(NX, NX, generator=g, dtype=DT),
        "Wxy": 0.6 * torch.randn(NX, NY, generator=g, dtype=DT),
        "Wyx": 0.6 * torch.randn(NY, NX, generator=g, dtype=DT),
        # The y block alone expands (eigenvalue 1.3): neither Picard nor Neumann converge.
        "Wyy": 1.3 * torch.eye(NY, dtype=DT) + 0.1 * torch.randn(NY, NY, generator=g, dtype=DT),
        "ux": torch.randn(B2, NX, generator=g, dtype=DT),
        "uy": torch.randn(B2, NY, generator=g, dtype=DT),
    }
    return {k: v.requires_grad_() for k, v in p.items()}


def _dict_map(p: dict[str, torch.Tensor]):
    def f(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = z["x"], z["y"]
        return {
            "x": torch.tanh(x @ p["Wxx"].T + y @ p["Wxy"].T + p["ux"]),
            "y": 0.5 * torch.tanh(x @ p["Wyx"].T) + y @ p["Wyy"].T + p["uy"],
        }

    return f


def _dict_reference(p: dict[str, torch.Tensor], wx: torch.Tensor, wy: torch.Tensor):
    """Per-sample dense Newton on the concatenated (x, y) and the dense IFT gradient."""
    q = {k: v.detach() for k, v in p.items()}
    names = list(p)
    grads = {k: torch.zeros_like(v) for k, v in q.items()}
    xs, ys = [], []
    for i in range(B2):

        def F(s, q_=q, i_=i):
            x, y = s[:NX], s[NX:]
            fx = torch.tanh(q_["Wxx"] @ x + q_["Wxy"] @ y + q_["ux"][i_])
            fy = 0.5 * torch.tanh(q_["Wyx"] @ x) + q_["Wyy"] @ y + q_["uy"][i_]
            return torch.cat([fx, fy]) - s

        s = dense_newton(F, torch.zeros(NX + NY, dtype=DT))
        J = torch.func.jacrev(F)(s)
        u = torch.linalg.solve(J.T, torch.cat([wx[i], wy[i]]))
        for k in names:
            Jk = torch.func.jacrev(lambda t, k_=k, s_=s: F(s_, {**q, k_: t}))(q[k])  # (N, *shape)
            grads[k] -= torch.tensordot(u, Jk, dims=1)
        xs.append(s[:NX])
        ys.append(s[NX:])
    return torch.stack(xs), torch.stack(ys), [grads[k] for k in names]


DICT_SOLVERS = SOLVERS + [("scipy", {"method": "lm"})]


@pytest.mark.parametrize(
    ("solver", "options"), DICT_SOLVERS, ids=["newton_krylov", "scipy-hybr", "scipy-krylov", "scipy-lm"]
)
@pytest.mark.parametrize("adjoint", ["exact", "gmres"])
def test_dict_problem_solution_and_gradient(solver: str, options: dict, adjoint: str) -> None:
    p = _dict_params()
    g = torch.Generator().manual_seed(11)
    wx, wy = torch.randn(B2, NX, generator=g, dtype=DT), torch.randn(B2, NY, generator=g, dtype=DT)
    x_ref, y_ref, grads_ref = _dict_reference(p, wx, wy)
    z0 = {"x": torch.zeros(B2, NX, dtype=DT), "y": torch.zeros(B2, NY, dtype=DT)}
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(_dict_map(p), batched=True),
        z0,
        solver=solver,
        adjoint=adjoint,
        tol=1e-12,
        max_iter=400,  # scipy's krylov needs 258 iterations on sample 0
        solver_options=options,
        on_failure="raise",
    )
    assert sol.converged and set(sol.z) == {"x", "y"}
    assert rel_err(sol.z["x"], x_ref) < 1e-11 and rel_err(sol.z["y"], y_ref) < 1e-11
    grads = torch.autograd.grad((wx * sol.z["x"]).sum() + (wy * sol.z["y"]).sum(), list(p.values()))
    for g_, g_ref in zip(grads, grads_ref):
        assert rel_err(g_, g_ref) < 1e-8


def test_dict_problem_defeats_neumann_but_not_gmres() -> None:
    p = _dict_params()
    z0 = {"x": torch.zeros(B2, NX, dtype=DT), "y": torch.zeros(B2, NY, dtype=DT)}
    problem = implicit.ImplicitProblem.fixed_point(_dict_map(p), batched=True)
    sol = implicit.solve(
        problem, z0, solver="newton_krylov", adjoint="neumann", tol=1e-12, adjoint_options={"max_iter": 60}
    )
    with pytest.warns(implicit.ConvergenceWarning):
        torch.autograd.grad(sol.z["y"].sum(), p["uy"])
    sol = implicit.solve(problem, z0, solver="newton_krylov", adjoint="gmres", tol=1e-12)
    torch.autograd.grad(sol.z["y"].sum(), p["uy"])  # no warning: converted to an error by the config
    assert sol.adjoint_stats is not None and bool(sol.adjoint_stats.converged.all())


# ---------------------------------------------------------------------------
# newton_krylov specifics
# ---------------------------------------------------------------------------


def test_newton_krylov_line_search_per_sample() -> None:
    # Newton on arctan overshoots and diverges from |z0| > 1.39; the line search rescues it.
    z0 = torch.tensor([0.5, 2.0, -3.0, 10.0], dtype=DT)
    problem = implicit.ImplicitProblem(torch.atan, batched=True)
    sol = implicit.solve(problem, z0, solver="newton_krylov", tol=1e-10, max_iter=60, on_failure="raise")
    assert sol.converged
    assert float(sol.z.abs().max()) <= 1e-10
    # Control: full Newton steps throw the far samples off to |z| → ∞ (where the relative
    # tolerance is eventually met: |atan z| ≤ π/2 ≤ tol·|z|), never to the root.
    plain = implicit.solve(
        problem,
        z0,
        solver="newton_krylov",
        tol=1e-10,
        max_iter=20,
        on_failure="ignore",
        solver_options={"line_search": False},
    )
    assert float(plain.z[0].abs()) <= 1e-10
    assert bool((plain.z[1:].abs() > 1e3).all())


def test_newton_krylov_counts_evaluations_and_freezes_samples() -> None:
    calls: list[int] = []

    def F(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return z**3 - torch.tensor([8.0, 1.0, 27.0], dtype=DT)

    with torch.no_grad():  # no graph to attach: every call of F is the solver's
        sol = implicit.solve(
            implicit.ImplicitProblem(F, batched=True),
            torch.tensor([2.0, 3.0, 1.0], dtype=DT),
            solver="newton_krylov",
            tol=1e-13,
        )
    torch.testing.assert_close(sol.z, torch.tensor([2.0, 1.0, 3.0], dtype=DT), rtol=1e-13, atol=0)
    # Every call of F is counted, those made by Jacobian-vector products included.
    assert sol.stats.nfe == len(calls)
    # Sample 0 starts at its root: its residual history stays exactly zero.
    assert bool((sol.stats.history[:, 0] == 0).all())
    assert sol.stats.history.shape == (sol.stats.iterations + 1, 3)


def test_newton_krylov_constant_forcing_and_unbatched() -> None:
    M = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=DT)
    c = torch.tensor([1.0, -2.0], dtype=DT)
    for forcing in ("constant", "eisenstat_walker"):
        z = implicit.root(
            lambda z: M @ z + 0.1 * z**3 - c,
            torch.zeros(2, dtype=DT),
            solver="newton_krylov",
            tol=1e-13,
            max_iter=200,
            solver_options={"forcing": forcing, "eta_max": 0.5},
        )
        ref = dense_newton(lambda z: M @ z + 0.1 * z**3 - c, torch.zeros(2, dtype=DT))
        assert rel_err(z, ref) < 1e-12


@pytest.mark.parametrize("solver", ["newton_krylov", "scipy"])
def test_scalar_float32_root(solver: str) -> None:
    # A 0-dim float32 state: forward AD of z**3 there yields a float64 tangent in torch.
    s = torch.tensor(8.0, requires_grad=True)
    z = implicit.root(lambda z: z**3 - s, torch.tensor(1.0), solver=solver, tol=1e-6)
    assert z.dtype == torch.float32 and z.shape == ()
    assert abs(float(z.detach()) - 2.0) <= 1e-5
    (g,) = torch.autograd.grad(z, s)
    assert abs(float(g) - 1 / 12) <= 1e-5  # dz/ds = 1 / (3 z²)


# ---------------------------------------------------------------------------
# scipy bridge specifics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hybr", "lm", "krylov", "broyden1", "broyden2", "anderson", "df-sane"])
def test_scipy_methods_on_contractive_batch(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    W = 0.3 * torch.randn(8, 8, generator=g, dtype=DT)
    u = torch.randn(5, 8, generator=g, dtype=DT)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + u)

    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(f, batched=True),
        torch.zeros(5, 8, dtype=DT),
        solver="scipy",
        solver_options={"method": method},
        tol=1e-10,
        max_iter=200,
        on_failure="raise",
    )
    refs = torch.stack(
        [dense_newton(lambda z, i=i: torch.tanh(W @ z + u[i]) - z, torch.zeros(8, dtype=DT)) for i in range(5)]
    )
    assert rel_err(sol.z, refs) < 1e-9
    assert bool((sol.stats.residual <= 1e-10 * sol.z.norm(dim=1) + 1e-12).all())


def test_scipy_float32_state_keeps_dtype() -> None:
    W = torch.tensor([[0.2, -0.1], [0.3, 0.1]])
    z = implicit.fixed_point(lambda z: torch.tanh(W @ z + 1.0), torch.zeros(2), solver="scipy", tol=1e-5)
    assert z.dtype == torch.float32
    ref = dense_newton(lambda z: torch.tanh(W.double() @ z + 1.0) - z, torch.zeros(2, dtype=DT))
    assert rel_err(z.double(), ref) < 1e-6


def test_scipy_failure_is_reported() -> None:
    # z² + 1 has no real root.
    with pytest.warns(implicit.ConvergenceWarning, match=r"forward solve \(scipy\) did not converge") as caught:
        implicit.root(lambda z: z**2 + 1, torch.ones(3, dtype=DT), solver="scipy", tol=1e-10)
    assert caught[0].message.reason.startswith("scipy.optimize.root(method='hybr') stopped on sample 0")


def test_scipy_user_options_pass_through() -> None:
    # A budget of 2 evaluations cannot solve this; the user's maxfev wins over max_iter.
    with pytest.warns(implicit.ConvergenceWarning):
        implicit.root(
            lambda z: z**3 - 8.0,
            torch.ones(1, dtype=DT),
            solver="scipy",
            tol=1e-12,
            solver_options={"method": "hybr", "scipy_options": {"maxfev": 2}},
        )


# ---------------------------------------------------------------------------
# Option validation
# ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ("solver", "newton_krylov", {"restart": 0}, "restart"),
    ("solver", "newton_krylov", {"restart": True}, "restart"),
    ("solver", "newton_krylov", {"max_inner": 0}, "max_inner"),
    ("solver", "newton_krylov", {"eta_max": 1.0}, "eta_max"),
    ("solver", "newton_krylov", {"eta_max": 0.0}, "eta_max"),
    ("solver", "newton_krylov", {"forcing": "ew3"}, "forcing"),
    ("solver", "newton_krylov", {"line_search": 1}, "line_search"),
    ("solver", "newton_krylov", {"max_backtracks": -1}, "max_backtracks"),
    ("solver", "newton_krylov", {"restrat": 5}, "did you mean 'restart'"),
    ("solver", "scipy", {"method": "hybrd"}, "did you mean 'hybr'"),
    ("solver", "scipy", {"method": "newton"}, "method must be one of"),
    ("solver", "scipy", {"scipy_options": {"xtoll": 1e-3}}, "did you mean 'xtol'"),
    ("solver", "scipy", {"method": "krylov", "scipy_options": {"maxfev": 3}}, "maxfev"),
    ("solver", "scipy", {"scipy_options": [("xtol", 1e-3)]}, "scipy_options"),
    ("adjoint", "gmres", {"restart": 0}, "restart"),
    ("adjoint", "gmres", {"restart": 2.5}, "restart"),
    ("adjoint", "gmres", {"tol": -1.0}, "tol"),
    ("adjoint", "gmres", {"max_iter": -1}, "max_iter"),
]


@pytest.mark.parametrize(("kind", "name", "options", "match"), BAD_OPTIONS)
def test_bad_options(kind: str, name: str, options: dict, match: str) -> None:
    problem = implicit.ImplicitProblem(lambda z: z - 1.0)
    kwargs = {"solver_options": options} if kind == "solver" else {"adjoint_options": options}
    spec = {kind: name}
    with pytest.raises(ValueError, match=match):
        implicit.solve(problem, torch.zeros(2, dtype=DT), **spec, **kwargs)


def test_registered_names() -> None:
    assert {"newton_krylov", "scipy"} <= set(implicit.available_solvers())
    assert "gmres" in implicit.available_adjoints()
    assert implicit.get_adjoint("gmres")().restart is None  # the unknowns per sample, capped
    assert issubclass(implicit.get_solver("scipy"), implicit.Solver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicit.get_solver("newton_krylov")(restart=5, max_inner=10)


class _CubeOnce(torch.autograd.Function):
    """``z³`` with a forward-mode rule and a backward that cannot be differentiated again."""

    @staticmethod
    def forward(z: torch.Tensor) -> torch.Tensor:
        return z**3

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (z,) = ctx.saved_tensors
        return 3 * z**2 * g

    @staticmethod
    def jvp(ctx, t):  # type: ignore[no-untyped-def]
        (z,) = ctx.saved_tensors
        return 3 * z**2 * t


def test_newton_krylov_products_from_the_graph_equal_forward_mode() -> None:
    from implicit.newton import Linearisation as _JacobianProduct

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, dtype=DT, generator=g) / 3
    x = torch.randn(4, 6, dtype=DT, generator=g)
    problem = implicit.ImplicitProblem(lambda z: torch.tanh(z @ W.T + x) * z - 0.3 * z**3, batched=True)
    z = torch.randn(4, 6, dtype=DT, generator=g)
    system = problem.bind(z)
    v = torch.randn(4, 6, dtype=DT, generator=g)
    with torch.no_grad():
        product = _JacobianProduct(system, z)
        assert product.graph is not None
        got = product(v)
        assert product.graph is not None  # still the graph's
    want = torch.func.jvp(system.residual, (z,), (v,))[1]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_newton_krylov_falls_back_to_forward_mode_without_double_backward() -> None:
    from implicit.newton import Linearisation as _JacobianProduct

    c = torch.tensor([8.0, 1.0, 27.0], dtype=DT)
    z = torch.tensor([1.5, 3.0, 2.0], dtype=DT)
    system = implicit.ImplicitProblem(lambda z: _CubeOnce.apply(z) - c, batched=True).bind(z)
    with torch.no_grad():
        product = _JacobianProduct(system, z[:, None])
        torch.testing.assert_close(product(torch.ones(3, 1, dtype=DT)), 3 * z[:, None] ** 2)
    assert product.graph is None  # the graph's product failed: forward mode from then on
    sol = implicit.solve(
        implicit.ImplicitProblem(lambda z: _CubeOnce.apply(z) - c, batched=True),
        torch.tensor([1.5, 3.0, 2.0], dtype=DT),
        solver="newton_krylov",
        tol=1e-13,
        on_failure="raise",
    )
    torch.testing.assert_close(sol.z, torch.tensor([2.0, 1.0, 3.0], dtype=DT), rtol=1e-13, atol=0)


def test_newton_krylov_graphs_are_hidden_from_the_callers_saved_tensor_hooks() -> None:
    seen = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += 1
        return t

    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = implicit.solve(
            implicit.ImplicitProblem(lambda z: torch.tanh(z) + z**3 - 1.0, batched=True),
            torch.zeros(3, 4, dtype=DT),
            solver="newton_krylov",
            tol=1e-12,
        )
    assert sol.converged and sol.stats.iterations > 1
    assert seen == 0


def test_newton_krylov_evaluates_once_per_full_newton_step() -> None:
    # Near the root every sample takes the full step: the line search's evaluation, recorded
    # with its graph, serves the next step's products, so each Newton step costs one evaluation.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, dtype=DT, generator=g) / 6
    x = torch.randn(4, 6, dtype=DT, generator=g)
    F = lambda z: z - torch.tanh(z @ W.T + x)  # noqa: E731
    sol = implicit.solve(implicit.ImplicitProblem(F, batched=True), x.clone(), solver="newton_krylov", tol=1e-12)
    assert sol.converged and sol.stats.iterations >= 2
    assert sol.stats.nfe == sol.stats.iterations + 1
    torch.testing.assert_close(F(sol.z.detach()), torch.zeros_like(x), rtol=0, atol=1e-11)
