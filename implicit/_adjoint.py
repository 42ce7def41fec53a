"""Base class of adjoint solvers and the linear operator they see."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ._settings import integer, non_negative, set_options
from .plugin import Monitor

__all__ = ["AdjointSolver", "LinearOperator"]


class LinearOperator:
    """``v ↦ M v`` on ``(B, N)`` tensors, block-diagonal over samples.

    For the backward pass ``M = (∂G/∂z)ᵀ`` at the solution (applied with a
    vector-Jacobian product); for forward mode ``M = ∂G/∂z`` (a
    Jacobian-vector product). ``G`` is the fixed-point map, so the adjoint
    equation is ``x = M x + b``.

    The library builds these in the backward pass and hands them to
    :meth:`AdjointSolver.solve`; a user meets one when writing an adjoint.
    Each call counts one product in :attr:`nmv`.

    Args:
        matvec: Applies ``M`` to a ``(B, N)`` tensor.
        dense: Returns ``M`` as a ``(B, N, N)`` tensor (one block per sample).
        batch: ``B``.
        size: ``N``.

    Examples:
        >>> import torch, implicit
        >>> M = torch.tensor([[0.5, 0.25], [0.0, 0.5]], dtype=torch.float64)
        >>> op = implicit.LinearOperator(lambda v: v @ M.T, lambda: M.expand(1, 2, 2), batch=1, size=2)
        >>> op(torch.ones(1, 2, dtype=torch.float64)).tolist(), op.nmv
        ([[0.75, 0.5]], 1)
        >>> tuple(op.dense().shape)
        (1, 2, 2)
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dense: Callable[[], torch.Tensor],
        *,
        batch: int,
        size: int,
    ) -> None:
        self._matvec = matvec
        self._dense = dense
        self.batch = batch
        self.size = size
        self.nmv = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``M v`` for ``v`` of shape ``(B, N)``; counts one product in :attr:`nmv`."""
        self.nmv += 1
        return self._matvec(v)

    def dense(self) -> torch.Tensor:
        """``M`` materialised per sample, shape ``(B, N, N)``."""
        return self._dense()


@dataclass(frozen=True, kw_only=True)
class AdjointSolver:
    """Solves the linear fixed point ``x = M x + b`` of implicit differentiation.

    With ``G`` the fixed-point map and ``J = ∂G/∂z`` at the solution, the
    backward pass solves ``(I - Jᵀ) x = g`` (``M = Jᵀ``, ``b = g``) and forward
    mode solves ``(I - J) x = b``. For a root problem ``G(z) = z - F(z)``,
    so this is ``(∂F/∂z)ᵀ x = g``. Adjoint solvers see ``M`` only through
    :class:`LinearOperator` (products with vectors); only ``exact`` asks for
    the dense matrix.

    Attributes:
        approximate: ``True`` for an adjoint that does not solve the equation
            (``jfb``); all others give the implicit gradient to their tolerance.
        symmetric: ``True`` for an adjoint that assumes ``I - M`` symmetric
            (``cg``, ``minres``): right for argmin and least-squares problems,
            whose ``I - M`` is the Hessian, and wrong for a general root or
            fixed-point problem. The library does not test the symmetry.
        tol: Relative tolerance, ``‖x - M x - b‖ ≤ tol·‖b‖ + atol`` per sample;
            ``None`` uses the forward solve's ``tol``.
        atol: Absolute tolerance floor; ``None`` uses the forward solve's ``atol``.
        max_iter: The most iterations.

    Raises:
        ValueError: (from the constructor) ``tol`` or ``atol`` not a finite
            non-negative number, or ``max_iter`` not a non-negative int.

    Examples:
        Richardson iteration ``x ← x + ω (M x + b - x)``, passed as a class
        (no registration needed); the fixed point of ``z = z/2 + θ`` has
        ``dz*/dθ = 2``:

        >>> import torch, implicit
        >>> class Richardson(implicit.AdjointSolver):
        ...     omega: float = 0.8
        ...     def solve(self, op, b, monitor):
        ...         x = b
        ...         while True:
        ...             r = op(x) + b - x
        ...             if monitor.check(x, r):
        ...                 return x
        ...             x = monitor.freeze(x + self.omega * r, x)
        >>> theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        >>> problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + theta)
        >>> sol = implicit.solve(problem, torch.zeros((), dtype=torch.float64), solver="fixed_point", adjoint=Richardson, adjoint_options={"tol": 1e-12}, tol=1e-10)
        >>> sol.z.backward()
        >>> round(theta.grad.item(), 8), sol.adjoint_stats.all_converged
        (2.0, True)

    Reference:
        Blondel et al., "Efficient and Modular Implicit Differentiation",
        NeurIPS 2022 (the adjoint equation as a linear system solved by any
        matrix-free method).
    """

    name: ClassVar[str] = ""
    approximate: ClassVar[bool] = False
    symmetric: ClassVar[bool] = False

    tol: float | None = None
    atol: float | None = None
    max_iter: int = 200

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # As for solvers: subclasses are frozen keyword-only dataclasses.
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True, kw_only=True)(cls)
        # An explicit @dataclass(frozen=True) on the subclass, which runs
        # next, refuses to overwrite these; the base class's still protect
        # every inherited option until it replaces them.
        for attr in ("__setattr__", "__delattr__"):
            if attr in cls.__dict__:
                delattr(cls, attr)

    def __post_init__(self) -> None:
        set_options(
            self,
            tol=None if self.tol is None else non_negative("tol", self.tol),
            atol=None if self.atol is None else non_negative("atol", self.atol),
            max_iter=integer("max_iter", self.max_iter, minimum=0),
        )

    def solve(self, op: LinearOperator, b: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        """Solve ``x = op(x) + b`` for ``(B, N)`` tensors.

        Args:
            op: The operator ``M``.
            b: The right-hand side, ``(B, N)``.
            monitor: Call ``monitor.check(x, x - op(x) - b)`` once per iterate.

        Returns:
            The last iterate passed to ``monitor.check``.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options of this adjoint as a dict (its constructor's keyword arguments).

        Returns:
            ``{option name: value}`` for every dataclass field, in declaration order.
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}
