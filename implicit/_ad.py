"""The one custom derivative of the package: implicit differentiation of a solution.

At a solution ``z*`` of ``z = G(z, θ)`` (``G`` the fixed-point map, closing over
the parameters ``θ``) the implicit function theorem gives
``dz*/dθ = (I - J)⁻¹ ∂G/∂θ`` with ``J = ∂G/∂z``. Because ``G`` is a closure,
``θ`` cannot be handed to an ``autograd.Function``; instead the solution is
re-attached to autograd by Newton steps whose linear solve is the one custom
Function :class:`_ImplicitSolve`:

    z_a = z* + L (G(z*, θ)  - z*)     with L = (I - J₀)⁻¹, J₀ = J at z*
    z   = z_a + L (G(z_a, θ) - z_a)

``z*`` is a constant, ``G(z*) = z*`` so both corrections are zero in value and
the output equals the solver's solution. Differentiating: a Newton step with
a constant ``L`` raises the order to which a function of ``θ`` matches ``z*(θ)``
by one, so ``z_a`` has the right first derivatives and ``z`` the right first and
second derivatives. The backward pass of the outer step solves the joint
adjoint system ``(I - J₀)ᵀ u = g`` over all variables together once, then sends
``u`` through the single evaluation ``G(z_a, θ)`` to every tensor ``G`` reads.
In a first-order backward the cotangent reaching ``z_a`` is ``g - (I - J₀)ᵀ u``,
zero up to the adjoint tolerance, so the inner step returns nothing and is never
evaluated; its ``G(z*, θ)`` is checkpointed (no activations kept), and is only
recomputed when a graph of the backward is built (``create_graph=True``) for
second derivatives. Bytes saved for backward are those of one evaluation of
``G``, whatever the number of solver iterations.

``L`` and ``Lᵀ`` are the same Function: its backward is the transposed solve
(differentiable again when a graph is being built) and its ``jvp`` the
untransposed one, so reverse mode, double backward and forward mode
(``torch.func.jvp``, ``torch.autograd.forward_ad``) all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

from ._adjoint import AdjointSolver, LinearOperator
from ._failure import handle_failure
from ._monitor import Monitor
from ._problem import System
from ._stats import SolverStats

__all__ = ["Linearisation", "attach"]

# Modes of _ImplicitSolve.
_INNER = "inner"  # Newton correction whose value is dropped; skipped in first-order backward
_OUTER = "outer"  # Newton correction whose value is dropped
_SOLVE = "solve"  # x = (I - J)⁻¹ r
_SOLVE_T = "solve_t"  # x = (I - J)⁻ᵀ r


class Linearisation:
    """The problem linearised at its solution: products with ``J`` and solves with ``I - J``.

    Args:
        system: The problem as functions of ``(B, N)`` tensors.
        z_star: The solution, ``(B, N)``, detached.
        adjoint: The adjoint solver for ``x = M x + b``.
        tol: Relative tolerance of the adjoint (the adjoint's own ``tol`` wins).
        atol: Absolute tolerance of the adjoint (the adjoint's own ``atol`` wins).
        on_failure: The failure policy for adjoint solves.
        record: Called with the :class:`SolverStats` of every transposed solve.
    """

    def __init__(
        self,
        system: System,
        z_star: torch.Tensor,
        adjoint: AdjointSolver,
        *,
        tol: float,
        atol: float,
        on_failure: str,
        record: Callable[[SolverStats], None] | None = None,
    ) -> None:
        self.system = system
        self.z_star = z_star
        self.adjoint = adjoint
        self.tol = adjoint.tol if adjoint.tol is not None else tol
        self.atol = adjoint.atol if adjoint.atol is not None else atol
        self.on_failure = on_failure
        self.record = record
        self.z: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self._jacobian: torch.Tensor | None = None
        self._last_rhs_norm: torch.Tensor | None = None
        self._jvp_graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._nested_forward_ad = False

    def set_graph(self, z: torch.Tensor, g: torch.Tensor) -> None:
        """Use the graph of ``g = G(z)`` (``z`` requiring grad) for products with ``Jᵀ``."""
        self.z, self.g = z, g

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        """``Jᵀ v``."""
        assert self.g is not None and self.z is not None, "set_graph() first"
        with torch.enable_grad():
            (out,) = torch.autograd.grad(self.g, self.z, v, retain_graph=True)
        return out

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v``, by forward-mode differentiation of ``G`` at the solution.

        Inside ``torch.autograd.forward_ad`` (which does not nest) it is the
        derivative of the vector-Jacobian product ``Jᵀ w`` in ``w`` instead.
        """
        if not self._nested_forward_ad:
            try:
                return torch.func.jvp(self.system.map, (self.z_star,), (v,))[1]
            except RuntimeError as exc:
                if "Nested forward mode" not in str(exc):
                    raise
                self._nested_forward_ad = True
        with torch.enable_grad():
            if self._jvp_graph is None:
                z = self.z_star.detach().requires_grad_()
                self._jvp_graph = (z, self.system.map(z))
            z, g = self._jvp_graph
            w = torch.zeros_like(z, requires_grad=True)
            (jtw,) = torch.autograd.grad(g, z, w, create_graph=True)
            (out,) = torch.autograd.grad(jtw, w, v)
        return out

    def jacobian(self) -> torch.Tensor:
        """``J`` per sample, ``(B, N, N)``, from ``N`` batched vector-Jacobian products.

        Before the graph exists (forward mode), from ``N`` Jacobian-vector products.
        """
        if self._jacobian is None:
            batch, size = self.z_star.shape
            basis = torch.eye(size, dtype=self.z_star.dtype, device=self.z_star.device)
            basis = basis[:, None, :].expand(size, batch, size)
            if self.g is None:  # forward mode before the graph exists: columns from JVPs
                cols = torch.stack([self.jvp(basis[k]) for k in range(size)], dim=-1)
                self._jacobian = cols.detach()
                return self._jacobian
            with torch.enable_grad():
                try:
                    (rows,) = torch.autograd.grad(
                        self.g, self.z, basis, retain_graph=True, is_grads_batched=True
                    )
                except RuntimeError:  # an op without a batching rule: one product per row
                    rows = torch.stack([self.vjp(basis[k]) for k in range(size)])
            self._jacobian = rows.transpose(0, 1).detach()
        return self._jacobian

    def negligible(self, c: torch.Tensor) -> bool:
        """Whether cotangent ``c`` reaching the inner Newton step can be dropped.

        In a first-order backward it is ``g - (I - J)ᵀ u``: the residual of the
        adjoint solve just finished, within its tolerance by construction (and
        by definition for an approximate adjoint). In a later backward through
        a graph built with ``create_graph=True`` it is not small, and is solved.
        """
        if self.adjoint.approximate:
            return True
        if self._last_rhs_norm is None:
            return False
        cn = torch.linalg.vector_norm(c, dim=1)
        return bool((cn <= self.tol * self._last_rhs_norm + self.atol).all())

    def solve(self, b: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``(I - J)⁻ᵀ b`` if ``transpose`` else ``(I - J)⁻¹ b``, with the adjoint solver."""
        if transpose:
            op = LinearOperator(self.vjp, lambda: self.jacobian().mT, batch=b.shape[0], size=b.shape[1])
        else:
            op = LinearOperator(self.jvp, self.jacobian, batch=b.shape[0], size=b.shape[1])
        with torch.no_grad():
            b = b.detach()
            monitor = Monitor(
                self.system.structure,
                tol=self.tol,
                atol=self.atol,
                max_iter=self.adjoint.max_iter,
                reference=torch.linalg.vector_norm(b, dim=1),
            )
            x = self.adjoint.solve(op, b, monitor)
        if monitor.converged is None:  # the adjoint never checked (a closed-form answer)
            monitor.check(x, torch.zeros_like(x))
        stats = monitor.stats(self.adjoint.name, op.nmv, self.system.problem.batched)
        if transpose:
            self._last_rhs_norm = monitor.reference
            if self.record is not None:
                self.record(stats)
        what = "adjoint solve" if transpose else "tangent solve"
        handle_failure(monitor, self.on_failure, f"{what} ({self.adjoint.name})")
        return x


class _ImplicitSolve(torch.autograd.Function):
    """``x = (I - J₀)^{-1} r`` (or its transpose) at a fixed linearisation.

    In the Newton modes the forward value is zero (the correction at an exact
    solution) and only the derivatives matter.
    """

    @staticmethod
    def forward(r: torch.Tensor, lin: Linearisation, mode: str) -> torch.Tensor:  # type: ignore[override]
        if mode in (_INNER, _OUTER):
            return torch.zeros_like(r)
        return lin.solve(r, transpose=mode == _SOLVE_T)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, ctx.lin, ctx.mode = inputs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        lin, mode = ctx.lin, ctx.mode
        building_graph = torch.is_grad_enabled()
        if mode == _INNER and not building_graph and lin.negligible(grad):
            return None, None, None
        transpose = mode != _SOLVE_T
        if building_graph:
            out = _ImplicitSolve.apply(grad, lin, _SOLVE_T if transpose else _SOLVE)
        else:
            out = lin.solve(grad, transpose=transpose)
        return out, None, None

    @staticmethod
    def jvp(ctx: Any, r_dot: torch.Tensor, *_: Any) -> torch.Tensor:  # type: ignore[override]
        return ctx.lin.solve(r_dot, transpose=ctx.mode == _SOLVE_T)


def attach(z_star: torch.Tensor, lin: Linearisation) -> torch.Tensor:
    """``z_star`` re-attached to autograd with its implicit derivatives (see the module docstring).

    Returns ``z_star`` itself when no graph is being recorded or when ``G``
    reads no tensor that requires grad.
    """
    if not torch.is_grad_enabled() and fwAD._current_level < 0:
        return z_star
    system = lin.system
    z0 = z_star.detach()
    g_in = checkpoint(system.map, z0, use_reentrant=False, preserve_rng_state=False)
    if not g_in.requires_grad and not _has_tangent(g_in):
        return z0
    z_a = z0 + _ImplicitSolve.apply(g_in - z0, lin, _INNER)
    g1 = system.map(z_a)
    lin.set_graph(z_a, g1)
    return z_a + _ImplicitSolve.apply(g1 - z_a, lin, _OUTER)


def _has_tangent(t: torch.Tensor) -> bool:
    if fwAD._current_level < 0:
        return False
    try:
        return fwAD.unpack_dual(t).tangent is not None
    except RuntimeError:
        return False
