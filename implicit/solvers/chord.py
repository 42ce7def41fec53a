"""The chord method: Newton steps with one Jacobian, formed at the start and factorised once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._registry import register_solver
from .._solver import Solver
from ..newton import Linearisation, check_dense_size, line_search_step
from ..plugin import Monitor, System, boolean, integer, set_options

__all__ = ["Chord"]


@register_solver("chord")
@dataclass(frozen=True, kw_only=True)
class Chord(Solver):
    """Solves ``F(z*) = 0`` by steps ``J₀ d = -F(z)``, ``J₀ = ∂F/∂z`` at ``z0``, LU-factorised once.

    The Jacobian of every sample (``B`` blocks of ``N × N``) is formed once,
    at the start, and factorised (``torch.linalg.lu_factor_ex``); each step
    then costs two triangular solves per sample (``torch.linalg.lu_solve``)
    and the evaluations of its line search, which halves the step until
    ``‖F(z + λd)‖ ≤ (1 - 10⁻⁴ λ) ‖F(z)‖`` (as for ``newton``). A linear
    problem is solved in one step; on a nonlinear one convergence is
    linear, with the rate ``‖I - J₀⁻¹ J(z*)‖``: fast when the Jacobian
    changes little between ``z0`` and the solution. With ``refresh = k``
    the Jacobian is formed and factorised again every ``k`` steps (the
    method of Shamanskii; ``refresh = 1`` is Newton's method).

    For small systems whose Jacobian is costly next to an evaluation of
    ``F`` (``N`` vector-Jacobian products, ``O(N³)`` to factorise):
    ``newton`` pays that every step, ``chord`` once. ``nfe`` counts
    evaluations of ``F``.

    This differs from the textbook chord method in that: 1. a sample whose
    ``J₀`` is singular makes the whole batch use the pseudo-inverse of its
    ``J₀`` (the minimum-norm least-squares step, frozen likewise); 2. the
    step is searched on ``‖F‖``, per sample, as Newton's is (without it,
    every step is the full chord step); far from ``z0`` the chord direction
    need not lower ``‖F‖``, and a sample whose search finds no decrease
    stays where it is: set ``refresh`` then.

    Host synchronisations: one per residual check, one per line-search
    trial, one per factorisation.

    Args:
        refresh: Form and factorise the Jacobian again every ``refresh``
            steps, a positive int; ``None`` (default): never.
        line_search: Backtrack on ``‖F‖``; without it every step is the full
            chord step.
        max_backtracks: The most step halvings per step.
        max_size: The largest ``B·N²`` (entries of the Jacobian) allowed.

    Raises:
        ValueError: (from :meth:`solve`) the Jacobian would exceed
            ``max_size`` entries; use ``newton_krylov`` then.

    Examples:
        A linear system is solved in one step; ``z³ + z = 2`` linearly, from
        the Jacobian at ``z = 0.9``:

        >>> import torch, implicit
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> sol = implicit.solve(implicit.ImplicitProblem(lambda z: A @ z - b), torch.zeros(2, dtype=torch.float64), solver="chord", tol=1e-12)
        >>> sol.stats.iterations, [round(v, 12) for v in sol.z.tolist()]
        (1, [0.6, -0.8])
        >>> sol = implicit.solve(implicit.ImplicitProblem(lambda z: z**3 + z - 2), torch.tensor(0.9, dtype=torch.float64), solver="chord", tol=1e-12)
        >>> round(sol.z.item(), 12), sol.stats.iterations
        (1.0, 15)

    References:
        C. T. Kelley, *Iterative Methods for Linear and Nonlinear
        Equations*, SIAM 1995, Chapter 5 (the chord and Shamanskii methods).
    """

    armijo: ClassVar[float] = 1e-4

    refresh: int | None = None
    line_search: bool = True
    max_backtracks: int = 10
    max_size: int = 2**26

    def __post_init__(self) -> None:
        set_options(
            self,
            refresh=None if self.refresh is None else integer("refresh", self.refresh),
            line_search=boolean("line_search", self.line_search),
            max_backtracks=integer("max_backtracks", self.max_backtracks, minimum=0),
            max_size=integer("max_size", self.max_size),
        )

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        check_dense_size(self.name or "chord", z0, self.max_size)
        lin = Linearisation(system, z0)
        fresh: Linearisation | None = lin  # the linearisation at z, where one was recorded
        z, f = z0, lin.value
        step: Callable[[torch.Tensor], torch.Tensor] | None = None
        taken = 0
        while not monitor.check(z, f):
            assert monitor.active is not None
            if step is None or self._refresh_due(taken):
                lin = fresh if fresh is not None else lin.at(z)
                step = _factorise(lin.jacobian())
            taken += 1
            d = torch.where(monitor.active[:, None], step(-f), torch.zeros_like(f))
            # The full step is recorded with its graph only where the next step needs a Jacobian.
            z, f, fresh = line_search_step(
                lin,
                z,
                f,
                d,
                active=monitor.active,
                line_search=self.line_search,
                linearise=self._refresh_due(taken),
                c1=self.armijo,
                max_backtracks=self.max_backtracks,
            )
        return z

    def _refresh_due(self, taken: int) -> bool:
        return self.refresh is not None and taken % self.refresh == 0


def _factorise(jac: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rhs ↦ J⁻¹ rhs`` per sample from one LU factorisation (the pseudo-inverse if any ``J`` is singular)."""
    lu, pivots, info = torch.linalg.lu_factor_ex(jac)
    if bool((info != 0).any()):
        pinv = torch.linalg.pinv(jac)
        return lambda rhs: (pinv @ rhs.unsqueeze(-1)).squeeze(-1)
    return lambda rhs: torch.linalg.lu_solve(lu, pivots, rhs.unsqueeze(-1)).squeeze(-1)
