"""Anderson acceleration and limited-memory Broyden against closed forms and dense references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import f64, two_variable_map, two_variable_params, two_variable_z0
from reference import ift_grads, picard

import implicit

SOLVERS = ["anderson", "broyden"]
BATCH, NX, NY = 4, 3, 5
N = NX + NY


def _split(v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": v[:, :NX], "y": v[:, NX:]}


def _cat(z: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([z["x"], z["y"]], dim=1)


def _symmetric(eigs: list[float], seed: int) -> torch.Tensor:
    """A symmetric ``N x N`` matrix with the given eigenvalues (so spectral norm = radius)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=f64, generator=g))
    return (q * torch.tensor(eigs, dtype=f64)) @ q.T


def _rhs(seed: int = 7) -> torch.Tensor:
    return torch.randn(BATCH, N, dtype=f64, generator=torch.Generator().manual_seed(seed))


def _zeros(dtype: torch.dtype = f64) -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(BATCH, NX, dtype=dtype), "y": torch.zeros(BATCH, NY, dtype=dtype)}


def _linear_solution(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``z* = (I - A)⁻¹ b`` per sample, the fixed point of ``z ↦ A z + b``."""
    return torch.linalg.solve(torch.eye(N, dtype=f64) - A, b.T).T


# A contraction, and a map whose Jacobian has eigenvalues 1.5 and -1.3 (plain iteration diverges)
CONTRACTIVE = [0.6, -0.5, 0.4, 0.3, -0.2, 0.1, 0.5, -0.45]
EXPANSIVE = [1.5, -1.3, 0.5, -0.4, 0.3, 0.2, -0.1, 0.7]
# Spectral radius 0.9, plus 0.05 tanh: Picard contracts at a rate between 0.85 and 0.95
SLOW = [0.9, 0.85, -0.6, 0.5, 0.3, -0.2, 0.1, 0.7]


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_variable_matches_long_picard(solver: str) -> None:
    params = two_variable_params()
    f = lambda z: two_variable_map(z, params)  # noqa: E731
    want = picard(f, two_variable_z0())
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(f, batched=True), two_variable_z0(), solver=solver, tol=1e-12
    )
    assert sol.converged
    assert sol.stats.solver == solver
    for k in ("x", "y"):
        assert sol.z[k].shape == want[k].shape and sol.z[k].dtype == f64
        torch.testing.assert_close(sol.z[k], want[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_closed_form(solver: str, form: str) -> None:
    A, b = _symmetric(CONTRACTIVE, 1), _rhs()
    if form == "fixed_point":
        problem = implicit.ImplicitProblem.fixed_point(lambda z: _split(_cat(z) @ A.T + b), batched=True)
    else:  # F(z) = (I - A) z - b; its map is G = z - F = A z + b
        problem = implicit.ImplicitProblem(lambda z: _split(_cat(z) - _cat(z) @ A.T - b), batched=True)
    sol = implicit.solve(problem, _zeros(), solver=solver, tol=1e-12)
    assert sol.converged
    torch.testing.assert_close(_cat(sol.z), _linear_solution(A, b), rtol=0, atol=1e-10)


def test_anderson_needs_fewer_evaluations_on_a_slow_contraction() -> None:
    A, b = _symmetric(SLOW, 3), _rhs()
    f = lambda z: _split(_cat(z) @ A.T + 0.05 * torch.tanh(_cat(z)) + b)  # noqa: E731
    problem = implicit.ImplicitProblem.fixed_point(f, batched=True)
    want = _cat(picard(f, _zeros(), iters=20000))
    kw = {"tol": 1e-10, "max_iter": 2000}
    picard_sol = implicit.solve(problem, _zeros(), solver="fixed_point", **kw)
    anderson_sol = implicit.solve(problem, _zeros(), solver="anderson", **kw)
    assert picard_sol.converged and anderson_sol.converged
    torch.testing.assert_close(_cat(anderson_sol.z), want, rtol=0, atol=1e-8)
    # Picard needs about log(1e-10) / log(0.9) ≈ 220 evaluations; Anderson about 40
    assert picard_sol.stats.nfe > 150
    assert 3 * anderson_sol.stats.nfe < picard_sol.stats.nfe


@pytest.mark.parametrize("form", ["fixed_point", "root"])
def test_broyden_converges_where_plain_iteration_diverges(form: str) -> None:
    A, b = _symmetric(EXPANSIVE, 2), _rhs()
    if form == "fixed_point":
        problem = implicit.ImplicitProblem.fixed_point(lambda z: _split(_cat(z) @ A.T + b), batched=True)
    else:
        problem = implicit.ImplicitProblem(lambda z: _split(_cat(z) - _cat(z) @ A.T - b), batched=True)
    want = _linear_solution(A, b)
    diverged = implicit.solve(problem, _zeros(), solver="fixed_point", max_iter=50, on_failure="ignore")
    assert not diverged.converged
    assert bool((diverged.stats.history[-1] > 1e3 * diverged.stats.history[0]).all())
    # what is returned is the best iterate seen, not the diverged last one
    torch.testing.assert_close(diverged.stats.residual, diverged.stats.history.min(dim=0).values)
    sol = implicit.solve(problem, _zeros(), solver="broyden", tol=1e-12, max_iter=100)
    assert sol.converged
    # Good Broyden ends a linear N-dimensional problem in at most 2N steps (Gay 1979), rounding aside
    assert sol.stats.iterations <= 2 * N + 4
    torch.testing.assert_close(_cat(sol.z), want, rtol=0, atol=1e-10)


def test_broyden_restarts_when_its_memory_is_full() -> None:
    A, b = _symmetric(SLOW, 3), _rhs()
    f = lambda z: _split(_cat(z) @ A.T + 0.05 * torch.tanh(_cat(z)) + b)  # noqa: E731
    want = _cat(picard(f, _zeros(), iters=20000))
    problem = implicit.ImplicitProblem.fixed_point(f, batched=True)
    sol = implicit.solve(problem, _zeros(), solver="broyden", solver_options={"memory": 3}, tol=1e-10, max_iter=300)
    assert sol.converged and sol.stats.iterations > 3  # the memory filled and was restarted
    torch.testing.assert_close(_cat(sol.z), want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_sample_at_its_solution_stays_bit_identical(solver: str) -> None:
    params = two_variable_params()
    f = lambda z: two_variable_map(z, params)  # noqa: E731
    want = picard(f, two_variable_z0())
    z0 = two_variable_z0()
    for k in z0:
        z0[k][2] = want[k][2]
    start = {k: v.clone() for k, v in z0.items()}
    sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f, batched=True), z0, solver=solver, tol=1e-10)
    assert sol.converged
    assert sol.stats.history[0, 2] <= 1e-10 * _cat(start)[2].norm()  # converged before the first step
    for k in z0:
        assert torch.equal(sol.z[k][2], start[k][2])
        torch.testing.assert_close(sol.z[k], want[k], rtol=0, atol=1e-8)


BAD_OPTIONS = [
    ("anderson", {"m": 0}, "m must be a positive int; got 0"),
    ("anderson", {"m": 2.5}, "m must be a positive int; got 2.5"),
    ("anderson", {"m": True}, "m must be a positive int; got True"),
    ("anderson", {"beta": 0.0}, r"beta must lie in \(0, 1\]; got 0.0"),
    ("anderson", {"beta": 1.5}, r"beta must lie in \(0, 1\]; got 1.5"),
    ("anderson", {"lam": -1e-3}, "lam must be a finite non-negative number; got -0.001"),
    ("anderson", {"lam": float("nan")}, "lam must be a finite non-negative number; got nan"),
    ("broyden", {"memory": 0}, "memory must be a positive int; got 0"),
    ("broyden", {"memory": 4.0}, "memory must be a positive int; got 4.0"),
]


@pytest.mark.parametrize(("solver", "options", "message"), BAD_OPTIONS)
def test_bad_options_name_the_option_and_value(solver: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        implicit.get_solver(solver)(**options)
    with pytest.raises(ValueError, match=message):
        implicit.fixed_point(torch.cos, torch.zeros(2, dtype=f64), solver=solver, solver_options=options)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32(solver: str) -> None:
    params64 = two_variable_params()
    want = picard(lambda z: two_variable_map(z, params64), two_variable_z0())
    params = [p.float() for p in params64]
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)
    z0 = {k: v.float() for k, v in two_variable_z0().items()}
    # tol = 1e-5 is about 100 float32 epsilons, well above the rounding floor of
    # ‖f(z) - z‖. Every block of the map has norm 0.3, so f is a contraction
    # with constant L ≤ 0.6 and ‖z - z*‖ ≤ ‖f(z) - z‖ / (1 - L) ≤ 2.5·tol·‖z‖;
    # the float32 rounding of the parameters adds ~1e-7 relative.
    sol = implicit.solve(problem, z0, solver=solver, tol=1e-5)
    assert sol.converged and sol.z["x"].dtype == torch.float32
    err = (_cat(sol.z).double() - _cat(want)).norm(dim=1)
    assert bool((err <= 3e-5 * _cat(want).norm(dim=1)).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_matches_dense_ift(solver: str) -> None:
    params = [p.requires_grad_() for p in two_variable_params()]
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)
    sol = implicit.solve(problem, two_variable_z0(), solver=solver, adjoint="exact", tol=1e-12)
    assert sol.converged
    cot = {"x": torch.linspace(-1, 1, BATCH * NX, dtype=f64).view(BATCH, NX), "y": torch.ones(BATCH, NY, dtype=f64)}
    grads = torch.autograd.grad(sum((sol.z[k] * cot[k]).sum() for k in cot), params)
    want = ift_grads(two_variable_map, picard(lambda z: two_variable_map(z, params), two_variable_z0()), params, cot)
    num = sum(float((g - w).norm() ** 2) for g, w in zip(grads, want)) ** 0.5
    assert num <= 1e-8 * sum(float(w.norm() ** 2) for w in want) ** 0.5


def test_broyden_gradient_on_an_expansive_map_matches_the_closed_form() -> None:
    A, b = _symmetric(EXPANSIVE, 2).requires_grad_(), _rhs().requires_grad_()
    problem = implicit.ImplicitProblem.fixed_point(lambda z: _split(_cat(z) @ A.T + b), batched=True)
    sol = implicit.solve(problem, _zeros(), solver="broyden", adjoint="exact", tol=1e-12)
    c = torch.linspace(-2, 3, BATCH * N, dtype=f64).view(BATCH, N)
    grad_A, grad_b = torch.autograd.grad((_cat(sol.z) * c).sum(), (A, b))
    # z* = (I - A)⁻¹ b: with u = (I - A)⁻ᵀ c, dL/db = u and dL/dA = Σ_samples u z*ᵀ
    with torch.no_grad():
        eye = torch.eye(N, dtype=f64)
        u = torch.linalg.solve((eye - A).T, c.T).T
        z_star = torch.linalg.solve(eye - A, b.T).T
    torch.testing.assert_close(grad_b, u, rtol=1e-8, atol=0)
    torch.testing.assert_close(grad_A, u.T @ z_star, rtol=1e-8, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_values_are_reported(solver: str) -> None:
    # log(1) = 0, log(0) = -inf: the second evaluation is not finite
    with pytest.raises(implicit.SolverError, match="non-finite"):
        implicit.fixed_point(torch.log, torch.ones(3, dtype=f64), solver=solver, on_failure="raise")
    with pytest.warns(implicit.ConvergenceWarning, match="non-finite"):
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(torch.log), torch.ones(3, dtype=f64), solver=solver)
    assert not sol.converged


def _system(z0: torch.Tensor) -> implicit._problem.System:
    return implicit.ImplicitProblem.fixed_point(lambda z: z, batched=True).bind(z0)


def test_anderson_singular_mixing_falls_back_to_the_plain_step() -> None:
    # With lam = 0, a vanishing residual makes the Gram matrix [[a, 0], [0, 0]]
    # singular: the step must be the plain damped step, not NaN.
    z0 = torch.zeros(2, 4, dtype=f64)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], dtype=f64)
    solver = implicit.get_solver("anderson")(lam=0.0, beta=0.5)
    system = _system(z0)
    state = solver.init(system, z0)
    z1 = solver.step(system, z0, r, state, None)  # type: ignore[arg-type]
    torch.testing.assert_close(z1, z0 + 0.5 * r, rtol=0, atol=0)
    z2 = solver.step(system, z1, torch.zeros_like(r), state, None)  # type: ignore[arg-type]
    torch.testing.assert_close(z2, z1, rtol=0, atol=0)
    # the same residual twice: [[a, a], [a, a]] is singular up to rounding
    z3 = solver.step(system, z2, r, state, None)  # type: ignore[arg-type]
    z4 = solver.step(system, z3, r.clone(), state, None)  # type: ignore[arg-type]
    assert bool(z4.isfinite().all())


def test_broyden_skips_an_update_with_zero_denominator() -> None:
    z0 = torch.zeros(2, 4, dtype=f64)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], dtype=f64)
    solver = implicit.get_solver("broyden")(memory=2)
    system = _system(z0)
    state = solver.init(system, z0)
    assert state.u.shape == state.v.shape == (2, 2, 4)  # buffers sized by memory, not max_iter
    z1 = solver.step(system, z0, r, state, None)  # type: ignore[arg-type]
    z2 = solver.step(system, z1, r.clone(), state, None)  # type: ignore[arg-type]  # y = 0
    torch.testing.assert_close(z2, z1 + r, rtol=0, atol=0)


def _iterates(solver: implicit.Solver, f, z0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """``z_0 … z_steps`` of ``solver`` on the map ``f``, driving its ``init`` and ``step`` directly."""
    system = _system_of(f, z0)
    state = solver.init(system, z0)
    zs = [z0]
    with torch.no_grad():
        for _ in range(steps):
            z = zs[-1]
            zs.append(solver.step(system, z, f(z) - z, state, None))  # type: ignore[arg-type]
    return zs


def _system_of(f, z0: torch.Tensor) -> implicit._problem.System:
    return implicit.ImplicitProblem.fixed_point(f, batched=True).bind(z0)


def _nonlinear_map(batch: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = _symmetric_n(size, 0.9, g)
    b = torch.randn(batch, size, dtype=f64, generator=g)
    return lambda z: torch.tanh(z @ A.T + b) + 0.1 * z


def _symmetric_n(size: int, rho: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, dtype=f64, generator=g))
    return (q * (rho * torch.linspace(-1, 1, size, dtype=f64))) @ q.T


def _anderson_reference(f, z0: torch.Tensor, steps: int, m: int, beta: float, lam: float) -> list[torch.Tensor]:
    """Anderson's iterates sample by sample: the constrained least-squares weights by a dense solve."""
    zs = [z0]
    rs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    for _ in range(steps):
        z = zs[-1]
        r = f(z) - z
        rs, gs = (rs + [r])[-(m + 1) :], (gs + [z + beta * r])[-(m + 1) :]
        R, G = torch.stack(rs, dim=1), torch.stack(gs, dim=1)  # (B, n, N)
        H = R @ R.mT
        H = H + lam * torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2))
        x = torch.linalg.solve(H, torch.ones(*H.shape[:2], 1, dtype=H.dtype))
        alpha = x / x.sum(dim=1, keepdim=True)
        zs.append((alpha.mT @ G).squeeze(1))
    return zs


