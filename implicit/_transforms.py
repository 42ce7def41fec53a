"""How a solve behaves under ``torch.func`` transforms and forward mode.

A solver stops on a data-dependent test (``‖F(z)‖ ≤ tol·‖z‖``) read on the
host once per iteration. Under ``torch.func.vmap`` the values being solved for
carry an invisible batch dimension, and neither that test nor any other host
read can be batched. ``grad``, ``vjp``, ``jvp``, ``jacrev`` and ``jacfwd`` do
not batch the primal values and work; ``vmap`` over the inputs of a solve is
refused with an error that says what to use instead. Forward-mode tangents of the
iterations themselves are switched off (:func:`no_tangents`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from . import _compat

__all__ = [
    "VMAP_UNSUPPORTED",
    "has_tangent",
    "lowered",
    "no_tangents",
    "plain",
    "strip_dead",
    "tracked_by_outer_transform",
    "vmapped",
]

VMAP_UNSUPPORTED = (
    "implicit cannot solve under torch.func.vmap: {where} is batched by vmap, and a solver "
    "stops on a per-iteration convergence test read on the host, which vmap cannot batch. "
    "Build the problem with batched=True (implicit.ImplicitProblem(F, batched=True), or "
    "batched=True in fixed_point/root/DEQ) and give the batch as dim 0 of z0 and of the inputs "
    "F reads: each sample is then solved and converges on its own, and its derivatives are "
    "exact. torch.func.grad, vjp, jvp, jacrev and jacfwd of a function that calls implicit.solve "
    "are supported, as is vmap over a function of a solution computed outside it."
)


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values batched by ``torch.func.vmap`` at any level.

    Peels the wrappers of ``torch.func`` transforms (gradient tracking,
    forward-mode duals) down to the plain tensor. A forward-mode tangent that
    is batched (``jacfwd``) leaves the primal unbatched and is not reported.
    """
    while _compat.is_wrapped(t):
        if _compat.is_batched(t):
            return True
        t = _compat.unwrapped(t)
    return False


def no_tangents() -> contextlib.AbstractContextManager[object]:
    """Forward-mode tangents off, when forward mode is in use (``forward_ad`` or ``torch.func.jvp``).

    For a solver's iterations: their tangents would differentiate the unrolled
    loop, which is thrown away (the implicit function theorem supplies the
    derivative), at the cost of a second pass per evaluation. Outside forward
    mode nothing changes, so a map that uses ``forward_ad`` itself still can.
    """
    if _compat.forward_ad_active() or _compat.jvp_transform_active():
        return _compat.forward_grad_disabled()
    return contextlib.nullcontext()


def plain(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` without the wrappers of ``torch.func`` transforms (vmap's batching kept)."""
    while _compat.is_wrapped(t) and not _compat.is_batched(t):
        t = _compat.unwrapped(t)
    return t


def lowered(z_star: torch.Tensor) -> bool:
    """Whether ``G`` must not be evaluated here: a ``torch.func`` transform the solve ran under is suspended.

    ``torch.func`` runs a Function's rules with the transforms above it
    lowered. The tensors ``G`` closes over are still wrapped at those
    levels, and a transform started there to differentiate ``G`` would
    take the same level number and mistake them for its own. Products
    then come from the graph recorded when the solution was attached.
    Levels that have exited (dead wrappers, level ``-2``) are harmless.
    """
    current = _compat.transform_level()
    t = z_star
    while _compat.is_wrapped(t):
        level = _compat.wrapped_level(t)
        if level > 0 and (current is None or level > current):
            return True
        t = _compat.unwrapped(t)
    return False


def tracked_by_outer_transform(t: torch.Tensor) -> bool:
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


def strip_dead(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrappers of ``torch.func`` levels that have exited (``make_dual`` refuses them)."""
    while _compat.is_wrapped(t) and _compat.is_dead_wrapper(t):
        t = _compat.unwrap_if_dead(t)
    return t


def has_tangent(t: torch.Tensor) -> bool:
    if not _compat.forward_ad_active():
        return False
    try:
        return fwAD.unpack_dual(t).tangent is not None
    except RuntimeError:
        return False
