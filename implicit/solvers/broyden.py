"""Limited-memory "good" Broyden method on the residual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._registry import register_solver
from .._settings import integer, set_options
from .._solver import IterativeSolver
from ..plugin import Monitor, System
from ._views import Views

__all__ = ["Broyden"]


class _TermViews(NamedTuple):
    """The views of the model's terms that a step with ``n`` terms in use reads, and of slot ``n``."""

    u_used: torch.Tensor  # (B, n, N)
    v_used: torch.Tensor  # (B, n, N)
    u_t: torch.Tensor  # (B, N, n)
    v_t: torch.Tensor  # (B, N, n)
    u_slot: torch.Tensor  # (B, 1, N): the term written next
    v_slot: torch.Tensor  # (B, 1, N)


class _BroydenState:
    """The inverse-Jacobian model ``H = γ I + Σᵢ uᵢ vᵢᵀ`` of each sample, and the last step.

    ``u`` and ``v`` hold up to ``memory`` rank-one terms, allocated once per
    solve; the first ``n`` are in use. ``t_prev = H r_prev`` is what the last
    step subtracted (``z_k = z_{k-1} - t_prev``). The views a step needs are
    made once per ``n``. The terms are the leading dimension,
    ``(memory, B, N)``, so that each is one contiguous block: on CPU, once the
    map has evicted them from the cache, the passes over them are about twice
    as fast as with the samples leading, ``(B, memory, N)``.
    """

    def __init__(self, z0: torch.Tensor, memory: int) -> None:
        batch, size = z0.shape
        # uninitialised: a term is always written before it is read
        self.u = u = z0.new_empty(memory, batch, size)
        self.v = v = z0.new_empty(memory, batch, size)
        u_rows, v_rows = u.transpose(0, 1), v.transpose(0, 1)
        u_cols, v_cols = u.permute(1, 2, 0), v.permute(1, 2, 0)
        # The views of every slot at once: one dispatch per unbind rather than one per slot.
        u_slots, v_slots = u.unsqueeze(2).unbind(0), v.unsqueeze(2).unbind(0)
        self.views = Views[int, _TermViews](
            lambda n: _TermViews(
                u_rows.narrow(1, 0, n),
                v_rows.narrow(1, 0, n),
                u_cols.narrow(2, 0, n),
                v_cols.narrow(2, 0, n),
                u_slots[n],
                v_slots[n],
            )
        )
        self.r_prev = z0.unsqueeze(1)
        self.t_prev = z0.unsqueeze(1)
        # The scale γ of H₀ = γ I per sample, (B, 1, 1): -1 for the first step, then set
        # from the secant pair at every restart of the model.
        self.gamma = z0.new_full((batch, 1, 1), -1.0)
        self.n = 0
        self.k = 0


