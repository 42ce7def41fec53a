"""GMRES's default restart follows the system size, and a stagnating restart is reported as such.

Restarted GMRES with a restart below the number of unknowns can stall for
good: on the cyclic shift ``P`` with ``b = e₁`` every Krylov space of fewer
than ``N`` vectors leaves the residual exactly where it was, so each cycle
repeats the last. The reference is a dense solve.
"""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit._krylov import RESTART_BUDGET, default_restart, gmres

f64 = torch.float64


def _shift(n: int) -> torch.Tensor:
    return torch.roll(torch.eye(n, dtype=f64), 1, dims=0)


def test_default_restart_is_the_size_within_a_memory_budget() -> None:
    assert default_restart(32, 45) == 45
    assert default_restart(1, 7) == 7
    big = default_restart(64, 4096)
    assert 20 <= big < 4096 and (big + 1) * 64 * 4096 <= max(RESTART_BUDGET, 21 * 64 * 4096)
    assert default_restart(10**6, 10**6) == 20  # never below min(N, 20)
    assert implicit.get_adjoint("gmres")().restart is None
    assert implicit.get_solver("newton_krylov")().restart is None
    implicit.get_adjoint("gmres")(restart=5)  # explicit integers still work
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="restart"):
            implicit.get_adjoint("gmres")(restart=bad)
        with pytest.raises(ValueError, match="restart"):
            implicit.get_solver("newton_krylov")(restart=bad)


def test_stagnation_is_detected_and_full_gmres_converges() -> None:
    n = 6
    P = _shift(n)
    b = torch.zeros(2, n, dtype=f64)
    b[0, 0] = 1.0
    b[1, 3] = 2.0  # a second row that stagnates too
    mv = lambda v: v @ P.T  # noqa: E731
    stuck = gmres(mv, b, restart=3, tol=1e-12, max_iter=1000)
    assert not bool(stuck.converged.any()) and bool(stuck.stagnated.all())
    assert stuck.iterations <= 2 * 3  # stopped after a cycle without progress, not at max_iter
    full = gmres(mv, b, tol=1e-12)
    assert bool(full.converged.all()) and not bool(full.stagnated.any())
    torch.testing.assert_close(full.x, torch.linalg.solve(P, b.T).T, rtol=1e-10, atol=1e-12)


def test_progressing_row_keeps_the_solve_going() -> None:
    # Row 0 stagnates on the shift, row 1 (a well-conditioned diagonal) converges: no early stop.
    n = 6
    A = torch.stack([_shift(n), torch.diag(torch.linspace(1.0, 2.0, n, dtype=f64))])
    b = torch.ones(2, n, dtype=f64)
    b[0] = torch.eye(n, dtype=f64)[0]
    result = gmres(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, restart=3, tol=1e-12, max_iter=1000)
    assert bool(result.converged[1]) and not bool(result.converged[0]) and bool(result.stagnated[0])


def test_stagnating_adjoint_warns_with_stagnation() -> None:
    n = 6
    P = _shift(n)
    c = torch.linspace(1.0, 2.0, n, dtype=f64).requires_grad_()
    problem = implicit.ImplicitProblem(lambda z: z @ P.T - c)
    sol = implicit.solve(problem, torch.zeros(n, dtype=f64), solver="newton_krylov", adjoint_options={"restart": 3})
    with pytest.warns(implicit.ConvergenceWarning, match="stagnated"):
        sol.z[0].backward()  # the adjoint system Pᵀ v = e₁: stagnates below N steps per cycle
    assert sol.adjoint_stats is not None and "stagnated" in sol.adjoint_stats.message
    assert sol.adjoint_stats.iterations < 200

    c.grad = None
    sol = implicit.solve(problem, torch.zeros(n, dtype=f64), solver="newton_krylov", adjoint_options={"tol": 1e-12})
    sol.z[0].backward()  # default restart: full GMRES
    e0 = torch.eye(n, dtype=f64)[0]
    torch.testing.assert_close(c.grad, torch.linalg.solve(P.T, e0), rtol=1e-10, atol=1e-12)
