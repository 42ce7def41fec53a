"""Broyden does not depend on the sign a root residual is written in; divergence is reported as such.

``F(z) = 0`` and ``-F(z) = 0`` have the same roots. An inverse Jacobian that
starts at a fixed ``-I`` fits one of them and points the wrong way for the
other; scaled from the first secant pair it fits both. A discretised heat
equation's implicit step ``y = y₀ + Δt L y`` is the test case (``∂F/∂y`` near
``±(I - Δt L)``), with nonlinear problems whose Jacobian is near ``+I`` and
``-I`` beside it; the references are a dense linear solve and SciPy.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import implicit

f64 = torch.float64


def _heat(n: int = 64, ratio: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix ``Δt L`` (Dirichlet Laplacian, ``Δt / Δx² = ratio``) and a rough initial temperature."""
    lap = (
        -2 * torch.eye(n, dtype=f64)
        + torch.diag(torch.ones(n - 1, dtype=f64), 1)
        + torch.diag(torch.ones(n - 1, dtype=f64), -1)
    )
    y0 = torch.rand(n, dtype=f64, generator=torch.Generator().manual_seed(0))
    return ratio * lap, y0


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["f(y)-y", "y-f(y)"])
@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_heat_equation_either_sign(sign: float, ratio: float) -> None:
    a, y0 = _heat(ratio=ratio)

    def residual(y: torch.Tensor) -> torch.Tensor:
        return sign * (y0 + a @ y - y)

    sol = implicit.solve(implicit.ImplicitProblem(residual), y0.clone(), solver="broyden", tol=1e-10, max_iter=100)
    assert sol.converged, sol.stats.message
    want = torch.linalg.solve(torch.eye(len(y0), dtype=f64) - a, y0)
    torch.testing.assert_close(sol.z, want, rtol=1e-8, atol=1e-9)


def _nonlinear(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, dtype=f64, generator=g)
    return 0.4 * w / torch.linalg.matrix_norm(w, ord=2), torch.randn(n, dtype=f64, generator=g)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["jacobian~+I", "jacobian~-I"])
@pytest.mark.parametrize("form", ["root", "fixed_point"])
def test_jacobian_near_plus_or_minus_identity(sign: float, form: str) -> None:
    w, b = _nonlinear(6, seed=1)

    def residual(z: torch.Tensor) -> torch.Tensor:
        return sign * (z - torch.tanh(z @ w.T + b) - 0.2 * torch.sin(z))

    if form == "root":
        z = implicit.root(residual, torch.zeros(6, dtype=f64), solver="broyden", tol=1e-11, on_failure="raise")
    else:  # z = f(z) with f(z) = z + F(z): ∂(f(z) - z)/∂z = ∂F/∂z
        z = implicit.fixed_point(
            lambda z: z + residual(z), torch.zeros(6, dtype=f64), solver="broyden", tol=1e-11, on_failure="raise"
        )
    wn, bn = w.numpy(), b.numpy()
    ref = scipy.optimize.root(lambda x: x - np.tanh(wn @ x + bn) - 0.2 * np.sin(x), np.zeros(6), tol=1e-14).x
    torch.testing.assert_close(z, torch.from_numpy(ref), rtol=1e-9, atol=1e-10)


def test_batched_samples_of_either_sign() -> None:
    # One sample written each way: each gets its own scale.
    w, b = _nonlinear(5, seed=2)
    signs = torch.tensor([[1.0], [-1.0]], dtype=f64)
    z = implicit.root(
        lambda z: signs * (z - torch.tanh(z @ w.T + b)),
        torch.zeros(2, 5, dtype=f64),
        batched=True,
        solver="broyden",
        tol=1e-11,
        on_failure="raise",
    )
    wn, bn = w.numpy(), b.numpy()
    ref = torch.from_numpy(scipy.optimize.root(lambda x: x - np.tanh(wn @ x + bn), np.zeros(5), tol=1e-14).x)
    torch.testing.assert_close(z, ref.expand(2, 5), rtol=1e-9, atol=1e-10)


def test_divergence_is_reported_as_divergence() -> None:
    # Plain iteration of an expanding map: the residual grows threefold per step in z['a'].
    def f(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"a": 3 * z["a"] + 1, "b": 0.5 * z["b"]}

    z0 = {"a": torch.ones(3, dtype=f64), "b": torch.ones(2, dtype=f64)}
    with pytest.raises(implicit.ConvergenceError, match=r"diverged: the residual norm grew .* largest in z\['a'\]"):
        implicit.fixed_point(f, z0, solver="fixed_point", max_iter=200, on_failure="raise")
    with pytest.warns(implicit.ConvergenceWarning, match="diverged") as record:
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f), z0, solver="fixed_point", max_iter=200)
    assert "non-finite" not in str(record[0].message)
    assert not sol.converged and sol.stats.iterations < 200
    # it stopped at the first residual past 1e8 times the first
    history = sol.stats.history
    assert history[-1] > implicit._monitor.DIVERGENCE * history[0] >= history[-2]
    assert torch.isfinite(sol.z["a"]).all()


@pytest.mark.parametrize("batch", [None, 3])
def test_overflowing_norm_with_finite_values(batch: int | None) -> None:
    # Every entry is finite but squaring them overflows (a state too large for the Python-arithmetic
    # check of small ones, which cannot overflow): no "non-finite value in (unknown)".
    shape = (100,) if batch is None else (batch, 40)
    z0 = {"a": torch.full(shape, 1e-3, dtype=f64), "b": torch.full(shape, 1e200, dtype=f64)}
    with pytest.raises(implicit.ConvergenceError, match=r"overflowed .*every value finite.*z\['b'\]") as info:
        implicit.fixed_point(
            lambda z: {"a": 0.5 * z["a"], "b": 0.5 * z["b"]}, z0, batched=batch is not None, on_failure="raise"
        )
    assert "unknown" not in str(info.value)
