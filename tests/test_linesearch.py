"""implicit.linesearch: the returned steps satisfy their conditions per sample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implicit.linesearch import backtracking, strong_wolfe

f64 = torch.float64


def rosenbrock(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Extended Rosenbrock per row and its gradient (by hand, as an independent reference)."""
    a, b = x[:, :-1], x[:, 1:]
    f = (100 * (b - a**2) ** 2 + (1 - a) ** 2).sum(1)
    g = torch.zeros_like(x)
    g[:, :-1] += -400 * a * (b - a**2) - 2 * (1 - a)
    g[:, 1:] += 200 * (b - a**2)
    return f, g


def quadratic(scales: torch.Tensor):  # noqa: ANN201
    def fg(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 * (scales * x * x).sum(1), scales * x

    return fg


def assert_strong_wolfe(fg, x, f0, g0, d, res, c1, c2) -> None:  # noqa: ANN001
    """Checks both conditions from fresh evaluations at x + step·d, row by row."""
    f, g = fg(x + res.step[:, None] * d)
    dphi0 = (g0 * d).sum(1)
    dphi = (g * d).sum(1)
    assert torch.allclose(res.value, f, rtol=1e-12, atol=0) and torch.allclose(res.grad, g, rtol=1e-12, atol=1e-12)
    assert torch.allclose(res.x, x + res.step[:, None] * d, rtol=0, atol=0)
    for b in range(x.shape[0]):
        assert bool(res.success[b]), f"row {b} failed"
        assert res.step[b] > 0
        assert f[b] <= f0[b] + c1 * res.step[b] * dphi0[b], f"row {b}: no sufficient decrease"
        assert abs(dphi[b]) <= -c2 * dphi0[b], f"row {b}: curvature condition fails"


@pytest.mark.parametrize("c2", [0.9, 0.1, 0.01])
@pytest.mark.parametrize("direction", ["steepest", "newton_like", "random_descent"])
def test_strong_wolfe_on_batched_rosenbrock(c2: float, direction: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, dtype=f64, generator=g)
    f0, g0 = rosenbrock(x)
    if direction == "steepest":
        d = -g0
    elif direction == "newton_like":
        d = -g0 / (1 + 400 * x.abs().max(1, keepdim=True).values ** 2)
    else:
        d = torch.randn(16, 4, dtype=f64, generator=g)
        d = torch.where(((d * g0).sum(1) > 0)[:, None], -d, d)
    res = strong_wolfe(rosenbrock, x, f0, g0, d, c2=c2, max_iter=60)
    assert_strong_wolfe(rosenbrock, x, f0, g0, d, res, 1e-4, c2)


@given(st.integers(1, 6), st.integers(1, 5), st.floats(1e-3, 1e3), st.integers(0, 1000))
def test_strong_wolfe_on_quadratics_of_any_scale(batch: int, n: int, step: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(batch, n, dtype=f64, generator=g) * 100 + 0.01
    fg = quadratic(scales)
    x = torch.randn(batch, n, dtype=f64, generator=g)
    f0, g0 = fg(x)
    res = strong_wolfe(fg, x, f0, g0, -g0, step=step, c2=0.5, max_iter=60)
    assert_strong_wolfe(fg, x, f0, g0, -g0, res, 1e-4, 0.5)


def test_strong_wolfe_exact_step_on_a_quadratic_with_tight_curvature() -> None:
    # Along d = −g the exact minimiser is gᵀg / gᵀAg; c1 = 1e-8, c2 = 1e-6 force the search to find it.
    scales = torch.tensor([[1.0, 4.0, 9.0], [2.0, 2.0, 50.0]], dtype=f64)
    fg = quadratic(scales)
    x = torch.ones(2, 3, dtype=f64)
    f0, g0 = fg(x)
    res = strong_wolfe(fg, x, f0, g0, -g0, c1=1e-8, c2=1e-6, max_iter=60)
    exact = (g0 * g0).sum(1) / (scales * g0 * g0).sum(1)
    assert bool(res.success.all())
    assert torch.allclose(res.step, exact, rtol=1e-5)


def test_strong_wolfe_rows_fail_cleanly() -> None:
    scales = torch.ones(3, 2, dtype=f64)
    fg = quadratic(scales)
    x = torch.ones(3, 2, dtype=f64)
    f0, g0 = fg(x)
    d = -g0.clone()
    d[1] = g0[1]  # an ascent direction: fails at once with step 0
    active = torch.tensor([True, True, False])
    res = strong_wolfe(fg, x, f0, g0, d, active=active)
    assert res.success.tolist() == [True, False, True]
    assert res.step[1] == 0 and res.step[2] == 0
    assert torch.equal(res.x[1:], x[1:]) and torch.equal(res.value[1:], f0[1:])


def test_strong_wolfe_treats_nonfinite_values_as_too_long() -> None:
    def fg(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.where(x[:, 0] > 1.5, torch.nan, (x * x).sum(1))
        return f, 2 * x

    x = torch.ones(2, 1, dtype=f64)
    f0, g0 = fg(x)
    res = strong_wolfe(fg, x, f0, g0, torch.tensor([[-2.0], [-0.1]], dtype=f64), step=20.0, max_iter=60)
    assert bool(res.success.all()) and bool(torch.isfinite(res.value).all())
    assert assert_strong_wolfe(fg, x, f0, g0, torch.tensor([[-2.0], [-0.1]], dtype=f64), res, 1e-4, 0.9) is None


def test_backtracking_armijo_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, dtype=f64, generator=g) * 2
    f0, g0 = rosenbrock(x)
    f = lambda z: rosenbrock(z)[0]  # noqa: E731
    res = backtracking(f, x, f0, (g0 * -g0).sum(1), -g0, max_iter=60)
    assert bool(res.success.all())
    assert res.grad is None
    fresh = f(x - res.step[:, None] * g0)
    assert torch.equal(res.value, fresh)
    slope = -(g0 * g0).sum(1)
    assert bool((fresh <= f0 + 1e-4 * res.step * slope).all())
    # Maximal: the step twice as long (where one was tried) fails Armijo's condition.
    longer = res.step * 2
    tried = longer <= 1.0
    f_long = f(x - longer[:, None] * g0)
    assert bool((f_long[tried] > (f0 + 1e-4 * longer * slope)[tried]).all())


def test_backtracking_fallback_and_no_move() -> None:
    # f decreases a little along d but never by Armijo's margin with a too-steep model slope.
    f = lambda z: (z * z).sum(1)  # noqa: E731
    x = torch.tensor([[1.0], [1.0]], dtype=f64)
    d = torch.tensor([[-1e-3], [1.0]], dtype=f64)
    res = backtracking(f, x, f(x), torch.tensor([-1e6, -1e6], dtype=f64), d, max_iter=3)
    assert res.success.tolist() == [False, False]
    assert res.step[0] == 0.25 and res.step[1] == 0  # the shortest trial where it lowered f, else no move
    assert torch.equal(res.value[1], f(x)[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"c1": 0.0}, "c1 must lie in"),
        ({"c2": 1e-5}, "c2 must lie in"),
        ({"max_iter": 0}, "max_iter must be a positive int"),
        ({"step": torch.ones(3)}, r"step must be a number or a tensor of shape \(2,\)"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    fg = quadratic(torch.ones(2, 2, dtype=f64))
    x = torch.ones(2, 2, dtype=f64)
    f0, g0 = fg(x)
    with pytest.raises(ValueError, match=message):
        strong_wolfe(fg, x, f0, g0, -g0, **kwargs)
    with pytest.raises(ValueError, match="shrink must lie"):
        backtracking(lambda z: fg(z)[0], x, f0, -(g0 * g0).sum(1), -g0, shrink=1.0)