def _broyden_reference(f, z0: torch.Tensor, steps: int, memory: int) -> list[torch.Tensor]:
    """Good Broyden with a dense inverse Jacobian per sample.

    The first step takes ``H = -I``; the model then starts, and restarts once
    ``memory`` updates were made, from ``H = γ I`` with ``γ = sᵀy / yᵀy`` of the
    latest secant pair.
    """
    batch, size = z0.shape
    eye = torch.eye(size, dtype=z0.dtype).expand(batch, size, size)
    H, updates = -eye.clone(), 0
    zs = [z0]
    r_prev = None
    for _ in range(steps):
        z = zs[-1]
        r = f(z) - z
        if r_prev is not None:
            s, y = (z - zs[-2]).unsqueeze(2), (r - r_prev).unsqueeze(2)
            if updates in (0, memory):
                H, updates = (s.mT @ y) / (y.mT @ y) * eye, 0
            sH = s.mT @ H
            H = H + (s - H @ y) @ sH / (sH @ y)
            updates += 1
        r_prev = r
        zs.append(z - (H @ r.unsqueeze(2)).squeeze(2))
    return zs


@pytest.mark.parametrize("options", [{}, {"m": 2, "beta": 0.6, "lam": 1e-3}, {"m": 1}])
def test_anderson_iterates_match_a_dense_reference(options: dict) -> None:
    # More steps than slots, so the ring buffer wraps around several times.
    f, z0 = _nonlinear_map(3, 7, seed=4), torch.zeros(3, 7, dtype=f64)
    solver = implicit.get_solver("anderson")(**options)
    got = _iterates(solver, f, z0, 14)
    want = _anderson_reference(f, z0, 14, solver.m, solver.beta, solver.lam)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda m, k=k: f"iterate {k}: {m}")


