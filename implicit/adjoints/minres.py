"""MINRES on the adjoint equation ``(I - M) x = b``, for a symmetric, possibly indefinite ``I - M``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._cg import minres
from .._registry import register_adjoint
from ..plugin import Monitor

__all__ = ["MINRESAdjoint"]


@register_adjoint("minres")
@dataclass(frozen=True, kw_only=True)
class MINRESAdjoint(AdjointSolver):
    """Solves ``(I - M) x = b`` by MINRES, for a symmetric ``I - M`` that may be indefinite.

    The adjoint of a stationary point that is not a minimum: a saddle point
    of an objective (a min-max problem, the KKT point of an equality
    constrained problem written as a Lagrangian), where the Hessian
    ``I - M`` is symmetric but indefinite and ``cg`` breaks down. One
    product ``M v`` per step and a few vectors of memory per sample, like
    ``cg``; the residual decreases monotonically. When the solve stops, the
    residual is recomputed as ``b - (I - M) x`` (one product) and the
    iteration restarts from ``x`` where it is not within tolerance.

    ``symmetric = True``: on a root or fixed-point problem whose Jacobian is
    not symmetric, MINRES solves the wrong equation; use ``gmres`` there.

    Examples:
        The saddle point of ``f(x, y) = ½x² − ½y² + θ(x + 2y)`` is
        ``(x*, y*) = (−θ, 2θ)``, so ``d(x* + y*)/dθ = 1``:

        >>> import torch, implicit
        >>> theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda z: 0.5 * z["x"] ** 2 - 0.5 * z["y"] ** 2 + theta * (z["x"] + 2 * z["y"])
        >>> z0 = {"x": torch.zeros((), dtype=torch.float64), "y": torch.zeros((), dtype=torch.float64)}
        >>> z = implicit.argmin(f, z0, solver="newton_krylov", adjoint="minres", tol=1e-10)
        >>> (z["x"] + z["y"]).backward()
        >>> round(theta.grad.item(), 8)
        1.0

    Reference:
        C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems
        of linear equations", SIAM J. Numer. Anal. 12(4), 1975.
    """

    symmetric: ClassVar[bool] = True

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        return minres(lambda v: v - op(v), b, monitor, confirm=True).x
