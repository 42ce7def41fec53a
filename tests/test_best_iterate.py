"""An unconverged solve returns, per sample, its best iterate (by its own residual), on both monitor paths."""

from __future__ import annotations

import math

import pytest
import torch
from test_monitor import host_numel

import implicit
from implicit import _monitor as monitor_module

F64 = torch.float64


class Oscillating(implicit.IterativeSolver):
    """Picard steps for sample 0; for the others a good step then a bad one, alternately.

    ``r = G(z) - z``; for ``G(z) = a z + c`` the good step ``z + r`` shrinks the
    error by ``a``, the bad step ``z - 3 r`` grows it by ``1 + 3(1 - a)``.
    Every iterate is recorded, to find the best one independently.
    """

    def init(self, system, z0):
        return {"k": 0, "seen": [z0.clone()]}

    def step(self, system, z, r, state, monitor):
        good = state["k"] % 2 == 0
        state["k"] += 1
        new = z + r if good else z - 3.0 * r
        new[0] = z[0] + r[0]
        state["seen"].append(new.clone())
        return new


def _solve(batch: int, size: int, theta: torch.Tensor, on_failure: str = "warn"):
    A = 0.5 * torch.eye(size, dtype=F64)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: z @ A.T + theta, batched=True)
    seen: list[torch.Tensor] = []

    class Recording(Oscillating):
        def init(self, system, z0):
            state = super().init(system, z0)
            seen[:] = [state["seen"]]
            return state

    z0 = torch.zeros(batch, size, dtype=F64)
    sol = implicit.solve(problem, z0, solver=Recording, adjoint="exact", tol=1e-6, max_iter=30, on_failure=on_failure)
    return sol, A, seen[0]


@pytest.mark.parametrize("host", [True, False])
def test_unconverged_solve_returns_the_best_iterate_per_sample(host):
    batch, size = 3, 4
    theta = torch.linspace(0.5, 2.0, batch * size, dtype=F64).view(batch, size).requires_grad_()
    with host_numel(monitor_module.HOST_NUMEL if host else 0):
        with pytest.warns(implicit.ConvergenceWarning, match="did not converge") as caught:
            sol, A, seen = _solve(batch, size, theta)
    z = sol.z.detach()
    history = sol.stats.history  # (checks, B)
    assert sol.stats.converged.tolist() == [True, False, False]
    # The residual measure is ‖G(z) - z‖; recomputed here for the returned point and for every iterate.
    residual = torch.linalg.vector_norm(z @ A.T + theta.detach() - z, dim=1)
    torch.testing.assert_close(residual, history.min(dim=0).values, rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.stats.residual, residual, rtol=1e-12, atol=0)
    torch.testing.assert_close(caught[0].message.residual, residual, rtol=1e-12, atol=0)
    # ... and it is the iterate where the history is smallest, not the last one.
    iterates = torch.stack(seen[: history.shape[0]])  # (checks, B, N)
    best = history.argmin(dim=0)
    for b in range(batch):
        torch.testing.assert_close(z[b], iterates[best[b], b], rtol=0, atol=0)
    last_rn = history[-1]
    assert bool((residual[1:] < last_rn[1:]).all())  # the oscillating samples ended worse than their best
    # The gradient is the implicit one (for this linear map, at any point): dL/dθ_b = (I - A)^{-T} w_b.
    w = torch.arange(1.0, batch * size + 1, dtype=F64).view(batch, size)
    (sol.z * w).sum().backward()
    expected = torch.linalg.solve((torch.eye(size, dtype=F64) - A).T, w.T).T
    torch.testing.assert_close(theta.grad, expected, rtol=1e-10, atol=1e-12)


def test_host_and_tensor_paths_return_the_same_iterate():
    theta = torch.linspace(0.5, 2.0, 8, dtype=F64).view(2, 4)
    out = {}
    for host in (True, False):
        with host_numel(monitor_module.HOST_NUMEL if host else 0):
            sol, _, _ = _solve(2, 4, theta, on_failure="ignore")
        out[host] = sol
    torch.testing.assert_close(out[True].z, out[False].z, rtol=0, atol=0)
    torch.testing.assert_close(out[True].stats.residual, out[False].stats.residual, rtol=1e-13, atol=0)


def test_a_monotone_solve_returns_its_last_iterate():
    theta = torch.ones(2, 3, dtype=F64)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.9 * z + theta, batched=True)
    sol = implicit.solve(problem, torch.zeros(2, 3, dtype=F64), solver="fixed_point", max_iter=5, on_failure="ignore")
    # Picard on a contraction: z_5 = θ (1 - 0.9⁵) / (1 - 0.9), the residual the last of the history.
    torch.testing.assert_close(sol.z, theta * (1 - 0.9**5) / 0.1)
    torch.testing.assert_close(sol.stats.residual, sol.stats.history[-1])


def test_anderson_non_monotone_run_returns_its_best():
    # A map Anderson solves non-monotonically: the returned residual is the history's minimum.
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, dtype=F64, generator=gen)
    b = torch.randn(6, dtype=F64, generator=gen)

    def f(z):
        return torch.tanh(z @ W.T + b)

    problem = implicit.ImplicitProblem.fixed_point(f, batched=True)
    z0 = torch.randn(4, 6, dtype=F64, generator=gen)
    sol = implicit.solve(problem, z0, solver="anderson", max_iter=12, tol=1e-12, on_failure="ignore")
    history = sol.stats.history
    assert bool((history[-1] > history.min(dim=0).values).any()), "the run is monotone; pick another map"
    z = sol.z
    residual = torch.linalg.vector_norm(f(z) - z, dim=1)
    torch.testing.assert_close(residual, history.min(dim=0).values, rtol=1e-10, atol=1e-14)


def test_a_non_finite_stop_returns_the_best_finite_iterate():
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * z + 1.0
        return out + math.nan if calls["n"] > 3 else out

    with pytest.warns(implicit.ConvergenceWarning, match="best iterate before it is returned") as caught:
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f), torch.zeros(2, dtype=F64), solver="fixed_point")
    assert caught[0].message.kind == "nonfinite" and not sol.converged
    # z_0 = 0, z_1 = 1, z_2 = 1.5, z_3 = 1.75 (whose map value is NaN): z_2 is the best checked
    torch.testing.assert_close(sol.z, torch.full((2,), 1.5, dtype=F64))
    assert math.isfinite(float(sol.stats.residual))


@pytest.mark.parametrize("host", [True, False])
def test_a_converged_sample_returns_the_iterate_that_met_the_relative_tolerance(host):
    # Full Newton steps on atan from |z0| > 1.39 run off to |z| ~ 1e10, where |atan z| ≤ π/2 ≤ tol·|z|:
    # converged, with a residual norm larger than at the start. That iterate is returned, not z0.
    z0 = torch.tensor([0.5, 2.0, -3.0, 10.0], dtype=F64)
    with host_numel(monitor_module.HOST_NUMEL if host else 0):
        sol = implicit.solve(implicit.ImplicitProblem(torch.atan, batched=True), z0, solver="newton_krylov",
                             tol=1e-10, max_iter=20, solver_options={"line_search": False})
    assert sol.converged
    history = sol.stats.history
    assert bool((history[-1, 1:] > history[0, 1:]).all())
    assert bool((sol.z[1:].abs() > 1e3).all())
    torch.testing.assert_close(sol.stats.residual, torch.atan(sol.z).abs(), rtol=1e-12, atol=0)
