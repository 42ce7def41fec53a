"""The problem linearised at its solution: products with ``J = ∂G/∂z`` and ``Jᵀ``, solves with ``I - J``.

What the custom derivative (``_ad``) needs of the problem at ``z*``: ``Jᵀ v``
through the graph of ``G`` recorded there, ``J v`` as the derivative of that
product (or by forward mode where no graph exists), the dense ``J`` per
sample for the ``exact`` adjoint and for batched tangents, and the solves
``(I - J)⁻¹ b`` and ``(I - J)⁻ᵀ b`` by the adjoint solver, with its failure
policy and statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _compat
from ._adjoint import AdjointSolver, LinearOperator
from ._failure import handle_failure
from ._monitor import Monitor
from ._problem import System
from ._products import JacobianFromGraph, vjp
from ._stats import SolverStats
from ._transforms import lowered, no_tangents, plain, strip_dead, vmapped

__all__ = ["LOWERED", "Linearisation"]

LOWERED = (
    "this composition of torch.func transforms needs products with the Jacobian of the problem "
    "inside the rule of an outer transform, where the problem cannot be differentiated again. "
    "Forward mode over another transform (torch.func.hessian, which is jacfwd over jacrev; "
    "jacfwd over grad or jacfwd) is not supported through implicit.solve; for second derivatives "
    "use torch.func.jacrev(torch.func.jacrev(f)), torch.func.jacrev over jacfwd, or "
    "torch.autograd.grad(..., create_graph=True)"
)


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
        self._products: JacobianFromGraph | None = None  # J v from the graph of g, kept between products
        self._negligible_bound: torch.Tensor | None = None  # see negligible()

    def set_graph(self, z: torch.Tensor, g: torch.Tensor) -> None:
        """Use the graph of ``g = G(z)`` (``z`` requiring grad) for products with ``Jᵀ``."""
        self.z, self.g = z, g
        self._products = None

    def record_graph(self) -> None:
        """Evaluate ``G`` once at the solution with a graph, for products with ``J`` and ``Jᵀ``.

        For forward mode alone, where :func:`attach` records none. Not while
        a ``torch.func`` transform is active: they forbid ``requires_grad_``.
        """
        if _compat.transform_level() is not None:
            raise NotImplementedError(LOWERED)
        with torch.enable_grad(), no_tangents():
            z = self.z_star.detach().requires_grad_()
            self.z, self.g = z, self.system.map(z)
            self._products = None

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        """``Jᵀ v``, from the graph recorded at the solution."""
        if self.g is None or self.z is None:
            self.record_graph()
        assert self.g is not None and self.z is not None
        with torch.enable_grad():
            try:
                return vjp(self.g, self.z, v)
            except RuntimeError:
                # The engine frees the forward graph once a backward without
                # retain_graph has passed through it; a later solve (a
                # second-order pass, or refining an unconverged adjoint) then
                # builds a graph of its own, at the cost of one evaluation.
                # Any other error recurs on the new graph, and propagates.
                self.record_graph()
                return vjp(self.g, self.z, v)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v``: from the recorded graph of ``G`` at the solution when there is one, else by forward mode.

        From the graph it is the derivative of the vector-Jacobian product
        ``Jᵀ w`` in ``w``, which evaluates nothing and starts no transform; so
        it is also inside ``torch.autograd.forward_ad``, which does not nest.

        Raises:
            NotImplementedError: where neither is possible (see :meth:`_lowered`).
        """
        wrapped = _compat.is_wrapped(self.z_star)
        if self.g is None and not wrapped and _compat.forward_ad_active():
            self.record_graph()  # torch.autograd.forward_ad does not nest: no forward mode here
        if self.g is not None and self.z is not None:
            # From the graph recorded at the solution: no new evaluation of G
            # (one backward pass of a small graph per product, recorded at the
            # first; forward mode evaluates G again, at three to five times
            # that), and no new transform level under torch.func.
            try:
                if wrapped or _compat.transform_level() is not None:
                    # under torch.func, levels differ between calls: nothing is kept
                    return JacobianFromGraph(self.z, self.g)(v)
                if self._products is None:
                    self._products = JacobianFromGraph(self.z, self.g)
                return self._products(v)
            except RuntimeError as exc:
                if wrapped or _compat.forward_ad_active():
                    raise NotImplementedError(LOWERED) from exc
                # An operation of G without a double backward: forward mode below.
        elif wrapped and lowered(self.z_star):
            raise NotImplementedError(LOWERED)
        return torch.func.jvp(self.system.map, (strip_dead(self.z_star),), (v,))[1]

    def jacobian(self) -> torch.Tensor:
        """``J`` per sample, ``(B, N, N)``, from ``N`` batched vector-Jacobian products.

        In forward mode without a graph it records one (an evaluation of
        ``G``); under ``torch.func``, where it cannot, it takes ``N``
        Jacobian-vector products instead.
        """
        if self._jacobian is None and 0 in self.z_star.shape:  # an empty batch: nothing to differentiate
            self._jacobian = plain(self.z_star.detach()).new_zeros(*self.z_star.shape, self.z_star.shape[1])
        if self._jacobian is None:
            if self.g is None and not _compat.is_wrapped(self.z_star):
                self.record_graph()
            batch, size = self.z_star.shape
            basis = torch.eye(size, dtype=self.z_star.dtype, device=self.z_star.device)
            basis = basis[:, None, :].expand(size, batch, size)
            if self.g is None or self.z is None:  # under torch.func, no graph: columns from JVPs
                cols = torch.stack([self.jvp(basis[k]) for k in range(size)], dim=-1)
                self._jacobian = plain(cols.detach())
                return self._jacobian
            with torch.enable_grad():
                try:
                    (rows,) = torch.autograd.grad(self.g, self.z, basis, retain_graph=True, is_grads_batched=True)
                except RuntimeError:  # an op without a batching rule: one product per row
                    rows = torch.stack([self.vjp(basis[k]) for k in range(size)])
            # Plain: L is a constant to every transform, whichever level asked first.
            self._jacobian = plain(rows.transpose(0, 1).detach())
        return self._jacobian

    def negligible(self, c: torch.Tensor) -> bool:
        """Whether cotangent ``c`` reaching the inner Newton step can be dropped.

        In a first-order backward it is ``g - (I - J)ᵀ u``: the residual of the
        adjoint solve just finished, within its tolerance by construction (and
        by definition for an approximate adjoint), but computed again by
        another route, so it may exceed the bound the solver met by rounding;
        it is held to twice that bound plus a rounding allowance. (Held to the
        bound itself, a residual that sits on it, as a Neumann series' does,
        could start a second solve and double the backward's cost.) In a
        later backward through a graph built with ``create_graph=True`` it is
        not small, and is solved. A sample whose adjoint solve ended
        unconverged (reported by the failure policy) is not solved again.
        """
        if self.adjoint.approximate:
            return True
        if self._negligible_bound is None or vmapped(c):
            return False
        cn = torch.linalg.vector_norm(c, dim=1)
        return bool((cn <= self._negligible_bound).all())

    def solve_dense(self, b: torch.Tensor, transpose: bool) -> torch.Tensor:
        """As :meth:`solve`, by a dense solve with the materialised ``J``, without host reads.

        For right-hand sides batched by ``torch.func.vmap`` (``jacfwd`` pushes
        a batch of tangents through), where an iterative solver's stopping test
        cannot be evaluated. One Jacobian serves every tangent.
        """
        jac = self.jacobian()
        m = jac.mT if transpose else jac
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        return torch.linalg.solve(eye - m, b.unsqueeze(-1)).squeeze(-1)

    def solve(self, b: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``(I - J)⁻ᵀ b`` if ``transpose`` else ``(I - J)⁻¹ b``, with the adjoint solver."""
        # The adjoint solver sees plain tensors only: its result carries no
        # derivative (the Function's rules supply those), and a bridge to
        # NumPy cannot read the wrappers of torch.func transforms.
        if transpose:
            op = LinearOperator(
                lambda v: plain(self.vjp(v)), lambda: self.jacobian().mT, batch=b.shape[0], size=b.shape[1]
            )
        else:
            op = LinearOperator(lambda v: plain(self.jvp(v)), self.jacobian, batch=b.shape[0], size=b.shape[1])
        with torch.no_grad(), no_tangents():  # no tangents of the iterations
            b = plain(b.detach())
            monitor = Monitor(
                self.system.structure,
                tol=self.tol,
                atol=self.atol,
                max_iter=self.adjoint.max_iter,
                reference=torch.linalg.vector_norm(b, dim=1),
            )
            with self.system.precision():
                x = self.adjoint.solve(op, b, monitor)
        if monitor.converged is None:  # the adjoint never checked (a closed-form answer)
            monitor.check(x, torch.zeros_like(x))
        stats = monitor.stats(self.adjoint.name, op.nmv, self.system.problem.batched, self.adjoint.approximate)
        if transpose:
            assert monitor.reference is not None
            bn, un = monitor.reference, torch.linalg.vector_norm(x, dim=1)
            eps = torch.finfo(x.dtype).eps
            bound = 2.0 * (self.tol * bn + self.atol) + 64.0 * eps * (bn + un)
            if monitor.converged is not None and not monitor.nonfinite:
                # A sample the adjoint reported unconverged (and warned of) is not solved a
                # second time behind the caller's back: max_iter is the budget asked for.
                bound = torch.where(monitor.converged, bound, torch.full_like(bound, math.inf))
            self._negligible_bound = bound
            if self.record is not None:
                self.record(stats)
        what = "adjoint solve" if transpose else "tangent solve"
        if monitor.nonfinite and not bool(torch.isfinite(b).all()):
            # Not the adjoint's failure: the right-hand side arrived non-finite.
            source = "the incoming gradient" if transpose else "the incoming tangent"
            monitor.blame_input(self.system.structure.nonfinite(b), source)
        handle_failure(monitor, self.on_failure, what, self.adjoint.name)
        return x