@register_solver("broyden")
@dataclass(frozen=True, kw_only=True)
class Broyden(IterativeSolver):
    """Broyden's method for ``R(z*) = 0`` with a low-rank inverse Jacobian per sample.

    The solver works on ``R(z) = G(z) - z``: ``F`` itself for a fixed-point
    problem (``F = f(z) - z``) and ``-F`` for a root problem, whose map is
    ``G = z - F``; both have the same roots. The first step takes
    ``H₀ = -I``, a plain fixed-point step ``z - H₀ R(z) = G(z)``; from then on
    the model starts from ``H₀ = γ I`` with ``γ = sᵀy / yᵀy`` from the first
    secant pair (``s = Δz``, ``y = ΔR``), so that it fits whichever sign the
    problem was written in: ``γ ≈ -1`` for a weakly coupled map
    (``∂R/∂z ≈ -I``), ``γ > 0`` for a root problem written the other way
    round (``F = f(z) - z`` passed as a residual, ``∂R/∂z ≈ +I``). Each step
    then takes ``z_{k+1} = z_k - H_k R(z_k)`` and applies the "good" Broyden
    (secant) update in inverse form by the Sherman–Morrison formula,

        H_{k+1} = H_k + (s - H_k y) sᵀH_k / (sᵀH_k y),

    kept as ``H_k = γ I + Σ uᵢ vᵢᵀ`` so that one step costs
    ``O(memory · N)`` per sample and no ``N × N`` matrix is formed. Unlike
    plain iteration, it converges where ``∂G/∂z`` has eigenvalues outside the
    unit circle, as long as the root is regular and the start close enough.

    This differs from the reference in a few ways:

    1. The model holds at most ``memory`` terms, so a step's cost does not
       grow with ``max_iter``; when it is full the method restarts from
       ``H₀ = γ I``, with ``γ`` from the latest secant pair. Overwriting the
       oldest term instead (as the DEQ solver of Bai et al. does) leaves a
       model whose later terms were built on the dropped one; in tests it
       diverged once the memory wrapped around.
    2. Broyden starts from ``H₀ = -I`` (or any fixed matrix); the scaling of
       ``H₀`` by the secant pair is Shanno and Phua's for quasi-Newton
       methods (the Barzilai–Borwein step length). With ``H₀ = -I`` the
       method depended on the sign the residual was written in: on a
       discretised heat equation, ``F = f(y) - y`` took several times as
       many steps as ``F = y - f(y)``, or diverged. A sample whose pair says
       nothing (``y = 0`` or ``sᵀy = 0``) keeps its ``γ``.
    3. An update whose denominator ``sᵀH_k y`` is zero or non-finite (a
       frozen sample, whose ``y`` vanishes) is skipped for that sample rather
       than dividing by zero, without a host synchronisation.
    4. There is no line search: the full quasi-Newton step is taken, so
       ``s = -H_k R(z_k)`` and ``H_k y = H_k R(z_{k+1}) - H_k R(z_k)``; the
       update then needs only ``H_k R(z_{k+1})`` and ``H_kᵀ s``, four passes
       over the stored terms per step, and the next step follows from them by
       a rank-one correction.

    Args:
        memory: The most rank-one terms kept (``memory ≥ 1``).

    Reference:
        Broyden, "A class of methods for solving nonlinear simultaneous
        equations", Math. Comp. 19, 1965; limited-memory form as in Bai,
        Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019; the
        scaling of H₀ from Shanno & Phua, "Matrix conditioning and nonlinear
        optimization", Math. Programming 14, 1978.
    """

    memory: int = 20

    def __post_init__(self) -> None:
        set_options(self, memory=integer("memory", self.memory))

    def init(self, system: System, z0: torch.Tensor) -> _BroydenState:
        return _BroydenState(z0, self.memory)

    def step(
        self, system: System, z: torch.Tensor, r: torch.Tensor, state: _BroydenState, monitor: Monitor
    ) -> torch.Tensor:
        # Row vectors (B, 1, N) throughout: (B, 1, N) @ (B, N, n) products are
        # far faster on CPU than the (B, n, N) @ (B, N, 1) orientation.
        r1 = r.unsqueeze(1)
        k = state.k
        state.k = k + 1
        if k == 0:  # H₀ r = -r: the first step is z + r = G(z)
            state.r_prev, state.t_prev = r1, r1.neg()
            return z + r
        # -y, so that 1 / (pᵀ(-y)) is the factor the update needs without a negation
        y_neg = state.r_prev - r1
        t_prev = state.t_prev  # the secant pair is s = -t_prev (the step taken) and y
        # The model (re)starts after the first step and whenever it is full: H₀ = γ I.
        restart = state.n in (0, self.memory)
        n = 0 if restart else state.n
        v = state.views[n]
        # p = Hᵀ t_prev is the new term's v (up to sign), so it is written in place
        if restart:
            state.gamma = gamma = _secant_scale(t_prev, y_neg, state.gamma)
            w = torch.mul(r1, gamma)  # H r
            p = torch.mul(t_prev, gamma, out=v.v_slot)  # Hᵀ t_prev
        else:
            gamma = state.gamma
            w = torch.baddbmm(r1 * gamma, torch.bmm(r1, v.v_t), v.u_used)  # H r
            p = torch.baddbmm(t_prev * gamma, torch.bmm(t_prev, v.u_t), v.v_used, out=v.v_slot)  # Hᵀ t_prev
        # The update is u vᵀ with v = Hᵀ s = -p and u = (s - H y) / (vᵀ y);
        # it is stored as (-u) (-v)ᵀ, with -u = (s - H y) / (pᵀ y). While H is
        # the one that made the last step, H y = H r - H r_prev = w - t_prev,
        # so s - H y = -w; after a restart H = γ I and s - H y = γ y_neg - t_prev.
        scale = torch.bmm(p, y_neg.mT).reciprocal_()  # -1 / (pᵀ y), (B, 1, 1)
        # pᵀ y = 0 for a frozen sample (y = 0): skip its update instead of dividing by zero
        torch.nan_to_num_(scale, nan=0.0, posinf=0.0, neginf=0.0)
        new_u = torch.mul(t_prev - gamma * y_neg if restart else w, scale, out=v.u_slot)
        state.n = n + 1
        # the new model applied to r: H r + (-u) (pᵀ r)
        t = torch.addcmul(w, new_u, torch.bmm(p, r1.mT))
        state.r_prev, state.t_prev = r1, t
        return z - t.squeeze(1)


def _secant_scale(t_prev: torch.Tensor, y_neg: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``γ = sᵀy / yᵀy`` per sample from the secant pair (``s = -t_prev``, ``y = -y_neg``).

    The scalar inverse Jacobian that best fits the last step in least squares
    (the Barzilai–Borwein step; Shanno and Phua's scaling of the initial
    matrix). Its sign follows the problem's: ``≈ -1`` where ``∂R/∂z ≈ -I``,
    positive where ``∂R/∂z`` is positive definite. A sample whose pair
    carries no information (frozen, ``y = 0``, or ``sᵀy = 0``) keeps its ``γ``.
    """
    new = torch.bmm(t_prev, y_neg.mT) / torch.bmm(y_neg, y_neg.mT)
    return torch.where(torch.isfinite(new) & (new != 0), new, gamma)
