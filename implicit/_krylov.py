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

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

__all__ = ["GMRESResult", "Tolerance", "gmres"]


class Checker(Protocol):
    """What :func:`gmres` needs of a convergence monitor (:class:`~implicit._monitor.Monitor` is one).

    ``check(x, r)`` records iterate ``x`` with residual ``r`` and says whether
    to stop; afterwards ``active`` is the ``(B,)`` mask of rows still short
    of their tolerance and ``nonfinite`` is non-empty if a NaN or infinity
    was seen. ``freeze(new, old)`` keeps the inactive rows of ``old``.
    """

    @property
    def active(self) -> torch.Tensor | None: ...

    @property
    def nonfinite(self) -> list[str]: ...

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool: ...

    def freeze(self, z_new: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


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

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool:
        rn = torch.linalg.vector_norm(r, dim=1)
        self.residual = rn
        self.converged = rn <= self.target
        self.active = ~self.converged
        done, finite = torch.stack([self.converged.all(), torch.isfinite(rn).all()]).tolist()
        if not finite:
            self.nonfinite = ["residual"]
            return True
        if done or self.iterations >= self.max_iter:
            return True
        self.iterations += 1
        return False

    def freeze(self, z_new: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.active is None or z.shape[0] == 1:
            return z_new
        return torch.where(self.active[:, None], z_new, z)


class GMRESResult(NamedTuple):
    """The outcome of :func:`gmres`.

    Attributes:
        x: The last checked iterate, ``(B, N)``.
        residual: ``‖b - A x‖`` per row as last checked, ``(B,)``.
        converged: Whether each row met its tolerance, ``(B,)``.
        iterations: Arnoldi steps taken (one product with ``A`` each).
    """

    x: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: int


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    restart: int = 20,
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
    Krylov space. After every Arnoldi step the iterate and its residual
    ``V_{j+1} (β e₁ - H_j y_j)`` (equal to ``b - A x_j`` up to rounding,
    whatever the loss of orthogonality) are handed to the monitor: one host
    synchronisation per step, so that the solve stops as soon as every row
    is done. The residual at the end of a cycle, and at any stop before it,
    is recomputed as ``b - A x`` (unless ``confirm`` is off), so convergence
    is confirmed by a true residual; a row it does not confirm carries on in
    a new cycle.

    Rows that have converged are frozen: their Arnoldi process stops
    (their new basis vectors are zero and their rotation is a plain swap,
    so their least-squares solution and residual stay as they were).

    This differs from Saad & Schultz (1986) in that: 1. the monitor sees
    the residual vector, not only its norm, after every step; 2. the
    basis is orthogonalised by CGS2 instead of modified Gram–Schmidt, so a
    step is four batched matrix products instead of ``2j`` vector operations.

    Args:
        matvec: Applies ``A`` to a ``(B, N)`` tensor, row by row.
        b: Right-hand sides, ``(B, N)``.
        x0: Initial guess; ``None`` starts from zero and saves one product.
        restart: Arnoldi steps per cycle (the memory is ``restart + 1``
            vectors per row).
        tol: Relative tolerance: row ``b`` is done when
            ``‖b_b - A x_b‖ ≤ tol·‖b_b‖ + atol``. A float or a ``(B,)`` tensor.
        atol: Absolute tolerance, a float or a ``(B,)`` tensor (``inf``
            leaves a row untouched).
        max_iter: The most Arnoldi steps in all; default ``10·N``.
        monitor: Replaces ``tol``, ``atol`` and ``max_iter`` by a monitor
            that decides when to stop (see :class:`Checker`); a
            :class:`~implicit._monitor.Monitor` of a linear solve has its
            ``reference`` set to ``‖b‖``.
        confirm: Recompute ``b - A x`` with one more product when the solve
            stops within a cycle. Off, the Arnoldi residual (exact up to
            rounding) is final: inner solves whose accuracy is a heuristic
            (inexact Newton) save a product per call.

    Returns:
        A :class:`GMRESResult`.

    Raises:
        ValueError: ``b`` is not 2-D, ``x0`` does not match it, or
            ``restart`` is not a positive int.
    """
    if b.dim() != 2:
        raise ValueError(f"b must be a (B, N) tensor; got shape {tuple(b.shape)}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected {tuple(b.shape)} as b")
    if isinstance(restart, bool) or not (isinstance(restart, int) and restart >= 1):
        raise ValueError(f"restart must be a positive int; got {restart!r}")
    if monitor is None:
        target = tol * torch.linalg.vector_norm(b, dim=1) + atol
        steps = 10 * b.shape[1] if max_iter is None else max_iter
        monitor = Tolerance(target, steps)
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    stop, exact = monitor.check(x, r), True
    while True:
        if stop:
            if exact or not confirm or monitor.nonfinite:
                break
            # The last check used the Arnoldi residual: confirm with the true one.
            r, exact = b - matvec(x), True
            if monitor.check(x, r):
                break
        x, r, stop, exact = _cycle(matvec, b, x, r, restart, monitor)
    assert monitor.active is not None
    rn = torch.linalg.vector_norm(r, dim=1)
    return GMRESResult(x, rn, ~monitor.active, int(getattr(monitor, "iterations", 0)))


def _cycle(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    m: int,
    monitor: Checker,
) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """One GMRES cycle of at most ``m`` steps from ``x`` with residual ``r = b - A x``.

    Returns:
        The last checked iterate, its residual, whether the monitor said
        stop, and whether that residual was computed as ``b - A x``.
    """
    batch, size = r.shape
    tiny = torch.finfo(r.dtype).tiny
    assert monitor.active is not None
    active = monitor.active
    beta = torch.linalg.vector_norm(r, dim=1)
    # Basis vectors V[:, k] of all rows, laid out for batched matrix products.
    V = r.new_zeros(batch, m + 1, size)
    V[:, 0] = torch.where((active & (beta > tiny))[:, None], r / beta.clamp_min(tiny)[:, None], 0.0)
    # R: the Hessenberg matrix after rotation (upper triangular); Q: the product of the rotations.
    R = r.new_zeros(batch, m, m)
    Q = torch.eye(m + 1, dtype=r.dtype, device=r.device).expand(batch, m + 1, m + 1).clone()
    eye = torch.eye(m, dtype=r.dtype, device=r.device)
    x_start = x
    for j in range(m):
        basis = V[:, : j + 1]
        w = matvec(V[:, j].contiguous())
        # Classical Gram–Schmidt twice ("twice is enough", Giraud et al. 2005).
        h = _dots(basis, w)
        w = w - _combine(basis, h)
        h2 = _dots(basis, w)
        w = w - _combine(basis, h2)
        h = h + h2
        hn = torch.linalg.vector_norm(w, dim=1)
        V[:, j + 1] = torch.where((active & (hn > tiny))[:, None], w / hn.clamp_min(tiny)[:, None], 0.0)
        # Apply the earlier rotations to the new column, then annihilate its subdiagonal entry.
        col = torch.cat([h, hn[:, None]], dim=1)
        rot = torch.bmm(Q[:, : j + 2, : j + 2], col[:, :, None])[:, :, 0]
        top, sub = rot[:, j], rot[:, j + 1]
        d = torch.hypot(top, sub)
        good = active & (d > tiny)
        # A frozen (or broken-down) row gets the swap (c, s) = (0, 1) and a unit pivot, so
        # its solution coefficient for this column is zero and its residual is unchanged.
        c = torch.where(good, top / d.clamp_min(tiny), 0.0)[:, None]
        s = torch.where(good, sub / d.clamp_min(tiny), 1.0)[:, None]
        qj, qj1 = Q[:, j].clone(), Q[:, j + 1].clone()
        Q[:, j] = c * qj + s * qj1
        Q[:, j + 1] = c * qj1 - s * qj
        new_col = rot[:, : j + 1].clone()
        new_col[:, j] = d
        R[:, : j + 1, j] = torch.where(good[:, None], new_col, eye[j, : j + 1])
        g = beta[:, None] * Q[:, : j + 2, 0]
        y = torch.linalg.solve_triangular(R[:, : j + 1, : j + 1], g[:, : j + 1, None], upper=True)[:, :, 0]
        x_new = monitor.freeze(x_start + _combine(basis, y), x)
        last = j == m - 1
        if last:
            r_new = b - matvec(x_new)
        else:
            # β e₁ - H y = Qᵀ (g - R y) = g_{j+1} Qᵀ e_{j+1}: the residual in the basis V.
            r_new = g[:, j + 1, None] * _combine(V[:, : j + 2], Q[:, j + 1, : j + 2])
            r_new = monitor.freeze(r_new, r)
        x, r = x_new, r_new
        if monitor.check(x, r):
            return x, r, True, last
        assert monitor.active is not None
        active = monitor.active
        # Rows that have just converged stop growing their basis.
        V[:, j + 1] = torch.where(active[:, None], V[:, j + 1], 0.0)
    return x, r, False, True


def _dots(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``⟨basis[b, k], w[b]⟩`` for every row ``b`` and vector ``k``: ``(B, k)``."""
    return torch.linalg.vecdot(basis, w[:, None, :])


def _combine(basis: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``Σ_k coef[b, k] basis[b, k]`` for every row ``b``: ``(B, N)``."""
    return torch.bmm(coef[:, None, :], basis)[:, 0]
