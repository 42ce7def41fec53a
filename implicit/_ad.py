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
zero up to the adjoint tolerance, so the inner step solves nothing (the
autograd engine walks that branch with an empty cotangent, computing
nothing). ``G(z*, θ)`` and ``G(z_a, θ)`` run the same operations on the same
values, so the two evaluations keep one set of saved tensors between them
(``_saved``): bytes saved for backward are those of one evaluation of ``G``,
whatever the number of solver iterations, and nothing is recomputed.

``L`` and ``Lᵀ`` are the same Function: its backward is the transposed solve
(through the Function again, so differentiable when a graph is being built)
and its ``jvp`` the untransposed one, so reverse mode, double backward and
forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``) all go
through it. A double backward costs six solves (two transposed solves with a
graph, then two untransposed and two transposed ones); the untransposed
products ``J v`` come from the graph of ``G(z_a, θ)`` already recorded (the
derivative of ``Jᵀ w`` in ``w``), so ``G`` is not evaluated again. Forward mode
alone records no graph and differentiates ``G`` in forward mode instead
(matrix-free; the ``exact`` adjoint materialises ``J`` once).

Under ``torch.func``: ``grad``, ``vjp``, ``jvp``, ``jacrev`` (batched
cotangents reach the Function's ``vmap`` rule, a loop of solves with one
operator), ``jacfwd`` (batched tangents: a dense solve with ``J``
materialised once, as no iterative stopping test can run under ``vmap``) and
the compositions ``jacrev∘jacrev``, ``jacrev∘jacfwd`` and ``jacrev∘jvp`` work.
``vmap`` over the inputs of a solve is refused where the state is first seen
batched (see ``_transforms``). Forward mode over another transform
(``hessian`` = ``jacfwd∘jacrev``, ``jacfwd∘jacfwd``) is refused: its rules
run with the outer transforms suspended, where differentiating ``G`` afresh
would reuse their level numbers and mistake their wrapped tensors for its own.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from . import _compat
from ._adjoint import AdjointSolver, LinearOperator
from ._failure import handle_failure
from ._monitor import Monitor
from ._problem import System
from ._products import JacobianFromGraph, vjp
from ._saved import SharedSaves, evaluate_without_saving
from ._stats import SolverStats
from ._transforms import no_tangents, plain, vmapped

__all__ = ["Linearisation", "attach"]

_LOWERED = (
    "this composition of torch.func transforms needs products with the Jacobian of the problem "
    "inside the rule of an outer transform, where the problem cannot be differentiated again. "
    "Forward mode over another transform (torch.func.hessian, which is jacfwd over jacrev; "
    "jacfwd over grad or jacfwd) is not supported through implicit.solve; for second derivatives "
    "use torch.func.jacrev(torch.func.jacrev(f)), torch.func.jacrev over jacfwd, or "
    "torch.autograd.grad(..., create_graph=True)"
)

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
            raise NotImplementedError(_LOWERED)
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
                    raise NotImplementedError(_LOWERED) from exc
                # An operation of G without a double backward: forward mode below.
        elif wrapped and self._lowered():
            raise NotImplementedError(_LOWERED)
        return torch.func.jvp(self.system.map, (_strip_dead(self.z_star),), (v,))[1]

    def _lowered(self) -> bool:
        """Whether ``G`` must not be evaluated here: a ``torch.func`` transform the solve ran under is suspended.

        ``torch.func`` runs a Function's rules with the transforms above it
        lowered. The tensors ``G`` closes over are still wrapped at those
        levels, and a transform started there to differentiate ``G`` would
        take the same level number and mistake them for its own. Products
        then come from the graph recorded when the solution was attached.
        Levels that have exited (dead wrappers, level ``-2``) are harmless.
        """
        current = _compat.transform_level()
        t = self.z_star
        while _compat.is_wrapped(t):
            level = _compat.wrapped_level(t)
            if level > 0 and (current is None or level > current):
                return True
            t = _compat.unwrapped(t)
        return False

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
        not small, and is solved.
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
            self._negligible_bound = 2.0 * (self.tol * bn + self.atol) + 64.0 * eps * (bn + un)
            if self.record is not None:
                self.record(stats)
        what = "adjoint solve" if transpose else "tangent solve"
        if monitor.nonfinite and not bool(torch.isfinite(b).all()):
            # Not the adjoint's failure: the right-hand side arrived non-finite.
            source = "the incoming gradient" if transpose else "the incoming tangent"
            monitor.blame_input(self.system.structure.nonfinite(b), source)
        handle_failure(monitor, self.on_failure, what, self.adjoint.name)
        return x


