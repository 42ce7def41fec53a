"""Solves inside a ``torch.compile``'d function: a graph break at the solve, same values as eager.

The solver loops read their stopping test on the host and the backward is a
custom ``autograd.Function``, so the entry points run eagerly inside a compiled
caller; the code around them is compiled. Every registered solver is checked,
forward and gradient, against the same function run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import SOLVERS

import implicit

f64 = torch.float64

dynamo = pytest.importorskip("torch._dynamo")
pytestmark = pytest.mark.skipif(
    not (hasattr(torch, "compile") and dynamo.is_dynamo_supported()), reason="torch.compile is not supported here"
)


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 4, dtype=f64, generator=g)
    w = 0.4 * w / torch.linalg.matrix_norm(w, ord=2)
    return w, torch.randn(4, 4, dtype=f64, generator=g)


def _model(form: str, solver: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    w, a = _weights()

    def fn(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(x @ a.T) * scale  # compiled before the solve
        kw = {"solver": solver, "tol": 1e-11, "max_iter": 300, "batched": True, "adjoint_options": {"tol": 1e-11}}
        if form == "fixed_point":
            z = implicit.fixed_point(lambda z: torch.tanh(z @ w.T + u), torch.zeros_like(u), **kw)
        else:
            z = implicit.root(lambda z: z - torch.tanh(z @ w.T + u), torch.zeros_like(u), **kw)
        return (z**2).sum() + z.sum()  # and after it

    return fn


def _value_and_grads(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    x = torch.linspace(-1, 1, 12, dtype=f64).reshape(3, 4).requires_grad_()
    scale = torch.tensor(1.3, dtype=f64, requires_grad=True)
    out = fn(x, scale)
    return [out.detach(), *torch.autograd.grad(out, (x, scale))]


@pytest.mark.parametrize(
    ("backend", "form"), [("eager", "fixed_point"), ("aot_eager", "fixed_point"), ("aot_eager", "root")]
)
@pytest.mark.parametrize("solver", SOLVERS)
def test_compiled_solve_matches_eager(solver: str, backend: str, form: str) -> None:
    eager = _value_and_grads(_model(form, solver))
    dynamo.reset()
    compiled = _value_and_grads(torch.compile(_model(form, solver), backend=backend))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiled_solve_entry_point() -> None:
    """``solve`` itself, with its stats, inside a compiled function."""
    w, _ = _weights()

    def fn(u: torch.Tensor) -> torch.Tensor:
        problem = implicit.ImplicitProblem.fixed_point(lambda z: torch.tanh(z @ w.T + u), batched=True)
        sol = implicit.solve(problem, torch.zeros_like(u), solver="broyden", tol=1e-11)
        return sol.z.sum()

    u = torch.linspace(-1, 1, 8, dtype=f64).reshape(2, 4).requires_grad_()
    want = torch.autograd.grad(fn(u), u)[0]
    dynamo.reset()
    got = torch.autograd.grad(torch.compile(fn, backend="aot_eager")(u), u)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
