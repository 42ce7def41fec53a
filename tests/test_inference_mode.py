"""Solves and layers under ``torch.inference_mode()``: the values and the cost of ``torch.no_grad()``."""

from __future__ import annotations

import pytest
import torch
from conftest import SOLVERS
from dense_reference import newton
from problems import f64, two_variable_map, two_variable_params
from reference import flat

import implicit


def _params() -> list[torch.Tensor]:
    return [p.requires_grad_() for p in two_variable_params()]


def _z0() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(4, 3, dtype=f64), "y": torch.zeros(4, 5, dtype=f64)}


@pytest.mark.parametrize("solver", SOLVERS)
def test_solve_under_inference_mode_equals_no_grad_at_the_same_cost(solver: str) -> None:
    params = _params()
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)
    kwargs = {"solver": solver, "tol": 1e-10, "max_iter": 200, "on_failure": "raise"}
    with torch.no_grad():
        expected = implicit.solve(problem, _z0(), **kwargs)
    with torch.inference_mode():
        sol = implicit.solve(problem, _z0(), **kwargs)
    assert sol.converged
    assert set(sol.z) == {"x", "y"}
    for k in ("x", "y"):
        assert torch.equal(sol.z[k], expected.z[k])
        assert not sol.z[k].requires_grad
    assert sol.stats.nfe == expected.stats.nfe and sol.stats.iterations == expected.stats.iterations
    reference = newton(two_variable_map, params, _z0())
    keys = ["x", "y"]
    assert torch.allclose(flat(sol.z, keys), flat(reference, keys), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_fixed_point_and_root_under_inference_mode(solver: str, form: str) -> None:
    a = torch.tensor(2.0, dtype=f64, requires_grad=True)
    z0 = torch.tensor(1.0, dtype=f64)
    if form == "root":
        fn, call, exact = (lambda z: 0.5 * (z**2 - a)), implicit.root, 2.0**0.5
    else:
        fn, call, exact = (lambda z: 0.5 * torch.cos(z) + a), implicit.fixed_point, None
    kwargs = {"solver": solver, "tol": 1e-12, "max_iter": 200, "on_failure": "raise"}
    with torch.no_grad():
        expected = call(fn, z0, **kwargs)
    with torch.inference_mode():
        z = call(fn, z0, **kwargs)
    assert torch.equal(z, expected)
    if exact is not None:
        assert abs(float(z) - exact) < 1e-10
    else:
        assert abs(float(z) - (0.5 * torch.cos(z) + 2.0)) < 1e-10


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.wx = torch.nn.Parameter(0.3 * torch.randn(3, 3, dtype=f64, generator=g) / 3**0.5)
        self.wy = torch.nn.Parameter(0.3 * torch.randn(5, 3, dtype=f64, generator=g) / 3**0.5)

    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": torch.tanh(z["x"] @ self.wx.T + x), "y": torch.tanh(z["x"] @ self.wy.T + 0.5 * z["y"])}

    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros_like(x), "y": x.new_zeros(len(x), 5)}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("solver", SOLVERS)
def test_deq_under_inference_mode_equals_no_grad(solver: str, training: bool) -> None:
    layer = implicit.nn.DEQ(_Cell(), solver=solver, tol=1e-10, max_iter=200, on_failure="raise")
    layer.train(training)
    x = torch.randn(6, 3, dtype=f64)
    with torch.no_grad():
        expected = layer(x)
        nfe = layer.last_stats.nfe
    with torch.inference_mode():
        z = layer(x)
    assert layer.last_stats.nfe == nfe and bool(layer.last_stats.converged.all())
    for k in ("x", "y"):
        assert torch.equal(z[k], expected[k])
    assert layer.last_adjoint_stats is None


def test_newton_krylov_under_inference_mode_with_an_input_it_cannot_record() -> None:
    # x, made under inference mode, is saved by x * z: no graph can hold it, and the
    # products come from forward mode instead; the solution is the same.
    g = torch.Generator().manual_seed(5)
    W = 0.3 * torch.randn(4, 4, dtype=f64, generator=g) / 2
    with torch.inference_mode():
        x = torch.randn(4, dtype=f64, generator=g)
    kwargs = {"solver": "newton_krylov", "tol": 1e-12, "on_failure": "raise"}
    x_normal = x.clone()  # outside inference mode: a tensor autograd may save
    with torch.no_grad():
        problem = implicit.ImplicitProblem.fixed_point(lambda z: torch.tanh(W @ (x_normal * z) + x_normal))
        expected = implicit.solve(problem, torch.zeros(4, dtype=f64), **kwargs).z
    with torch.inference_mode():
        problem = implicit.ImplicitProblem.fixed_point(lambda z: torch.tanh(W @ (x * z) + x))
        z = implicit.solve(problem, torch.zeros(4, dtype=f64), **kwargs).z
    assert torch.allclose(z, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(z, torch.tanh(W @ (x * z) + x), rtol=1e-10, atol=1e-12)
