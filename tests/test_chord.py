"""The chord solver: one Jacobian, factorised once, linear convergence at the predicted rate."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
from dense_reference import loss_gradient, relerr

import implicit
from implicit.solvers import chord

f64 = torch.float64


def test_linear_problem_in_one_step() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 5, dtype=f64, generator=g) + 4 * torch.eye(5, dtype=f64)
    b = torch.randn(3, 5, dtype=f64, generator=g)

    def F(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = (A @ torch.cat([z["u"], z["v"]], dim=1).unsqueeze(-1)).squeeze(-1) - b
        return {"u": r[:, :2], "v": r[:, 2:]}

    z0 = {"u": torch.zeros(3, 2, dtype=f64), "v": torch.zeros(3, 3, dtype=f64)}
    sol = implicit.solve(implicit.ImplicitProblem(F, batched=True), z0, solver="chord", tol=1e-12)
    assert sol.converged and sol.stats.iterations == 1
    assert sol.stats.nfe == 2  # the start (with its graph, for the Jacobian) and the full step
    want = torch.linalg.solve(A, b)
    torch.testing.assert_close(torch.cat([sol.z["u"], sol.z["v"]], dim=1), want, rtol=1e-12, atol=1e-12)


def _mild(batch: int = 4, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(batch, n, n, dtype=f64, generator=g)
    W = 0.5 * W / torch.linalg.matrix_norm(W, ord=2)[:, None, None]
    return W, torch.randn(batch, n, dtype=f64, generator=g)


def _residual(W: torch.Tensor, c: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda z: z + 0.1 * z**3 - torch.tanh((W @ z.unsqueeze(-1)).squeeze(-1)) - c


def test_mildly_nonlinear_problem_against_scipy() -> None:
    W, c = _mild()
    F = _residual(W, c)
    z0 = torch.zeros(4, 6, dtype=f64)
    sol = implicit.solve(implicit.ImplicitProblem(F, batched=True), z0, solver="chord", tol=1e-13, max_iter=200)
    assert sol.converged
    refs = []
    for i in range(4):
        Wi, ci = W[i].numpy(), c[i].numpy()
        ref = scipy.optimize.root(lambda x, Wi=Wi, ci=ci: x + 0.1 * x**3 - np.tanh(Wi @ x) - ci, np.zeros(6), tol=1e-14)
        assert float(np.abs(ref.fun).max()) < 1e-13  # a root, whatever hybr says of its xtol
        refs.append(torch.from_numpy(ref.x))
    z_ref = torch.stack(refs)
    torch.testing.assert_close(sol.z, z_ref, rtol=1e-11, atol=1e-12)
    newton = implicit.solve(implicit.ImplicitProblem(F, batched=True), z0, solver="newton", tol=1e-13)
    assert newton.stats.iterations < sol.stats.iterations


def test_linear_rate_is_the_closed_form_one() -> None:
    # z³ + z = a per sample, from z0: the chord error obeys e ← (1 - J*/J₀) e + O(e²), with
    # J = 3z² + 1 at z0 and at the root, which Cardano's formula gives.
    a = torch.tensor([0.5, 2.0, 3.0, -1.0], dtype=f64)
    z0 = torch.tensor([0.3, 0.9, 1.0, -0.5], dtype=f64)
    sol = implicit.solve(
        implicit.ImplicitProblem(lambda z: z**3 + z - a, batched=True), z0, solver="chord", tol=1e-14, atol=0.0
    )
    q = torch.sqrt(a**2 / 4 + 1 / 27)
    root = torch.sign(a / 2 + q) * (a / 2 + q).abs() ** (1 / 3) + torch.sign(a / 2 - q) * (a / 2 - q).abs() ** (1 / 3)
    torch.testing.assert_close(sol.z, root, rtol=1e-14, atol=0)
    rate = (1 - (3 * root**2 + 1) / (3 * z0**2 + 1)).abs()
    history = sol.stats.history  # (checks, B)
    for i in range(4):
        h = history[:, i]
        window = (h[1:] < 1e-5 * h[0]) & (h[1:] > 1e-10 * h[0])  # asymptotic, before rounding
        ratios = (h[1:] / h[:-1])[window]
        assert len(ratios) >= 4
        torch.testing.assert_close(ratios, rate[i].expand(len(ratios)), rtol=1e-3, atol=0)


def test_refresh_every_step_is_newton() -> None:
    W, c = _mild()
    problem = implicit.ImplicitProblem(_residual(W, c), batched=True)
    z0 = torch.zeros(4, 6, dtype=f64)
    newton = implicit.solve(problem, z0, solver="newton", tol=1e-13)
    every = implicit.solve(problem, z0, solver="chord", solver_options={"refresh": 1}, tol=1e-13)
    assert every.stats.iterations == newton.stats.iterations and every.stats.nfe == newton.stats.nfe
    torch.testing.assert_close(every.stats.history, newton.stats.history, rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(every.z, newton.z, rtol=1e-13, atol=1e-14)
    never = implicit.solve(problem, z0, solver="chord", tol=1e-13)
    sometimes = implicit.solve(problem, z0, solver="chord", solver_options={"refresh": 3}, tol=1e-13)
    assert newton.stats.iterations < sometimes.stats.iterations < never.stats.iterations
    torch.testing.assert_close(sometimes.z, newton.z, rtol=1e-12, atol=1e-12)


def test_gradients_by_the_ift_against_a_dense_float64_reference() -> None:
    g = torch.Generator().manual_seed(2)
    params = [
        (0.4 * torch.randn(3, 3, dtype=f64, generator=g) / 3).requires_grad_(),
        (0.4 * torch.randn(2, 3, dtype=f64, generator=g) / 3).requires_grad_(),
        torch.randn(4, 3, dtype=f64, generator=g).requires_grad_(),
    ]

    def G(z: dict[str, torch.Tensor], p) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        A, B, u = p
        return {"x": torch.tanh(z["x"] @ A.T + u) - 0.1 * z["x"] ** 3, "y": torch.sin(z["x"] @ B.T) + 0.5 * z["y"]}

    def F(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # the root form: z - G(z) = 0
        out = G(z, params)
        return {k: z[k] - out[k] for k in z}

    def loss(z: dict[str, torch.Tensor]) -> torch.Tensor:
        return (z["x"] ** 2).sum() + (z["y"] * torch.arange(1.0, 3.0, dtype=f64)).sum()

    z0 = {"x": torch.zeros(4, 3, dtype=f64), "y": torch.zeros(4, 2, dtype=f64)}
    want = loss_gradient(G, loss, params, z0)
    for adjoint in ("exact", "gmres", "chord"):
        sol = implicit.solve(
            implicit.ImplicitProblem(F, batched=True),
            z0,
            solver="chord",
            adjoint=adjoint,
            adjoint_options={"tol": 1e-13},
            tol=1e-13,
            on_failure="raise",
        )
        got = torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss(sol.z), params)])
        assert relerr(got, want) < 1e-9, adjoint
        if adjoint == "chord":  # the adjoint equation is linear: one chord step
            assert sol.adjoint_stats is not None and sol.adjoint_stats.iterations == 1


def test_line_search_rescues_a_chord_step_that_overshoots() -> None:
    # arctan from z = 3: J₀ = 1/10 is ten times too flat near the root, so the full chord step
    # multiplies the error by -9 there; halving it to 1/8 gives a steady -1/4.
    z = implicit.root(torch.atan, torch.tensor([3.0], dtype=f64), solver="chord", tol=0.0, atol=1e-12, max_iter=100)
    torch.testing.assert_close(z, torch.zeros(1, dtype=f64), rtol=0, atol=1e-12)
    with pytest.warns(implicit.ConvergenceWarning):
        implicit.root(
            torch.atan,
            torch.tensor([3.0], dtype=f64),
            solver="chord",
            solver_options={"line_search": False},
            tol=0.0,
            atol=1e-10,
        )


def test_singular_start_takes_the_minimum_norm_step() -> None:
    # A consistent singular linear system: the pseudo-inverse's step reaches the nearest root at once.
    A = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=f64)
    b = torch.tensor([2.0, 4.0], dtype=f64)
    sol = implicit.solve(
        implicit.ImplicitProblem(lambda z: A @ z - b), torch.zeros(2, dtype=f64), solver="chord", tol=1e-12
    )
    assert sol.converged and sol.stats.iterations == 1
    torch.testing.assert_close(sol.z, torch.ones(2, dtype=f64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_refreshing_under_no_grad_and_inference_mode(context: str) -> None:
    W, c = _mild()
    problem = implicit.ImplicitProblem(_residual(W, c), batched=True)
    kwargs = {"solver": "chord", "solver_options": {"refresh": 2}, "tol": 1e-12, "on_failure": "raise"}
    expected = implicit.solve(problem, torch.zeros(4, 6, dtype=f64), **kwargs)
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        sol = implicit.solve(problem, torch.zeros(4, 6, dtype=f64), **kwargs)
    assert torch.equal(sol.z, expected.z.detach()) and sol.stats.nfe == expected.stats.nfe


def test_size_limit_points_to_newton_krylov() -> None:
    with pytest.raises(
        ValueError, match=r"the chord solver .* 4 x 10 x 10 = 400 entries \(max_size=100\).*newton_krylov"
    ):
        implicit.root(
            lambda z: z - 1,
            torch.zeros(4, 10, dtype=f64),
            batched=True,
            solver="chord",
            solver_options={"max_size": 100},
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"refresh": 0}, "refresh must be a positive int; got 0"),
        ({"refresh": 2.0}, r"refresh must be a positive int; got 2.0"),
        ({"refresh": True}, "refresh must be a positive int; got True"),
        ({"line_search": 1}, "line_search must be True or False; got 1"),
        ({"max_backtracks": -1}, "max_backtracks must be a non-negative int; got -1"),
        ({"max_size": 0}, "max_size must be a positive int; got 0"),
        ({"refesh": 2}, "did you mean 'refresh'"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        implicit.root(lambda z: z - 1, torch.zeros(2, dtype=f64), solver="chord", solver_options=options)


def test_registered() -> None:
    assert "chord" in implicit.available_solvers()
    Chord = implicit.get_solver("chord")
    assert issubclass(Chord, implicit.Solver) and Chord().refresh is None


def test_the_plugin_guide_shows_this_code() -> None:
    # docs/plugins.md presents the solver, with public imports, as its worked example.
    page = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    for fn in (chord.Chord.__post_init__, chord.Chord.solve, chord.Chord._refresh_due):
        assert textwrap.indent(textwrap.dedent(inspect.getsource(fn)), "    ") in page, fn.__name__
    assert inspect.getsource(chord._factorise) in page
    for line in inspect.getsource(chord).splitlines():
        if line.startswith("from ..") and "import" in line:
            names = line.split(" import ")[1].split(", ")
            assert all(name in page for name in names), line
