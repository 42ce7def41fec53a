"""Implicit layers and functions in PyTorch: solve ``F(z*) = 0`` or ``z* = f(z*)``
over a dict of tensors, and differentiate through the solution with the
implicit function theorem."""

from . import adjoints, linesearch, newton, nn, plugin, projections, solvers  # noqa: F401 - importing registers the built-ins
from ._adjoint import AdjointSolver, LinearOperator
from ._attach import attach, custom_root
from ._check import CheckReport, Finding, check
from ._errors import ConvergenceError, ConvergenceWarning, SolverError
from ._problem import ImplicitProblem
from ._registry import (
    available_adjoints,
    available_solvers,
    get_adjoint,
    get_solver,
    register_adjoint,
    register_solver,
)
from ._solve import argmin, fixed_point, least_squares, root, solve
from ._solver import IterativeSolver, Solver
from ._stats import Solution, SolverStats

__version__ = "0.1.0"

__all__ = [
    "AdjointSolver",
    "CheckReport",
    "ConvergenceError",
    "ConvergenceWarning",
    "Finding",
    "ImplicitProblem",
    "IterativeSolver",
    "LinearOperator",
    "Solution",
    "Solver",
    "SolverError",
    "SolverStats",
    "argmin",
    "attach",
    "available_adjoints",
    "available_solvers",
    "check",
    "custom_root",
    "fixed_point",
    "get_adjoint",
    "get_solver",
    "least_squares",
    "linesearch",
    "newton",
    "nn",
    "plugin",
    "projections",
    "register_adjoint",
    "register_solver",
    "root",
    "solve",
]
