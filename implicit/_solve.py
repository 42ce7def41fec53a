"""The public entry points: :func:`solve`, :func:`fixed_point`, :func:`root`, :func:`argmin` and :func:`least_squares`."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._ad import Linearisation, attach
from ._adjoint import AdjointSolver
from ._failure import handle_failure
from ._monitor import Monitor
from ._problem import ImplicitProblem, System
from ._registry import available_adjoints, available_solvers, make_adjoint, make_solver
from ._settings import DEFAULT_ATOL, DEFAULT_MAX_ITER, DEFAULT_ON_FAILURE, DEFAULT_TOL, SolveSettings
from ._solver import Solver
from ._stats import Solution, SolverStats
from ._structure import Structure
from ._transforms import no_tangents

__all__ = ["argmin", "fixed_point", "least_squares", "root", "solve"]

DEFAULT_SOLVER = "anderson"
DEFAULT_ADJOINT = "gmres"

# The solver loops read their convergence test on the host every iteration and
# the backward is a custom autograd.Function over a closure; neither traces
# (AOT autograd fails inside some solvers' in-place buffer updates), so a
# compiled caller breaks its graph at the entry points and runs the solve
# eagerly, as nn.DEQ does. torch.compiler.disable is the public spelling
# since PyTorch 2.1; torch._dynamo.disable is the same function before it.
_graph_break = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable


def default_solver(problem: ImplicitProblem) -> str:
    """The problem's default solver where it is registered; else ``newton_krylov``, which runs any root problem."""
    name = problem.default_solver
    if name is None:
        return DEFAULT_SOLVER
    return name if name in available_solvers() else "newton_krylov"


def default_adjoint(problem: ImplicitProblem) -> str:
    """The problem's default adjoint where it is registered; else ``gmres``."""
    name = problem.default_adjoint
    if name is None:
        return DEFAULT_ADJOINT
    return name if name in available_adjoints() else DEFAULT_ADJOINT


@_graph_break
def solve(
    problem: ImplicitProblem,
    z0: Any,
    *,
    solver: str | Solver | type[Solver] | None = None,
    adjoint: str | AdjointSolver | type[AdjointSolver] | None = None,
    tol: float = DEFAULT_TOL,
    atol: float = DEFAULT_ATOL,
    max_iter: int = DEFAULT_MAX_ITER,
    on_failure: str = DEFAULT_ON_FAILURE,
    solver_options: Mapping[str, Any] | None = None,
    adjoint_options: Mapping[str, Any] | None = None,
) -> Solution:
    """Solve ``F(z*) = 0`` (or ``z* = f(z*)``) and make ``z*`` differentiable by the IFT.

    The forward solve builds no autograd graph. The returned ``z`` carries one
    custom backward that solves the joint adjoint system
    ``(∂F/∂z)ᵀ v = g`` over all variables together, then sends ``v`` through
    one evaluation of ``F`` to every tensor ``F`` reads. ``z0`` gets no gradient.

    Args:
        problem: The equation to solve.
        z0: The initial state: a dict of tensors, a tuple/list of tensors or a
            tensor; ``F`` receives and returns this structure.
        solver: A registered solver name, a :class:`Solver` subclass or
            instance; ``None`` is the problem's :attr:`~ImplicitProblem.default_solver`
            (``"anderson"`` for root and fixed-point problems).
        adjoint: A registered adjoint name, an :class:`AdjointSolver` subclass
            or instance; ``None`` is the problem's :attr:`~ImplicitProblem.default_adjoint`
            (``"gmres"`` for root and fixed-point problems, ``"cg"`` for argmin and least squares).
        tol: Relative tolerance: a sample has converged when
            ``‖F(z)‖ ≤ tol·‖z‖ + atol`` (norms over all its variables together).
        atol: Absolute tolerance floor, so that ``z* = 0`` can converge.
        max_iter: The most iterations of the forward solver.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``: what
            non-convergence of the forward or adjoint solve does. Non-finite
            values raise :class:`SolverError` under ``"raise"`` and warn otherwise.
        solver_options: Keyword arguments of the solver's constructor.
        adjoint_options: Keyword arguments of the adjoint's constructor (at
            least ``tol`` and ``max_iter`` for iterative adjoints).

    Returns:
        A :class:`Solution` with ``z``, ``stats``, ``converged``; its
        ``adjoint_stats`` is filled by each backward pass.

    Raises:
        ValueError: for inconsistent inputs or an unknown solver, adjoint or option.
        ConvergenceError: when a solve fails to converge and ``on_failure="raise"``.
        SolverError: when a non-finite value appears and ``on_failure="raise"``.

    Examples:
        >>> import torch, implicit
        >>> W = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
        >>> problem = implicit.ImplicitProblem.fixed_point(lambda z: {"x": 0.5 * torch.tanh(z["y"].sum()) + 1, "y": W @ z["y"] + z["x"]})
        >>> sol = implicit.solve(problem, {"x": torch.zeros((), dtype=torch.float64), "y": torch.zeros(2, dtype=torch.float64)}, solver="fixed_point", tol=1e-10, max_iter=500)
        >>> sol.converged
        True

    Reference:
        Krantz & Parks, "The Implicit Function Theorem", Birkhäuser 2002;
        Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the
        adjoint solve in the backward pass).
    """
    if not isinstance(problem, ImplicitProblem):
        raise TypeError(f"problem must be an implicit.ImplicitProblem; got {type(problem).__name__}")
    settings = SolveSettings.build(tol, atol, max_iter, on_failure)
    tol, atol, max_iter, on_failure = settings.tol, settings.atol, settings.max_iter, settings.on_failure
    solver_obj = make_solver(default_solver(problem) if solver is None else solver, solver_options)
    adjoint_obj = make_adjoint(default_adjoint(problem) if adjoint is None else adjoint, adjoint_options)

    structure = Structure(z0, problem.batched)
    if structure.device.type == "meta":
        raise ValueError(
            f"z0 is on the meta device ({structure.describe()}): meta tensors have shapes but no values, "
            "and a solve needs values; create z0 (and what the map reads) on a real device"
        )
    system = System(problem, structure)
    # Forward-mode tangents are off too: they would differentiate the unrolled
    # iterations, which attach() discards.
    with torch.no_grad(), no_tangents():
        start = structure.flatten(z0).detach()
        if structure.kind == "tensor":  # a view of z0: never hand the caller's memory back
            start = start.clone()
        monitor = Monitor(structure, tol=float(tol), atol=float(atol), max_iter=max_iter, track_best=True)
        with system.precision():
            z_flat = solver_obj.solve(system, start, monitor)
    if monitor.converged is None:
        raise RuntimeError(f"solver {solver_obj.name!r} returned without checking convergence")
    # Per sample, the iterate of smallest residual: the last one where the residual never rose
    # (a converged sample's, always), and where a non-monotone solver ended worse, a better one.
    z_flat = monitor.result(z_flat)
    stats = monitor.stats(solver_obj.name, system.nfe, problem.batched)
    handle_failure(monitor, on_failure, f"forward solve ({solver_obj.name})")
    return attach_solution(system, z_flat, stats, adjoint_obj, tol=float(tol), atol=float(atol), on_failure=on_failure)


