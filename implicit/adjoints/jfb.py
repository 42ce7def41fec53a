"""Jacobian-free backpropagation: the adjoint equation with ``∂G/∂z`` taken as zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._registry import register_adjoint
from ..plugin import Monitor

__all__ = ["JacobianFreeAdjoint"]


@register_adjoint("jfb")
@dataclass(frozen=True, kw_only=True)
class JacobianFreeAdjoint(AdjointSolver):
    """Returns ``x = b``: the gradient becomes ``gᵀ ∂G/∂θ`` at ``z*``.

    Not the implicit gradient (``approximate = True``) but a descent
    direction for contractive ``G`` at the cost of one backward pass of ``G``;
    for a root problem ``G(z) = z - F(z)``. Convergence is not checked.

    Reference:
        Fung et al., "JFB: Jacobian-Free Backpropagation for Implicit
        Networks", AAAI 2022.
    """

    approximate = True

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        monitor.check(b, torch.zeros_like(b))
        return b
