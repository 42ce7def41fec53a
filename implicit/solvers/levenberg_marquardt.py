"""Levenberg–Marquardt for least squares: damped normal equations by CG, damping by the gain ratio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._cg import cg
from .._krylov import Tolerance
from .._registry import register_solver
from .._settings import integer, interval
from .._solver import Solver
from ..plugin import Monitor, System
from ._descent import check_positive, forcing, normal_matvec, require_form

__all__ = ["LevenbergMarquardt"]


@register_solver("levenberg_marquardt")
@dataclass(frozen=True, kw_only=True)
class LevenbergMarquardt(Solver):
    """Solves ``z* = argmin ½ ‖r(z)‖²`` by damped Gauss–Newton steps ``(JᵀJ + μ I) p = −Jᵀr``.

    ``J = ∂r/∂z`` is never formed: conjugate gradients solve the damped
    normal equations with one Jacobian-vector and one vector-Jacobian
    product per step (``system.lsq_linearize``), to the relative accuracy
    ``η = min(eta_max, √‖Jᵀr‖)``. Each sample has its own damping ``μ``,
    adapted by the gain ratio ``ϱ = (L(z) − L(z + p)) / (L(z) − q(p))`` of
    the actual to the predicted decrease (``q`` the Gauss–Newton model) by
    Nielsen's rule: a step with ``ϱ > 0`` is taken and
    ``μ ← μ · max(1/3, 1 − (2ϱ − 1)³)``, ``ν ← 2``; otherwise the sample
    stays, ``μ ← μ ν`` and ``ν ← 2ν``. Large ``μ`` gives short
    steepest-descent steps, small ``μ`` Gauss–Newton steps. The tolerance
    applies to the gradient ``Jᵀr``; every iteration checks each sample's
    current iterate, taken step or not.

    This differs from Madsen, Nielsen and Tingleff's Algorithm 3.16 in that:
    1. the damping matrix is the identity (``D = I``; ``diag(JᵀJ)`` would
    cost ``N`` products per sample); 2. ``μ₀ = tau · ‖J ∇‖² / ‖∇‖²``, the
    curvature of ``JᵀJ`` along the gradient, stands in for the largest
    diagonal entry of ``JᵀJ``; 3. the linear solve is inexact (CG from zero
    decreases the damped model monotonically, so the predicted decrease
    stays positive).

    Needs a least-squares problem (``implicit.least_squares``); on any other
    it raises a ``ValueError``.

    Each trial step is evaluated with its graph (``system.lsq_linearize``),
    so that a taken step needs no further evaluation.

    Host synchronisations: one per iteration's check, one per CG step and
    one to decide whether every sample took its step.

    Args:
        tau: The initial damping relative to the curvature along the gradient.
        max_inner: The most CG steps per iteration.
        eta_max: Upper bound on the inner solve's relative tolerance, in ``(0, 1)``.

    Examples:
        Fitting ``y = a · exp(b t)`` exactly to three points:

        >>> import torch, implicit
        >>> t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-0.5 * t)
        >>> problem = implicit.ImplicitProblem.least_squares(lambda p: p[0] * torch.exp(p[1] * t) - y)
        >>> sol = implicit.solve(problem, torch.tensor([1.0, 0.0], dtype=torch.float64), solver="levenberg_marquardt", tol=1e-12)
        >>> [round(v, 8) for v in sol.z.tolist()]
        [2.0, -0.5]

    References:
        K. Madsen, H. B. Nielsen and O. Tingleff, *Methods for non-linear
        least squares problems*, 2nd ed., IMM, DTU 2004, Section 3.2. H. B.
        Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05.
    """

    forms: ClassVar[tuple[str, ...]] = ("least_squares",)
    rounding: ClassVar[float] = 64.0  # ulps of ½‖r‖² below which a decrease is not measurable

    tau: float = 1e-3
    max_inner: int = 50
    eta_max: float = 0.1

    def __post_init__(self) -> None:
        check_positive("tau", self.tau)
        integer("max_inner", self.max_inner)
        interval("eta_max", self.eta_max, 0.0, 1.0, high_open=True)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        system = require_form(system, self.name or "levenberg_marquardt", self.forms)
        z = z0
        r, jvp, vjp = system.lsq_linearize(z)
        g = vjp(r)
        mu: torch.Tensor | None = None
        nu = torch.full((z.shape[0],), 2.0, dtype=z.dtype, device=z.device)
        tiny = torch.finfo(z.dtype).tiny
        while not monitor.check(z, g):
            active = monitor.active
            assert active is not None
            gn = torch.linalg.vector_norm(g, dim=1)
            if mu is None:
                jg = jvp(g)
                curvature = (jg * jg).sum(1) / (gn * gn).clamp(min=tiny)
                mu = self.tau * torch.where(curvature > 0, curvature, torch.ones_like(curvature))
            reference = torch.linalg.vector_norm(z, dim=1) if monitor.reference is None else monitor.reference
            target = forcing(gn, monitor.tol * reference + monitor.atol, active, self.eta_max)
            p = cg(normal_matvec(jvp, vjp, mu), -g, Tolerance(target, self.max_inner)).x
            jp = jvp(p)
            predicted = -((g * p).sum(1) + 0.5 * (jp * jp).sum(1))
            z_try = z + p
            r_try, jvp_try, vjp_try = system.lsq_linearize(z_try)
            g_try = vjp_try(r_try)
            # ½‖r‖² − ½‖r_try‖² as ½ (r − r_try)·(r + r_try): no cancellation of two large sums
            # when the decrease is far below ‖r‖² (near a solution with nonzero residuals).
            actual = 0.5 * ((r - r_try) * (r + r_try)).sum(1)
            gain = actual / predicted
            # A decrease within the rounding of ½‖r‖² cannot be measured: there the step is
            # judged by the gradient it leads to, and counts as a perfect one (ϱ = 1).
            size = 0.5 * ((r * r).sum(1) + (r_try * r_try).sum(1))
            flat = actual.abs() <= self.rounding * torch.finfo(z.dtype).eps * size
            finite = torch.isfinite(actual) & torch.isfinite(g_try).all(1)
            improves = torch.where(flat, torch.linalg.vector_norm(g_try, dim=1) < gn, (predicted > 0) & (gain > 0))
            take = active & finite & improves
            gain = torch.where(flat, torch.ones_like(gain), gain)
            factor = torch.clamp(1 - (2 * gain - 1) ** 3, min=1 / 3)
            mu = torch.where(take, mu * factor, torch.where(active, mu * nu, mu))
            nu = torch.where(take, torch.full_like(nu, 2.0), torch.where(active, 2 * nu, nu))
            moved = take | ~active  # converged rows have p = 0: z_try is z there
            if bool(moved.all()):
                z, r, g, jvp, vjp = z_try, r_try, g_try, jvp_try, vjp_try
            elif bool(take.any()):
                z = torch.where(take[:, None], z_try, z)
                r, jvp, vjp = system.lsq_linearize(z)
                g = vjp(r)
        return z
