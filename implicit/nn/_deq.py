"""The deep equilibrium layer: ``z* = cell(z*, x)`` as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._adjoint import AdjointSolver
from .._problem import ImplicitProblem
from .._registry import make_adjoint, make_solver
from .._settings import (
    DEFAULT_ATOL,
    DEFAULT_MAX_ITER,
    DEFAULT_ON_FAILURE,
    DEFAULT_TOL,
    SolveSettings,
    integer,
    non_negative,
)
from .._solve import solve
from .._solver import Solver
from .._stats import Solution, SolverStats
from ._stabilisers import jacobian_regularization, spectral_radius

__all__ = ["DEQ"]


class CellMap:
    """The fixed-point map ``z ↦ cell(z, x)`` of one call, with ``x`` bound.

    A small class rather than a closure so that nothing the layer builds is a
    lambda, and so that problems print with the cell's name.
    """

    def __init__(self, cell: nn.Module, x: Any) -> None:
        self.cell = cell
        self.x = x
        self.__qualname__ = f"{type(cell).__qualname__}.forward"

    def __call__(self, z: Any) -> Any:
        return self.cell(z, self.x)


class SolveCounters:
    """Running counts of a layer's solves since the last reset, kept without host synchronisation.

    The counts that depend on values (unconverged solves, worst residuals)
    are accumulated as tensors on the state's device, so that counting adds
    no host synchronisation to a training step; :meth:`as_dict` reads them
    (one synchronisation), e.g. once per progress-bar update or epoch.
    Adjoint solves of an approximate adjoint (``jfb``) are counted in
    ``adjoint_solves`` only: they have no residual.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every count back to zero."""
        self.forward_solves = 0
        self.adjoint_solves = 0
        self._tensors: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        old = self._tensors.get(key)
        self._tensors[key] = value if old is None else old + value.to(old.device)

    def _max(self, key: str, stats: SolverStats) -> None:
        if stats.residual.numel() == 0:
            return
        value = stats.residual.detach().max()
        old = self._tensors.get(key)
        self._tensors[key] = value if old is None else torch.maximum(old, value.to(old.device, old.dtype))

    def forward(self, stats: SolverStats) -> None:
        """Count a forward solve."""
        self.forward_solves += 1
        self._add("forward_unconverged", (~stats.converged).any().long())
        self._max("worst_forward_residual", stats)

    def adjoint(self, stats: SolverStats) -> None:
        """Count an adjoint solve."""
        self.adjoint_solves += 1
        if stats.approximate:
            return
        self._add("adjoint_unconverged", (~stats.converged).any().long())
        self._max("worst_adjoint_residual", stats)

    def as_dict(self) -> dict[str, Any]:
        """The counts as Python numbers (the worst residuals ``None`` before any solve)."""
        t = self._tensors

        def count(key: str) -> int:
            return int(t[key]) if key in t else 0

        def worst(key: str) -> float | None:
            return float(t[key]) if key in t else None

        return {
            "forward_solves": self.forward_solves,
            "forward_unconverged": count("forward_unconverged"),
            "adjoint_solves": self.adjoint_solves,
            "adjoint_unconverged": count("adjoint_unconverged"),
            "worst_forward_residual": worst("worst_forward_residual"),
            "worst_adjoint_residual": worst("worst_adjoint_residual"),
        }


class DEQ(nn.Module):
    """A deep equilibrium layer: returns the state ``z*`` with ``z* = cell(z*, x)``.

    The forward pass solves the fixed point with the chosen solver, building
    no autograd graph; the backward pass solves one joint adjoint system
    ``(I - ∂cell/∂z)ᵀ u = g`` over all variables of the state together (the
    implicit function theorem) and sends ``u`` through one evaluation of the
    cell to its parameters and to ``x``. Memory does not grow with the number
    of iterations.

    The cell is an ``nn.Module`` (registered as the submodule ``cell``) with

    * ``forward(z, x)``: the next state from state ``z`` and input ``x``; it
      receives and must return the structure of the initial state (a dict of
      tensors, a tuple/list of tensors or one tensor) with the same keys,
      shapes, dtype and device;
    * ``init_state(x)``: the initial state for input ``x`` (needed unless
      every call passes ``z0``).

    When ``batched`` (the default) dim 0 of every variable indexes samples,
    sample ``i`` of the new state must depend on sample ``i`` only (no batch
    norm over the batch inside the cell), and convergence is tracked per
    sample. ``tol``/``max_iter`` apply in training mode; ``eval_tol`` and
    ``eval_max_iter``, when given, replace them in eval mode (``layer.eval()``).

    The layer has no parameters or buffers of its own, so ``state_dict`` and
    ``.to(...)`` act on the cell alone; solver settings are constructor
    arguments and, with the last stats, travel with ``copy.deepcopy`` and
    ``pickle`` (nothing the layer stores is a lambda or a graph). Under
    ``torch.compile`` of a surrounding model the solve (forward iterations,
    IFT backward) runs eagerly: the graph breaks at the call to the layer and
    resumes after it, and the code before and after is compiled.

    Args:
        cell: The module computing the next state, see above.
        solver: A registered solver name, a :class:`~implicit.Solver` subclass or instance.
        adjoint: A registered adjoint name, an :class:`~implicit.AdjointSolver` subclass or instance.
        tol: Relative tolerance of the forward solve in training mode
            (``‖cell(z, x) - z‖ ≤ tol·‖z‖ + atol`` per sample).
        atol: Absolute tolerance floor.
        max_iter: The most forward iterations in training mode.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence
            of the forward or adjoint solve.
        solver_options: Keyword arguments of the solver's constructor.
        adjoint_options: Keyword arguments of the adjoint's constructor.
        batched: Whether dim 0 of every variable indexes independent samples.
        eval_tol: ``tol`` in eval mode; ``None`` keeps ``tol``.
        eval_max_iter: ``max_iter`` in eval mode; ``None`` keeps ``max_iter``.

    Raises:
        TypeError: ``cell`` is not an ``nn.Module``.
        ValueError: an invalid setting, or an unknown solver, adjoint or
            option (the message lists what exists).

    Examples:
        >>> import torch, implicit
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, z, x):
        ...         return {"h": 0.5 * torch.tanh(self.lin(z["h"]) + x)}
        ...     def init_state(self, x):
        ...         return {"h": torch.zeros_like(x)}
        >>> layer = implicit.nn.DEQ(Cell(), solver="fixed_point", adjoint="neumann", tol=1e-5)
        >>> z = layer(torch.randn(8, 4))
        >>> z["h"].shape, layer.last_stats.all_converged
        (torch.Size([8, 4]), True)

    Reference:
        Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(
        self,
        cell: nn.Module,
        *,
        solver: str | Solver | type[Solver] = "anderson",
        adjoint: str | AdjointSolver | type[AdjointSolver] = "gmres",
        tol: float = DEFAULT_TOL,
        atol: float = DEFAULT_ATOL,
        max_iter: int = DEFAULT_MAX_ITER,
        on_failure: str = DEFAULT_ON_FAILURE,
        solver_options: Mapping[str, Any] | None = None,
        adjoint_options: Mapping[str, Any] | None = None,
        batched: bool = True,
        eval_tol: float | None = None,
        eval_max_iter: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise TypeError(
                f"the cell must be a torch.nn.Module with forward(z, x) and init_state(x); got {type(cell).__name__}"
            )
        settings = SolveSettings.build(tol, atol, max_iter, on_failure)
        tol, atol, max_iter = settings.tol, settings.atol, settings.max_iter
        if eval_tol is not None:
            eval_tol = non_negative("eval_tol", eval_tol)
        if eval_max_iter is not None:
            eval_max_iter = integer("eval_max_iter", eval_max_iter, minimum=0)
        # Built once here only to reject unknown names and options when the
        # layer is made rather than at its first call; the specs themselves
        # are kept (as the user gave them: a name stays a name in repr and
        # pickles, and may be reassigned) and each call builds from them.
        make_solver(solver, solver_options)
        make_adjoint(adjoint, adjoint_options)
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.tol = float(tol)
        self.atol = float(atol)
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.solver_options = dict(solver_options or {})
        self.adjoint_options = dict(adjoint_options or {})
        self.batched = bool(batched)
        self.eval_tol = None if eval_tol is None else float(eval_tol)
        self.eval_max_iter = eval_max_iter
        self.last_stats: SolverStats | None = None
        self._last_solution: Solution | None = None
        self._counters = SolveCounters()

    @property
    def counters(self) -> dict[str, Any]:
        """Running counts of this layer's solves since it was built or :meth:`reset_counters` ran.

        ``forward_solves`` and ``adjoint_solves`` (calls and backward passes),
        ``forward_unconverged`` and ``adjoint_unconverged`` (solves that ended
        with some sample unconverged or non-finite), ``worst_forward_residual``
        and ``worst_adjoint_residual`` (the largest final residual norm of any
        sample, ``None`` before any solve). The counts are kept on the
        state's device without host synchronisation; reading this property
        synchronises once. An approximate adjoint (``jfb``) is counted in
        ``adjoint_solves`` only.
        """
        return self._counters.as_dict()

    def reset_counters(self) -> None:
        """Set :attr:`counters` back to zero (at the start of an epoch, say)."""
        self._counters.reset()

    @property
    def last_adjoint_stats(self) -> SolverStats | None:
        """The adjoint solve's stats of the latest backward through the last call's output.

        ``None`` until a backward pass has gone through the output of the last
        call (and always in eval mode or under ``torch.no_grad()``, where no
        backward exists).
        """
        return None if self._last_solution is None else self._last_solution.adjoint_stats

    def settings(self) -> tuple[float, int]:
        """``(tol, max_iter)`` of the current mode (training or eval)."""
        if self.training:
            return self.tol, self.max_iter
        tol = self.tol if self.eval_tol is None else self.eval_tol
        max_iter = self.max_iter if self.eval_max_iter is None else self.eval_max_iter
        return tol, max_iter

    def initial_state(self, x: Any) -> Any:
        """``cell.init_state(x)``, with a clear error when the cell has none.

        Raises:
            TypeError: the cell defines no ``init_state``.
        """
        init = getattr(self.cell, "init_state", None)
        if not callable(init):
            raise TypeError(
                f"{type(self.cell).__name__} has no init_state(x): define init_state(self, x) on the cell, "
                "returning the initial state (e.g. {'h': x.new_zeros(len(x), 64)}), or call the layer as "
                "layer(x, z0=...)"
            )
        return init(x)

    def forward(self, x: Any, z0: Any = None) -> Any:
        """The equilibrium state for input ``x``.

        Args:
            x: The input, handed unchanged to ``cell.forward`` and ``cell.init_state``.
            z0: The initial state (a warm start, e.g. a previous solution);
                ``None`` uses ``cell.init_state(x)``. It receives no gradient.

        Returns:
            ``z*`` in the structure of the initial state, differentiable by the
            implicit function theorem with respect to ``x`` and the cell's parameters.

        Raises:
            TypeError: ``z0`` is ``None`` and the cell has no ``init_state``.
            ValueError: the cell returned other keys, shapes, dtypes or devices
                than it was given.
            ConvergenceError: a solve did not converge and ``on_failure="raise"``.
        """
        return self._solve(x, z0)

    # The solver loop synchronises with the host every iteration and the
    # backward is a custom autograd.Function over a closure; neither traces,
    # so a compiled model breaks its graph here and runs the solve eagerly.
    @torch.compiler.disable
    def _solve(self, x: Any, z0: Any) -> Any:
        if z0 is None:
            z0 = self.initial_state(x)
        tol, max_iter = self.settings()
        problem = ImplicitProblem.fixed_point(CellMap(self.cell, x), batched=self.batched)
        sol = solve(
            problem,
            z0,
            solver=self.solver,
            adjoint=self.adjoint,
            tol=tol,
            atol=self.atol,
            max_iter=max_iter,
            on_failure=self.on_failure,
            solver_options=self.solver_options,
            adjoint_options=self.adjoint_options,
        )
        z = sol.z
        # The backward fills sol.adjoint_stats through a weak reference, so
        # the layer keeps the Solution alive; without its z, which would hold
        # the autograd graph of the call until the next one and keep the
        # layer from being deep-copied.
        sol.z = None
        self._last_solution = sol
        self.last_stats = sol.stats
        self._counters.forward(sol.stats)
        sol._adjoint_listeners.append(self._counters.adjoint)
        return z

    def jacobian_regularization(self, x: Any, z: Any, **kwargs: Any) -> torch.Tensor:
        """A Hutchinson estimate of ``‖∂cell(z, x)/∂z‖_F²`` per sample, at state ``z``.

        See :func:`implicit.nn.jacobian_regularization`; ``kwargs`` are its
        keyword arguments (``batched`` defaults to the layer's).
        """
        kwargs.setdefault("batched", self.batched)
        return jacobian_regularization(CellMap(self.cell, x), z, **kwargs)

    def spectral_radius(self, x: Any, z: Any, **kwargs: Any) -> torch.Tensor:
        """The spectral radius of ``∂cell(z, x)/∂z`` per sample, by power iteration.

        See :func:`implicit.nn.spectral_radius`; ``kwargs`` are its keyword
        arguments (``batched`` defaults to the layer's).
        """
        kwargs.setdefault("batched", self.batched)
        return spectral_radius(CellMap(self.cell, x), z, **kwargs)

    def extra_repr(self) -> str:
        name = self.solver if isinstance(self.solver, str) else getattr(self.solver, "name", repr(self.solver))
        adj = self.adjoint if isinstance(self.adjoint, str) else getattr(self.adjoint, "name", repr(self.adjoint))
        text = f"solver={name!r}, adjoint={adj!r}, tol={self.tol:g}, max_iter={self.max_iter}"
        if self.eval_tol is not None:
            text += f", eval_tol={self.eval_tol:g}"
        if self.eval_max_iter is not None:
            text += f", eval_max_iter={self.eval_max_iter}"
        if not self.batched:
            text += ", batched=False"
        return text
