"""What non-convergence and non-finite values do: raise, warn or pass."""

from __future__ import annotations

import warnings

from ._errors import ConvergenceError, ConvergenceWarning, SolverError
from ._monitor import Monitor

__all__ = ["ON_FAILURE", "check_on_failure", "handle_failure"]

ON_FAILURE = ("warn", "raise", "ignore")


def check_on_failure(on_failure: str) -> str:
    """Validate an ``on_failure`` policy."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}; got {on_failure!r}")
    return on_failure


def handle_failure(monitor: Monitor, on_failure: str, what: str) -> None:
    """Apply the policy to a finished solve.

    Non-convergence raises :class:`ConvergenceError` (``"raise"``), warns with
    :class:`ConvergenceWarning` (``"warn"``) or passes (``"ignore"``). A
    non-finite value raises :class:`SolverError` under ``"raise"`` and warns
    under the other two policies: it is never passed over silently.
    """
    if monitor.nonfinite:
        message = f"{what}: {monitor.message}; the result is not usable"
        if on_failure == "raise":
            raise SolverError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=4)
        return
    assert monitor.converged is not None
    if on_failure == "ignore" or bool(monitor.converged.all()):
        return
    failed = int((~monitor.converged).sum())
    total = monitor.converged.numel()
    worst = float(monitor.residual.max()) if monitor.residual is not None else float("nan")
    message = (
        f"{what} did not converge: {monitor.message} ({failed} of {total} samples unconverged, "
        f"largest residual {worst:.3e}); raise max_iter, loosen tol or pick another solver"
    )
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)
