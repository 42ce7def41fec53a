"""Results of a solve: :class:`SolverStats` and :class:`Solution`."""

from __future__ import annotations

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
        history: Residual norm after each iteration, shape ``(iterations, B)``
            when batched and ``(iterations,)`` otherwise.
        message: A short human-readable account of how the solve ended.
    """

    solver: str
    iterations: int
    nfe: int
    residual: torch.Tensor
    converged: torch.Tensor
    history: torch.Tensor
    message: str = ""

    @property
    def all_converged(self) -> bool:
        """``True`` when every sample converged."""
        return bool(self.converged.all())

    def __repr__(self) -> str:
        res = self.residual.max().item() if self.residual.numel() else float("nan")
        return (
            f"SolverStats(solver={self.solver!r}, iterations={self.iterations}, nfe={self.nfe}, "
            f"max_residual={res:.3e}, converged={self.all_converged}, message={self.message!r})"
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
    """

    z: Any
    stats: SolverStats
    adjoint_stats: SolverStats | None = field(default=None)

    @property
    def converged(self) -> bool:
        """``True`` when every sample met the forward tolerance."""
        return self.stats.all_converged
