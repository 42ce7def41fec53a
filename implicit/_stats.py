"""Results of a solve: :class:`SolverStats` and :class:`Solution`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Solution", "SolverStats"]


@dataclass
class SolverStats:
    """What one forward or adjoint solve did.

    Attributes:
        solver: The registered name of the solver that ran.
        iterations: Iterations performed.
        nfe: Evaluations of the residual or map (vector-Jacobian products for
            an adjoint solve).
        residual: Final residual norm ``‖F(z)‖``; shape ``(B,)`` when batched,
            0-dim otherwise.
        converged: Whether each sample met ``‖F(z)‖ ≤ tol·‖z‖ + atol``; same
            shape as ``residual``.
        history: Residual norm at each convergence check, the initial state
            first: ``iterations + 1`` rows for solvers checked once per
            iterate (fewer for ``scipy``, checked at its ends only); shape
            ``(checks, B)`` when batched and ``(checks,)`` otherwise.
        message: A short human-readable account of how the solve ended.
        approximate: ``True`` for the stats of an approximate adjoint
            (``jfb``), which solves no equation: its gradient is not the
            implicit gradient to any tolerance, so ``converged`` is ``False``
            and ``residual`` is NaN (not measured); no warning is issued,
            since the approximation was asked for.

    Examples:
        Picard iteration on ``z = z/2 + 3/2`` halves the error at each step:

        >>> import torch, implicit
        >>> problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + 1.5)
        >>> stats = implicit.solve(problem, torch.zeros((), dtype=torch.float64), solver="fixed_point", tol=1e-10).stats
        >>> stats.solver, stats.iterations, stats.nfe, tuple(stats.history.shape)
        ('fixed_point', 33, 34, (34,))
        >>> bool(stats.converged), stats.all_converged, stats.residual.item() < 1e-9
        (True, True, True)
    """

    solver: str
    iterations: int
    nfe: int
    residual: torch.Tensor
    converged: torch.Tensor
    history: torch.Tensor
    message: str = ""
    approximate: bool = False

    @property
    def all_converged(self) -> bool:
        """``True`` when every sample converged."""
        return bool(self.converged.all())

    def __repr__(self) -> str:
        res = self.residual.max().item() if self.residual.numel() else float("nan")
        return (
            f"SolverStats(solver={self.solver!r}, iterations={self.iterations}, nfe={self.nfe}, "
            f"max_residual={res:.3e}, converged={self.all_converged}, "
            + ("approximate=True, " if self.approximate else "")
            + f"message={self.message!r})"
        )


@dataclass
class Solution:
    """The solution of an implicit problem.

    Attributes:
        z: The solution, in the structure of ``z0``; differentiable through the
            implicit function theorem.
        stats: :class:`SolverStats` of the forward solve.
        adjoint_stats: :class:`SolverStats` of the most recent adjoint solve,
            ``None`` until a backward pass has run.

    Examples:
        The fixed point of ``z = z/2 + θ`` is ``z* = 2θ``, so ``dz*/dθ = 2``:

        >>> import torch, implicit
        >>> theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        >>> problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + theta)
        >>> sol = implicit.solve(problem, torch.zeros((), dtype=torch.float64), solver="fixed_point", adjoint="neumann", tol=1e-10)
        >>> round(sol.z.item(), 8), sol.converged, sol.adjoint_stats is None
        (3.0, True, True)
        >>> sol.z.backward()
        >>> round(theta.grad.item(), 8), sol.adjoint_stats.solver, sol.adjoint_stats.all_converged
        (2.0, 'neumann', True)
    """

    z: Any
    stats: SolverStats
    adjoint_stats: SolverStats | None = field(default=None)
    # Called with the stats of every adjoint solve, held by the backward
    # itself, so that they are called even after the Solution is gone (a
    # layer's counters, say).
    _adjoint_listeners: list[Callable[[SolverStats], None]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    @property
    def converged(self) -> bool:
        """``True`` when every sample met the forward tolerance."""
        return self.stats.all_converged
