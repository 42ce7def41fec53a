"""Solutions computed elsewhere: :func:`attach` and the :func:`custom_root` decorator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._adjoint import AdjointSolver
from ._failure import handle_failure
from ._monitor import Monitor
from ._problem import ImplicitProblem
from ._registry import make_adjoint
from ._settings import DEFAULT_ATOL, DEFAULT_ON_FAILURE, DEFAULT_TOL, SolveSettings
from ._solve import attach_solution, default_adjoint
from ._stats import Solution
from ._structure import Structure
from ._transforms import no_tangents

__all__ = ["attach", "custom_root"]


def _check_state(z: Any, what: str) -> None:
    if not isinstance(z, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"{what} must be a tensor, a dict of tensors or a tuple/list of tensors; got {type(z).__name__} "
            "(convert NumPy results with torch.as_tensor(..., dtype=..., device=...))"
        )


def attach(
    problem: ImplicitProblem,
    z_star: Any,
    *,
    adjoint: str | AdjointSolver | type[AdjointSolver] | None = None,
    tol: float = DEFAULT_TOL,
    atol: float = DEFAULT_ATOL,
    on_failure: str = DEFAULT_ON_FAILURE,
    adjoint_options: Mapping[str, Any] | None = None,
    name: str = "attach",
) -> Solution:
    """A solution ``z_star`` of ``problem`` computed elsewhere, made differentiable by the IFT.

    ``z_star`` may come from any code (SciPy, NumPy, a hand-written loop):
    it is checked against the tolerance with one evaluation of the residual
    (``‖F(z*)‖ ≤ tol·‖z*‖ + atol`` per sample, as for :func:`solve`; the
    gradient's norm for argmin and least-squares problems), the failure
    policy applies, and the returned ``sol.z`` carries the same backward,
    double-backward and forward-mode derivatives as a solution of
    :func:`solve`, through the same code. ``z_star`` itself is detached: its
    own history (the iterations that found it) is never differentiated.

    Args:
        problem: The problem ``z_star`` solves.
        z_star: The solution: a dict of tensors, a tuple/list of tensors or a
            tensor, in the structure the problem's function receives.
        adjoint: As for :func:`solve` (``None``: the problem's default).
        tol: Relative tolerance of the check (and, by default, of the adjoint).
        atol: Absolute tolerance floor.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``: what a ``z_star``
            that misses the tolerance (or an adjoint solve that fails) does.
        adjoint_options: Keyword arguments of the adjoint's constructor.
        name: The name recorded as ``sol.stats.solver``.

    Returns:
        A :class:`Solution` whose ``stats`` record the check: ``iterations``
        0, ``nfe`` 1, the residual of ``z_star``.

    Raises:
        TypeError: ``problem`` is not an :class:`ImplicitProblem` or
            ``z_star`` is not a tensor, dict or tuple/list of tensors.
        ValueError: for inconsistent inputs or an unknown adjoint or option.
        ConvergenceError: ``z_star`` misses the tolerance and ``on_failure="raise"``.
        SolverError: a non-finite value and ``on_failure="raise"``.

    Examples:
        A minimum found by SciPy, and the derivative of ``z* = argmin (z - a)² + z⁴``
        in ``a`` (``2 / (2 + 12 z*²)``):

        >>> import scipy.optimize, torch, implicit
        >>> a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> problem = implicit.ImplicitProblem.argmin(lambda z: ((z - a) ** 2 + z**4).sum())
        >>> found = scipy.optimize.minimize(lambda z: (z[0] - 1.0) ** 2 + z[0] ** 4, [0.0], tol=1e-14).x
        >>> sol = implicit.attach(problem, torch.as_tensor(found, dtype=torch.float64), tol=1e-6)
        >>> sol.stats.iterations, sol.stats.nfe, sol.converged
        (0, 1, True)
        >>> sol.z.sum().backward()
        >>> torch.allclose(a.grad, 2 / (2 + 12 * sol.z.detach() ** 2))
        True
    """
    if not isinstance(problem, ImplicitProblem):
        raise TypeError(f"problem must be an implicit.ImplicitProblem; got {type(problem).__name__}")
    _check_state(z_star, "z_star")
    settings = SolveSettings.build(tol, atol, on_failure=on_failure)
    tol, atol, on_failure = settings.tol, settings.atol, settings.on_failure
    adjoint_obj = make_adjoint(default_adjoint(problem) if adjoint is None else adjoint, adjoint_options)
    system = problem.bind(z_star)
    structure = system.structure
    with torch.no_grad(), no_tangents():
        z_flat = structure.flatten(z_star).detach()
        if structure.kind == "tensor":  # a view of z_star: never hand the caller's memory back
            z_flat = z_flat.clone()
        monitor = Monitor(structure, tol=float(tol), atol=float(atol), max_iter=0)
        with system.precision():
            monitor.check(z_flat, system.residual(z_flat))
    if not monitor.nonfinite:
        assert monitor.converged is not None
        within = bool(monitor.converged.all())
        monitor.message = f"the given solution is {'within' if within else 'not within'} tol={float(tol):g}"
        monitor.reason = "given"
    stats = monitor.stats(name, system.nfe, problem.batched)
    handle_failure(monitor, on_failure, f"attached solution ({name})")
    return attach_solution(system, z_flat, stats, adjoint_obj, tol=float(tol), atol=float(atol), on_failure=on_failure)


def custom_root(
    problem_or_F: ImplicitProblem | Callable[[Any], Any],
    *,
    adjoint: str | AdjointSolver | type[AdjointSolver] | None = None,
    tol: float = DEFAULT_TOL,
    atol: float = DEFAULT_ATOL,
    on_failure: str = DEFAULT_ON_FAILURE,
    adjoint_options: Mapping[str, Any] | None = None,
    batched: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: a solver function of the user's, ``my_solver(z0, *args) -> z_star``, made differentiable by the IFT.

    The decorated function runs as it is (any code: NumPy, SciPy, a loop of
    torch operations; autograd is left as the caller has it), and its result
    is passed to :func:`attach`: checked against the tolerance, and returned
    in the structure of ``z0`` with the implicit derivatives of a solution
    of ``problem``, as :func:`fixed_point` and :func:`root` return theirs.

    Args:
        problem_or_F: The problem the function solves, or a callable, taken
            as the residual ``F`` of a root problem ``F(z*) = 0``.
        adjoint: As for :func:`solve`.
        tol: Relative tolerance of the check and of the adjoint.
        atol: Absolute tolerance floor.
        on_failure: As for :func:`attach`.
        adjoint_options: Keyword arguments of the adjoint's constructor.
        batched: With a callable ``F``: whether dim 0 indexes samples.

    Returns:
        A decorator; the decorated function returns ``z*`` in the structure
        of ``z0``.

    Raises:
        TypeError: ``problem_or_F`` is neither a problem nor callable, or
            ``batched`` is given with a problem.
        ValueError: (from the decorated function) it returned a state of
            another structure than ``z0``.

    Examples:
        Newton's method on ``z² = a``, written by hand, and ``dz*/da = 1 / (2 z*)``:

        >>> import torch, implicit
        >>> a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> @implicit.custom_root(lambda z: z**2 - a, tol=1e-10)
        ... def newton(z0):
        ...     z = z0.clone()
        ...     for _ in range(30):
        ...         z = z - (z**2 - a.detach()) / (2 * z)
        ...     return z
        >>> z = newton(torch.tensor(1.0, dtype=torch.float64))
        >>> z.backward()
        >>> round(z.item(), 8), round(a.grad.item(), 8)
        (1.41421356, 0.35355339)
    """
    if isinstance(problem_or_F, ImplicitProblem):
        if batched:
            raise TypeError("batched is for a callable F; the problem given already says whether it is batched")
        problem = problem_or_F
    elif callable(problem_or_F):
        problem = ImplicitProblem(problem_or_F, batched=batched)
    else:
        raise TypeError(
            f"custom_root needs an implicit.ImplicitProblem or a callable F; got {type(problem_or_F).__name__}"
        )
    settings = SolveSettings.build(tol, atol, on_failure=on_failure)
    tol, atol, on_failure = settings.tol, settings.atol, settings.on_failure

    def decorate(solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(solver):
            raise TypeError(f"custom_root decorates a function; got {type(solver).__name__}")
        name = getattr(solver, "__name__", type(solver).__name__)

        @functools.wraps(solver)
        def solved(z0: Any, *args: Any, **kwargs: Any) -> Any:
            _check_state(z0, "z0")
            z_star = solver(z0, *args, **kwargs)
            _check_state(z_star, f"the value returned by {name}")
            _same_structure(z0, z_star, problem.batched, name)
            sol = attach(
                problem,
                z_star,
                adjoint=adjoint,
                tol=tol,
                atol=atol,
                on_failure=on_failure,
                adjoint_options=adjoint_options,
                name=name,
            )
            return sol.z

        return solved

    return decorate


def _same_structure(z0: Any, z_star: Any, batched: bool, name: str) -> None:
    """That ``z_star`` has the keys, shapes and dtype of ``z0``; else a ValueError naming the difference."""
    a, b = Structure(z0, batched), Structure(z_star, batched)
    if a.kind != b.kind or a.keys != b.keys:
        raise ValueError(
            f"{name} returned a {b.kind} with variables {b.names}; expected a {a.kind} with {a.names} as z0"
        )
    for var, s0, s1 in zip(a.names, a.shapes, b.shapes):
        if s0 != s1:
            raise ValueError(f"{name} returned {var} with shape {s1}; expected {s0} as in z0")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{name} returned dtype {b.dtype} on {b.device}; expected {a.dtype} on {a.device} as z0")
