"""Inexact Newton–Krylov: Newton steps whose linear systems GMRES solves with Jacobian-vector products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._registry import register_solver
from .._settings import boolean, integer, interval, one_of, set_options
from .._solver import Solver
from ..newton import Linearisation, default_restart, gmres, line_search_step
from ..plugin import Monitor, System

__all__ = ["NewtonKrylov"]

_FORCING = ("eisenstat_walker", "constant")


@register_solver("newton_krylov")
@dataclass(frozen=True, kw_only=True)
class NewtonKrylov(Solver):
    """Solves ``F(z*) = 0`` by Newton steps ``J d = -F(z)`` solved inexactly by GMRES.

    ``J = ∂F/∂z`` is never formed: GMRES needs only the products ``J v``.
    Each Newton step evaluates ``F`` once with its graph, and each product
    differentiates a vector-Jacobian product through it (about the cost of
    one evaluation; forward mode, three to five, where no graph can be
    recorded; ``nfe`` counts evaluations of ``F``, not those products). The
    linear solve stops at ``‖F + J d‖ ≤ η_k ‖F‖``, with the forcing term
    ``η_k`` chosen by Eisenstat and Walker's choice 2,
    ``η_k = γ (‖F_k‖ / ‖F_{k-1}‖)^α`` (``γ = 0.9``, ``α = 2``), safeguarded
    as they propose and capped at ``eta_max``: loose far from the solution,
    tight near it, so convergence is superlinear without oversolving. A
    backtracking line search then halves the step until
    ``‖F(z + λd)‖ ≤ (1 - 10⁻⁴ λ) ‖F(z)‖`` (Armijo's condition on ``‖F‖``).
    When batched, each sample has its own forcing term, GMRES tolerance and
    step length, and converged samples are frozen.

    This differs from Eisenstat & Walker (1996) in that: 1. ``η_k`` is also
    kept above ``0.5 τ / ‖F_k‖`` (τ the stopping threshold), as Kelley does,
    so the last linear solve is not more accurate than the answer needs;
    2. the line search halves the step instead of fitting a parabola; 3.
    when no step length within ``max_backtracks`` halvings satisfies
    Armijo's condition, the shortest one is still taken if it lowers
    ``‖F‖`` at all, and otherwise the sample stays where it is.

    Host synchronisations: one per residual check of the Newton iteration,
    one per GMRES step (to stop the inner solve as soon as it is accurate
    enough) and one per line-search trial.

    Args:
        restart: GMRES steps per restart cycle of the inner solve. ``None``
            (default): the number of unknowns per sample ``N`` (full GMRES:
            a shorter restart can stall the inner solve for good on systems
            of more unknowns), capped so that the basis, ``(restart + 1)·N·B``
            numbers, stays within 2²² (``implicit.newton.default_restart``).
        max_inner: The most GMRES steps (Jacobian-vector products) per Newton
            step. ``None`` (default): ``max(40, restart)``, so that one full
            cycle fits.
        eta_max: Upper bound on the forcing term, in ``(0, 1)``; also
            ``η_0``, and the constant forcing term when ``forcing="constant"``.
        forcing: ``"eisenstat_walker"`` (choice 2) or ``"constant"``.
        line_search: Backtrack on ``‖F‖``; without it every step is the full
            Newton step.
        max_backtracks: The most step halvings per Newton step.

    References:
        S. C. Eisenstat and H. F. Walker, "Choosing the forcing terms in an
        inexact Newton method", SIAM J. Sci. Comput. 17(1), 1996.
        D. A. Knoll and D. E. Keyes, "Jacobian-free Newton–Krylov methods:
        a survey of approaches and applications", J. Comput. Phys. 193, 2004.
    """

    gamma: ClassVar[float] = 0.9
    alpha: ClassVar[float] = 2.0
    armijo: ClassVar[float] = 1e-4

    restart: int | None = None
    max_inner: int | None = None
    eta_max: float = 0.9
    forcing: str = "eisenstat_walker"
    line_search: bool = True
    max_backtracks: int = 10

    def __post_init__(self) -> None:
        set_options(
            self,
            restart=None if self.restart is None else integer("restart", self.restart),
            max_inner=None if self.max_inner is None else integer("max_inner", self.max_inner),
            max_backtracks=integer("max_backtracks", self.max_backtracks, minimum=0),
            eta_max=interval("eta_max", self.eta_max, 0.0, 1.0, high_open=True),
            forcing=one_of("forcing", self.forcing, _FORCING),
            line_search=boolean("line_search", self.line_search),
        )

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        z = z0
        last = Linearisation(system, z)
        product: Linearisation | None = last
        f = last.value
        fn = torch.linalg.vector_norm(f, dim=1)
        eta = torch.full_like(fn, self.eta_max)
        fn_prev: torch.Tensor | None = None
        restart = default_restart(*z.shape) if self.restart is None else self.restart
        max_inner = max(40, restart) if self.max_inner is None else self.max_inner
        while not monitor.check(z, f):
            assert monitor.active is not None
            active = monitor.active
            if fn_prev is not None and self.forcing == "eisenstat_walker":
                eta = self._forcing(eta, fn, fn_prev)
            reference = torch.linalg.vector_norm(z, dim=1) if monitor.reference is None else monitor.reference
            threshold = monitor.tol * reference + monitor.atol
            eta_k = torch.minimum(torch.maximum(eta, 0.5 * threshold / fn), torch.full_like(eta, self.eta_max))
            # Converged samples need no step: an infinite target leaves their direction at zero.
            target = torch.where(active, eta_k * fn, torch.full_like(fn, float("inf")))
            if product is None:  # the line search backtracked: F's graph at the new iterate
                product = last.at(z)
            last = product
            d = gmres(
                product,
                -f,
                restart=restart,
                tol=0.0,
                atol=target,
                max_iter=max_inner,
                confirm=False,
            ).x
            z, f, product = line_search_step(
                product,
                z,
                f,
                d,
                active=active,
                line_search=self.line_search,
                c1=self.armijo,
                max_backtracks=self.max_backtracks,
            )
            fn_prev = fn
            fn = torch.linalg.vector_norm(f, dim=1)
        return z

    def _forcing(self, eta: torch.Tensor, fn: torch.Tensor, fn_prev: torch.Tensor) -> torch.Tensor:
        """Eisenstat–Walker choice 2 with its safeguard against a sudden drop of ``η``."""
        new = self.gamma * (fn / fn_prev) ** self.alpha
        floor = self.gamma * eta**self.alpha
        new = torch.where(floor > 0.1, torch.maximum(new, floor), new)
        return torch.nan_to_num(new, nan=self.eta_max).clamp(max=self.eta_max)
