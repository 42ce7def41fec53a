"""Gauss–Newton for least squares: matrix-free normal equations by CG, then a line search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._cg import cg
from .._krylov import Tolerance
from .._registry import register_solver
from .._settings import integer, interval
from .._solver import Solver
from ..linesearch import backtracking
from ..plugin import Monitor, System
from ._descent import forcing, normal_matvec, require_form

__all__ = ["GaussNewton"]


@register_solver("gauss_newton")
@dataclass(frozen=True, kw_only=True)
class GaussNewton(Solver):
    """Solves ``z* = argmin ½ ‖r(z)‖²`` by Gauss–Newton steps ``JᵀJ p = −Jᵀr``.

    ``J = ∂r/∂z`` is never formed: conjugate gradients solve the normal
    equations with one Jacobian-vector and one vector-Jacobian product per
    step (``system.lsq_linearize``), to the relative accuracy
    ``η = min(eta_max, √‖Jᵀr‖)`` (as the forcing term of truncated Newton).
    An Armijo backtracking search on ``½ ‖r‖²``
    (:func:`implicit.linesearch.backtracking`) then sets the step length.
    The tolerance applies to the gradient ``Jᵀr``. Per sample throughout.

    Where ``J`` is rank deficient CG meets zero curvature (``pᵀJᵀJp = 0``)
    and stops there; the step is then its last iterate, or steepest descent
    ``−Jᵀr`` at the first direction. Gauss–Newton converges fast when the
    residuals at the solution are small; for large residuals or a poor start
    prefer ``levenberg_marquardt``.

    Needs a least-squares problem (``implicit.least_squares``); on any other
    it raises a ``ValueError``.

    Host synchronisations: one per iteration's check, one per CG step and
    one per line-search trial.

    Args:
        max_inner: The most CG steps per iteration.
        eta_max: Upper bound on the inner solve's relative tolerance, in ``(0, 1)``.
        c1: Sufficient-decrease constant of the line search, in ``(0, 1)``.
        max_linesearch: The most step halvings plus one per iteration.

    Examples:
        Fitting ``y = a · exp(b t)`` exactly to three points:

        >>> import torch, implicit
        >>> t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-0.5 * t)
        >>> problem = implicit.ImplicitProblem.least_squares(lambda p: p[0] * torch.exp(p[1] * t) - y)
        >>> sol = implicit.solve(problem, torch.tensor([1.0, 0.0], dtype=torch.float64), solver="gauss_newton", tol=1e-12)
        >>> [round(v, 8) for v in sol.z.tolist()]
        [2.0, -0.5]

    References:
        J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed.,
        Springer 2006, Section 10.3.
    """

    forms: ClassVar[tuple[str, ...]] = ("least_squares",)

    max_inner: int = 50
    eta_max: float = 0.1
    c1: float = 1e-4
    max_linesearch: int = 30

    def __post_init__(self) -> None:
        integer("max_inner", self.max_inner)
        interval("eta_max", self.eta_max, 0.0, 1.0, high_open=True)
        interval("c1", self.c1, 0.0, 1.0, high_open=True)
        integer("max_linesearch", self.max_linesearch)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        system = require_form(system, self.name or "gauss_newton", self.forms)
        z = z0
        r, jvp, vjp = system.lsq_linearize(z)
        f = 0.5 * (r * r).sum(1)
        g = vjp(r)
        while not monitor.check(z, g):
            active = monitor.active
            assert active is not None
            gn = torch.linalg.vector_norm(g, dim=1)
            reference = torch.linalg.vector_norm(z, dim=1) if monitor.reference is None else monitor.reference
            target = forcing(gn, monitor.tol * reference + monitor.atol, active, self.eta_max)
            inner = cg(normal_matvec(jvp, vjp), -g, Tolerance(target, self.max_inner))
            d = inner.x
            slope = (d * g).sum(1)
            fallback = (torch.linalg.vector_norm(d, dim=1) == 0) | (slope >= 0)
            d = torch.where(fallback[:, None], -g, d)
            slope = (d * g).sum(1)
            step = torch.where(fallback, torch.clamp(1 / gn, max=1.0), torch.ones_like(gn))
            res = backtracking(
                system.objective,
                z,
                f,
                slope,
                d,
                step=step,
                c1=self.c1,
                max_iter=self.max_linesearch,
                active=active,
            )
            z = res.x
            r, jvp, vjp = system.lsq_linearize(z)
            f = 0.5 * (r * r).sum(1)
            g = vjp(r)
        return z
