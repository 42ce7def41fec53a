"""Validation of options shared by :func:`~implicit.solve`, layers, solvers and adjoints.

Each check returns the value in a plain Python type (``int``, ``float``,
``str``), accepting any real number type (NumPy scalars included) but not
``bool``, and raises a ``ValueError`` that names the option, the expected and
the actual value (and its type, where a wrong type is the likely mistake).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_MAX_ITER",
    "DEFAULT_ON_FAILURE",
    "DEFAULT_TOL",
    "ON_FAILURE",
    "SolveSettings",
    "boolean",
    "integer",
    "interval",
    "non_negative",
    "one_of",
    "set_options",
]

# The defaults of solve(), the functions built on it and nn.DEQ: one place.
DEFAULT_TOL = 1e-6
DEFAULT_ATOL = 1e-12
DEFAULT_MAX_ITER = 100
DEFAULT_ON_FAILURE = "warn"
ON_FAILURE = ("warn", "raise", "ignore")


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) else repr(value)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` at least ``minimum`` (a positive int by default)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else ("a non-negative int" if minimum == 0 else f"an int >= {minimum}")
        raise ValueError(f"{name} must be {kind}; got {_got(value)}")
    return int(value)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` ``>= 0``."""
    if not _real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number; got {_got(value)}")
    return float(value)


def interval(
    name: str, value: Any, low: float, high: float, *, low_open: bool = True, high_open: bool = False
) -> float:
    """``value`` as a ``float`` in the interval from ``low`` to ``high`` (``(0, 1]`` by default)."""
    ok = _real(value) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {bounds}; got {_got(value)}")
    return float(value)


def one_of(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else an error listing them, with a suggestion."""
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(value, list(choices), n=1) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {_got(value)}{hint}")


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {_got(value)}")
    return value


def set_options(obj: Any, **values: Any) -> None:
    """Store validated (and normalised) option values on a frozen dataclass."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class SolveSettings:
    """The stopping rule and failure policy of a solve, validated once.

    Built by :func:`~implicit.solve` (and the functions built on it),
    :func:`~implicit.attach` and :class:`~implicit.nn.DEQ` alike, through
    :meth:`build`; an adjoint's own ``tol`` and ``atol`` follow the same rule
    (finite and non-negative).
    """

    tol: float = DEFAULT_TOL
    atol: float = DEFAULT_ATOL
    max_iter: int = DEFAULT_MAX_ITER
    on_failure: str = DEFAULT_ON_FAILURE

    @classmethod
    def build(
        cls,
        tol: Any = DEFAULT_TOL,
        atol: Any = DEFAULT_ATOL,
        max_iter: Any = DEFAULT_MAX_ITER,
        on_failure: Any = DEFAULT_ON_FAILURE,
    ) -> SolveSettings:
        """The settings with each value checked and normalised (``ValueError`` naming the one that is not)."""
        return cls(
            non_negative("tol", tol),
            non_negative("atol", atol),
            integer("max_iter", max_iter, minimum=0),
            one_of("on_failure", on_failure, ON_FAILURE),
        )