class _ImplicitSolve(torch.autograd.Function):
    """``x = (I - J₀)^{-1} r`` (or its transpose) at a fixed linearisation, and the two Newton steps.

    ``L = (I - J₀)^{-1}``. In the Newton modes ``r`` is an evaluation ``G(b)``
    at the state ``base = b``, which equals ``z*`` in value, and the output is
    the state after the step, ``b + L (G(b) - b)``: ``b`` in value, since the
    correction vanishes at a solution. ``_INNER`` (``b = z*``, a constant)
    returns ``b``'s memory; ``_OUTER`` (``b = z_a``) returns a copy, the
    solution the caller may modify in place.
    """

    @classmethod
    def apply(  # type: ignore[override]
        cls, r: torch.Tensor, lin: Linearisation, mode: str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Function.apply`` without its per-call ``inspect.signature`` binding (about 50 µs).

        ``Function.apply`` binds the arguments of a Function that defines
        ``setup_context`` on every call, to fill in defaults; here they are
        always complete.
        """
        args = (r, lin, mode, base)
        if _compat.transforms_active():
            return _compat.custom_function_call(cls, *args)
        return super(torch.autograd.Function, cls).apply(*_compat.unwrap_dead_wrappers(args))  # type: ignore[misc]

    @staticmethod
    def forward(  # type: ignore[override]
        r: torch.Tensor, lin: Linearisation, mode: str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mode == _INNER:
            assert base is not None
            return base.view_as(base)  # no copy of the state, nor one saved by the G that reads it
        if mode == _OUTER:
            assert base is not None
            return base.clone()
        return lin.solve(r, transpose=mode == _SOLVE_T)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        lin, ctx.mode = inputs[1], inputs[2]
        # The inner step's output z_a is held by the linearisation (its graph
        # of G(z_a) starts there), so the inner step's node holds the
        # linearisation weakly: a strong reference would close a cycle through
        # autograd's nodes that Python's collector cannot see, and keep the
        # solve's tensors and graph alive for good. The outer step's node,
        # which every backward pass reaching the inner one passes first, holds it.
        ctx.lin = weakref.ref(lin) if ctx.mode == _INNER else lin

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None]:  # type: ignore[override]
        lin, mode = _linearisation(ctx), ctx.mode
        if mode == _INNER and not torch.is_grad_enabled() and lin.negligible(grad):
            return None, None, None, None
        # Through the Function again rather than lin.solve: the solve is then
        # differentiable when a graph is being built, and batched cotangents
        # (torch.func.jacrev) reach the vmap rule below.
        u = _ImplicitSolve.apply(grad, lin, _SOLVE if mode == _SOLVE_T else _SOLVE_T)
        if mode == _OUTER and ctx.needs_input_grad[3]:
            return u, None, None, grad - u  # d(b + L (G(b) - b)) = db + L (dG - db)
        return u, None, None, None  # the inner step's base is a constant

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, r_dot: torch.Tensor | None, _lin: None, _mode: None, base_dot: torch.Tensor | None = None
    ) -> torch.Tensor:
        lin, mode = _linearisation(ctx), ctx.mode
        if mode == _OUTER and base_dot is not None:
            rhs = -base_dot if r_dot is None else r_dot - base_dot
            return base_dot + _solve_tangent(lin, rhs, transpose=False)
        assert r_dot is not None
        return _solve_tangent(lin, r_dot, transpose=mode == _SOLVE_T)

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any, in_dims: tuple[Any, ...], r: torch.Tensor, lin: Linearisation, mode: str, base: Any = None
    ) -> tuple[torch.Tensor, Any]:
        # Reached by batched cotangents (torch.func.jacrev, vmap over a
        # vector-Jacobian product); the solution itself is never batched, as
        # solve() refuses to run under vmap.
        dim = in_dims[0]
        if mode in (_INNER, _OUTER):
            return _ImplicitSolve.forward(r, lin, mode, base), in_dims[3]
        if dim is None:
            return _ImplicitSolve.apply(r, lin, mode, base), None
        # One operator for every slice (and one Jacobian for ``exact``, cached):
        # a loop of solves, each through the Function so that nested vmaps recurse.
        return torch.stack([_ImplicitSolve.apply(r_i, lin, mode) for r_i in r.unbind(dim)]), 0


def _linearisation(ctx: Any) -> Linearisation:
    lin = ctx.lin() if isinstance(ctx.lin, weakref.ref) else ctx.lin
    if lin is None:  # pragma: no cover - the outer step's node keeps it while it can be reached
        raise RuntimeError("the solve this derivative belongs to no longer exists")
    return lin  # type: ignore[no-any-return]


def _solve_tangent(lin: Linearisation, r_dot: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``L r_dot`` (``Lᵀ r_dot`` if ``transpose``) in a forward-mode rule, by the route the context allows."""
    if vmapped(r_dot) or _tracked_by_outer_transform(r_dot):
        # jacfwd batches the tangents, so no host reads; reverse mode over
        # forward mode differentiates this rule itself. Both want plain
        # torch operations with L held constant: a dense solve.
        return lin.solve_dense(r_dot, transpose=transpose)
    if r_dot.requires_grad and torch.is_grad_enabled():
        # Reverse over forward mode in plain autograd: through the Function
        # again, whose backward is the transposed solve. (Not under
        # torch.func: re-entering there would evaluate G at a lowered level.)
        return _ImplicitSolve.apply(r_dot, lin, _SOLVE_T if transpose else _SOLVE)
    return lin.solve(r_dot, transpose=transpose)


def attach(z_star: torch.Tensor, lin: Linearisation) -> torch.Tensor:
    """``z_star`` re-attached to autograd with its implicit derivatives (see the module docstring).

    Returns ``z_star`` itself when no graph is being recorded or when ``G``
    reads no tensor that requires grad, and always under
    ``torch.inference_mode()``, where nothing can be differentiated.
    """
    if torch.is_inference_mode_enabled() or (not torch.is_grad_enabled() and not _compat.forward_ad_active()):
        return z_star
    system = lin.system
    z0 = z_star.detach()
    if system.autocast is not None:
        # Autocast caches its low-precision copy of each parameter within a region; a copy
        # made by the solver's iterations under no_grad carries no history, and PyTorch 2.2
        # would hand it to the evaluations below, which would then not reach the parameter.
        torch.clear_autocast_cache()
    # The two evaluations of G keep one set of saved tensors between them
    # (see _saved); without saved-tensor hooks (torch.func) each keeps its own.
    # Each checks, on unpack, that no tensor it saved was modified in place since.
    reads = system.problem.fn
    # A gradient taken inside G unpacks what G saved while G runs: not to be recomputed.
    differentiates = system.problem.form in ("argmin", "least_squares")
    shared = SharedSaves.create(reads) if not _compat.forward_ad_active() else None
    g_in = None
    if shared is not None:
        z_in = z0.detach().requires_grad_()
        try:
            with shared.first():
                # At a leaf that requires grad, as z_a does below: autograd then
                # saves the same tensors in both evaluations. Its gradient is never read.
                g_in = system.map(z_in)
        except RuntimeError:
            # G itself calls torch.func.grad or vjp, which refuse saved-tensor hooks: it is
            # evaluated below without them (an error of G's own recurs there, and propagates).
            shared = None
        else:
            if not _reads_other_leaves(g_in, z_in):
                return z0
    elif not _compat.forward_ad_active() and _compat.saved_tensors_hooks_enabled() and not differentiates:
        # PyTorch without access to the caller's hooks: this evaluation keeps nothing.
        z_in = z0.detach().requires_grad_()  # as above
        try:
            g_in = evaluate_without_saving(system.map, z_in, reads)
        except RuntimeError:  # G refuses saved-tensor hooks (as above); an error of its own recurs below
            pass
        else:
            if not _reads_other_leaves(g_in, z_in):
                return z0
    if g_in is None:
        # torch.func.grad / vjp / jacrev disable saved-tensor hooks, and forward
        # mode records no graph: this evaluation keeps its own activations.
        if _compat.transforms_active() or _compat.forward_ad_active():
            g_in = system.map(z0)
            if not g_in.requires_grad and not _has_tangent(g_in):
                return z0
        else:  # at a leaf, as above: a gradient G takes inside has a graph of its own
            z_in = z0.detach().requires_grad_()
            g_in = system.map(z_in)
            if not _reads_other_leaves(g_in, z_in):
                return z0
    # The corrections G(z) - z are folded into the Function (z0 is a constant,
    # z_a is the Function's ``base``): no subtraction, zero or sum is formed.
    z_a = _ImplicitSolve.apply(g_in, lin, _INNER, z0)  # z0 in value and memory
    if shared is not None:
        with shared.second():
            g1 = system.map(z_a)
        shared.settle()
    else:
        g1 = system.map(z_a)
    if g1.requires_grad:  # forward mode alone records no graph; J v then comes from jvp
        lin.set_graph(z_a, g1)
    return _ImplicitSolve.apply(g1, lin, _OUTER, z_a)  # a copy of z0 in value


def _reads_other_leaves(g: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether the graph of ``g`` reaches a tensor that requires grad other than ``leaf``.

    Every tensor that requires grad descends from leaves that do, so this is
    whether ``g`` depends on anything but ``leaf`` that requires grad. A
    breadth-first walk that stops at the first such leaf: a map's own
    parameters are a few nodes down, nearer than the graph of an encoder
    that made its inputs.
    """
    if g.grad_fn is None:
        return g.requires_grad and g is not leaf
    seen: set[Any] = {g.grad_fn}
    queue: deque[Any] = deque(seen)
    while queue:
        node = queue.popleft()
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen:
                seen.add(next_node)
                queue.append(next_node)
    return False


def _tracked_by_outer_transform(t: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform below the current one tracks ``t`` (``jacrev`` over ``jvp``, say)."""
    current = _compat.transform_level()
    first = True
    while _compat.is_wrapped(t):
        level = _compat.wrapped_level(t)
        if level > 0 and not (first and level == current):
            return True
        first = False
        t = _compat.unwrapped(t)
    return False


def _strip_dead(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrappers of ``torch.func`` levels that have exited (``make_dual`` refuses them)."""
    while _compat.is_wrapped(t) and _compat.is_dead_wrapper(t):
        t = _compat.unwrap_if_dead(t)
    return t


def _has_tangent(t: torch.Tensor) -> bool:
    if not _compat.forward_ad_active():
        return False
    try:
        return fwAD.unpack_dual(t).tangent is not None
    except RuntimeError:
        return False
