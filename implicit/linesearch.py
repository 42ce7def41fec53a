"""Batched line searches: a step length per sample along a direction, for Newton-type solvers.

Both searches act on flat ``(B, N)`` tensors (row ``b`` is sample ``b``, as
a :class:`~implicit._problem.System` presents them) and choose one step
length per row along ``x + α d``; every trial evaluates all rows at once (one
batched call of the function), and a row keeps its own bracket and step.
Rows that are already settled, or masked out by ``active``, are still
evaluated at their last accepted point by the batched call but never change.

* :func:`strong_wolfe` needs values and gradients and returns steps with
  sufficient decrease and small curvature, ``φ(α) ≤ φ(0) + c₁ α φ'(0)`` and
  ``|φ'(α)| ≤ c₂ |φ'(0)|`` (what quasi-Newton updates need for ``sᵀy > 0``);
* :func:`backtracking` needs values only and returns steps with sufficient
  decrease (Armijo's condition), shrinking a trial step geometrically;
* :func:`residual_backtracking` is the search of Newton's method for
  ``F(z) = 0``: halving a Newton step until ``‖F‖`` decreases enough.

Each costs one host synchronisation per trial (to stop when every row has
settled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._settings import integer

__all__ = ["LineSearchResult", "ResidualStep", "backtracking", "residual_backtracking", "strong_wolfe"]

ValueAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LineSearchResult(NamedTuple):
    """The outcome of a batched line search.

    Attributes:
        step: The step length per row, ``(B,)`` (zero where the row did not move).
        x: ``x + step · d``, ``(B, N)``: the point where ``value`` (and ``grad``) were evaluated.
        value: The function's value at ``x``, ``(B,)``.
        grad: Its gradient at ``x``, ``(B, N)`` (:func:`strong_wolfe` only; ``None`` for
            :func:`backtracking`).
        success: ``(B,)`` bool: whether the row's step meets the search's conditions.
            Inactive rows count as successful, with step zero.
        evaluations: The number of batched evaluations made.
    """

    step: torch.Tensor
    x: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor | None
    success: torch.Tensor
    evaluations: int


class ResidualStep(NamedTuple):
    """The outcome of :func:`residual_backtracking`.

    Attributes:
        step: The step length per row, ``(B,)`` (zero where the row did not move).
        z: The new iterate, ``(B, N)``.
        residual: ``F`` there, ``(B, N)``.
        full: Whether every row that moved took the full step on the first trial
            (so a linearisation recorded at ``z + d`` is the one at :attr:`z`).
        evaluations: The number of batched evaluations of ``F`` made (the
            first trial's, when given as ``first``, not counted).
    """

    step: torch.Tensor
    z: torch.Tensor
    residual: torch.Tensor
    full: bool
    evaluations: int


def _check_params(c1: float, c2: float | None, max_iter: int) -> None:
    if not 0 < c1 < 1:
        raise ValueError(f"c1 must lie in (0, 1); got {c1!r}")
    if c2 is not None and not c1 < c2 < 1:
        raise ValueError(f"c2 must lie in (c1, 1) = ({c1}, 1); got {c2!r}")
    integer("max_iter", max_iter)


def _as_rows(name: str, value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(like.shape[0]).clone()
    if t.shape != like.shape[:1]:
        raise ValueError(f"{name} must be a number or a tensor of shape ({like.shape[0]},); got shape {tuple(t.shape)}")
    return t.clone()


def _cubic_min(
    a0: torch.Tensor, f0: torch.Tensor, d0: torch.Tensor, a1: torch.Tensor, f1: torch.Tensor, d1: torch.Tensor
) -> torch.Tensor:
    """The minimiser of the cubic matching value and slope at ``a0`` and ``a1`` (NaN where none)."""
    e1 = d0 + d1 - 3 * (f0 - f1) / (a0 - a1)
    e2 = torch.sign(a1 - a0) * torch.sqrt(e1 * e1 - d0 * d1)  # NaN where the cubic has no minimiser
    return a1 - (a1 - a0) * (d1 + e2 - e1) / (d1 - d0 + 2 * e2)


def strong_wolfe(
    value_and_grad: ValueAndGrad,
    x: torch.Tensor,
    value: torch.Tensor,
    grad: torch.Tensor,
    direction: torch.Tensor,
    *,
    step: float | torch.Tensor = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_step: float = 1e10,
    max_iter: int = 25,
    active: torch.Tensor | None = None,
) -> LineSearchResult:
    """Finds per-row steps ``α`` along ``d`` satisfying the strong Wolfe conditions.

    With ``φ_b(α) = f_b(x_b + α d_b)``, each row's step satisfies
    ``φ(α) ≤ φ(0) + c₁ α φ'(0)`` and ``|φ'(α)| ≤ c₂ |φ'(0)|``. The search is
    Nocedal and Wright's: a bracketing phase that doubles the step until it
    brackets an acceptable one (Algorithm 3.5), then ``zoom`` (Algorithm
    3.6), which shrinks the bracket by safeguarded cubic interpolation
    (bisection where the cubic has no minimiser or falls outside the middle
    80 % of the bracket). All rows advance together: each trial is one call
    of ``value_and_grad`` on the whole batch.

    Near a minimum the decrease of ``f`` falls below its rounding error
    while the slope is still accurate: where ``φ(α)`` is within a few ulps
    of ``φ(0)``, sufficient decrease is judged by the slope instead,
    ``φ'(α) ≤ (1 − 2c₁) |φ'(0)|`` (the approximate Wolfe conditions of
    Hager and Zhang), so that gradients can be driven far below
    ``√ε · |f|``.

    A row whose direction is not a descent direction (``φ'(0) ≥ 0``) fails
    at once with step zero. A row that has no acceptable step after
    ``max_iter`` trials returns the best point it found that satisfies the
    sufficient-decrease condition (possibly step zero), with ``success``
    ``False``; a non-finite value counts as a step too long.

    Args:
        value_and_grad: ``x ↦ (f(x), ∇f(x))`` on ``(B, N)`` tensors, giving
            ``(B,)`` and ``(B, N)``; rows independent.
        x: The current point, ``(B, N)``.
        value: ``f(x)``, ``(B,)``.
        grad: ``∇f(x)``, ``(B, N)``.
        direction: The search direction ``d``, ``(B, N)``.
        step: The first trial step, a number or ``(B,)``.
        c1: Sufficient-decrease constant, in ``(0, 1)``.
        c2: Curvature constant, in ``(c1, 1)`` (0.9 for quasi-Newton
            directions, 0.1 for conjugate gradients).
        max_step: The longest step tried.
        max_iter: The most trials (batched evaluations).
        active: Optional ``(B,)`` bool mask; other rows are not searched
            (step zero, success ``True``).

    Returns:
        A :class:`LineSearchResult` with the value and gradient at the accepted points.

    Raises:
        ValueError: an option outside its range, or ``step`` of the wrong shape.

    Examples:
        One step of steepest descent on two independent quadratics of
        different curvature:

        >>> import torch
        >>> from implicit.linesearch import strong_wolfe
        >>> scale = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
        >>> fg = lambda x: (0.5 * (scale * x * x).sum(1), scale * x)
        >>> x = torch.ones(2, 3, dtype=torch.float64)
        >>> f, g = fg(x)
        >>> res = strong_wolfe(fg, x, f, g, -g, c2=0.1)
        >>> res.success.tolist(), [round(a, 6) for a in res.step.tolist()]
        ([True, True], [1.0, 0.1])

    References:
        J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed.,
        Springer 2006, Algorithms 3.5 and 3.6. W. W. Hager and H. Zhang, "A
        new conjugate gradient method with guaranteed descent and an
        efficient line search", SIAM J. Optim. 16(1), 2005.
    """
    _check_params(c1, c2, max_iter)
    if not max_step > 0:
        raise ValueError(f"max_step must be positive; got {max_step!r}")
    dphi0 = (grad * direction).sum(1)
    alpha = _as_rows("step", step, value).clamp(max=max_step)
    done = dphi0 >= 0 if active is None else (dphi0 >= 0) | ~active
    success = torch.zeros_like(done) if active is None else ~active
    # The accepted point so far (for a failed row: the best with sufficient decrease).
    best_a = torch.zeros_like(value)
    best_f, best_g = value.clone(), grad.clone()
    # The bracket: "lo" is the best sufficient-decrease step, "hi" the other end.
    a_lo, f_lo, d_lo = torch.zeros_like(value), value.clone(), dphi0.clone()
    a_hi, f_hi, d_hi = torch.zeros_like(value), value.clone(), dphi0.clone()
    zooming = torch.zeros_like(done)
    first = torch.ones_like(done)
    rounding = 8 * torch.finfo(value.dtype).eps
    evaluations = 0
    for _ in range(max_iter):
        if bool(done.all()):
            break
        # Trial steps: bracketing rows use alpha; zooming rows interpolate.
        lo_, hi_ = torch.minimum(a_lo, a_hi), torch.maximum(a_lo, a_hi)
        width = hi_ - lo_
        cubic = _cubic_min(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi)
        inside = (cubic >= lo_ + 0.1 * width) & (cubic <= hi_ - 0.1 * width)
        trial = torch.where(zooming, torch.where(inside, cubic, 0.5 * (a_lo + a_hi)), alpha)
        trial = torch.where(done, best_a, trial)
        f, g = value_and_grad(x + trial[:, None] * direction)
        evaluations += 1
        dphi = (g * direction).sum(1)
        finite = torch.isfinite(f) & torch.isfinite(dphi)
        # Near a minimum, changes of f fall below its rounding while the slope is still
        # accurate: where f is indistinguishable from φ(0) (or from φ(lo)), the slope decides
        # (Hager and Zhang's approximate Wolfe conditions).
        flat = (f - value).abs() <= rounding * (value.abs() + f.abs())
        armijo = finite & ((f <= value + c1 * trial * dphi0) | (flat & (dphi <= -(1 - 2 * c1) * dphi0)))
        worse = (f >= f_lo) & ((f - f_lo).abs() > rounding * (f_lo.abs() + f.abs()))
        curvature = dphi.abs() <= -c2 * dphi0
        live = ~done
        # --- bracketing rows (Algorithm 3.5)
        b = live & ~zooming
        too_long = b & (~armijo | (~first & worse))
        accept_b = b & ~too_long & curvature
        uphill = b & ~too_long & ~curvature & (dphi >= 0)
        extend = b & ~too_long & ~curvature & (dphi < 0)
        # too_long: zoom(lo = previous, hi = trial); uphill: zoom(lo = trial, hi = previous).
        a_hi_new = torch.where(too_long, trial, torch.where(uphill, a_lo, a_hi))
        f_hi_new = torch.where(too_long, f, torch.where(uphill, f_lo, f_hi))
        d_hi_new = torch.where(too_long, dphi, torch.where(uphill, d_lo, d_hi))
        # --- zooming rows (Algorithm 3.6)
        zr = live & zooming
        shrink_hi = zr & (~armijo | worse)
        accept_z = zr & ~shrink_hi & curvature
        move_lo = zr & ~shrink_hi & ~curvature
        flip = move_lo & (dphi * (a_hi - a_lo) >= 0)
        a_hi_new = torch.where(shrink_hi, trial, torch.where(flip, a_lo, a_hi_new))
        f_hi_new = torch.where(shrink_hi, f, torch.where(flip, f_lo, f_hi_new))
        d_hi_new = torch.where(shrink_hi, dphi, torch.where(flip, d_lo, d_hi_new))
        new_lo = uphill | extend | move_lo
        a_lo = torch.where(new_lo, trial, a_lo)
        f_lo = torch.where(new_lo, f, f_lo)
        d_lo = torch.where(new_lo, dphi, d_lo)
        a_hi, f_hi, d_hi = a_hi_new, f_hi_new, d_hi_new
        # Remember the best sufficient-decrease point, and the accepted ones.
        accept = accept_b | accept_z
        keep = accept | new_lo
        best_a = torch.where(keep, trial, best_a)
        best_f = torch.where(keep, f, best_f)
        best_g = torch.where(keep[:, None], g, best_g)
        success = success | accept
        zooming = zooming | too_long | uphill
        # A bracket that has collapsed to rounding cannot improve: stop the row.
        collapsed = zooming & ((a_hi - a_lo).abs() <= 1e-12 * torch.maximum(a_lo.abs(), a_hi.abs()))
        at_max = extend & (trial >= max_step)
        done = done | accept | collapsed | at_max
        alpha = torch.where(extend, torch.clamp(2 * trial, max=max_step), alpha)
        first = first & ~b
    return LineSearchResult(best_a, x + best_a[:, None] * direction, best_f, best_g, success, evaluations)


def backtracking(
    value_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    value: torch.Tensor,
    slope: torch.Tensor,
    direction: torch.Tensor,
    *,
    step: float | torch.Tensor = 1.0,
    shrink: float = 0.5,
    c1: float = 1e-4,
    max_iter: int = 20,
    active: torch.Tensor | None = None,
) -> LineSearchResult:
    """Finds per-row steps ``α`` along ``d`` with Armijo's sufficient decrease, by backtracking.

    Row ``b`` tries ``α = step, step·shrink, step·shrink², …`` until
    ``f(x + α d) ≤ f(x) + c₁ α · slope``, where ``slope`` is the directional
    derivative ``∇f(x)ᵀd`` (or any negative model slope, such as ``−‖F‖`` for
    a merit function ``‖F‖`` along a Newton direction). A row that finds no
    such step within ``max_iter`` trials takes the last, shortest one if it
    lowered the value at all (``success`` ``False``), and otherwise stays
    where it is (step zero, ``success`` ``False``); a non-finite value is
    never accepted. A trial whose value is within a few ulps of ``f(x)``, where
    the decrease asked for is within them too, is accepted: near a minimum the decrease falls below the rounding of
    ``f`` and cannot be measured, and a step there cannot make ``f``
    measurably worse (the approximate Armijo condition of Hager and Zhang).

    Args:
        value_fn: ``x ↦ f(x)`` on ``(B, N)`` tensors, giving ``(B,)``; rows independent.
        x: The current point, ``(B, N)``.
        value: ``f(x)``, ``(B,)``.
        slope: The directional derivative (model slope) per row, ``(B,)``;
            should be negative.
        direction: The search direction ``d``, ``(B, N)``.
        step: The first trial step, a number or ``(B,)``.
        shrink: The factor in ``(0, 1)`` applied to a rejected step.
        c1: Sufficient-decrease constant, in ``(0, 1)``.
        max_iter: The most trials (batched evaluations).
        active: Optional ``(B,)`` bool mask; other rows are not searched.

    Returns:
        A :class:`LineSearchResult` (``grad`` is ``None``).

    Raises:
        ValueError: an option outside its range, or ``step`` of the wrong shape.

    Examples:
        >>> import torch
        >>> from implicit.linesearch import backtracking
        >>> f = lambda x: (x**4).sum(1)
        >>> x = torch.tensor([[1.0], [0.1]], dtype=torch.float64)
        >>> d = -4 * x**3  # steepest descent
        >>> res = backtracking(f, x, f(x), (4 * x**3 * d).sum(1), d)
        >>> res.step.tolist(), res.success.tolist()
        ([0.25, 1.0], [True, True])
    """
    _check_params(c1, None, max_iter)
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must lie in (0, 1); got {shrink!r}")
    alpha = _as_rows("step", step, value)
    settled = torch.zeros(value.shape, dtype=torch.bool, device=value.device) if active is None else ~active
    success = settled.clone()
    best_a, best_f = torch.zeros_like(value), value.clone()
    rounding = 8 * torch.finfo(value.dtype).eps
    evaluations = 0
    for trial in range(max_iter):
        if bool(settled.all()):
            break
        a = torch.where(settled, best_a, alpha)
        f = value_fn(x + a[:, None] * direction)
        evaluations += 1
        ok = torch.isfinite(f) & ~settled
        # Within rounding of f(x), where the decrease asked for is itself below rounding.
        scale = rounding * (value.abs() + f.abs())
        flat = ((f - value).abs() <= scale) & ((c1 * a * slope).abs() <= scale)
        accept = ok & ((f <= value + c1 * a * slope) | flat)
        if trial == max_iter - 1:
            fallback = ok & ~accept & (f < value)
            best_a = torch.where(fallback, a, best_a)
            best_f = torch.where(fallback, f, best_f)
        best_a = torch.where(accept, a, best_a)
        best_f = torch.where(accept, f, best_f)
        success = success | accept
        settled = settled | accept
        alpha = alpha * shrink
    return LineSearchResult(best_a, x + best_a[:, None] * direction, best_f, None, success, evaluations)


def residual_backtracking(
    residual: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    f: torch.Tensor,
    direction: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    c1: float = 1e-4,
    max_backtracks: int = 10,
) -> ResidualStep:
    """Halves a Newton step for ``F(z) = 0`` per row until ``‖F‖`` decreases enough.

    Row ``b`` tries ``λ = 1, ½, ¼, …`` until
    ``‖F(z + λd)‖ ≤ (1 − c₁λ) ‖F(z)‖`` (Armijo's condition on the merit
    function ``‖F‖`` along a Newton direction, whose slope there is
    ``−‖F‖``). A row that finds none within ``max_backtracks`` halvings
    takes the shortest step if it lowered ``‖F‖`` at all, and otherwise
    stays where it is. A trial whose ``F`` is not finite is taken and ends
    the row's search: the solver's next convergence check then names the
    variable, as every solver reports the first non-finite value it meets.

    Args:
        residual: ``F`` on ``(B, N)`` tensors, rows independent.
        z: The iterate, ``(B, N)``.
        f: ``F(z)``, ``(B, N)``.
        direction: The Newton direction ``d``, ``(B, N)``.
        active: Optional ``(B,)`` bool mask; other rows stay where they are.
        first: ``F(z + d)`` where the caller has it already (a Newton solver
            evaluates the full step with its graph, for the next step's
            linearisation).
        c1: Sufficient-decrease constant, in ``(0, 1)``.
        max_backtracks: The most halvings, an int ``≥ 0``.

    Returns:
        A :class:`ResidualStep`.

    Examples:
        >>> import torch
        >>> from implicit.linesearch import residual_backtracking
        >>> F = lambda z: torch.atan(z)  # Newton's full step overshoots from z = 2
        >>> z = torch.tensor([[2.0], [0.5]], dtype=torch.float64)
        >>> d = -torch.atan(z) * (1 + z**2)
        >>> res = residual_backtracking(F, z, F(z), d)
        >>> res.step.tolist(), res.full
        ([0.5, 1.0], False)
    """
    if not 0 < c1 < 1:
        raise ValueError(f"c1 must lie in (0, 1); got {c1!r}")
    integer("max_backtracks", max_backtracks, minimum=0)
    fn = torch.linalg.vector_norm(f, dim=1)
    lam = torch.ones_like(fn)
    decided = torch.zeros_like(fn, dtype=torch.bool) if active is None else ~active
    taken = torch.zeros_like(fn)
    z_new, f_new = z, f
    evaluations = 0
    for trial in range(max_backtracks + 1):
        z_try = z + lam[:, None] * direction
        if trial == 0 and first is not None:
            f_try = first
        else:
            f_try = residual(z_try)
            evaluations += 1
        fn_try = torch.linalg.vector_norm(f_try, dim=1)
        accept = ((fn_try <= (1 - c1 * lam) * fn) | ~torch.isfinite(fn_try)) & ~decided
        if trial == max_backtracks:
            accept = accept | ((fn_try < fn) & ~decided)
        z_new = torch.where(accept[:, None], z_try, z_new)
        f_new = torch.where(accept[:, None], f_try, f_new)
        taken = torch.where(accept, lam, taken)
        decided = decided | accept
        if trial == max_backtracks or bool(decided.all()):
            # After the first trial every row still moving took the full step.
            return ResidualStep(taken, z_new, f_new, trial == 0 and bool(decided.all()), evaluations)
        lam = torch.where(decided, lam, 0.5 * lam)
    raise AssertionError("unreachable")  # pragma: no cover
