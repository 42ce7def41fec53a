"""What non-convergence and non-finite values do: raise, warn or pass."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

from ._errors import ConvergenceError, ConvergenceWarning, SolverError
from ._monitor import Monitor
from ._settings import ON_FAILURE, one_of

__all__ = ["ON_FAILURE", "check_on_failure", "handle_failure", "warn_at_caller"]


# Frames of these directories are the library's (and PyTorch's, between a
# caller's backward() and the derivative): a warning is attributed to the
# first frame outside them.
_SKIP = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def check_on_failure(on_failure: str) -> str:
    """Validate an ``on_failure`` policy."""
    return one_of("on_failure", on_failure, ON_FAILURE)


def warn_at_caller(warning: Warning) -> None:
    """``warnings.warn(warning)`` attributed to the caller's line, outside the library and PyTorch.

    Python's default filter shows a warning once per message and location;
    the location is the line that called the solve, the layer or
    ``backward()``. Where no such frame exists (a backward pass run by one of
    autograd's device threads) it is this function's line: still one place.
    """
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(warning, stacklevel=level if frame is not None else 1)


def handle_failure(monitor: Monitor, on_failure: str, what: str, solver: str | None = None) -> None:
    """Apply the policy to a finished solve.

    Non-convergence raises :class:`ConvergenceError` (``"raise"``), warns with
    :class:`ConvergenceWarning` (``"warn"``) or passes (``"ignore"``). A
    non-finite value raises :class:`SolverError` under ``"raise"`` and warns
    under the other two policies: it is never passed over silently.

    ``what`` names the solve (``"forward solve (anderson)"``); the warning's
    message depends only on it, the kind of failure and the variables
    concerned, so that a repeat is recognised by Python's warning filter; the
    figures are the warning's (and the error's) attributes.
    """
    if solver is None and what.endswith(")") and " (" in what:
        what, solver = what[:-1].split(" (", 1)
    label = f"{what} ({solver})" if solver else what
    figures: dict[str, Any] = {
        "what": what,
        "solver": solver,
        "reason": monitor.message,
        "iterations": monitor.iterations,
        "tol": monitor.tol,
        "atol": monitor.atol,
        "max_iter": monitor.max_iter,
        "variables": list(monitor.nonfinite) or None,
    }
    if monitor.nonfinite:
        residual = monitor.final_residual
        figures.update(residual=residual, samples=None if residual is None else residual.numel())
        names = ", ".join(monitor.nonfinite)
        if monitor.nonfinite_input:
            source = "incoming gradient" if what.startswith("adjoint") else "incoming tangent"
            figures["kind"] = "nonfinite_input"
            text = (
                f"{label}: the {source} holds a non-finite value in {names}; it came from the computation "
                "that uses the solution, not from this solve"
            )
        else:
            figures["kind"] = "nonfinite"
            after = (
                "the best iterate before it is returned, unconverged"
                if monitor.track_best
                else "its result is not usable"
            )
            text = f"{label}: non-finite value in {names}; the solve stopped there and {after}"
        if on_failure == "raise":
            raise SolverError(f"{text} ({monitor.message})", **figures)
        warn_at_caller(ConvergenceWarning(text + "; see the warning's attributes or the stats for figures", **figures))
        return
    assert monitor.converged is not None
    if on_failure == "ignore" or bool(monitor.converged.all()):
        return
    residual = monitor.final_residual
    failed = int((~monitor.converged).sum())
    total = monitor.converged.numel()
    figures.update(kind="unconverged", residual=residual, unconverged=failed, samples=total)
    within = " within max_iter" if monitor.reason == "max_iter" else ""
    text = f"{label} did not converge{within}"
    advice = "raise max_iter, loosen tol or pick another solver"
    if monitor.kind:  # a solver's own stop, in words without figures
        text = f"{label} did not converge: {monitor.kind}"
    if monitor.reason == "given":  # a solution computed elsewhere (attach): nothing was iterated
        text = f"{label}: the given solution is not within tol={monitor.tol:g}"
        advice = "solve more accurately before attaching, or loosen tol"
    if on_failure == "raise":
        worst = float(residual.max()) if residual is not None and residual.numel() else float("nan")
        raise ConvergenceError(
            f"{text}: {monitor.message} ({failed} of {total} samples unconverged, largest residual {worst:.3e}); "
            f"{advice}",
            **figures,
        )
    warn_at_caller(
        ConvergenceWarning(
            f"{text}; see the warning's attributes (residual, iterations, unconverged, reason) or the stats for "
            f"figures; {advice}",
            **figures,
        )
    )
