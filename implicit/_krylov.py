"""Batched, matrix-free, restarted GMRES for ``A_b x_b = b_b`` with one system per row.

Rows of the ``(B, N)`` right-hand side are independent systems and ``matvec``
acts row by row (``A`` is block-diagonal over samples, as every Jacobian of a
batched problem is). Each row runs its own Arnoldi process; all rows advance
together in batched tensor operations, and a row that has met its tolerance
stops changing while the others go on.

Reference:
    Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual
    algorithm for solving nonsymmetric linear systems", SIAM J. Sci. Stat.
    Comput. 7(3), 1986.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from ._settings import integer

__all__ = ["RESTART_BUDGET", "STAGNATION", "GMRESResult", "Tolerance", "default_restart", "gmres"]

RESTART_BUDGET = 2**22
"""The most numbers (``(restart + 1)·N·B``) that the Krylov basis of a default restart may hold.

32 MiB in float64. ``default_restart`` keeps the basis within it, which for
the states of most implicit layers (a few thousand unknowns per batch) means
no restart at all.
"""

STAGNATION = 1e-3
"""A restart cycle that lowers no unconverged row's residual by more than this fraction has stagnated."""


def default_restart(batch: int, size: int) -> int:
    """The restart of GMRES when none is given: ``min(N, cap)``, ``cap`` from :data:`RESTART_BUDGET`.

    GMRES restarted after fewer steps than the ``N`` unknowns per row may
    stagnate for good (a cycle that makes no progress is repeated exactly by
    the next one), so the default is ``N``: full GMRES, which cannot. Its
    basis holds ``(restart + 1)·N·B`` numbers (the rotations at most as many
    again), so the restart is capped where that exceeds
    :data:`RESTART_BUDGET`, though never below ``min(N, 20)``.

    Args:
        batch: ``B``, the rows solved together.
        size: ``N``, the unknowns per row.

    Returns:
        The restart, an int ``≥ 1``.

    Examples:
        >>> from implicit._krylov import default_restart
        >>> default_restart(32, 45), default_restart(64, 512), default_restart(1, 3)
        (45, 127, 3)
    """
    cap = RESTART_BUDGET // max(1, batch * size) - 1
    return max(1, min(size, max(cap, 20)))


class Checker(Protocol):
    """What :func:`gmres` needs of a convergence monitor (:class:`~implicit._monitor.Monitor` is one).

    ``check(x, r)`` records an iterate ``x`` with residual ``r`` and says
    whether to stop; afterwards ``active`` is the ``(B,)`` mask of rows
    still short of their tolerance and ``nonfinite`` is non-empty if a NaN
    or infinity was seen. Within a cycle :func:`gmres` hands it the cycle's
    first iterate and a ``(B, 1)`` tensor holding the norm of the current
    residual, so a checker must judge by ``‖r‖`` alone (a ``Monitor`` with
    its ``reference`` set to ``‖b‖`` does). When the solve stagnates,
    :func:`gmres` writes why into its ``message``, if it has one.
    """

    @property
    def active(self) -> torch.Tensor | None: ...

    @property
    def nonfinite(self) -> list[str]: ...

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool: ...


class Tolerance:
    """Stops when ``‖r_b‖ ≤ target_b`` for every row ``b``, after ``max_iter`` steps, or on NaN.

    The lightweight counterpart of :class:`~implicit._monitor.Monitor` for
    inner solves that report to nobody. Each :meth:`check` costs one host
    synchronisation.

    Args:
        target: Per-row residual bound, ``(B,)``; ``inf`` marks a row that
            needs no solving.
        max_iter: The most steps (checks after the first).
    """

    def __init__(self, target: torch.Tensor, max_iter: int) -> None:
        self.target = target
        self.max_iter = max_iter
        self.iterations = 0
        self.residual: torch.Tensor | None = None
        self.converged: torch.Tensor | None = None
        self.active: torch.Tensor | None = None
        self.nonfinite: list[str] = []
        self.message = ""

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool:
        rn = torch.linalg.vector_norm(r, dim=1)
        self.residual = rn
        margin = rn - self.target  # -inf where a row needs no solving
        self.converged = margin <= 0
        self.active = ~self.converged
        # Its maximum answers "all done?" and, being NaN or infinite otherwise,
        # "all finite?" in one read (NaN propagates through max).
        worst = float(margin.max())
        if math.isnan(worst) or worst == math.inf:
            self.nonfinite = ["residual"]
            return True
        if worst <= 0 or self.iterations >= self.max_iter:
            return True
        self.iterations += 1
        return False


