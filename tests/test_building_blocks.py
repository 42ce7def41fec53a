"""The public types a plugin receives (implicit.plugin) and the Newton building blocks (implicit.newton)."""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit.adjoints.from_solver import LinearSystem
from implicit.newton import Linearisation, check_dense_size, gmres, line_search_step, recordable
from implicit.plugin import Monitor, OptimisationSystem, System

f64 = torch.float64


def _problem(batched: bool = True) -> tuple[implicit.ImplicitProblem, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 5, dtype=f64, generator=g) / 3
    x = torch.randn(3, 5, dtype=f64, generator=g)
    problem = implicit.ImplicitProblem(lambda z: z + 0.2 * z**3 - torch.tanh(z @ W.T + x), batched=batched)
    return problem, torch.randn(3, 5, dtype=f64, generator=g)


def test_what_solvers_receive_satisfies_the_protocols() -> None:
    seen: list[tuple[bool, ...]] = []

    class Recorder(implicit.Solver):
        def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
            seen.append((isinstance(system, System), isinstance(monitor, Monitor), recordable(system)))
            z = z0
            while not monitor.check(z, system.residual(z)):
                z = monitor.freeze(system.map(z), z)
            return z

    theta = torch.tensor(0.5, dtype=f64, requires_grad=True)
    z = implicit.fixed_point(lambda z: theta * torch.cos(z), torch.zeros(3, dtype=f64), solver=Recorder, tol=1e-12)
    z.sum().backward()
    assert seen == [(True, True, True)]
    # The reference: z* = θ cos z*, so dz*/dθ = cos z* / (1 + θ sin z*).
    want = (torch.cos(z) / (1 + theta * torch.sin(z))).sum().detach()
    torch.testing.assert_close(theta.grad, want, rtol=1e-8, atol=0)


def test_the_linear_system_of_an_adjoint_is_a_system_without_a_graph() -> None:
    M = torch.tensor([[0.5, 0.25], [0.0, 0.5]], dtype=f64)
    op = implicit.LinearOperator(lambda v: v @ M.T, lambda: M.expand(1, 2, 2), batch=1, size=2)
    b = torch.ones(1, 2, dtype=f64)
    system = LinearSystem(op, b)
    assert isinstance(system, System) and not isinstance(system, OptimisationSystem)
    assert not recordable(system)
    with torch.no_grad():
        lin = Linearisation(system, torch.zeros(1, 2, dtype=f64))
    assert lin.graph is None  # forward-mode products only
    torch.testing.assert_close(lin.jacobian(), (torch.eye(2, dtype=f64) - M)[None])
    torch.testing.assert_close(lin.value, -b)


def test_an_optimisation_system_has_its_methods() -> None:
    problem = implicit.ImplicitProblem.argmin(lambda z: ((z - 1.0) ** 4).sum())
    system = problem.bind(torch.zeros(3, dtype=f64))
    assert isinstance(system, OptimisationSystem) and system.form == "argmin"


@pytest.mark.parametrize("mode", ["graph", "forward"])
def test_linearisation_against_a_dense_float64_jacobian(mode: str) -> None:
    problem, z = _problem()
    system = problem.bind(z)
    full = torch.autograd.functional.jacobian(system.residual, z)  # (B, N, B, N), dense float64
    want = torch.stack([full[b, :, b] for b in range(3)])
    assert all(float(full[a, :, b].abs().max()) == 0.0 for a in range(3) for b in range(3) if a != b)
    v = torch.randn(3, 5, dtype=f64)
    with torch.no_grad():
        lin = Linearisation(system, z)
        if mode == "forward":
            lin.graph = None
        torch.testing.assert_close(lin.jacobian(), want, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(lin(v), (want @ v[..., None])[..., 0], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(lin.value, system.residual(z), rtol=0, atol=0)
        moved = lin.at(z + 0.1)
    assert moved.system is system and moved.hooks == lin.hooks
    torch.testing.assert_close(moved.value, system.residual(z + 0.1), rtol=0, atol=0)


def test_a_newton_solver_made_of_the_blocks_matches_newton() -> None:
    # Newton-Krylov in a few lines: GMRES on the linearisation's products, then the line search.
    problem, _ = _problem()
    z0 = torch.zeros(3, 5, dtype=f64)

    class TinyNewtonKrylov(implicit.Solver):
        def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
            lin = Linearisation(system, z0)
            z, f = z0, lin.value
            while not monitor.check(z, f):
                assert monitor.active is not None
                d = gmres(lin, -f, tol=1e-13, restart=5).x
                d = torch.where(monitor.active[:, None], d, torch.zeros_like(d))
                z, f, new = line_search_step(lin, z, f, d, active=monitor.active)
                lin = new if new is not None else lin.at(z)
            return z

    mine = implicit.solve(problem, z0, solver=TinyNewtonKrylov, tol=1e-12)
    ref = implicit.solve(problem, z0, solver="newton", tol=1e-12)
    assert mine.converged and mine.stats.iterations == ref.stats.iterations
    torch.testing.assert_close(mine.z, ref.z, rtol=1e-12, atol=1e-12)


def test_line_search_step_without_search_or_graph() -> None:
    problem, z = _problem()
    system = problem.bind(z)
    with torch.no_grad():
        lin = Linearisation(system, z)
        d = torch.full_like(z, 0.01)
        active = torch.tensor([True, False, True])
        step = line_search_step(lin, z, lin.value, d, active=active, line_search=False, linearise=False)
    assert step.linearisation is None
    want = torch.where(active[:, None], z + d, z)
    torch.testing.assert_close(step.z, want, rtol=0, atol=0)
    torch.testing.assert_close(step.residual, system.residual(want), rtol=0, atol=0)


def test_dense_size_guard_names_the_solver_and_the_limit() -> None:
    check_dense_size("mine", torch.zeros(4, 5), 100)  # 100 entries: allowed
    with pytest.raises(ValueError, match=r"the mine solver .* 4 x 6 x 6 = 144 entries \(max_size=100\).*newton_krylov"):
        check_dense_size("mine", torch.zeros(4, 6), 100)