@pytest.mark.parametrize("memory", [20, 3, 1])
def test_broyden_iterates_match_a_dense_reference(memory: int) -> None:
    # memory 3 and 1: the model restarts several times within the 12 steps
    f, z0 = _nonlinear_map(3, 7, seed=5), torch.zeros(3, 7, dtype=f64)
    got = _iterates(implicit.get_solver("broyden")(memory=memory), f, z0, 12)
    want = _broyden_reference(f, z0, 12, memory)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, k=k: f"iterate {k}: {m}")


def test_anderson_falls_back_per_sample() -> None:
    # Sample 0's residual vanishes (a singular Gram matrix with lam = 0): it
    # takes the plain step, while sample 1 mixes as usual.
    z0 = torch.zeros(2, 4, dtype=f64)
    r0 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], dtype=f64)
    r1 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.1, -0.3, 0.4]], dtype=f64)
    solver = implicit.get_solver("anderson")(lam=0.0)
    system = _system(z0)
    state = solver.init(system, z0)
    z1 = solver.step(system, z0, r0, state, None)  # type: ignore[arg-type]
    z2 = solver.step(system, z1, r1, state, None)  # type: ignore[arg-type]
    torch.testing.assert_close(z2[0], z1[0], rtol=0, atol=0)
    R, G = torch.stack([r0[1], r1[1]]), torch.stack([z0[1] + r0[1], z1[1] + r1[1]])
    x = torch.linalg.solve(R @ R.T, torch.ones(2, dtype=f64))
    torch.testing.assert_close(z2[1], (x / x.sum()) @ G, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("solver", "bound"), [("anderson", lambda s: 2 * s.m + 1), ("broyden", lambda s: s.memory)])
