"""Base classes of forward solvers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .plugin import Monitor, System

__all__ = ["IterativeSolver", "Solver"]


@dataclass(frozen=True, kw_only=True)
class Solver:
    """A forward solver: finds ``z*`` with ``F(z*) = 0`` (equivalently ``z* = G(z*)``).

    A solver is a frozen object holding only its options (keyword-only,
    validated in ``__post_init__``). Subclasses implement :meth:`solve`, or
    :meth:`init` and :meth:`step` of :class:`IterativeSolver` to share its
    loop. Solvers never build autograd graphs: they run under
    ``torch.no_grad()`` and see the problem through a system
    (:class:`implicit.plugin.System`), whose ``map(z)`` and ``residual(z)``
    act on ``(B, N)`` tensors (row ``b`` is sample ``b``; an unbatched
    problem has ``B = 1``), and report to a monitor
    (:class:`implicit.plugin.Monitor`). Register a subclass with
    :func:`implicit.register_solver` to make it available by name, or pass
    the class or an instance as ``solver=...``.

    Examples:
        Picard iteration ``z ← G(z)`` written from scratch and passed as a
        class, without registering it:

        >>> import torch, implicit
        >>> class Picard(implicit.Solver):
        ...     def solve(self, system, z0, monitor):
        ...         z = z0
        ...         while True:
        ...             g = system.map(z)
        ...             if monitor.check(z, g - z):  # ‖G(z) - z‖ = ‖F(z)‖
        ...                 return z
        ...             z = monitor.freeze(g, z)  # converged samples keep their value
        >>> z = implicit.fixed_point(torch.cos, torch.tensor(1.0, dtype=torch.float64), solver=Picard, tol=1e-12)
        >>> round(z.item(), 10)
        0.7390851332
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
        """The options of this solver as a dict (its constructor's keyword arguments).

        Returns:
            ``{option name: value}`` for every dataclass field, in declaration order.
        """
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class IterativeSolver(Solver):
    """A solver made of :meth:`init` and :meth:`step`, sharing one loop.

    Each iteration asks :meth:`direction` for the direction at the iterate
    (by default it evaluates the map, ``uses_map = True``, and hands
    ``G(z) - z`` on, or the residual ``F(z)``), checks convergence on it, and
    asks :meth:`step` for the next iterate. Samples that have converged are
    frozen. Every built-in iterative solver runs this one loop.

    This follows the shape of the nonlinear solvers of ``scipy.optimize``
    (``_nonlin.py``): one loop, and a model that proposes each step.

    Examples:
        Damped Picard iteration with a validated option, passed as a class
        with ``solver_options`` (no registration needed):

        >>> import torch, implicit
        >>> class Damped(implicit.IterativeSolver):
        ...     damping: float = 0.5
        ...     def __post_init__(self):
        ...         if not 0 < self.damping <= 1:
        ...             raise ValueError(f"damping must lie in (0, 1]; got {self.damping}")
        ...     def step(self, system, z, r, state, monitor):
        ...         return z + self.damping * r  # r = G(z) - z, since uses_map is True
        >>> problem = implicit.ImplicitProblem.fixed_point(torch.cos)
        >>> sol = implicit.solve(problem, torch.tensor(1.0, dtype=torch.float64), solver=Damped, solver_options={"damping": 0.8}, tol=1e-12)
        >>> round(sol.z.item(), 10), sol.converged
        (0.7390851332, True)
        >>> Damped(damping=2.0)
        Traceback (most recent call last):
            ...
        ValueError: damping must lie in (0, 1]; got 2.0
    """

    uses_map: ClassVar[bool] = True

    def init(self, system: System, z0: torch.Tensor) -> Any:
        """The solver's state before the first step (memory buffers, say).

        Args:
            system: The problem as functions of ``(B, N)`` tensors.
            z0: The initial iterate, ``(B, N)``.

        Returns:
            Any object; it is passed to every :meth:`step`. ``None`` by default.
        """
        return None

    def direction(self, system: System, z: torch.Tensor, state: Any) -> torch.Tensor:
        """The direction at ``z``, on which convergence is checked: ``G(z) - z`` if ``uses_map``, else ``F(z)``.

        Override it to keep what the evaluation gives in ``state`` for the
        step (the map's value ``G(z)``, say) or to write the direction
        straight into the step's own buffer; it must evaluate the problem
        once and return ``G(z) - z`` or ``F(z)``.

        Args:
            system: The problem as functions of ``(B, N)`` tensors.
            z: The current iterate, ``(B, N)``.
            state: What :meth:`init` returned.

        Returns:
            The direction, ``(B, N)``.
        """
        return system.map(z) - z if self.uses_map else system.residual(z)

    def step(self, system: System, z: torch.Tensor, r: torch.Tensor, state: Any, monitor: Monitor) -> torch.Tensor:
        """The next iterate from ``z`` and its direction ``r``; may update ``state`` in place.

        Args:
            system: The problem as functions of ``(B, N)`` tensors (for extra
                evaluations, a line search say).
            z: The current iterate, ``(B, N)``.
            r: ``G(z) - z`` when ``uses_map`` is ``True``, else ``F(z)``; ``(B, N)``.
            state: What :meth:`init` returned.
            monitor: The solve's monitor (``monitor.active`` masks the
                samples still iterating).

        Returns:
            The next iterate, ``(B, N)``; the loop keeps converged samples frozen.
        """
        raise NotImplementedError

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        state = self.init(system, z0)
        z = z0
        while True:
            r = self.direction(system, z, state)
            if monitor.check(z, r):
                return z
            z = monitor.freeze(self.step(system, z, r, state, monitor), z)
