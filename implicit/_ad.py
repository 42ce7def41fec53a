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

This module holds the Function and the attach; the products and solves at
the solution are in ``_linearisation``, the probes of ``torch.func`` levels
and forward mode in ``_transforms``, and the PyTorch internals both rely on
in ``_compat``.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any

import torch

from . import _compat
from ._linearisation import Linearisation
from ._saved import SharedSaves, evaluate_without_saving
from ._transforms import has_tangent, tracked_by_outer_transform, vmapped

__all__ = ["Linearisation", "attach"]

# Modes of _ImplicitSolve.
_INNER = "inner"  # Newton correction whose value is dropped; skipped in first-order backward
_OUTER = "outer"  # Newton correction whose value is dropped
_SOLVE = "solve"  # x = (I - J)⁻¹ r
_SOLVE_T = "solve_t"  # x = (I - J)⁻ᵀ r


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
    if vmapped(r_dot) or tracked_by_outer_transform(r_dot):
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
    # In plain autograd G is evaluated at a leaf that requires grad, as z_a is below:
    # autograd then saves the same tensors in both evaluations, and a gradient G takes
    # inside has a graph of its own. The leaf's gradient is never read.
    z_in: torch.Tensor | None = None
    g_in = None
    if shared is not None:
        z_in = z0.detach().requires_grad_()
        try:
            with shared.first():
                g_in = system.map(z_in)
        except RuntimeError:
            # G itself calls torch.func.grad or vjp, which refuse saved-tensor hooks: it is
            # evaluated below without them (an error of G's own recurs there, and propagates).
            shared = None
    elif not _compat.forward_ad_active() and _compat.saved_tensors_hooks_enabled() and not differentiates:
        # PyTorch without access to the caller's hooks: this evaluation keeps nothing.
        z_in = z0.detach().requires_grad_()
        try:
            g_in = evaluate_without_saving(system.map, z_in, reads)
        except RuntimeError:  # G refuses saved-tensor hooks (as above); an error of its own recurs below
            pass
    if g_in is None:
        # torch.func.grad / vjp / jacrev disable saved-tensor hooks, and forward
        # mode records no graph: this evaluation keeps its own activations.
        if _compat.transforms_active() or _compat.forward_ad_active():
            z_in = None  # torch.func forbids requires_grad_
            g_in = system.map(z0)
        else:
            z_in = z0.detach().requires_grad_() if z_in is None else z_in
            g_in = system.map(z_in)
    if z_in is None:
        if not g_in.requires_grad and not has_tangent(g_in):
            return z0
    elif not _reads_other_leaves(g_in, z_in):
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
