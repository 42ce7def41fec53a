"""Newton's method with the Jacobian materialised per sample and a dense solve, for small systems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._registry import register_solver
from .._settings import integer
from .._solver import Solver
from ..newton import Linearisation, check_dense_size, line_search_step
from ..plugin import Monitor, System

__all__ = ["Newton"]


@register_solver("newton")
@dataclass(frozen=True, kw_only=True)
class Newton(Solver):
    """Solves ``F(z*) = 0`` by Newton steps ``J d = -F(z)`` with ``J = ∂F/∂z`` formed and solved densely.

    Each step materialises the Jacobian of every sample (block-diagonal when
    batched: ``B`` blocks of ``N × N``, never the ``BN × BN`` matrix) from
    ``N`` vector-Jacobian products through one recorded evaluation of ``F``,
    and solves for the step with ``torch.linalg.solve``. A linear problem is
    solved in one step. A backtracking line search then halves the step
    until ``‖F(z + λd)‖ ≤ (1 - 10⁻⁴ λ) ‖F(z)‖`` (Armijo's condition on
    ``‖F‖``), per sample; converged samples take no step.

    For small systems (up to a few hundred unknowns per sample), where
    ``newton_krylov``'s inner GMRES costs more than the dense solve and may
    stop short of the Newton step: cost per step ``O(B·N²)`` memory and
    ``O(B·N³)`` time, and ``N`` products. The line search evaluates the
    full step with its graph, so when every sample takes it the next step
    needs no further evaluation. ``nfe`` counts evaluations of ``F``.

    This differs from textbook Newton in that: 1. a sample whose Jacobian is
    singular takes the least-squares step (``torch.linalg.lstsq``) instead;
    2. when no step length within ``max_backtracks`` halvings satisfies
    Armijo's condition, the shortest one is still taken if it lowers
    ``‖F‖`` at all, and otherwise the sample stays where it is.

    Host synchronisations: one per residual check, one per line-search trial.

    Args:
        line_search: Backtrack on ``‖F‖``; without it every step is the full
            Newton step.
        max_backtracks: The most step halvings per Newton step.
        max_size: The largest ``B·N²`` (entries of the Jacobian) allowed.

    Raises:
        ValueError: (from :meth:`solve`) the Jacobian would exceed
            ``max_size`` entries; use ``newton_krylov`` then.

    Examples:
        A linear system is solved in one step:

        >>> import torch, implicit
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> sol = implicit.solve(implicit.ImplicitProblem(lambda z: A @ z - b), torch.zeros(2, dtype=torch.float64), solver="newton", tol=1e-12)
        >>> sol.stats.iterations, [round(v, 12) for v in sol.z.tolist()]
        (1, [0.6, -0.8])

    Reference:
        J. Nocedal and S. J. Wright, "Numerical Optimization", 2nd ed.,
        Springer 2006, §11.1–11.2 (Newton's method for nonlinear equations
        with a line search on the merit function).
    """

    armijo: ClassVar[float] = 1e-4

    line_search: bool = True
    max_backtracks: int = 10
    max_size: int = 2**26

    def __post_init__(self) -> None:
        if not isinstance(self.line_search, bool):
            raise ValueError(f"line_search must be a bool; got {self.line_search!r}")
        integer("max_backtracks", self.max_backtracks, 0)
        integer("max_size", self.max_size, 1)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        check_dense_size("newton", z0, self.max_size)
        z = z0
        first = Linearisation(system, z)
        lin: Linearisation | None = first
        f = first.value
        while not monitor.check(z, f):
            assert monitor.active is not None
            active = monitor.active
            if lin is None:  # the line search backtracked: linearise at the new iterate
                lin = first.at(z)
            d = self._direction(lin.jacobian(), f, active)
            z, f, lin = line_search_step(
                lin,
                z,
                f,
                d,
                active=active,
                line_search=self.line_search,
                c1=self.armijo,
                max_backtracks=self.max_backtracks,
            )
        return z

    def _direction(self, jac: torch.Tensor, f: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``d = -J⁻¹ F`` per sample (zero for converged ones), least squares where ``J`` is singular."""
        d, info = torch.linalg.solve_ex(jac, -f.unsqueeze(-1))
        if bool((info != 0).any()):
            d = torch.linalg.lstsq(jac, -f.unsqueeze(-1), driver="gelsd" if jac.device.type == "cpu" else None).solution
        return torch.where(active[:, None], d.squeeze(-1), torch.zeros_like(f))
