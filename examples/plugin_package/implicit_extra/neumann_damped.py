"""``neumann_damped``: damped Richardson iteration on the adjoint equation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import implicit

__all__ = ["DampedNeumann"]


@dataclass(frozen=True, kw_only=True)
class DampedNeumann(implicit.AdjointSolver):
    """Solves ``x = M x + b`` by ``x ← x + ω (M x + b - x)`` from ``x = b``.

    With ``ω = 1`` this is the truncated Neumann series of the built-in
    ``neumann`` adjoint. A smaller ``ω`` converges whenever every eigenvalue
    ``λ`` of ``M`` satisfies ``|1 - ω (1 - λ)| < 1``, which admits eigenvalues
    below ``-1`` (oscillating fixed-point maps) at the price of slower
    convergence on well-behaved ones.

    Args:
        omega: The relaxation weight ``ω``, in ``(0, 1]``.
        tol: Relative tolerance (``None``: the forward solve's).
        atol: Absolute tolerance (``None``: the forward solve's).
        max_iter: The most iterations.
    """

    omega: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.omega <= 1.0:
            raise ValueError(f"omega must lie in (0, 1]; got {self.omega}")

    def solve(self, op: implicit.LinearOperator, b: torch.Tensor, monitor: Any) -> torch.Tensor:
        """Iterate until ``monitor.check`` says stop; return the last checked iterate.

        Args:
            op: The operator ``M`` (one vector-Jacobian product per call).
            b: The right-hand side, ``(B, N)``.
            monitor: The convergence monitor: ``check(x, r)`` records the residual
                ``r`` of iterate ``x`` and says whether to stop; ``freeze`` keeps
                converged samples fixed.

        Returns:
            The approximate solution ``x``, ``(B, N)``.
        """
        x = b
        while True:
            r = op(x) + b - x
            if monitor.check(x, r):
                return x
            x = monitor.freeze(x + self.omega * r, x)
