"""What the optimisation solvers share: the problem forms they accept, option checks, forcing terms."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import cast

import torch

from ..plugin import OptimisationSystem, System

__all__ = ["check_positive", "forcing", "normal_matvec", "require_form"]

_WHAT = {
    "argmin": "minimisation problems (implicit.argmin, ImplicitProblem.argmin)",
    "least_squares": "least-squares problems (implicit.least_squares, ImplicitProblem.least_squares)",
}


def require_form(system: System, solver: str, forms: tuple[str, ...]) -> OptimisationSystem:
    """``system`` as an optimisation problem's, or a ``ValueError`` unless its form is one of ``forms``."""
    form = getattr(system, "form", None)
    if form is None:  # a linear system of the backward pass, handed to a forward solver
        form = "linear (an adjoint equation)"
    if form in forms:
        return cast(OptimisationSystem, system)
    accepted = " and ".join(_WHAT[f] for f in forms)
    if form in ("root", "fixed_point"):
        hint = (
            "for F(z) = 0 or z = f(z) use a root solver such as 'newton_krylov', 'anderson' or 'broyden', "
            "or state a minimisation as ImplicitProblem.argmin(objective) / least_squares(residuals)"
        )
    elif form == "argmin":
        hint = "state it as ImplicitProblem.least_squares(residuals), or use 'lbfgs' or 'newton_cg' on the objective"
    else:
        hint = "name an adjoint made for linear systems instead, such as 'gmres', 'cg' or 'exact'"
    raise ValueError(f"solver {solver!r} solves {accepted}; this problem has form {form!r}: {hint}")


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and float(value) > 0):
        raise ValueError(f"{name} must be a positive number; got {value!r}")


def forcing(gn: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor, eta_max: float) -> torch.Tensor:
    """The inner solve's absolute residual target per row: ``η ‖g‖`` with ``η = min(η_max, √‖g‖)``.

    ``√‖g‖`` gives superlinear convergence of truncated Newton (Nocedal and
    Wright, Algorithm 7.1); ``η`` is kept above ``0.5 τ / ‖g‖`` (``τ`` the
    outer stopping threshold) so that the last inner solve is no more
    accurate than the answer needs. Rows that have converged get ``inf``
    (nothing to solve).
    """
    eta = torch.clamp(torch.sqrt(gn), max=eta_max)
    eta = torch.maximum(eta, torch.clamp(0.5 * threshold / gn, max=eta_max))
    return torch.where(active, eta * gn, torch.full_like(gn, float("inf")))


def normal_matvec(
    jvp: Callable[[torch.Tensor], torch.Tensor],
    vjp: Callable[[torch.Tensor], torch.Tensor],
    damping: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ Jᵀ J v`` (plus ``μ v`` per row with ``damping`` ``μ``, ``(B,)``) from the products of ``J``."""
    if damping is None:
        return lambda v: vjp(jvp(v))
    mu = damping[:, None]
    return lambda v: vjp(jvp(v)) + mu * v