def attach_solution(
    system: System,
    z_flat: torch.Tensor,
    stats: SolverStats,
    adjoint: AdjointSolver,
    *,
    tol: float,
    atol: float,
    on_failure: str,
) -> Solution:
    """The :class:`Solution` holding flat solution ``z_flat`` re-attached to autograd with its implicit derivatives.

    The one path by which a solution gets its derivatives, whether
    :func:`solve` computed it or :func:`~implicit.attach` was handed it.
    """
    solution = Solution(z=None, stats=stats)
    ref = weakref.ref(solution)
    listeners = solution._adjoint_listeners

    def record(adjoint_stats: SolverStats) -> None:
        for listener in listeners:
            listener(adjoint_stats)
        sol = ref()
        if sol is not None:
            sol.adjoint_stats = adjoint_stats

    lin = Linearisation(system, z_flat.detach(), adjoint, tol=tol, atol=atol, on_failure=on_failure, record=record)
    solution.z = system.structure.unflatten(attach(z_flat.detach(), lin))
    return solution


@_graph_break
def fixed_point(f: Callable[[Any], Any], z0: Any, *, batched: bool = False, **kwargs: Any) -> Any:
    """The fixed point ``z* = f(z*)``, differentiable by the IFT, in the structure of ``z0``.

    Args:
        f: The map; receives and returns the structure of ``z0``.
        z0: The initial state.
        batched: Whether dim 0 of every variable indexes independent samples.
        **kwargs: The keyword arguments of :func:`solve`.

    Returns:
        The solution ``sol.z`` of :func:`solve` (dict, tuple/list or tensor),
        differentiable with respect to every tensor ``f`` reads.

    Raises:
        ValueError: for inconsistent inputs or an unknown solver, adjoint or option.
        ConvergenceError: when a solve fails to converge and ``on_failure="raise"``.
        SolverError: when a non-finite value appears and ``on_failure="raise"``.

    Examples:
        >>> import torch, implicit
        >>> round(implicit.fixed_point(torch.cos, torch.tensor(1.0, dtype=torch.float64), tol=1e-12).item(), 10)
        0.7390851332
    """
    return solve(ImplicitProblem.fixed_point(f, batched=batched), z0, **kwargs).z


