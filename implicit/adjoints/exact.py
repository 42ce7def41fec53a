"""The exact adjoint: materialise ``∂G/∂z`` per sample and solve densely."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _compat
from .._adjoint import AdjointSolver, LinearOperator
from .._registry import register_adjoint
from ..plugin import Monitor

__all__ = ["ExactAdjoint"]


@register_adjoint("exact")
@dataclass(frozen=True, kw_only=True)
class ExactAdjoint(AdjointSolver):
    """Builds ``M`` per sample (block-diagonal when batched) and solves ``(I - M) x = b``.

    The Jacobian comes from ``N`` vector-Jacobian products batched with
    ``vmap`` (``N`` the number of unknowns per sample), i.e. the rows of the
    ``torch.func.jacrev`` Jacobian; for a batched problem one product with a
    basis vector repeated over the batch yields that row of every sample's
    block at once. Cost ``O(B·N²)`` memory and ``O(B·N³)`` time: for large
    states use ``gmres`` or ``neumann``.

    A sample whose block ``I - M`` is singular (to the factorisation) has
    no adjoint solution: its result is NaN and it is reported non-finite
    (and unconverged), while the other samples keep their exact solutions.

    Args:
        max_size: The largest ``B·N²`` (entries of the Jacobian) allowed.
    """

    max_size: int = 2**26

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        entries = op.batch * op.size * op.size
        if entries > self.max_size:
            raise ValueError(
                f"the exact adjoint would materialise a Jacobian of {op.batch} x {op.size} x {op.size} = "
                f"{entries} entries (max_size={self.max_size}); use adjoint='gmres' or 'neumann' for "
                "states this large, or raise adjoint_options={'max_size': ...}"
            )
        m = op.dense()
        eye = torch.eye(op.size, dtype=b.dtype, device=b.device)
        x, info = torch.linalg.solve_ex(eye - m, b.unsqueeze(-1))
        # Per sample: a singular block leaves its own sample non-finite for the
        # monitor to report (unconverged), and the other samples exact.
        singular = info != 0
        x = torch.where(singular[:, None], torch.full_like(x.squeeze(-1), float("nan")), x.squeeze(-1))
        monitor.check(x, x - (m @ x.unsqueeze(-1)).squeeze(-1) - b)
        if monitor.nonfinite and bool(singular.any()):
            samples = _compat.tolist(singular.nonzero().flatten())
            monitor.message = (
                f"I - ∂G/∂z is singular for sample{'s' if len(samples) > 1 else ''} {samples[:8]}"
                f"{'...' if len(samples) > 8 else ''} (no solution of the adjoint equation there); "
                "the other samples are exact"
            )
        return x
