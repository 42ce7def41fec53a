"""Jacobian-vector products from a recorded graph: the derivative of a vector-Jacobian product."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import has_torch_function

from . import _compat

__all__ = ["JacobianFromGraph", "private_saved_tensors", "record_privately", "recordable", "vjp"]


def vjp(g: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(∂g/∂z)ᵀ v`` through the recorded graph, which is kept.

    ``torch.autograd.grad`` less its argument normalisation, which costs
    about as much as the engine call itself on small problems (the adjoint
    solvers and Newton–Krylov's inner solve make one call per iteration; the
    arguments here are always one tensor each, of matching shapes).
    """
    if _compat.engine_run_backward is None or has_torch_function((g, z, v)):
        return torch.autograd.grad(g, z, v, retain_graph=True)[0]
    return _compat.engine_run_backward((g,), (v,), True, False, (z,), False, accumulate_grad=False)[0]  # type: ignore[no-any-return]


class JacobianFromGraph:
    """``v ↦ (∂g/∂z) v`` from the graph of ``g = G(z)`` (``z`` requiring grad).

    ``Jᵀ w`` is linear in ``w``: recorded once with ``create_graph=True`` at
    ``w = 0``, its derivative in ``w`` along ``v`` is ``J v``, one backward
    pass through that small graph per product. On CPU that is about one
    evaluation of ``G`` per product, where ``torch.func.jvp`` costs three to
    five (it evaluates ``G`` again each time, in forward mode). It needs
    ``G``'s operations to have double backward, as almost all do; the first
    call raises ``RuntimeError`` where one does not.

    Args:
        z: The point, a leaf that requires grad.
        g: ``G(z)``, recorded with its graph.
    """

    def __init__(self, z: torch.Tensor, g: torch.Tensor) -> None:
        self._z, self._g = z, g
        self._w: torch.Tensor | None = None
        self._jtw: torch.Tensor | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if self._w is None:
                w = torch.zeros_like(self._g, requires_grad=True)
                (jtw,) = torch.autograd.grad(
                    self._g, self._z, w, create_graph=True, retain_graph=True, allow_unused=True
                )
                self._w, self._jtw = w, jtw
            if self._jtw is None or not self._jtw.requires_grad:  # g does not depend on z
                return torch.zeros_like(v)
            return vjp(self._jtw, self._w, v)


class private_saved_tensors(torch.autograd.graph.saved_tensors_hooks):
    """Keep what a graph built inside saves as it is, out of reach of the caller's saved-tensor hooks.

    For graphs that live and die inside a solve (a Newton step's
    linearisation): hooks the caller installed around the solve (offloading
    to CPU, counting the bytes saved for backward) must not see them.
    """

    def __init__(self) -> None:
        super().__init__(_identity, _identity)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def record_privately(
    fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, hooks: bool | None
) -> tuple[torch.Tensor, bool]:
    """``fn(z)`` with its graph under :class:`private_saved_tensors` where ``fn`` allows, and whether it did.

    A function that calls ``torch.func.grad`` or ``vjp`` (the optimality
    condition of an objective) cannot run while any saved-tensor hook is
    installed. ``hooks=None`` tries once with the private hooks; if that
    fails, ``fn`` is evaluated again without them and the outcome decides:
    succeeding, ``fn`` refuses hooks (and, having run, none of the caller's
    are installed, so there is nothing to keep the graph from); failing
    again, the error is ``fn``'s own and propagates. Pass the returned flag
    as ``hooks`` for later evaluations of the same function.
    """
    if hooks is False:
        return fn(z), False
    try:
        with private_saved_tensors():
            return fn(z), True
    except RuntimeError:
        if hooks:  # fn ran under the hooks before: this error is its own
            raise
    return fn(z), False


def recordable(system: object) -> bool:
    """Whether a solver may record ``system.residual``'s graph: a problem's own system, outside ``torch.func`` transforms."""
    return bool(getattr(system, "records_graph", False)) and not _compat.transforms_active()
