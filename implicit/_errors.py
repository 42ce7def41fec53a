"""Exceptions and warnings raised while solving or differentiating."""

from __future__ import annotations

from typing import Any

__all__ = ["ConvergenceError", "ConvergenceWarning", "SolverError"]

_FIGURES = (
    "what",
    "solver",
    "kind",
    "reason",
    "residual",
    "iterations",
    "tol",
    "atol",
    "max_iter",
    "unconverged",
    "samples",
    "variables",
)


class _Figures:
    """The figures of a failure, as attributes (``None`` where they do not apply).

    ``what`` (``"forward solve"``, ``"adjoint solve"``, ``"tangent solve"``),
    ``solver`` (the registered name), ``kind`` (``"unconverged"``,
    ``"nonfinite"`` or ``"nonfinite_input"``), ``reason`` (the solve's own
    account, with its numbers), ``residual`` (per-sample residual norms of
    the returned iterate, a tensor), ``iterations``, ``tol``, ``atol``,
    ``max_iter``, ``unconverged`` and ``samples`` (counts) and ``variables``
    (the names holding a non-finite value).
    """

    what: str | None
    solver: str | None
    kind: str | None
    reason: str | None
    residual: Any
    iterations: int | None
    tol: float | None
    atol: float | None
    max_iter: int | None
    unconverged: int | None
    samples: int | None
    variables: list[str] | None

    def _set_figures(self, figures: dict[str, Any]) -> None:
        unknown = set(figures) - set(_FIGURES)
        if unknown:
            raise TypeError(f"unknown figures {sorted(unknown)}; expected some of {', '.join(_FIGURES)}")
        for name in _FIGURES:
            setattr(self, name, figures.get(name))


class SolverError(_Figures, RuntimeError):
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

    def __init__(self, *args: Any, **figures: Any) -> None:
        super().__init__(*args)
        self._set_figures(figures)


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


class ConvergenceWarning(_Figures, UserWarning):
    """Issued instead of :class:`ConvergenceError` when ``on_failure="warn"`` (the default).

    Also issued for a non-finite value under ``"warn"`` and ``"ignore"``. The
    solution is still returned; turn the warning into an error with
    ``warnings.simplefilter("error", implicit.ConvergenceWarning)``.

    The message holds no numbers: it names the kind of failure, the solve and
    the solver (and the variables, for a non-finite value), so that Python's
    warning filter recognises a repeat and, under its default action, shows
    a failure at the same call site once, however many training steps
    repeat it. The warning points at the caller's line (the call of the solve
    or layer, or ``backward()``), not at the library. Its figures are
    attributes (``residual``, ``iterations``, ``tol``, ``unconverged``...,
    see below) and are in the solve's stats.

    Attributes:
        what: ``"forward solve"``, ``"adjoint solve"`` or ``"tangent solve"``.
        solver: The registered name of the solver or adjoint.
        kind: ``"unconverged"``, ``"nonfinite"`` or ``"nonfinite_input"`` (a
            non-finite value that came in with the incoming gradient or tangent).
        reason: The solve's own account of how it ended, with its numbers.
        residual: Per-sample residual norms of the returned iterate (a tensor).
        iterations: Iterations performed.
        tol: The relative tolerance.
        atol: The absolute tolerance.
        max_iter: The iteration limit.
        unconverged: How many samples did not converge.
        samples: How many samples were solved.
        variables: The variables holding a non-finite value, if any.

    Examples:
        >>> import warnings, torch, implicit
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     z = implicit.fixed_point(torch.cos, torch.tensor(1.0, dtype=torch.float64), solver="fixed_point", max_iter=3)
        >>> [w.category.__name__ for w in caught]
        ['ConvergenceWarning']
        >>> caught[0].message.iterations, caught[0].message.solver, caught[0].message.kind
        (3, 'fixed_point', 'unconverged')
    """

    def __init__(self, *args: Any, **figures: Any) -> None:
        super().__init__(*args)
        self._set_figures(figures)
