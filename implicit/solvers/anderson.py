"""Anderson acceleration (type II) of the fixed-point map."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._monitor import Monitor
from .._problem import System
from .._registry import register_solver
from .._solver import IterativeSolver
from ._views import Views

__all__ = ["Anderson"]


class _AndersonState:
    """The last ``slots`` residuals and damped map values, allocated once per solve.

    Slot ``i`` of ``r`` holds a residual ``r_i = G(z_i) - z_i`` and slot ``i``
    of ``g`` the damped map value ``z_i + β r_i`` of the same iterate; ``gram``
    holds the regularised ``r_i · r_j``. The order of the slots does not matter
    to the mixing problem, so the oldest slot is simply overwritten. The views
    a step needs are indexed by the slot written ``j`` and the number of slots
    in use ``n``.
    """

    def __init__(self, z0: torch.Tensor, slots: int, lam: float) -> None:
        batch, size = z0.shape
        self.slots = slots
        self.k = 0
        # uninitialised: a slot is always written before it is read
        r = z0.new_empty(batch, slots, size)
        g = z0.new_empty(batch, slots, size)
        gram = z0.new_empty(batch, slots, slots)
        ones = z0.new_ones(1, 1, slots).expand(batch, 1, slots)
        eye = torch.eye(slots, dtype=z0.dtype, device=z0.device)
        reg = 1.0 + lam * eye
        self.r_slot = Views[int](lambda j: r[:, j])
        self.g_slot = Views[int](lambda j: g[:, j])
        self.r_t = Views[int](lambda n: r[:, :n].mT)
        self.g_used = Views[int](lambda n: g[:, :n])
        self.gram = Views[int](lambda n: gram[:, :n, :n])
        self.ones = Views[int](lambda n: ones[:, :, :n])
        # keyed by (j, n): row and column j of the Gram matrix in use, the
        # factor (1 + λ) on its diagonal entry, and the fallback weights (all
        # on slot j: the plain damped step)
        self.gram_row = Views[tuple[int, int]](lambda jn: gram[:, jn[0] : jn[0] + 1, : jn[1]])
        self.gram_col = Views[tuple[int, int]](lambda jn: gram[:, : jn[1], jn[0] : jn[0] + 1])
        self.reg = Views[tuple[int, int]](lambda jn: reg[jn[0], : jn[1]].view(1, 1, -1))
        self.newest = Views[tuple[int, int]](lambda jn: eye[jn[0], : jn[1]].view(1, 1, -1))


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
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"m must be a positive int; got {self.m!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta <= 1.0):
            raise ValueError(f"beta must lie in (0, 1]; got {self.beta!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0.0):
            raise ValueError(f"lam must be a finite non-negative number; got {self.lam!r}")

    def init(self, system: System, z0: torch.Tensor) -> _AndersonState:
        # m differences of Walker & Ni's form span m + 1 iterates
        return _AndersonState(z0, self.m + 1, self.lam)

    def step(
        self, system: System, z: torch.Tensor, r: torch.Tensor, state: _AndersonState, monitor: Monitor
    ) -> torch.Tensor:
        k = state.k
        state.k = k + 1
        slots = state.slots
        j = k % slots
        n = min(k + 1, slots)
        g = torch.add(z, r, alpha=self.beta, out=state.g_slot[j])
        state.r_slot[j].copy_(r)
        # Row j of the Gram matrix, (B, 1, N) @ (B, N, n): on CPU this
        # orientation is far faster than (B, n, N) @ (B, N, 1).
        row = torch.bmm(r.unsqueeze(1), state.r_t[n])
        jn = (j, n)
        row.mul_(state.reg[jn])
        if n == 1:  # a single iterate: its weight is 1
            state.gram[1].copy_(row)
            return g.clone()
        state.gram_row[jn].copy_(row)
        state.gram_col[jn].copy_(row.mT)
        # The weights are α = x / Σx with x H = 1ᵀ. H is symmetric positive
        # definite unless a residual vanishes (or λ = 0 and residuals repeat),
        # so it is solved by Cholesky, H = UᵀU: w U = 1ᵀ, then x Uᵀ = w. (The
        # LU solvers of torch.linalg read values back to the host, a
        # synchronisation per step on a GPU; these do not.) A sample whose
        # factorisation fails or whose Σx is not finite takes the plain step.
        u, info = torch.linalg.cholesky_ex(state.gram[n], upper=True)
        w = torch.linalg.solve_triangular(u, state.ones[n], upper=True, left=False)
        x = torch.linalg.solve_triangular(u.mT, w, upper=False, left=False)
        total = x.sum(dim=2, keepdim=True)
        ok = (info == 0).view(-1, 1, 1) & (total < math.inf)
        alpha = torch.where(ok, x / total, state.newest[jn])
        return torch.bmm(alpha, state.g_used[n]).squeeze(1)
