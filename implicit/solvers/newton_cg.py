"""Truncated Newton: Newton directions from conjugate gradients on Hessian-vector products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._cg import cg
from .._krylov import Tolerance
from .._registry import register_solver
from .._settings import integer, interval
from .._solver import Solver
from ..linesearch import strong_wolfe
from ..plugin import Monitor, System
from ._descent import forcing, require_form

__all__ = ["NewtonCG"]


@register_solver("newton_cg")
@dataclass(frozen=True, kw_only=True)
class NewtonCG(Solver):
    """Solves ``z* = argmin L(z)`` by truncated Newton steps ``∇²L d = −∇L`` solved by CG.

    The Hessian is never formed: conjugate gradients need only the products
    ``∇²L v`` (``system.value_grad_hvp``: one evaluation of ``L`` with
    its graph per Newton step, one backward pass per product). The inner solve stops at
    ``‖∇²L d + ∇L‖ ≤ η ‖∇L‖`` with the forcing term ``η = min(eta_max,
    √‖∇L‖)`` (loose far from the solution, tight near it: superlinear
    convergence without oversolving; kept above ``0.5 τ / ‖∇L‖`` for the
    stopping threshold ``τ``), or at negative curvature: a CG direction
    ``p`` with ``pᵀ∇²L p ≤ 0`` stops the inner solve and the step uses the
    last CG iterate, which is a descent direction, or steepest descent
    ``−∇L`` where CG stopped at its first direction. A strong-Wolfe line
    search (:func:`implicit.linesearch.strong_wolfe`, first trial step one)
    then sets the step length. All of it per sample: each has its own
    forcing term, inner tolerance and step.

    This is Nocedal and Wright's line-search Newton–CG (Algorithm 7.1) with
    a strong-Wolfe search instead of backtracking, so that steps past the
    Newton point are possible too; a sample whose search fails stays where
    it is for that iteration and restarts from steepest descent.

    Needs an argmin or least-squares problem (it evaluates the objective);
    on a root or fixed-point problem it raises a ``ValueError``.

    Host synchronisations: one per iteration's check, one per CG step and
    one per line-search trial.

    Args:
        max_inner: The most CG steps (Hessian-vector products) per Newton step.
        eta_max: Upper bound on the forcing term, in ``(0, 1)``.
        c1: Sufficient-decrease constant of the line search, in ``(0, 1)``.
        c2: Curvature constant of the line search, in ``(c1, 1)``.
        max_linesearch: The most trials (evaluations) per line search.

    Examples:
        >>> import torch, implicit
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> problem = implicit.ImplicitProblem.argmin(lambda z: 0.5 * z @ A @ z - b @ z)
        >>> sol = implicit.solve(problem, torch.zeros(2, dtype=torch.float64), solver="newton_cg", tol=1e-12)
        >>> torch.allclose(sol.z, torch.linalg.solve(A, b))
        True

    References:
        J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed.,
        Springer 2006, Algorithm 7.1. R. S. Dembo and T. Steihaug,
        "Truncated-Newton algorithms for large-scale unconstrained
        optimization", Math. Programming 26, 1983.
    """

    forms: ClassVar[tuple[str, ...]] = ("argmin", "least_squares")

    max_inner: int = 50
    eta_max: float = 0.5
    c1: float = 1e-4
    c2: float = 0.9
    max_linesearch: int = 25

    def __post_init__(self) -> None:
        integer("max_inner", self.max_inner)
        interval("eta_max", self.eta_max, 0.0, 1.0, high_open=True)
        interval("c1", self.c1, 0.0, 1.0, high_open=True)
        interval("c2", self.c2, float(self.c1), 1.0, high_open=True)
        integer("max_linesearch", self.max_linesearch)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        system = require_form(system, self.name or "newton_cg", self.forms)
        z = z0
        f, g, hvp = system.value_grad_hvp(z)
        steepest = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        while not monitor.check(z, g):
            active = monitor.active
            assert active is not None
            gn = torch.linalg.vector_norm(g, dim=1)
            reference = torch.linalg.vector_norm(z, dim=1) if monitor.reference is None else monitor.reference
            target = forcing(gn, monitor.tol * reference + monitor.atol, active, self.eta_max)
            inner = cg(hvp, -g, Tolerance(target, self.max_inner))
            d = inner.x
            # CG's iterates before negative curvature are descent directions; its first is zero.
            fallback = steepest | (torch.linalg.vector_norm(d, dim=1) == 0) | ((d * g).sum(1) >= 0)
            d = torch.where(fallback[:, None], -g, d)
            step = torch.where(fallback, torch.clamp(1 / gn, max=1.0), torch.ones_like(gn))
            res = strong_wolfe(
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
            steepest = active & ~res.success
            # The Hessian's products at the new iterate come from one more evaluation, with its graph.
            z = res.x
            f, g, hvp = system.value_grad_hvp(z)
        return z
