"""Exceptions and warnings raised while solving or differentiating."""

from __future__ import annotations

__all__ = ["ConvergenceError", "ConvergenceWarning", "SolverError"]


class SolverError(RuntimeError):
    """A solve could not produce a trustworthy result (non-finite values, breakdown)."""


class ConvergenceError(SolverError):
    """A forward or adjoint solve stopped before meeting its tolerance."""


class ConvergenceWarning(UserWarning):
    """Issued instead of :class:`ConvergenceError` when ``on_failure="warn"``."""
