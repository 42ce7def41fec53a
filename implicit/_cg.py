"""Batched, matrix-free conjugate gradients and MINRES for symmetric ``A_b x_b = b_b``, one system per row.

As for :func:`~implicit._krylov.gmres`, rows of the ``(B, N)`` right-hand side
are independent systems and ``matvec`` acts row by row; all rows advance
together in batched tensor operations. Both stop through a checker with the
:class:`~implicit._krylov.Checker` protocol (a :class:`~implicit._monitor.Monitor`
with ``reference=‖b‖``, or an inner :class:`~implicit._krylov.Tolerance`),
called once per iterate.

* :func:`cg` for symmetric positive definite ``A`` (a Hessian at a minimum).
  A row that meets a direction of non-positive curvature ``pᵀAp ≤ 0`` stops
  there and is flagged, with the direction, for truncated-Newton (Steihaug)
  use and so that an adjoint can report that ``A`` is not positive definite.
* :func:`minres` for symmetric, possibly indefinite ``A`` (a saddle point, a
  KKT system).

References:
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving
    linear systems", J. Res. Nat. Bur. Standards 49(6), 1952.
    C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12(4), 1975.
    T. Steihaug, "The conjugate gradient method and trust regions in large
    scale optimization", SIAM J. Numer. Anal. 20(3), 1983.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._krylov import Checker, Tolerance

__all__ = ["CGResult", "MINRESResult", "cg", "minres", "tolerance"]

_NEGATIVE_CHECK_EVERY = 8
"""Off the CPU, rows of negative curvature are looked for every this many steps (each look is a host read)."""


class CGResult(NamedTuple):
    """The outcome of :func:`cg`.

    Attributes:
        x: The last checked iterate, ``(B, N)``; for a row of negative
            curvature, the iterate before the step along ``direction``.
        negative_curvature: ``(B,)`` bool: the rows that met ``pᵀAp ≤ 0``
            (``A`` is not positive definite there) and stopped.
        direction: ``(B, N)``: for those rows, the direction ``p`` of
            non-positive curvature (elsewhere the last search direction).
        residual: ``‖b - A x‖`` per row as last checked (by the recurrence), ``(B,)``.
        converged: Whether each row met its tolerance, ``(B,)``.
        iterations: Steps taken (one product with ``A`` each).
    """

    x: torch.Tensor
    negative_curvature: torch.Tensor
    direction: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: int


class MINRESResult(NamedTuple):
    """The outcome of :func:`minres`.

    Attributes:
        x: The last checked iterate, ``(B, N)``.
        residual: ``‖b - A x‖`` per row as last checked, ``(B,)``.
        converged: Whether each row met its tolerance, ``(B,)``.
        iterations: Lanczos steps taken (one product with ``A`` each, plus
            one per confirmation of the residual).
    """

    x: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: int


def tolerance(b: torch.Tensor, tol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None) -> Tolerance:
    """A :class:`~implicit._krylov.Tolerance` for ``‖b - A x‖ ≤ tol·‖b‖ + atol`` per row, ``max_iter`` default ``10·N``."""
    target = tol * torch.linalg.vector_norm(b, dim=1) + atol
    return Tolerance(target, 10 * b.shape[1] if max_iter is None else max_iter)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=1)


def _check_inputs(b: torch.Tensor, x0: torch.Tensor | None) -> None:
    if b.dim() != 2:
        raise ValueError(f"b must be a (B, N) tensor; got shape {tuple(b.shape)}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected {tuple(b.shape)} as b")


def cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    checker: Checker,
    *,
    x0: torch.Tensor | None = None,
) -> CGResult:
    """Solve ``A_b x_b = b_b`` per row of a ``(B, N)`` tensor by conjugate gradients, ``A`` symmetric positive definite.

    Each step is one product with ``A`` and a few row-wise dot products;
    ``checker.check(x, r)`` sees every iterate with its recurrence residual
    ``r = b - A x`` (one host synchronisation per step). Rows that have
    converged stop changing (their step length is zero) while the others go on.

    This differs from Hestenes & Stiefel (1952) in that a row whose search
    direction has non-positive curvature ``pᵀAp ≤ 0`` stops before stepping
    along it and is flagged in :attr:`CGResult.negative_curvature` (with the
    direction), as in Steihaug's truncated CG: ``A`` is then not positive
    definite, and CG's iterates would not minimise anything. The solve ends
    when every row has converged or stopped so, or when the checker says
    stop. Off the CPU, flagged rows are looked for every few steps, so the
    others may take up to that many steps more before the solve ends.

    Args:
        matvec: Applies ``A`` to a ``(B, N)`` tensor, row by row.
        b: Right-hand sides, ``(B, N)``.
        checker: Decides when to stop (see :class:`~implicit._krylov.Checker`);
            a :class:`~implicit._monitor.Monitor` needs its ``reference`` set
            to ``‖b‖``; :func:`tolerance` makes a plain one.
        x0: Initial guess; ``None`` starts from zero and saves one product.

    Returns:
        A :class:`CGResult`.

    Raises:
        ValueError: ``b`` is not 2-D or ``x0`` does not match it.

    Examples:
        >>> import torch
        >>> from implicit._cg import cg, tolerance
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> out = cg(lambda v: v @ A, b, tolerance(b, 1e-12))
        >>> torch.allclose(out.x @ A, b), out.negative_curvature.tolist(), out.iterations
        (True, [False], 2)
    """
    _check_inputs(b, x0)
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    p = r.clone()
    rs = _rowdot(r, r)
    negative = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    zero = b.new_zeros(())
    look_every = 1 if b.device.type == "cpu" else _NEGATIVE_CHECK_EVERY
    stop, steps = checker.check(x, r), 0
    while not stop:
        assert checker.active is not None
        ap = matvec(p)
        pap = _rowdot(p, ap)
        moving = checker.active & ~negative
        negative = negative | (moving & (pap <= 0))
        go = moving & (pap > 0)
        alpha = torch.where(go, rs / torch.where(go, pap, 1.0), zero)
        x = x + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * ap
        rs_new = _rowdot(r, r)
        beta = torch.where(go, rs_new / torch.where(go & (rs > 0), rs, 1.0), zero)
        p = torch.where(go.unsqueeze(1), r + beta.unsqueeze(1) * p, p)  # flagged rows keep their direction
        rs = torch.where(go, rs_new, rs)
        steps += 1
        stop = checker.check(x, r)
        if not stop and steps % look_every == 0 and bool(negative.any()):
            # Every row still short of its tolerance has met negative curvature: nothing moves any more.
            assert checker.active is not None
            stop = not bool((checker.active & ~negative).any())
    assert checker.active is not None
    return CGResult(
        x,
        negative,
        p,
        torch.linalg.vector_norm(r, dim=1),
        ~checker.active,
        int(getattr(checker, "iterations", steps)),
    )


def minres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    checker: Checker,
    *,
    x0: torch.Tensor | None = None,
    confirm: bool = True,
) -> MINRESResult:
    """Solve ``A_b x_b = b_b`` per row of a ``(B, N)`` tensor by MINRES, ``A`` symmetric (possibly indefinite).

    The Lanczos process builds an orthonormal basis of the Krylov space with
    a three-term recurrence (three vectors of memory per row), and the
    iterate minimises ``‖b - A x‖`` over it; the QR factorisation of the
    tridiagonal matrix is updated by one Givens rotation per step, which
    also gives the residual norm. ``checker.check`` sees, at every step,
    the iterate and a ``(B, 1)`` tensor holding that norm (so a checker must
    judge by ``‖r‖`` alone, as for :func:`~implicit._krylov.gmres`). When
    the checker says stop and ``confirm`` is on, the residual is recomputed
    as ``b - A x`` (one product) and checked; where it is not yet within
    tolerance (the recurrence drifts as the basis loses orthogonality), the
    process starts again from the current iterate. Rows that have converged
    stop changing.

    This follows Paige & Saunders (1975) (as in the SYMMLQ/MINRES codes of
    Choi, Paige and Saunders), without a preconditioner, batched over rows.

    Args:
        matvec: Applies ``A`` to a ``(B, N)`` tensor, row by row; ``A`` symmetric.
        b: Right-hand sides, ``(B, N)``.
        checker: Decides when to stop; see :func:`cg`.
        x0: Initial guess; ``None`` starts from zero.
        confirm: Recompute ``b - A x`` when the solve stops.

    Returns:
        A :class:`MINRESResult`.

    Raises:
        ValueError: ``b`` is not 2-D or ``x0`` does not match it.

    Examples:
        An indefinite system, where conjugate gradients would break down:

        >>> import torch
        >>> from implicit._cg import minres, tolerance
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> out = minres(lambda v: v @ A, b, tolerance(b, 1e-12))
        >>> torch.allclose(out.x @ A, b), out.converged.tolist()
        (True, [True])
    """
    _check_inputs(b, x0)
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    stop, exact = checker.check(x, r), True
    while True:
        if stop:
            if exact or not confirm or checker.nonfinite:
                break
            r, exact = b - matvec(x), True
            if checker.check(x, r):
                break
        x, r, stop, exact = _lanczos(matvec, x, r, checker)
    assert checker.active is not None
    return MINRESResult(x, torch.linalg.vector_norm(r, dim=1), ~checker.active, int(getattr(checker, "iterations", 0)))


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    r: torch.Tensor,
    checker: Checker,
) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """MINRES from ``x`` with residual ``r = b - A x`` until the checker says stop.

    Returns the last iterate, its residual (a ``(B, 1)`` norm from the
    recurrence, or ``r`` itself if no step was taken), whether the checker
    said stop, and whether that residual is ``b - A x`` itself.
    """
    eps = torch.finfo(r.dtype).eps
    tiny = torch.finfo(r.dtype).tiny
    zero = r.new_zeros(())
    beta1 = torch.linalg.vector_norm(r, dim=1, keepdim=True)
    r1 = r
    r2 = r
    y = r
    beta = beta1
    oldb = torch.zeros_like(beta1)
    dbar = torch.zeros_like(beta1)
    epsln = torch.zeros_like(beta1)
    phibar = beta1
    cs = -torch.ones_like(beta1)
    sn = torch.zeros_like(beta1)
    w = torch.zeros_like(r)
    w2 = torch.zeros_like(r)
    residual = beta1
    first = True
    while True:
        assert checker.active is not None
        active = checker.active.unsqueeze(1)
        alive = beta > tiny  # a row whose Krylov space is exhausted has y = 0: it takes zero steps
        v = y / torch.where(alive, beta, 1.0)
        y = matvec(v)
        if not first:
            y = y - (beta / torch.where(oldb > tiny, oldb, 1.0)) * r1
        first = False
        alfa = _rowdot(v, y).unsqueeze(1)
        y = y - (alfa / torch.where(alive, beta, 1.0)) * r2
        r1, r2 = r2, y
        oldb = beta
        beta = torch.linalg.vector_norm(y, dim=1, keepdim=True)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(eps * beta1.clamp_min(tiny))
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        # Converged rows are frozen: x and their reported residual stay as they were.
        x = x + torch.where(active, phi, zero) * w
        residual = torch.where(active, phibar.abs(), residual)
        if checker.check(x, residual):
            return x, residual, True, False