def test_views_are_made_once(solver: str, bound) -> None:
    # A step looks its views up; after the first few steps it makes none.
    s = implicit.get_solver(solver)(**({"memory": 3} if solver == "broyden" else {"m": 2}))
    f, z0 = _nonlinear_map(2, 5, seed=6), torch.zeros(2, 5, dtype=f64)
    system = _system_of(f, z0)
    state = s.init(system, z0)
    z = z0
    with torch.no_grad():
        for _ in range(20):
            z = s.step(system, z, f(z) - z, state, None)  # type: ignore[arg-type]
    assert len(state.views) <= bound(s)


@given(
    batch=st.integers(1, 5),
    size=st.integers(1, 12),
    rho=st.floats(0.1, 0.9),
    solver=st.sampled_from(SOLVERS),
    seed=st.integers(0, 1000),
)
def test_random_linear_contractions(batch: int, size: int, rho: float, solver: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, dtype=f64, generator=g))
    A = (q * (rho * torch.linspace(-1, 1, size, dtype=f64))) @ q.T
    b = torch.randn(batch, size, dtype=f64, generator=g)
    want = torch.linalg.solve(torch.eye(size, dtype=f64) - A, b.T).T
    z = implicit.fixed_point(
        lambda z: z @ A.T + b, torch.zeros(batch, size, dtype=f64), batched=True, solver=solver, tol=1e-12, max_iter=500
    )
    torch.testing.assert_close(z, want, rtol=0, atol=1e-9 * (1 + float(want.abs().max())))
