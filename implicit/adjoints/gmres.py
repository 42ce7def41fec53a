"""Restarted GMRES on the adjoint equation ``(I - M) x = b``, matrix-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._krylov import gmres
from .._registry import register_adjoint
from .._settings import integer, set_options
from ..plugin import Monitor

__all__ = ["GMRESAdjoint"]


@register_adjoint("gmres")
@dataclass(frozen=True, kw_only=True)
class GMRESAdjoint(AdjointSolver):
    """Solves ``(I - M) x = b`` by restarted GMRES, with one product ``M v`` per step.

    ``M = (∂G/∂z)ᵀ`` in the backward pass (vector-Jacobian products) and
    ``∂G/∂z`` in forward mode. Unlike ``neumann`` it does not need the
    spectral radius of ``M`` below one: it converges whenever ``I - M`` is
    nonsingular (given enough steps), e.g. at a solution that a fixed-point
    iteration could not reach. Each row of a batch is its own system.

    The monitor sees every Arnoldi step, so ``iterations`` (and ``max_iter``)
    count Arnoldi steps; ``nfe`` of the adjoint stats counts products with
    ``M``, which adds one per restart. A solve that stops within a cycle
    reports the Arnoldi residual, equal to ``‖b - (I - M) x‖`` up to rounding
    (the basis is orthogonalised twice), without a product to confirm it: in
    the backward pass the implicit derivative receives the true residual
    anyway (the cotangent of its inner Newton step; "What the backward pass
    costs" in the concepts guide) and solves again for a correction if it
    exceeds twice the tolerance.

    A cycle that lowers no unconverged sample's residual is repeated exactly
    by the next, so the solve stops there and its message says it stagnated
    (instead of spending ``max_iter`` and reporting that). By default the
    restart is the number of unknowns per sample ``N`` (full GMRES, which
    does not stagnate), capped so that the basis, ``(restart + 1)·N·B``
    numbers, stays within 2²² (32 MiB in float64): see
    ``implicit._krylov.default_restart``.

    Args:
        restart: Arnoldi steps per cycle; memory is ``restart + 1`` vectors of
            the state's size per sample. ``None``: ``N``, capped as above.

    Reference:
        Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual
        algorithm for solving nonsymmetric linear systems", SIAM J. Sci.
        Stat. Comput. 7(3), 1986.
    """

    restart: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restart is not None:
            set_options(self, restart=integer("restart", self.restart))

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        # The monitor's tolerance is relative to ‖b‖ and b - (I - M) x = -(x - M x - b),
        # so GMRES's own residual is the one the contract asks to check.
        return gmres(lambda v: v - op(v), b, restart=self.restart, monitor=monitor, confirm=False).x
