"""What a solver or adjoint plugin receives: the types of ``system`` and ``monitor``.

:meth:`implicit.Solver.solve` is called as ``solve(system, z0, monitor)`` and
:meth:`implicit.AdjointSolver.solve` as ``solve(op, b, monitor)``. The
protocols below say what those objects offer, so that a plugin can be typed
(and checked by ``mypy`` or ``pyright``) against them instead of against the
library's own classes, which are private and may change:

* :class:`System`: the problem as functions of one ``(B, N)`` tensor, what
  every forward solver receives (a problem of the user's, or the linear
  system of a backward pass when a forward solver serves as an adjoint);
* :class:`OptimisationSystem`: a :class:`System` of an argmin or
  least-squares problem, with the objective, its gradient and Hessian
  products, and the least-squares residuals;
* :class:`Monitor`: the convergence bookkeeping of one solve.

It also holds the checks that built-in solvers validate their options with
(:func:`integer`, :func:`non_negative`, :func:`interval`, :func:`one_of`,
:func:`boolean`, and :func:`set_options` to store what they return on a
frozen dataclass): each returns the value in a plain Python type and raises
a ``ValueError`` naming the option, the expected and the actual value.

All three are :func:`typing.runtime_checkable`, so ``isinstance(system,
implicit.plugin.OptimisationSystem)`` says whether a system has the
optimisation methods (it checks that the names exist, not their signatures).
A solver must not test for the library's concrete classes: a forward solver
run as an adjoint receives another implementation of :class:`System`.

Examples:
    The system and monitor a solver receives satisfy the protocols:

    >>> import torch, implicit
    >>> from implicit.plugin import Monitor, System
    >>> seen = []
    >>> class Picard(implicit.Solver):
    ...     def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
    ...         seen.append((isinstance(system, System), isinstance(monitor, Monitor), system.batch, system.size))
    ...         z = z0
    ...         while not monitor.check(z, system.residual(z)):
    ...             z = monitor.freeze(system.map(z), z)
    ...         return z
    >>> z = implicit.fixed_point(torch.cos, torch.ones(3, dtype=torch.float64), solver=Picard, tol=1e-10)
    >>> seen
    [(True, True, 1, 3)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ._settings import boolean, integer, interval, non_negative, one_of, set_options

__all__ = [
    "Monitor",
    "OptimisationSystem",
    "System",
    "boolean",
    "integer",
    "interval",
    "non_negative",
    "one_of",
    "set_options",
]

Tensor = torch.Tensor


@runtime_checkable
class System(Protocol):
    """The problem ``F(z) = 0`` (equivalently ``z = G(z)``) as a solver sees it: functions of ``(B, N)`` tensors.

    Row ``b`` of every tensor is sample ``b`` with all its variables
    flattened into it (an unbatched problem has ``B = 1``); rows are
    independent systems. ``G(z) = z - F(z)`` holds throughout, so a solver
    may iterate the map or drive the residual to zero, whichever the problem
    was stated as. Every method returns values without an autograd graph.
    """

    @property
    def batch(self) -> int:
        """``B``, the number of independent systems (rows)."""
        ...

    @property
    def size(self) -> int:
        """``N``, the unknowns per system (all variables of a sample together)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flat state (what ``z0`` has and the solver's iterates should keep)."""
        ...

    @property
    def device(self) -> torch.device:
        """The device of the flat state."""
        ...

    @property
    def nfe(self) -> int:
        """Evaluations of the user's function so far (``F``, ``f``, or products of the linear map)."""
        ...

    @property
    def records_graph(self) -> bool:
        """Whether :meth:`residual` may be evaluated under ``torch.enable_grad()`` to record its graph.

        ``True`` for a problem's own system: a Newton-type solver linearises
        ``F`` through that graph (see :class:`implicit.newton.Linearisation`).
        ``False`` for a linear system handed over by an adjoint, whose
        products come from :meth:`residual_jvp`. Read it through
        :func:`implicit.newton.recordable`, which also says no under
        ``torch.func`` transforms.
        """
        ...

    def map(self, z: Tensor) -> Tensor:
        """The fixed-point map ``G(z)``, ``(B, N)``; one evaluation."""
        ...

    def residual(self, z: Tensor) -> Tensor:
        """The residual ``F(z)``, ``(B, N)``, zero at the solution; one evaluation."""
        ...

    def residual_jvp(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``F(z)`` and the Jacobian-vector product ``(∂F/∂z) v`` per row, both ``(B, N)``."""
        ...


@runtime_checkable
class OptimisationSystem(System, Protocol):
    """A :class:`System` of ``z* = argmin objective(z)`` or ``z* = argmin ½ Σ r(z)²``.

    Its :meth:`residual` is the gradient of the objective. Each method is one
    evaluation of the user's function, values only. The least-squares methods
    raise a ``ValueError`` on an argmin problem, and every method does on a
    root or fixed-point problem (whose system may still have them).
    """

    @property
    def form(self) -> str:
        """``"root"``, ``"fixed_point"``, ``"argmin"`` or ``"least_squares"``."""
        ...

    def objective(self, z: Tensor) -> Tensor:
        """The objective per sample, ``(B,)`` (``½ Σ r²`` for least squares)."""
        ...

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The objective ``(B,)`` and its gradient ``(B, N)``."""
        ...

    def value_grad_hvp(self, z: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """The objective, its gradient and ``v ↦ H v`` at ``z``, one evaluation for many products."""
        ...

    def hvp(self, z: Tensor, v: Tensor) -> Tensor:
        """The Hessian-vector product ``H(z) v`` per sample, ``(B, N)``."""
        ...

    def lsq_residuals(self, z: Tensor) -> Tensor:
        """The least-squares residuals flattened per sample, ``(B, M)``."""
        ...

    def lsq_linearize(self, z: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``(r, jvp, vjp)``: the residuals ``(B, M)``, ``v ↦ J v`` and ``u ↦ Jᵀ u``."""
        ...


@runtime_checkable
class Monitor(Protocol):
    """The bookkeeping of one solve: tolerance, iteration budget, history, failures.

    A sample has converged when ``‖F(z)‖ ≤ tol · ‖z‖ + atol`` (``‖z‖``
    replaced by :attr:`reference` where that is set, as for a linear solve
    ``A x = b``, which scales by ``‖b‖``). A solver calls :meth:`check` once
    per iterate and stops when it says so; it may write :attr:`message`
    (and :attr:`kind`) to say why it stopped on its own.
    """

    iterations: int
    """Steps taken so far (counted by :meth:`check`; a solver that iterates elsewhere may set it)."""

    message: str
    """What ended the solve, in words; reported in the stats and warnings."""

    kind: str
    """The kind of a solver's own failure in words without figures (repeated warnings are recognised by it)."""

    @property
    def tol(self) -> float:
        """The relative tolerance."""
        ...

    @property
    def atol(self) -> float:
        """The absolute tolerance floor."""
        ...

    @property
    def max_iter(self) -> int:
        """The most steps the solver may take."""
        ...

    @property
    def reference(self) -> Tensor | None:
        """Per-sample norms ``(B,)`` that scale ``tol`` instead of ``‖z‖``, or ``None``."""
        ...

    @property
    def active(self) -> Tensor | None:
        """``(B,)`` bool: the samples still iterating at the last check (``None`` before the first)."""
        ...

    @property
    def converged(self) -> Tensor | None:
        """``(B,)`` bool: the samples within tolerance at the last check (``None`` before the first)."""
        ...

    @property
    def nonfinite(self) -> list[str]:
        """The variables in which a NaN or infinity stopped the solve (empty otherwise)."""
        ...

    def check(self, z: Tensor, r: Tensor) -> bool:
        """Record iterate ``z`` with residual ``r`` (any vector with ``‖r‖ = ‖F(z)‖``); whether to stop.

        It stops when every sample has converged, after ``max_iter`` steps,
        on a non-finite value (naming the variable), or on divergence. One
        host synchronisation.
        """
        ...

    def freeze(self, z_new: Tensor, z: Tensor) -> Tensor:
        """``z_new`` for the samples still iterating, ``z`` for those that have converged."""
        ...
