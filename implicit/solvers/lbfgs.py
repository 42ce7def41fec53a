"""Limited-memory BFGS with a strong-Wolfe line search, one model per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._registry import register_solver
from .._settings import integer, interval
from .._solver import Solver
from ..linesearch import strong_wolfe
from ..plugin import Monitor, System
from ._descent import check_positive, require_form

__all__ = ["LBFGS"]


class _Memory:
    """The last ``m`` pairs ``(s, y)`` of every sample, in one ring of ``(m, B, N)`` buffers.

    All samples write the same slot at each update; a sample whose pair is
    skipped (``sᵀy`` too small, or not iterating) gets ``ρ = 0`` there, which
    makes the slot a no-op in its two-loop recursion.
    """

    def __init__(self, m: int, z: torch.Tensor) -> None:
        batch, size = z.shape
        self.s = z.new_zeros(m, batch, size)
        self.y = z.new_zeros(m, batch, size)
        self.rho = z.new_zeros(m, batch)
        self.gamma = z.new_ones(batch)  # the initial inverse Hessian γ I
        self.order: list[int] = []  # slots from oldest to newest
        self.m = m

    def update(self, s: torch.Tensor, y: torch.Tensor, accept: torch.Tensor) -> None:
        slot = self.order.pop(0) if len(self.order) == self.m else len(self.order)
        self.order.append(slot)
        sy = (s * y).sum(1)
        yy = (y * y).sum(1)
        self.s[slot] = s
        self.y[slot] = y
        self.rho[slot] = torch.where(accept, 1 / torch.where(accept, sy, 1), 0)
        self.gamma = torch.where(accept, sy / torch.where(accept, yy, 1), self.gamma)

    def reset(self, rows: torch.Tensor) -> None:
        """Forget every pair of the samples in ``rows`` (a ``(B,)`` mask)."""
        self.rho.masked_fill_(rows[None, :], 0)
        self.gamma = torch.where(rows, 1, self.gamma)

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """``−H g`` by the two-loop recursion."""
        q = g.clone()
        alphas = []
        for slot in reversed(self.order):
            a = self.rho[slot] * (self.s[slot] * q).sum(1)
            q -= a[:, None] * self.y[slot]
            alphas.append(a)
        r = self.gamma[:, None] * q
        for slot, a in zip(self.order, reversed(alphas)):
            b = self.rho[slot] * (self.y[slot] * r).sum(1)
            r += (a - b)[:, None] * self.s[slot]
        return -r


@register_solver("lbfgs")
@dataclass(frozen=True, kw_only=True)
class LBFGS(Solver):
    """Solves ``z* = argmin L(z)`` by limited-memory BFGS with a strong-Wolfe line search.

    Each sample keeps its own last ``m`` pairs ``s = z_{k+1} − z_k``,
    ``y = ∇L(z_{k+1}) − ∇L(z_k)``; the direction ``d = −H ∇L`` comes from the
    two-loop recursion with the initial inverse Hessian ``γ I``,
    ``γ = sᵀy / yᵀy`` of the newest pair, and the step along it from a
    batched strong-Wolfe line search (:func:`implicit.linesearch.strong_wolfe`),
    which also returns the value and gradient at the new iterate. The
    tolerance applies to the gradient: a sample has converged when
    ``‖∇L(z)‖ ≤ tol · ‖z‖ + atol``.

    This differs from Nocedal and Wright's Algorithm 7.5 in that: 1. a pair
    with ``sᵀy ≤ curvature_eps · ‖s‖ ‖y‖`` is not stored (the scale-free form
    of the usual ``sᵀy ≤ ε``; the Wolfe conditions make ``sᵀy > 0``, so this
    only drops pairs spoiled by rounding); 2. the first step, and any step
    after a reset, is steepest descent with the trial step ``min(1, 1/‖∇L‖)``;
    3. a sample whose line search fails forgets its pairs and restarts from
    steepest descent; if that fails too it stays where it is (and the solve
    reports non-convergence at ``max_iter``).

    Needs an argmin or least-squares problem (it evaluates the objective);
    on a root or fixed-point problem it raises a ``ValueError``.

    Host synchronisations: one per iteration's check and one per
    line-search trial.

    Args:
        m: The number of pairs kept per sample.
        c1: Sufficient-decrease constant of the line search, in ``(0, 1)``.
        c2: Curvature constant of the line search, in ``(c1, 1)``.
        max_linesearch: The most trials (evaluations) per line search.
        curvature_eps: Pairs with ``sᵀy ≤ curvature_eps · ‖s‖ ‖y‖`` are skipped.

    Examples:
        A batch of two quadratics ``½ zᵀAz − bᵀz``, solved to ``z = A⁻¹b``:

        >>> import torch, implicit
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> objective = lambda z: 0.5 * ((z @ A) * z).sum(1) - (b * z).sum(1)
        >>> problem = implicit.ImplicitProblem.argmin(objective, batched=True)
        >>> sol = implicit.solve(problem, torch.zeros(2, 2, dtype=torch.float64), solver="lbfgs", tol=1e-10)
        >>> torch.allclose(sol.z, torch.linalg.solve(A, b.T).T), bool(sol.converged)
        (True, True)

    References:
        J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed.,
        Springer 2006, Algorithms 7.4 and 7.5. D. C. Liu and J. Nocedal, "On
        the limited memory BFGS method for large scale optimization", Math.
        Programming 45, 1989.
    """

    forms: ClassVar[tuple[str, ...]] = ("argmin", "least_squares")

    m: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    max_linesearch: int = 25
    curvature_eps: float = 1e-10

    def __post_init__(self) -> None:
        integer("m", self.m)
        interval("c1", self.c1, 0.0, 1.0, high_open=True)
        interval("c2", self.c2, float(self.c1), 1.0, high_open=True)
        integer("max_linesearch", self.max_linesearch)
        check_positive("curvature_eps", self.curvature_eps)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        system = require_form(system, self.name or "lbfgs", self.forms)
        z = z0
        f, g = system.value_and_grad(z)
        memory = _Memory(self.m, z)
        fresh = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)  # no pairs yet
        while not monitor.check(z, g):
            active = monitor.active
            assert active is not None
            d = memory.direction(g)
            res = self._search(system, z, f, g, d, fresh, active)
            # A failed search after a quasi-Newton direction: retry from steepest descent.
            retry = active & ~res.success & ~fresh
            if bool(retry.any()):
                memory.reset(retry)
                again = self._search(system, z, f, g, -g, retry, retry)
                res = again._replace(
                    step=torch.where(retry, again.step, res.step),
                    x=torch.where(retry[:, None], again.x, res.x),
                    value=torch.where(retry, again.value, res.value),
                    grad=torch.where(retry[:, None], again.grad, res.grad),  # type: ignore[arg-type]
                )
            assert res.grad is not None
            s, y = res.x - z, res.grad - g
            sy = (s * y).sum(1)
            scale = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(y, dim=1)
            accept = active & (res.step > 0) & (sy > self.curvature_eps * scale)
            memory.update(s, y, accept)
            fresh = fresh & ~accept
            z, f, g = res.x, res.value, res.grad
        return z

    def _search(self, system, z, f, g, d, steepest, active):  # type: ignore[no-untyped-def]
        """The strong-Wolfe search along ``d``; rows in ``steepest`` use ``−g`` and a short first step."""
        gn = torch.linalg.vector_norm(g, dim=1)
        d = torch.where(steepest[:, None], -g, d)
        step = torch.where(steepest, torch.clamp(1 / gn, max=1.0), torch.ones_like(gn))
        return strong_wolfe(
            system.value_and_grad,
            z,
            f,
            g,
            d,
            step=step,
            c1=self.c1,
            c2=self.c2,
            max_iter=self.max_linesearch,
            active=active,
        )
