"""Anderson acceleration (type II) of the fixed-point map."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._registry import register_solver
from .._settings import integer, interval, non_negative, set_options
from .._solver import IterativeSolver
from ..plugin import Monitor, System
from ._views import Views

__all__ = ["Anderson"]


class _StepViews(NamedTuple):
    """The views of the buffers that a step writing slot ``j`` with ``n`` slots in use reads and writes."""

    g_slot: torch.Tensor  # (B, N): slot j of the damped map values
    r_slot: torch.Tensor  # (B, N): slot j of the residuals
    r_row: torch.Tensor  # (B, 1, N): the same, as a row
    r_t: torch.Tensor  # (B, N, n): the residuals in use, as columns
    row: torch.Tensor  # (B, 1, n): r_j · r_i, written by bmm
    row_t: torch.Tensor  # (B, n, 1): the same, as a column
    gram_row: torch.Tensor  # (B, 1, n): row j of the Gram matrix in use
    gram_col: torch.Tensor  # (B, n, 1): column j
    reg_row: torch.Tensor  # (1, 1, n): 1, and 1 + λ on the diagonal entry
    reg_col: torch.Tensor  # (1, n, 1)
    gram: torch.Tensor  # (B, n, n): the Gram matrix in use
    ones: torch.Tensor  # (B, 1, n)
    newest: torch.Tensor  # (1, 1, n): the fallback weights, all on slot j (the plain damped step)
    g_used: torch.Tensor  # (B, n, N): the damped map values in use

    def narrow(self, n: int) -> _StepViews:
        """These views for ``n`` slots in use, from those for all of them (``n`` less only while filling up)."""
        if n == self.r_t.shape[2]:
            return self
        row = self.row.new_empty(self.row.shape[0], 1, n)
        return _StepViews(
            g_slot=self.g_slot,
            r_slot=self.r_slot,
            r_row=self.r_row,
            r_t=self.r_t.narrow(2, 0, n),
            row=row,
            row_t=row.mT,
            gram_row=self.gram_row.narrow(2, 0, n),
            gram_col=self.gram_col.narrow(1, 0, n),
            reg_row=self.reg_row.narrow(2, 0, n),
            reg_col=self.reg_col.narrow(1, 0, n),
            gram=self.gram.narrow(1, 0, n).narrow(2, 0, n),
            ones=self.ones.narrow(2, 0, n),
            newest=self.newest.narrow(2, 0, n),
            g_used=self.g_used.narrow(1, 0, n),
        )


class _AndersonState:
    """The last ``slots`` residuals and damped map values, allocated once per solve.

    Slot ``i`` of ``r`` holds a residual ``r_i = G(z_i) - z_i`` and slot ``i``
    of ``g`` the damped map value ``z_i + β r_i`` of the same iterate; ``gram``
    holds the regularised ``r_i · r_j``. The order of the slots does not matter
    to the mixing problem, so the oldest slot is simply overwritten. The views
    a step needs are looked up by the slot written ``j`` and the number of
    slots in use ``n``: those with every slot in use are made up front, the
    others while the history fills up.

    The slots are the leading dimension, ``(slots, B, N)``, so that each is one
    contiguous block: on CPU, once the map has evicted the history from the
    cache, writing a slot and reading the history are about twice as fast
    as with the samples leading, ``(B, slots, N)``.
    """

    def __init__(self, z0: torch.Tensor, slots: int, lam: float) -> None:
        batch, size = z0.shape
        self.slots = slots
        self.k = 0
        # The views and map value of the direction just computed, for the step that follows.
        self.pending: tuple[_StepViews, torch.Tensor] | None = None
        # uninitialised: a slot is always written before it is read
        r = z0.new_empty(slots, batch, size)
        g = z0.new_empty(slots, batch, size)
        gram = z0.new_empty(batch, slots, slots)
        row = z0.new_empty(batch, 1, slots)
        ones = z0.new_ones(1, 1, slots).expand(batch, 1, slots)
        eye = torch.eye(slots, dtype=z0.dtype, device=z0.device)
        reg = 1.0 + lam * eye
        r_t, row_t, g_used = r.permute(1, 2, 0), row.mT, g.transpose(0, 1)
        # The views of every slot at once: one dispatch per unbind rather than one per slot.
        per_slot = zip(
            g.unbind(0),
            r.unbind(0),
            r.unsqueeze(2).unbind(0),
            gram.unsqueeze(2).unbind(1),
            gram.unsqueeze(3).unbind(2),
            reg.view(slots, 1, 1, slots).unbind(0),
            reg.view(slots, 1, slots, 1).unbind(0),
            eye.view(slots, 1, 1, slots).unbind(0),
        )
        full = [
            _StepViews(g_j, r_j, r_row, r_t, row, row_t, gram_row, gram_col, reg_row, reg_col, gram, ones, e_j, g_used)
            for g_j, r_j, r_row, gram_row, gram_col, reg_row, reg_col, e_j in per_slot
        ]
        self.views = Views[tuple[int, int], _StepViews](lambda jn: full[jn[0]].narrow(jn[1]))

    def next_views(self) -> _StepViews:
        """The views of the step about to be taken: the oldest slot written, the slots in use."""
        return self.views[self.k % self.slots, min(self.k + 1, self.slots)]


@register_solver("anderson")
@dataclass(frozen=True, kw_only=True)
class Anderson(IterativeSolver):
    """Anderson acceleration for ``z* = G(z*)``: mixes the last ``m`` map values.

    With the residuals ``r_i = G(z_i) - z_i`` of the last ``m + 1`` iterates
    (of all of them in the first ``m`` steps), each step finds the weights

        α = argmin ‖Σᵢ αᵢ rᵢ‖  subject to  Σᵢ αᵢ = 1

    and moves to ``z_{k+1} = Σᵢ αᵢ (zᵢ + β rᵢ)``, the mix of the damped map
    values (Algorithm AA of the reference, which is the same iteration as its
    unconstrained "type II" difference form). One weight of ``1`` on the newest
    iterate is the damped Picard step. When batched, every sample has its own
    weights: the small ``(B, m + 1, m + 1)`` systems are solved together.

    This differs from the reference in a few ways:

    1. The weights come from the normal equations, ``α ∝ H⁻¹ 1`` with the
       Gram matrix ``Hᵢⱼ = rᵢ · rⱼ`` kept up to date one row per step and
       factorised by Cholesky, rather than from a QR factorisation of the
       differences; this is one pass over the history per step instead of
       several.
    2. ``H`` is regularised *relative to each column*, ``H + λ diag(H)``: the
       scaled matrix keeps a condition number of at most about
       ``(m + 1 + λ)/λ`` however small the residuals become, whereas an absolute
       ``λ`` (or one scaled by the largest entry) swamps the newest, smallest
       residuals near convergence and falls behind plain iteration.
    3. A sample whose Cholesky factorisation fails (a singular ``H``; with
       ``λ = 0`` also repeated residuals) or whose weights are not finite
       takes the plain damped step instead, decided on the device without a
       host synchronisation. With ``λ > 0`` the weights are bounded by about
       ``(m + 1 + λ)/λ`` in size.
    4. The history is a ring buffer of the last ``m + 1`` iterates (no
       restarts), allocated once per solve.

    Args:
        m: Memory ``m ≥ 1``: the number of differences of past iterates,
            as in the reference (``m + 1`` iterates are mixed).
        beta: Damping ``β`` in ``(0, 1]``; ``1`` is undamped.
        lam: Relative regularisation ``λ ≥ 0`` of the normal equations (see 2.).

    Reference:
        Walker & Ni, "Anderson acceleration for fixed-point iterations",
        SIAM J. Numer. Anal. 49(4), 2011.
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-6

    def __post_init__(self) -> None:
        set_options(
            self,
            m=integer("m", self.m),
            beta=interval("beta", self.beta, 0.0, 1.0),
            lam=non_negative("lam", self.lam),
        )

    def init(self, system: System, z0: torch.Tensor) -> _AndersonState:
        # m differences of Walker & Ni's form span m + 1 iterates
        return _AndersonState(z0, self.m + 1, self.lam)

    def direction(self, system: System, z: torch.Tensor, state: _AndersonState) -> torch.Tensor:
        # The residual written straight into its history slot: no copy of it per step.
        v = state.next_views()
        g = system.map(z)
        state.pending = (v, g)
        return torch.sub(g, z, out=v.r_slot)

    def step(
        self, system: System, z: torch.Tensor, r: torch.Tensor, state: _AndersonState, monitor: Monitor
    ) -> torch.Tensor:
        v, g = state.pending if state.pending is not None else (state.next_views(), None)
        state.pending = None
        if r is not v.r_slot:  # a direction computed elsewhere (a subclass's own)
            v.r_slot.copy_(r)
        if g is not None and self.beta == 1.0:
            v.g_slot.copy_(g)
        else:
            torch.add(z, r, alpha=self.beta, out=v.g_slot)
        return self._mix(state, v)

    @staticmethod
    def _mix(state: _AndersonState, v: _StepViews) -> torch.Tensor:
        """The next iterate from the history, slot ``v`` holding the newest residual and damped map value."""
        n = v.r_t.shape[2]
        state.k += 1
        # Row j of the Gram matrix, (B, 1, N) @ (B, N, n): on CPU this
        # orientation is far faster than (B, n, N) @ (B, N, 1).
        torch.bmm(v.r_row, v.r_t, out=v.row)
        torch.mul(v.row, v.reg_row, out=v.gram_row)
        if n == 1:  # a single iterate: its weight is 1
            return v.g_slot.clone()
        torch.mul(v.row_t, v.reg_col, out=v.gram_col)
        # The weights are α = x / Σx with x H = 1ᵀ. H is symmetric positive
        # definite unless a residual vanishes (or λ = 0 and residuals repeat),
        # so it is solved by Cholesky, H = UᵀU: w U = 1ᵀ, then x Uᵀ = w. (The
        # LU solvers of torch.linalg read values back to the host, a
        # synchronisation per step on a GPU; these do not.) A sample whose
        # factorisation fails or whose Σx is not finite takes the plain step.
        u, info = torch.linalg.cholesky_ex(v.gram, upper=True)
        w = torch.linalg.solve_triangular(u, v.ones, upper=True, left=False)
        x = torch.linalg.solve_triangular(u.mT, w, upper=False, left=False)
        total = x.sum(dim=2, keepdim=True)
        ok = info.logical_not().view(-1, 1, 1) & (total < math.inf)
        alpha = torch.where(ok, x.div_(total), v.newest)
        return torch.bmm(alpha, v.g_used).squeeze(1)
