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

__all__ = ["VMAP_UNSUPPORTED", "no_tangents", "plain", "vmapped"]

_functorch = torch._C._functorch

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
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def no_tangents() -> contextlib.AbstractContextManager[object]:
    """Forward-mode tangents off, when forward mode is in use (``forward_ad`` or ``torch.func.jvp``).

    For a solver's iterations: their tangents would differentiate the unrolled
    loop, which is thrown away (the implicit function theorem supplies the
    derivative), at the cost of a second pass per evaluation. Outside forward
    mode nothing changes, so a map that uses ``forward_ad`` itself still can.
    """
    from torch.autograd import forward_ad

    stack = _functorch.get_interpreter_stack() or []
    jvp = any(interpreter.key() == _functorch.TransformType.Jvp for interpreter in stack)
    if forward_ad._current_level >= 0 or jvp:
        return forward_ad._set_fwd_grad_enabled(False)
    return contextlib.nullcontext()


def plain(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` without the wrappers of ``torch.func`` transforms (vmap's batching kept)."""
    while _functorch.is_functorch_wrapped_tensor(t) and not _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t
