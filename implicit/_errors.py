"""Exceptions and warnings raised while solving or differentiating."""

from __future__ import annotations

__all__ = ["ConvergenceError", "ConvergenceWarning", "SolverError"]


class SolverError(RuntimeError):
    """A solve could not produce a trustworthy result (non-finite values, breakdown).

    Raised by :func:`~implicit.solve` and everything built on it when a
    non-finite value appears in the forward or adjoint solve and
    ``on_failure="raise"``; the message names the variable. Under ``"warn"``
    and ``"ignore"`` a :class:`ConvergenceWarning` is issued instead: a
    non-finite result is never returned silently. The base class of
    :class:`ConvergenceError`.

    Examples:
        >>> import torch, implicit
        >>> try:
        ...     implicit.fixed_point(lambda z: {"h": torch.log(z["h"] - 2)}, {"h": torch.ones(2, dtype=torch.float64)}, on_failure="raise")
        ... except implicit.SolverError as err:
        ...     print(type(err).__name__, "z['h']" in str(err))
        SolverError True
    """


class ConvergenceError(SolverError):
    """A forward or adjoint solve stopped before meeting its tolerance.

    Raised when ``on_failure="raise"`` and the solver reached ``max_iter``
    with some sample's residual still above ``tol·‖z‖ + atol``; the message
    gives the number of unconverged samples and the largest residual.

    Examples:
        >>> import torch, implicit
        >>> try:
        ...     implicit.fixed_point(torch.cos, torch.tensor(1.0, dtype=torch.float64), solver="fixed_point", max_iter=3, on_failure="raise")
        ... except implicit.ConvergenceError as err:
        ...     print(type(err).__name__, isinstance(err, implicit.SolverError))
        ConvergenceError True
    """


class ConvergenceWarning(UserWarning):
    """Issued instead of :class:`ConvergenceError` when ``on_failure="warn"`` (the default).

    Also issued for a non-finite value under ``"warn"`` and ``"ignore"``. The
    solution is still returned; turn the warning into an error with
    ``warnings.simplefilter("error", implicit.ConvergenceWarning)``.

    Examples:
        >>> import warnings, torch, implicit
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     z = implicit.fixed_point(torch.cos, torch.tensor(1.0, dtype=torch.float64), solver="fixed_point", max_iter=3)
        >>> [w.category.__name__ for w in caught]
        ['ConvergenceWarning']
    """
