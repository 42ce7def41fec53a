"""Bad input gets a clear answer: non-finite values, singular samples, wrong options, meta tensors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import SOLVERS

import implicit

F64 = torch.float64


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_after_k_evaluations_raises_naming_the_variable(solver):
    k = 4
    calls = {"n": 0, "after": 0}

    def f(z):
        calls["n"] += 1
        y = 0.5 * torch.tanh(z["y"]) + 0.2 * z["x"].sum()
        if calls["n"] > k:
            calls["after"] += 1
            y = y + math.nan
        return {"x": 0.5 * torch.cos(z["x"]), "y": y}

    z0 = {"x": torch.ones(2, dtype=F64), "y": torch.ones(3, dtype=F64)}
    with pytest.raises(implicit.SolverError, match=r"z\['y'\]") as info:
        implicit.solve(implicit.ImplicitProblem.fixed_point(f), z0, solver=solver, tol=1e-14, max_iter=500,
                       on_failure="raise")
    assert info.value.kind == "nonfinite" and "z['y']" in info.value.variables
    assert "z['x']" not in str(info.value).split(";")[0]
    assert calls["after"] <= 3, f"{solver} evaluated the map {calls['after']} times after the first NaN"


def _singular_batch():
    # Sample 1's map has an eigenvalue exactly 1 along its first coordinate: I - ∂G/∂z is singular there.
    A = torch.stack([
        torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=F64),
        torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=F64),
        torch.tensor([[0.2, -0.3], [0.1, 0.4]], dtype=F64),
    ])
    c = torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]], dtype=F64, requires_grad=True)

    def f(z):
        return (A @ z.unsqueeze(-1)).squeeze(-1) + c

    return A, c, f


def test_exact_adjoint_keeps_the_regular_samples_of_a_batch():
    A, c, f = _singular_batch()
    sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f, batched=True), torch.zeros(3, 2, dtype=F64),
                         solver="fixed_point", adjoint="exact", tol=1e-12, max_iter=500)
    assert sol.converged
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0], [3.0, 1.0]], dtype=F64)
    with pytest.warns(implicit.ConvergenceWarning, match="adjoint solve") as caught:
        (sol.z * w).sum().backward()
    assert "singular for sample [1]" in caught[0].message.reason
    # dense reference: dL/dc_b = (I - A_b)^{-T} w_b
    eye = torch.eye(2, dtype=F64)
    for b in (0, 2):
        expected = torch.linalg.solve((eye - A[b]).T, w[b])
        torch.testing.assert_close(c.grad[b], expected, rtol=1e-10, atol=1e-12)
    assert not torch.isfinite(c.grad[1]).any()
    stats = sol.adjoint_stats
    assert stats.converged.tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tol": "1e-6"}, "tol must be a finite non-negative number; got '1e-6' (str)"),
        ({"tol": math.inf}, "tol must be a finite non-negative number; got inf"),
        ({"tol": -1.0}, "tol must be a finite non-negative number; got -1.0"),
        ({"atol": math.nan}, "atol must be a finite non-negative number; got nan"),
        ({"max_iter": 2.5}, "max_iter must be a non-negative int; got 2.5"),
        ({"max_iter": True}, "max_iter must be a non-negative int; got True"),
        ({"on_failure": "rasie"}, "on_failure must be one of 'warn', 'raise', 'ignore'; got 'rasie' (str); did you mean 'raise'?"),
        ({"solver": "fixed_point", "solver_options": {"damping": "0.5"}},
         "solver 'fixed_point': damping must lie in (0, 1]; got '0.5' (str)"),
        ({"solver": "fixed_point", "solver_options": {"damping": 0.0}}, "damping must lie in (0, 1]; got 0.0"),
        ({"solver_options": {"m": 0}}, "solver 'anderson': m must be a positive int; got 0"),
        ({"solver_options": {"beta": 1.5}}, "beta must lie in (0, 1]; got 1.5"),
        ({"solver_options": {"lam": math.inf}}, "lam must be a finite non-negative number; got inf"),
        ({"solver": "broyden", "solver_options": {"memory": 1.0}}, "memory must be a positive int; got 1.0"),
        ({"solver": "newton_krylov", "solver_options": {"eta_max": 1.0}}, "eta_max must lie in (0, 1); got 1.0"),
        ({"solver": "newton_krylov", "solver_options": {"forcing": "eisenstat"}},
         "forcing must be one of 'eisenstat_walker', 'constant'; got 'eisenstat' (str); did you mean 'eisenstat_walker'?"),
        ({"solver": "newton_krylov", "solver_options": {"line_search": 1}}, "line_search must be True or False; got 1"),
        ({"solver": "newton_krylov", "solver_options": {"max_backtracks": -1}},
         "max_backtracks must be a non-negative int; got -1"),
        ({"solver": "scipy", "solver_options": {"method": "hbr"}}, "did you mean 'hybr'?"),
        ({"adjoint_options": {"tol": "1e-8"}}, "adjoint 'gmres': tol must be a finite non-negative number; got '1e-8' (str)"),
        ({"adjoint_options": {"tol": math.inf}}, "adjoint 'gmres': tol must be a finite non-negative number; got inf"),
        ({"adjoint_options": {"max_iter": -1}}, "adjoint 'gmres': max_iter must be a non-negative int; got -1"),
        ({"adjoint_options": {"restart": 0}}, "adjoint 'gmres': restart must be a positive int; got 0"),
    ],
)
def test_bad_options_name_the_option(kwargs, message):
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z)
    with pytest.raises(ValueError) as info:
        implicit.solve(problem, torch.ones(2, dtype=F64), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tol": "1e-6"}, "tol must be a finite non-negative number"),
        ({"eval_tol": math.inf}, "eval_tol must be a finite non-negative number; got inf"),
        ({"eval_max_iter": 1.5}, "eval_max_iter must be a non-negative int; got 1.5"),
        ({"solver": "fixed_point", "solver_options": {"damping": "0.5"}}, "damping must lie in (0, 1]"),
    ],
)
def test_bad_layer_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError) as info:
        implicit.nn.DEQ(torch.nn.Linear(2, 2), **kwargs)
    assert message in str(info.value)


def test_numpy_scalars_and_zero_tolerances_are_accepted():
    theta = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + theta)
    sol = implicit.solve(problem, torch.zeros(2, dtype=F64), solver="fixed_point", tol=np.float32(1e-10),
                         max_iter=np.int64(200), solver_options={"damping": np.float64(1.0)},
                         adjoint_options={"tol": 0, "atol": np.float32(1e-12), "max_iter": np.int32(100)})
    assert sol.converged and isinstance(sol.stats.iterations, int)
    torch.testing.assert_close(sol.z, 2 * theta.detach())
    sol.z.sum().backward()
    torch.testing.assert_close(theta.grad, torch.full((2,), 2.0, dtype=F64))  # dz*/dθ = 2
    # tol = 0 forward, with the atol floor
    sol = implicit.solve(problem, torch.zeros(2, dtype=F64), solver="anderson", tol=0, atol=1e-12, max_iter=200)
    assert sol.converged
    layer = implicit.nn.DEQ(torch.nn.Linear(2, 2), tol=np.float64(1e-4), max_iter=np.int64(10), eval_max_iter=np.int8(3))
    assert layer.settings() == (1e-4, 10) and type(layer.max_iter) is int


def test_meta_state_is_a_clear_error():
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z)
    with pytest.raises(ValueError, match="meta device .*no values"):
        implicit.solve(problem, torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="meta device"), torch.autocast("cpu"):
        implicit.solve(problem, torch.zeros(3, device="meta"))


@pytest.mark.parametrize("adjoint", ["gmres", "exact", "neumann", "jfb"])
def test_nan_in_the_incoming_gradient_is_named_as_such(adjoint):
    theta = torch.ones(2, dtype=F64, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: {"h": 0.5 * z["h"] + theta, "g": 0.5 * z["g"]})
    sol = implicit.solve(problem, {"h": torch.zeros(2, dtype=F64), "g": torch.zeros(1, dtype=F64)}, adjoint=adjoint,
                         on_failure="raise")
    loss = (sol.z["h"] * torch.tensor([1.0, math.nan], dtype=F64)).sum() + sol.z["g"].sum()
    with pytest.raises(implicit.SolverError, match=r"incoming gradient holds a non-finite value in z\['h'\]") as info:
        loss.backward()
    assert info.value.kind == "nonfinite_input" and info.value.variables == ["z['h']"]


def test_jfb_stats_say_the_gradient_is_approximate():
    theta = torch.tensor(1.5, dtype=F64, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + theta)
    sol = implicit.solve(problem, torch.zeros((), dtype=F64), solver="fixed_point", adjoint="jfb", tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol.z.backward()
    stats = sol.adjoint_stats
    assert stats.approximate and not stats.all_converged and math.isnan(float(stats.residual))
    assert "approximate=True" in repr(stats)
    assert theta.grad.item() == pytest.approx(1.0)  # gᵀ ∂G/∂θ, not the implicit gradient 2
    assert not sol.stats.approximate  # the forward solve is not