class GMRESResult(NamedTuple):
    """The outcome of :func:`gmres`.

    Attributes:
        x: The last checked iterate, ``(B, N)``.
        residual: ``‖b - A x‖`` per row as last checked, ``(B,)``.
        converged: Whether each row met its tolerance, ``(B,)``.
        iterations: Arnoldi steps taken (one product with ``A`` each).
        stagnated: Whether each row's last full restart cycle lowered its
            residual by less than :data:`STAGNATION` (``(B,)``; ``False``
            for a converged row): restarting again repeats that cycle, so
            the row will not converge at this restart.
    """

    x: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: int
    stagnated: torch.Tensor


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    restart: int | None = None,
    tol: float | torch.Tensor = 1e-6,
    atol: float | torch.Tensor = 0.0,
    max_iter: int | None = None,
    monitor: Checker | None = None,
    confirm: bool = True,
) -> GMRESResult:
    """Solve ``A_b x_b = b_b`` for every row ``b`` of a ``(B, N)`` tensor by restarted GMRES.

    Each cycle builds up to ``restart`` Arnoldi vectors per row (classical
    Gram–Schmidt applied twice, which keeps them orthogonal to working
    precision), reduces the Hessenberg matrix to triangular form with Givens
    rotations, and takes the iterate that minimises ``‖b - A x‖`` over the
    Krylov space. After every Arnoldi step the monitor sees the residual
    norm ``β |Q_{j+1, 0}|`` of the rotated least-squares problem (equal to
    ``‖b - A x_j‖`` up to rounding while the basis is orthonormal): one host
    synchronisation per step, so that the solve stops as soon as every row
    is done. The iterate itself is formed only when the cycle ends or the
    solve stops, and its residual is then recomputed as ``b - A x``
    (unless ``confirm`` is off), so convergence is confirmed by a true
    residual; a row it does not confirm carries on in a new cycle.

    Rows that have converged are frozen: their Arnoldi process stops
    (their new basis vectors are zero and their rotation is a plain swap,
    so their least-squares solution and residual stay as they were).

    All rows advance together: a step is one product with ``A``, four
    batched matrix products with the ``(B, j+1, N)`` basis, one with the
    ``(B, j+2, j+2)`` rotations, and a few dozen operations on ``(B, j+2)``
    tensors, with no per-row Python work; the memory is allocated once per
    solve and written in place, so the result carries no derivative (call
    it on plain tensors under ``torch.no_grad()``, as solvers and adjoints do).

    This differs from Saad & Schultz (1986) in that: 1. the basis is
    orthogonalised by CGS2 instead of modified Gram–Schmidt, so a step is
    four batched matrix products instead of ``2j`` vector operations; 2. the
    rotations are accumulated into a matrix ``Q``, so applying them to a new
    column is one product instead of ``j`` rotations; 3. the residual at the
    end of a cycle is recomputed, not taken from the recurrence; 4. a
    solve stops when every unconverged row has stagnated: a full cycle
    that lowers its residual by less than :data:`STAGNATION` is repeated
    exactly by the next one, so iterating on would only spend ``max_iter``.
    The monitor's ``message`` (and :attr:`GMRESResult.stagnated`) says so.

    Args:
        matvec: Applies ``A`` to a ``(B, N)`` tensor, row by row.
        b: Right-hand sides, ``(B, N)``.
        x0: Initial guess; ``None`` starts from zero and saves one product.
        restart: Arnoldi steps per cycle (the memory is ``restart + 1``
            vectors per row); ``None`` picks :func:`default_restart`.
        tol: Relative tolerance: row ``b`` is done when
            ``‖b_b - A x_b‖ ≤ tol·‖b_b‖ + atol``. A float or a ``(B,)`` tensor.
        atol: Absolute tolerance, a float or a ``(B,)`` tensor (``inf``
            leaves a row untouched).
        max_iter: The most Arnoldi steps in all; default ``10·N``.
        monitor: Replaces ``tol``, ``atol`` and ``max_iter`` by a monitor
            that decides when to stop (see :class:`Checker`); a
            :class:`~implicit._monitor.Monitor` needs its ``reference``
            set to ``‖b‖``.
        confirm: Recompute ``b - A x`` with one more product when the solve
            stops within a cycle. Off, the Arnoldi residual (exact up to
            rounding) is final: inner solves whose accuracy is a heuristic
            (inexact Newton) save a product per call.

    Returns:
        A :class:`GMRESResult`.

    Raises:
        ValueError: ``b`` is not 2-D, ``x0`` does not match it,
            ``restart`` is not a positive int, or ``monitor`` measures
            its tolerance against the iterate's norm (no ``reference``).
    """
    if b.dim() != 2:
        raise ValueError(f"b must be a (B, N) tensor; got shape {tuple(b.shape)}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected {tuple(b.shape)} as b")
    if restart is None:
        restart = default_restart(b.shape[0], b.shape[1])
    restart = integer("restart", restart)
    if monitor is None:
        target = tol * torch.linalg.vector_norm(b, dim=1) + atol
        steps = 10 * b.shape[1] if max_iter is None else max_iter
        monitor = Tolerance(target, steps)
    elif getattr(monitor, "reference", True) is None:
        raise ValueError(
            "monitor has reference=None, so its tolerance scales with the iterate's norm, which gmres does "
            "not form at every step; pass Monitor(..., reference=torch.linalg.vector_norm(b, dim=1))"
        )
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    stop, exact = monitor.check(x, r), True
    arnoldi: _Arnoldi | None = None
    stagnated = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    while True:
        if stop:
            if exact or not confirm or monitor.nonfinite:
                break
            # The last check used the Arnoldi residual: confirm with the true one.
            r, exact = b - matvec(x), True
            if monitor.check(x, r):
                break
        if arnoldi is None:
            arnoldi = _Arnoldi(b, restart)
        start = torch.linalg.vector_norm(r, dim=1)
        x, r, stop, exact = arnoldi.cycle(matvec, b, x, r, monitor)
        if not stop:  # a full cycle, not the last: did it make progress? (one host read per cycle)
            assert monitor.active is not None
            end = torch.linalg.vector_norm(r, dim=1)
            stagnated = monitor.active & ~(end < (1 - STAGNATION) * start)
            if bool((stagnated | ~monitor.active).all()):
                _report_stagnation(monitor, stagnated, end, restart, b.shape[1])
                break
    assert monitor.active is not None
    rn = torch.linalg.vector_norm(r, dim=1)
    return GMRESResult(x, rn, ~monitor.active, int(getattr(monitor, "iterations", 0)), stagnated & monitor.active)