@_graph_break
def root(F: Callable[[Any], Any], z0: Any, *, batched: bool = False, **kwargs: Any) -> Any:
    """The root ``F(z*) = 0``, differentiable by the IFT, in the structure of ``z0``.

    Args:
        F: The residual; receives and returns the structure of ``z0``.
        z0: The initial state.
        batched: Whether dim 0 of every variable indexes independent samples.
        **kwargs: The keyword arguments of :func:`solve`.

    Returns:
        The solution ``sol.z`` of :func:`solve` (dict, tuple/list or tensor),
        differentiable with respect to every tensor ``F`` reads.

    Raises:
        ValueError: for inconsistent inputs or an unknown solver, adjoint or option.
        ConvergenceError: when a solve fails to converge and ``on_failure="raise"``.
        SolverError: when a non-finite value appears and ``on_failure="raise"``.

    Examples:
        The root of ``F(z) = z² - a`` and its derivative ``dz*/da = 1 / (2 z*)``:

        >>> import torch, implicit
        >>> a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> z = implicit.root(lambda z: z**2 - a, torch.tensor(1.0, dtype=torch.float64), solver="broyden", tol=1e-12)
        >>> round(z.item(), 8)
        1.41421356
        >>> z.backward()
        >>> round(a.grad.item(), 8)
        0.35355339
    """
    return solve(ImplicitProblem(F, batched=batched), z0, **kwargs).z


def argmin(objective: Callable[[Any], torch.Tensor], z0: Any, *, batched: bool = False, **kwargs: Any) -> Any:
    """The minimiser ``z* = argmin_z objective(z)``, differentiable by the IFT, in the structure of ``z0``.

    Solved as the root of the gradient (the tolerance applies to ``‖∇objective‖``);
    the implicit derivative's Jacobian is the Hessian. Without ``solver`` the
    problem's default is used (``"lbfgs"``, or ``"newton_krylov"`` where that is
    not registered); without ``adjoint``, ``"cg"``.

    Args:
        objective: ``z ↦`` a 0-dim tensor (``(B,)`` when batched); it
            receives the structure of ``z0``.
        z0: The initial state.
        batched: Whether dim 0 of every variable indexes independent samples
            (then ``objective`` returns one value per sample).
        **kwargs: The keyword arguments of :func:`solve`.

    Returns:
        The solution ``sol.z`` of :func:`solve`, differentiable with respect
        to every tensor ``objective`` reads.

    Raises:
        ValueError: for inconsistent inputs or an unknown solver, adjoint or option.
        ConvergenceError: when a solve fails to converge and ``on_failure="raise"``.
        SolverError: when a non-finite value appears and ``on_failure="raise"``.

    Examples:
        ``argmin (z - a)² + z⁴`` and its derivative ``dz*/da = 2 / (2 + 12 z*²)``:

        >>> import torch, implicit
        >>> a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> z = implicit.argmin(lambda z: (z - a) ** 2 + z**4, torch.tensor(0.0, dtype=torch.float64), solver="newton_krylov", tol=1e-12)
        >>> z.backward()
        >>> torch.allclose(a.grad, 2 / (2 + 12 * z.detach() ** 2))
        True
    """
    return solve(ImplicitProblem.argmin(objective, batched=batched), z0, **kwargs).z


def least_squares(residuals: Callable[[Any], Any], z0: Any, *, batched: bool = False, **kwargs: Any) -> Any:
    """The least-squares solution ``z* = argmin_z ½ Σ residuals(z)²``, differentiable by the IFT.

    Solved as the root of the gradient ``Jᵀr``. Without ``solver`` the
    problem's default is used (``"levenberg_marquardt"``, or
    ``"newton_krylov"`` where that is not registered); without ``adjoint``, ``"cg"``.

    Args:
        residuals: ``z ↦`` a tensor, or a dict, tuple or list of tensors of
            any shapes (each with dim 0 of size ``B`` when batched).
        z0: The initial state.
        batched: Whether dim 0 of every variable and residual indexes samples.
        **kwargs: The keyword arguments of :func:`solve`.

    Returns:
        The solution ``sol.z`` of :func:`solve` in the structure of ``z0``,
        differentiable with respect to every tensor ``residuals`` reads.

    Raises:
        ValueError: for inconsistent inputs or an unknown solver, adjoint or option.
        ConvergenceError: when a solve fails to converge and ``on_failure="raise"``.
        SolverError: when a non-finite value appears and ``on_failure="raise"``.

    Examples:
        Linear least squares ``min ‖Xz − y‖²``, whose solution is ``(XᵀX)⁻¹Xᵀy``:

        >>> import torch, implicit
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> z = implicit.least_squares(lambda z: X @ z - y, torch.zeros(2, dtype=torch.float64), solver="newton_krylov", tol=1e-12)
        >>> torch.allclose(z, torch.linalg.lstsq(X, y).solution)
        True
    """
    return solve(ImplicitProblem.least_squares(residuals, batched=batched), z0, **kwargs).z
