"""Any forward solver as an adjoint solver: the adjoint equation is a linear fixed point."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._adjoint import AdjointSolver, LinearOperator
from .._registry import ADJOINTS, SOLVERS
from .._solver import Solver
from ..plugin import Monitor

__all__ = ["LinearSystem", "SolverAdjoint", "adjoint_from_solver"]


class LinearSystem:
    """``x = M x + b`` presented to a forward solver as an :class:`implicit.plugin.System`.

    It records no graph (:attr:`records_graph` is ``False``): its products
    with ``I - M`` come from ``op`` through :meth:`residual_jvp`.
    """

    records_graph = False

    def __init__(self, op: LinearOperator, b: torch.Tensor) -> None:
        self.op = op
        self.b = b
        self.batch, self.size = b.shape
        self.dtype = b.dtype
        self.device = b.device

    @property
    def nfe(self) -> int:
        return self.op.nmv

    def map(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) + self.b

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.op(x) - self.b

    def residual_jvp(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual(x), v - self.op(v)


@dataclass(frozen=True, kw_only=True)
class SolverAdjoint(AdjointSolver):
    """Base of the adjoints made from forward solvers by :func:`adjoint_from_solver`."""

    solver_class: ClassVar[type[Solver]]

    def __reduce__(self) -> tuple[Any, ...]:
        # The class is made at run time: an instance pickles as its solver class and options.
        return (_rebuild, (self.solver_class, self.options()))

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        names = {f.name for f in dataclasses.fields(self.solver_class) if f.init}
        solver = self.solver_class(**{k: v for k, v in self.options().items() if k in names})
        return solver.solve(LinearSystem(op, b), b, monitor)


_cache: dict[type[Solver], type[SolverAdjoint]] = {}


def adjoint_from_solver(solver_class: type[Solver]) -> type[SolverAdjoint]:
    """An :class:`AdjointSolver` class running ``solver_class`` on the adjoint equation.

    Its options are the adjoint's (``tol``, ``atol``, ``max_iter``) followed by
    the solver's own.
    """
    if solver_class not in _cache:
        own = {f.name for f in dataclasses.fields(AdjointSolver)}
        extra: list[Any] = [
            (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
            if f.default_factory is not dataclasses.MISSING
            else (f.name, f.type, dataclasses.field(default=f.default))
            for f in dataclasses.fields(solver_class)
            if f.init and f.name not in own
        ]
        cls = dataclasses.make_dataclass(
            f"{solver_class.__name__}Adjoint",
            extra,
            bases=(SolverAdjoint,),
            frozen=True,
            kw_only=True,
            namespace={"solver_class": solver_class, "name": solver_class.name, "__module__": __name__},
        )
        _cache[solver_class] = cls
    return _cache[solver_class]


def _rebuild(solver_class: type[Solver], options: dict[str, Any]) -> SolverAdjoint:
    return adjoint_from_solver(solver_class)(**options)


# Every forward solver's name, not taken by an adjoint, names that solver on the adjoint equation.
ADJOINTS.fall_back_to(SOLVERS, adjoint_from_solver)