def _report_stagnation(
    monitor: Checker, stagnated: torch.Tensor, residual: torch.Tensor, restart: int, size: int
) -> None:
    """Write into the monitor's ``message`` (where it has one) that the solve stopped on stagnation."""
    if not hasattr(monitor, "message"):
        return
    count = int(stagnated.sum())
    worst = float(residual.masked_fill(~stagnated, 0).max())
    monitor.kind = (  # type: ignore[attr-defined]
        "GMRES stagnated: a restart cycle lowered no unconverged residual; raise restart or use adjoint='exact'"
    )
    monitor.message = (
        f"GMRES stagnated after {getattr(monitor, 'iterations', '?')} steps: a restart cycle of {restart} steps "
        f"lowered the residual of none of the {count} unconverged rows by {STAGNATION:.1%} (largest residual "
        f"{worst:.3e}), and every later cycle would repeat it; raise restart (to the {size} unknowns per row "
        "for full GMRES, which does not stagnate) or, for small systems, a dense solve (adjoint='exact')"
    )


class _Arnoldi:
    """The memory of restarted GMRES, allocated once per solve and reused by every cycle.

    ``V[k]`` is the ``k``-th basis vector of every row (a contiguous ``(B, N)``
    tensor, handed to ``matvec`` as it is); ``basis = V.transpose(0, 1)`` is
    the ``(B, m + 1, N)`` view that the Gram–Schmidt products read. ``P`` is
    the transpose of ``Q``, the product of the Givens rotations so far, and
    ``R`` the rotated Hessenberg matrix (upper triangular; only its upper
    triangle is ever read). Every entry is written in a cycle before it is read.
    """

    def __init__(self, b: torch.Tensor, m: int) -> None:
        batch, size = b.shape
        self.m = m
        self.V = b.new_empty(m + 1, batch, size)
        self.P = b.new_empty(batch, m + 1, m + 1)
        self.R = b.new_empty(batch, m, m)
        self.basis = self.V.transpose(0, 1)
        self.basis_t = self.V.permute(1, 2, 0)
        self.q0 = self.P.select(1, 0)  # the first column of Q: β times it is the rotated right-hand side
        self.eye = torch.eye(m + 1, dtype=b.dtype, device=b.device)
        # A rotation (c, s) as the transpose of [[c, s], [-s, c]]: (c, s) @ to_matrix, flattened.
        self.to_matrix = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0]], dtype=b.dtype, device=b.device)
        self.swap = torch.tensor([0.0, 1.0], dtype=b.dtype, device=b.device)
        self.zero = b.new_zeros(())
        self.tiny = torch.finfo(b.dtype).tiny
        self.tiny_t = torch.tensor(
            self.tiny, dtype=b.dtype, device=b.device
        )  # compared with as a tensor: half the cost of a float

    def cycle(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        b: torch.Tensor,
        x: torch.Tensor,
        r: torch.Tensor,
        monitor: Checker,
    ) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """One GMRES cycle of at most ``m`` steps from ``x`` with residual ``r = b - A x``.

        Returns:
            The last checked iterate, its residual, whether the monitor said
            stop, and whether that residual was computed as ``b - A x``.
        """
        V, P, R, tiny, tiny_t = self.V, self.P, self.R, self.tiny, self.tiny_t
        batch = r.shape[0]
        assert monitor.active is not None
        active = monitor.active.unsqueeze(1)
        beta = torch.linalg.vector_norm(r, dim=1, keepdim=True)
        torch.where(active & (beta > tiny_t), r / beta.clamp_min(tiny), self.zero, out=V[0])
        P.copy_(self.eye)
        x_start = x
        for j in range(self.m):
            w = matvec(V[j]).unsqueeze(1)
            vs, vs_t = self.basis.narrow(1, 0, j + 1), self.basis_t.narrow(2, 0, j + 1)
            # Classical Gram–Schmidt twice ("twice is enough", Giraud et al. 2005): four
            # products that each read the basis once.
            h = torch.bmm(w, vs_t)
            w = torch.baddbmm(w, h, vs, alpha=-1)
            h2 = torch.bmm(w, vs_t)
            w = torch.baddbmm(w, h2, vs, alpha=-1)
            hn = torch.linalg.vector_norm(w, dim=2)
            # The new Hessenberg column turned by the earlier rotations: one product with Qᵀ.
            col = torch.cat([h + h2, hn.unsqueeze(2)], dim=2)
            rot = torch.bmm(col, P[:, : j + 2, : j + 2]).squeeze(1)
            pair = rot.narrow(1, j, 2)
            d = torch.linalg.vector_norm(pair, dim=1, keepdim=True)
            # A frozen (or broken-down) row gets the swap (c, s) = (0, 1) and a unit pivot, so
            # its solution coefficient for this column is zero and its residual is unchanged.
            good = active & (d > tiny_t)
            cs = torch.where(good, pair / d, self.swap)  # where not good, pair / d is discarded
            turned = P.narrow(2, j, 2)
            turned.copy_(torch.bmm(turned, (cs @ self.to_matrix).view(batch, 2, 2)))
            rot[:, j] = d.squeeze(1)  # the new diagonal entry of R
            torch.where(good, rot.narrow(1, 0, j + 1), self.eye[j, : j + 1], out=R[:, : j + 1, j])
            if j == self.m - 1:
                x = self._solution(x_start, beta, j + 1)
                r = b - matvec(x)
                return x, r, monitor.check(x, r), True
            # ‖b - A x_j‖ = β |Q[j+1, 0]| while V is orthonormal: the monitor sees a (B, 1)
            # vector of that norm, with the cycle's first iterate; x_j and its residual
            # are formed only when the solve stops.
            r = self.q0.narrow(1, j + 1, 1).abs() * beta
            if monitor.check(x_start, r):
                return self._solution(x_start, beta, j + 1), r, True, False
            assert monitor.active is not None
            active = monitor.active.unsqueeze(1)
            # Rows that have converged (or broken down) stop growing their basis: their new
            # vector is zero. Dividing by a zero norm gives only infinities and NaN, which go.
            # (A where on the (B, N) vector costs as much as these two passes.)
            norm = torch.where(active, hn, self.zero)
            torch.div(w.squeeze(1), norm, out=V[j + 1]).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        raise AssertionError("unreachable: the last step returns")

    def _solution(self, x_start: torch.Tensor, beta: torch.Tensor, k: int) -> torch.Tensor:
        """``x_start + V_k y`` with ``R_k y = β Q[:k, 0]``: the minimiser over the first ``k`` vectors."""
        g = (beta * self.q0.narrow(1, 0, k)).unsqueeze(2)
        y = torch.linalg.solve_triangular(self.R[:, :k, :k], g, upper=True)
        return torch.baddbmm(x_start.unsqueeze(1), y.mT, self.basis.narrow(1, 0, k)).squeeze(1)
