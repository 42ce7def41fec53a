"""Truncated Neumann series: fixed-point iteration on the adjoint equation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._registry import register_adjoint
from ..plugin import Monitor

__all__ = ["NeumannAdjoint"]


@register_adjoint("neumann")
@dataclass(frozen=True, kw_only=True)
class NeumannAdjoint(AdjointSolver):
    """``x ← M x + b`` from ``x = b``: the partial sums of ``Σₖ Mᵏ b``.

    Converges when the spectral radius of ``M = (∂G/∂z)ᵀ`` is below one, as
    it is at an attracting fixed point; the error shrinks by about that radius
    per vector-Jacobian product.
    """

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        # The partial sum x = b + M b + ... + Mᵏ b has residual M x + b - x =
        # Mᵏ⁺¹ b, the next term: one product and one sum per iteration. Every
        # sample keeps adding terms until all have converged: the products are
        # made for the whole batch anyway, a converged sample only gains
        # accuracy, and its reported residual stays exactly its sum's.
        x, term = b.clone(), b
        while True:
            term = op(term)
            if monitor.check(x, term):
                return x
            x.add_(term)  # x is this solve's own: summed in place, no tensor per iteration
