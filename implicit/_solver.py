"""Base classes of forward solvers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._monitor import Monitor
from ._problem import System

__all__ = ["IterativeSolver", "Solver"]


@dataclass(frozen=True, kw_only=True)
class Solver:
    """A forward solver: finds ``z*`` with ``F(z*) = 0`` (equivalently ``z* = G(z*)``).

    A solver is a frozen object holding only its options (keyword-only,
    validated in ``__post_init__``). Subclasses implement :meth:`solve`, or
    :meth:`init` and :meth:`step` of :class:`IterativeSolver` to share its
    loop. Solvers never build autograd graphs: they run under
    ``torch.no_grad()`` and see the problem through a :class:`System`, whose
    ``map(z)`` and ``residual(z)`` act on ``(B, N)`` tensors (row ``b`` is
    sample ``b``; an unbatched problem has ``B = 1``). Register a subclass with
    :func:`implicit.register_solver` to make it available by name.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Subclasses are frozen keyword-only dataclasses too, so that
        # ``class Mine(get_solver("anderson")): m: int = 10`` changes a default.
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True, kw_only=True)(cls)
        # An explicit @dataclass(frozen=True) on the subclass, which runs
        # next, refuses to overwrite these; the base class's still protect
        # every inherited option until it replaces them.
        for attr in ("__setattr__", "__delattr__"):
            if attr in cls.__dict__:
                delattr(cls, attr)

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        """Iterate from ``z0`` until ``monitor.check`` says stop; return the last checked iterate.

        Args:
            system: The problem as functions of ``(B, N)`` tensors.
            z0: The initial iterate, ``(B, N)``.
            monitor: Tracks tolerance, history and failures; call
                ``monitor.check(z, r)`` once per iterate with ``‖r‖ = ‖F(z)‖``.

        Returns:
            The iterate passed to the last ``monitor.check`` call.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options of this solver as a dict (its constructor's keyword arguments)."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class IterativeSolver(Solver):
    """A solver made of :meth:`init` and :meth:`step`, sharing one loop.

    Each iteration evaluates either the map (``uses_map = True``; the
    direction handed to :meth:`step` is ``G(z) - z``) or the residual (the
    direction is ``F(z)``), checks convergence, and asks :meth:`step` for the
    next iterate. Samples that have converged are frozen.
    """

    uses_map: ClassVar[bool] = True

    def init(self, system: System, z0: torch.Tensor) -> Any:
        """The solver's state before the first step (memory buffers, say)."""
        return None

    def step(self, system: System, z: torch.Tensor, r: torch.Tensor, state: Any, monitor: Monitor) -> torch.Tensor:
        """The next iterate from ``z`` and its direction ``r``; may update ``state`` in place."""
        raise NotImplementedError

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        state = self.init(system, z0)
        z = z0
        while True:
            r = system.map(z) - z if self.uses_map else system.residual(z)
            if monitor.check(z, r):
                return z
            z = monitor.freeze(self.step(system, z, r, state, monitor), z)
