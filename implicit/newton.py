"""Building blocks of Newton-type solvers for ``F(z) = 0``: linearisations, dense Jacobians, steps, GMRES.

The built-in ``newton``, ``newton_krylov`` and ``chord`` solvers are made of
these; a solver of your own can be too (see *Writing a Newton-type solver* in
the plugin guide). Everything acts on the flat ``(B, N)`` tensors of a
:class:`implicit.plugin.System`, row ``b`` being sample ``b``, and never
leaves an autograd graph behind.

* :class:`Linearisation`: ``F`` at one iterate, evaluated once with its
  graph, and from that graph the Jacobian-vector products ``J v``
  (:meth:`~Linearisation.jvp`) and the dense per-sample Jacobian
  ``(B, N, N)`` (:meth:`~Linearisation.jacobian`); forward mode where no
  graph can be recorded;
* :func:`line_search_step`: a step ``z + λ d`` with the residual
  backtracking search, recording the full step's graph for the next
  linearisation where asked;
* :func:`residual_backtracking` (from :mod:`implicit.linesearch`): the
  search itself;
* :func:`gmres`: batched restarted GMRES, the inner solve of inexact
  Newton, with :func:`default_restart`;
* :class:`JacobianFromGraph` and :func:`recordable`: the lower-level
  pieces, for a solver that records graphs of its own;
* :func:`check_dense_size`: the size guard of a solver that materialises
  ``B · N²`` entries.

Examples:
    Two Newton steps on ``z² = 2``, one sample per row:

    >>> import torch, implicit
    >>> from implicit.newton import Linearisation
    >>> z = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    >>> system = implicit.ImplicitProblem(lambda z: z**2 - 2.0, batched=True).bind(z)
    >>> for _ in range(2):
    ...     lin = Linearisation(system, z)
    ...     z = z - torch.linalg.solve(lin.jacobian(), lin.value.unsqueeze(-1)).squeeze(-1)
    >>> [round(v, 6) for v in z.flatten().tolist()]
    [1.416667, 1.462121]
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ._krylov import GMRESResult, default_restart, gmres
from ._products import JacobianFromGraph, private_saved_tensors, record_privately, recordable
from .linesearch import ResidualStep, residual_backtracking
from .plugin import System

__all__ = [
    "GMRESResult",
    "JacobianFromGraph",
    "Linearisation",
    "NewtonStep",
    "ResidualStep",
    "check_dense_size",
    "default_restart",
    "gmres",
    "line_search_step",
    "recordable",
    "residual_backtracking",
]


class Linearisation:
    """``F(z)`` at one iterate ``z`` and the products of its Jacobian ``J = ∂F/∂z`` there.

    ``F`` is evaluated once, with its graph where one can be recorded
    (:func:`recordable`: a problem's own system, outside ``torch.func``
    transforms; under ``torch.inference_mode()`` the recording leaves
    inference mode). From that graph:

    * ``J v`` (:meth:`jvp`, or calling the object, so that it serves as the
      ``matvec`` of :func:`gmres`) is the derivative of a vector-Jacobian
      product (:class:`JacobianFromGraph`): one backward pass of a small
      graph, about one evaluation's cost on CPU, where forward mode costs
      three to five;
    * :meth:`jacobian` is ``J`` per sample, ``(B, N, N)``: ``N``
      vector-Jacobian products batched into one backward pass.

    Without a graph (a linear system handed over by an adjoint, a
    ``torch.func`` transform, an input made under inference mode that the
    graph would save, or an operation of ``F`` without a double backward)
    both come from forward mode (``system.residual_jvp``), one evaluation of
    ``F`` per product. The graph lives as long as this object; the graphs it
    records save nothing through the caller's saved-tensor hooks.

    Args:
        system: The problem (see :class:`implicit.plugin.System`).
        z: The iterate, ``(B, N)``.
        hooks: Whether ``F`` runs under private saved-tensor hooks, as found
            by an earlier linearisation of the same system (its
            :attr:`hooks`); ``None`` tries. :meth:`at` passes it on.

    Attributes:
        system: The system.
        z: The iterate.
        value: ``F(z)``, ``(B, N)``, without a graph.
        graph: ``(zz, F(zz))`` with ``zz`` a leaf copy of ``z``, or ``None``
            where the products come from forward mode.
        hooks: What ``hooks`` was found to be (pass it on, or use :meth:`at`).

    Examples:
        >>> import torch, implicit
        >>> from implicit.newton import Linearisation
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> system = implicit.ImplicitProblem(lambda z: z @ A.T + z**2, batched=True).bind(torch.zeros(1, 2, dtype=torch.float64))
        >>> lin = Linearisation(system, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
        >>> lin.value.tolist(), lin.jacobian().tolist()
        ([[2.0, -2.0]], [[[4.0, 1.0], [0.0, 1.0]]])
        >>> lin(torch.tensor([[1.0, 1.0]], dtype=torch.float64)).tolist()
        [[5.0, 1.0]]
    """

    def __init__(self, system: System, z: torch.Tensor, hooks: bool | None = None) -> None:
        self.system, self.z, self.hooks = system, z, hooks
        self.inference = torch.is_inference_mode_enabled()
        self.graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._product: JacobianFromGraph | None = None
        if not recordable(system):
            self.value = system.residual(z)
            return
        try:
            with self._outside_inference(), torch.enable_grad():
                zz = (z.clone() if self.inference else z.detach()).requires_grad_()
                f, self.hooks = record_privately(system.residual, zz, hooks)
        except RuntimeError:
            if not self.inference:
                raise
            self.value = system.residual(z)  # an input made under inference mode: no graph
        else:
            self.graph = (zz, f)
            self.value = f.detach()

    def _outside_inference(self) -> contextlib.AbstractContextManager[object]:
        return torch.inference_mode(False) if self.inference else contextlib.nullcontext()

    def _private(self) -> contextlib.AbstractContextManager[object]:
        return private_saved_tensors() if self.hooks else contextlib.nullcontext()

    def at(self, z: torch.Tensor) -> Linearisation:
        """The linearisation of the same system at another iterate ``z`` (one evaluation of ``F``)."""
        return type(self)(self.system, z, self.hooks)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` per row, ``(B, N)``, in the dtype of ``z``.

        Through the graph; by forward mode where there is none, or where an
        operation of ``F`` turns out to have no double backward (then
        :attr:`graph` becomes ``None`` and every later product uses forward
        mode).
        """
        if self.graph is not None:
            if self._product is None:
                self._product = JacobianFromGraph(*self.graph)
            try:
                with self._outside_inference(), self._private():
                    return self._product(v).to(self.z.dtype)
            except RuntimeError:  # an operation of F without a double backward
                self.graph = None
        # Forward AD may promote a tangent past the primal's dtype (torch 2.x: ``z ** 3`` on a
        # 0-dim float32 view gives a float64 tangent); a Krylov basis keeps the state's dtype.
        return self.system.residual_jvp(self.z, v)[1].to(self.z.dtype)

    __call__ = jvp

    def jacobian(self) -> torch.Tensor:
        """``J`` per sample, ``(B, N, N)`` (block-diagonal over samples: never the ``BN × BN`` matrix).

        With a graph, its rows are ``N`` vector-Jacobian products batched
        into one backward pass (``is_grads_batched``, as
        ``torch.func.jacrev`` does; a basis vector repeated over the batch
        gives that row of every sample's block), or one backward pass per
        row for an operation without a batching rule. Without one, its
        columns are ``N`` forward-mode products. Check the size first with
        :func:`check_dense_size`.
        """
        batch, size = self.z.shape
        basis = torch.eye(size, dtype=self.z.dtype, device=self.z.device)[:, None, :].expand(size, batch, size)
        if self.graph is not None:
            zz, f = self.graph
            if not f.requires_grad:  # F does not depend on z
                return self.z.new_zeros(batch, size, size)
            with self._outside_inference(), self._private(), torch.enable_grad():
                try:
                    (rows,) = torch.autograd.grad(f, zz, basis, retain_graph=True, is_grads_batched=True)
                except RuntimeError:  # an operation without a batching rule: one product per row
                    rows = torch.stack([torch.autograd.grad(f, zz, e, retain_graph=True)[0] for e in basis])
            return rows.transpose(0, 1).to(self.z.dtype)
        cols = [self.system.residual_jvp(self.z, e)[1].to(self.z.dtype) for e in basis]
        return torch.stack(cols, dim=-1)


def check_dense_size(solver: str, z: torch.Tensor, max_size: int) -> None:
    """Refuse a Jacobian of more than ``max_size`` entries (``B · N²`` for ``z`` of shape ``(B, N)``).

    Args:
        solver: The solver's name, for the message.
        z: The state, ``(B, N)``.
        max_size: The most entries allowed (the solver's ``max_size`` option).

    Raises:
        ValueError: naming the shape, the count and the limit, and pointing
            to ``newton_krylov``, which forms no matrix.

    Examples:
        >>> import torch
        >>> from implicit.newton import check_dense_size
        >>> check_dense_size("chord", torch.zeros(4, 10), 100)
        Traceback (most recent call last):
            ...
        ValueError: the chord solver would materialise a Jacobian of 4 x 10 x 10 = 400 entries (max_size=100); use solver='newton_krylov' for states this large, or raise solver_options={'max_size': ...}
    """
    batch, size = z.shape
    entries = batch * size * size
    if entries > max_size:
        raise ValueError(
            f"the {solver} solver would materialise a Jacobian of {batch} x {size} x {size} = {entries} entries "
            f"(max_size={max_size}); use solver='newton_krylov' for states this large, or raise "
            "solver_options={'max_size': ...}"
        )


class NewtonStep(NamedTuple):
    """The outcome of :func:`line_search_step`.

    Attributes:
        z: The new iterate, ``(B, N)``.
        residual: ``F`` there, ``(B, N)``.
        linearisation: The :class:`Linearisation` at :attr:`z` where it was
            recorded on the way (every sample took the full step), else ``None``.
    """

    z: torch.Tensor
    residual: torch.Tensor
    linearisation: Linearisation | None


def line_search_step(
    lin: Linearisation,
    z: torch.Tensor,
    f: torch.Tensor,
    d: torch.Tensor,
    *,
    active: torch.Tensor,
    line_search: bool = True,
    linearise: bool = True,
    c1: float = 1e-4,
    max_backtracks: int = 10,
) -> NewtonStep:
    """The next iterate of a Newton-type method from ``z`` along the direction ``d``.

    With ``line_search``, :func:`residual_backtracking` halves the step per
    sample until ``‖F(z + λd)‖ ≤ (1 - c₁λ) ‖F(z)‖``; without, every active
    sample takes the full step. With ``linearise``, the full step is
    evaluated as a :class:`Linearisation` (its graph recorded), so that when
    every sample takes it the next step's linearisation costs no further
    evaluation; without, it is a plain evaluation (a chord step, which
    reuses an old Jacobian, needs no graph).

    Args:
        lin: A linearisation of the system (it supplies ``F`` and, for the
            new one, what :meth:`Linearisation.at` needs); not necessarily at ``z``.
        z: The iterate, ``(B, N)``.
        f: ``F(z)``, ``(B, N)``.
        d: The direction, ``(B, N)``, zero for samples that are not active.
        active: ``(B,)`` bool: the samples still iterating (the monitor's
            ``active``); the others stay where they are.
        line_search: Backtrack on ``‖F‖``.
        linearise: Record the full step's graph.
        c1: Sufficient-decrease constant of the search, in ``(0, 1)``.
        max_backtracks: The most halvings, an int ``≥ 0``.

    Returns:
        A :class:`NewtonStep`.
    """
    if not line_search:
        z_new = z + d if z.shape[0] == 1 else torch.where(active[:, None], z + d, z)
        if not linearise:
            return NewtonStep(z_new, lin.system.residual(z_new), None)
        new = lin.at(z_new)
        return NewtonStep(z_new, new.value, new)
    full = lin.at(z + d) if linearise else None
    step = residual_backtracking(
        lin.system.residual,
        z,
        f,
        d,
        active=active,
        first=None if full is None else full.value,
        c1=c1,
        max_backtracks=max_backtracks,
    )
    return NewtonStep(step.z, step.residual, full if step.full else None)
