"""Conjugate gradients on the adjoint equation ``(I - M) x = b``, for a symmetric positive definite ``I - M``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._cg import cg
from .._registry import register_adjoint
from ..plugin import Monitor

__all__ = ["NEGATIVE_CURVATURE", "CGAdjoint"]

NEGATIVE_CURVATURE = (
    "negative curvature: the Hessian is not positive definite at the solution (a saddle point or "
    "maximum?); use adjoint='minres' or 'gmres'"
)


@register_adjoint("cg")
@dataclass(frozen=True, kw_only=True)
class CGAdjoint(AdjointSolver):
    """Solves ``(I - M) x = b`` by conjugate gradients: the natural adjoint at a minimum.

    For an argmin or least-squares problem the residual is the gradient, so
    ``I - M`` is the Hessian of the objective at the solution: symmetric,
    and positive definite at a strict minimum. CG then needs one product
    ``M v`` per step and three vectors of memory per sample (GMRES keeps
    ``restart + 1``), and converges in at most ``N`` steps in exact arithmetic.
    It is the default adjoint of argmin and least-squares problems.

    Each sample is its own system. A sample whose search direction has
    non-positive curvature (the Hessian is indefinite there: the solution
    is a saddle point or a maximum) stops and stays unconverged, and the
    failure policy reports it with a message saying so (a
    :class:`~implicit.ConvergenceWarning` or, under ``on_failure="raise"``,
    :class:`~implicit.ConvergenceError`); use ``minres`` (symmetric
    indefinite) or ``gmres`` there.

    When every sample has converged by the recurrence, the residual is
    recomputed as ``b - (I - M) x`` (one more product) and the iteration
    goes on from ``x`` where that is not within tolerance, so a gradient is
    never reported converged on the recurrence alone (which drifts in
    floating point, and is meaningless when ``I - M`` is not symmetric).

    ``symmetric = True``: on a root or fixed-point problem whose Jacobian is
    not symmetric, CG solves the wrong equation; use ``gmres`` there.

    Examples:
        Ridge regression ``z* = argmin ‖Xz − y‖² + λ‖z‖²``; the gradient of
        ``Σ z*`` in ``y`` is ``X (XᵀX + λI)⁻¹ 1``:

        >>> import torch, implicit
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> problem = implicit.ImplicitProblem.argmin(lambda z: ((X @ z - y) ** 2).sum() + 0.1 * (z**2).sum())
        >>> sol = implicit.solve(problem, torch.zeros(2, dtype=torch.float64), solver="newton_krylov", adjoint="cg", tol=1e-10)
        >>> sol.z.sum().backward()
        >>> want = X @ torch.linalg.solve(X.T @ X + 0.1 * torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(y.grad, want), sol.adjoint_stats.solver
        (True, 'cg')

    Reference:
        M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for
        solving linear systems", J. Res. Nat. Bur. Standards 49(6), 1952.
    """

    symmetric: ClassVar[bool] = True

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        def matvec(v: torch.Tensor) -> torch.Tensor:
            return v - op(v)

        out = cg(matvec, b, monitor)
        while True:
            if bool(out.negative_curvature.any()):
                monitor.message = f"{NEGATIVE_CURVATURE} ({monitor.message})"
                monitor.kind = NEGATIVE_CURVATURE
                return out.x
            if monitor.nonfinite or not bool(out.converged.all()):
                return out.x
            # Converged by the recurrence: CG again from x checks the true residual
            # first, and returns at once (no step) where it is within tolerance.
            steps = monitor.iterations
            out = cg(matvec, b, monitor, x0=out.x)
            if monitor.iterations == steps:
                return out.x
