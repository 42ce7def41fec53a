"""implicit.projections against brute-force references, idempotence and finite-difference gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize

from implicit import projections

f64 = torch.float64


def simplex_reference(z: np.ndarray, total: float) -> np.ndarray:
    """argmin ½‖x − z‖² over {x ≥ 0, Σx = total}, by SLSQP on the QP."""
    n = len(z)
    res = minimize(
        lambda x: 0.5 * np.sum((x - z) ** 2),
        np.full(n, total / n),
        jac=lambda x: x - z,
        bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - total, "jac": lambda x: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@given(st.integers(1, 8), st.integers(1, 3), st.floats(0.1, 5.0), st.integers(0, 10_000))
def test_simplex_matches_qp_and_kkt(n: int, batch: int, total: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(batch, n, dtype=f64, generator=g)
    x = projections.simplex(z, total=total)
    for b in range(batch):
        ref = simplex_reference(z[b].numpy(), total)
        np.testing.assert_allclose(x[b].numpy(), ref, atol=1e-6)
    # KKT: x = max(z − τ, 0) for one τ per row, Σx = total, x ≥ 0.
    assert torch.allclose(x.sum(-1), torch.full((batch,), total, dtype=f64), atol=1e-12)
    assert bool((x >= 0).all())
    support = x > 0
    tau = ((z - x) * support).sum(-1) / support.sum(-1)
    assert torch.allclose(x, (z - tau[:, None]).clamp(min=0), atol=1e-12)
    assert torch.allclose(projections.simplex(x, total=total), x, atol=1e-12)


@given(st.integers(1, 6), st.floats(0.2, 3.0), st.integers(0, 10_000))
def test_l2_ball_matches_constrained_minimisation(n: int, radius: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(3, n, dtype=f64, generator=g)
    x = projections.l2_ball(z, radius=radius)
    for b in range(3):
        zb = z[b].numpy()
        res = minimize(
            lambda v, zb=zb: 0.5 * np.sum((v - zb) ** 2), np.zeros(n), jac=lambda v, zb=zb: v - zb, method="SLSQP",
            constraints=[{"type": "ineq", "fun": lambda v: radius**2 - v @ v, "jac": lambda v: -2 * v}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        np.testing.assert_allclose(x[b].numpy(), res.x, atol=1e-6)
    assert torch.allclose(projections.l2_ball(x, radius=radius), x, atol=1e-14)


def test_box_and_nonnegative_with_tensor_and_dict_bounds() -> None:
    z = {"a": torch.tensor([[-2.0, 0.5, 3.0]], dtype=f64), "b": torch.tensor([1.0, -1.0], dtype=f64)}
    lower = {"a": torch.tensor([0.0, 1.0, 0.0], dtype=f64), "b": -0.5}
    upper = {"a": 2.0, "b": torch.tensor([0.5, 0.5], dtype=f64)}
    x = projections.box(z, lower, upper)
    assert torch.equal(x["a"], torch.tensor([[0.0, 1.0, 2.0]], dtype=f64))
    assert torch.equal(x["b"], torch.tensor([0.5, -0.5], dtype=f64))
    assert torch.equal(projections.box(x, lower, upper)["a"], x["a"])
    t = projections.nonnegative((torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -4.0])))
    assert isinstance(t, tuple) and torch.equal(t[0], torch.tensor([0.0, 2.0])) and torch.equal(t[1], torch.tensor([3.0, 0.0]))
    lst = projections.box([torch.tensor([5.0])], upper=[1.0])
    assert isinstance(lst, list) and torch.equal(lst[0], torch.tensor([1.0]))


def test_tuple_and_dict_structures_for_last_dimension_sets() -> None:
    z = {"p": torch.tensor([[0.5, 1.0, -1.0]]), "q": torch.tensor([3.0, 4.0])}
    x = projections.simplex(z, total={"p": 1.0, "q": 7.0})
    assert torch.allclose(x["p"], torch.tensor([[0.25, 0.75, 0.0]])) and torch.allclose(x["q"], torch.tensor([3.0, 4.0]))
    y = projections.l2_ball((z["q"],), radius=(1.0,))
    assert torch.allclose(y[0], torch.tensor([0.6, 0.8]))
    # A tensor total per row.
    rows = projections.simplex(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=f64), total=torch.tensor([[2.0], [4.0]], dtype=f64))
    assert torch.allclose(rows, torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=f64))


@pytest.mark.parametrize(
    ("name", "fn", "params"),
    [
        ("box", lambda z, lo, hi: projections.box(z, lo, hi), "bounds"),
        ("simplex", lambda z, s: projections.simplex(z, total=s), "total"),
        ("l2_ball", lambda z, r: projections.l2_ball(z, radius=r), "radius"),
    ],
)
def test_gradients_match_finite_differences(name: str, fn, params: str) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, dtype=f64, generator=g).requires_grad_()
    if params == "bounds":
        args = (torch.full((5,), -0.5, dtype=f64, requires_grad=True), torch.full((4, 1), 0.7, dtype=f64, requires_grad=True))
    elif params == "total":
        args = (torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=f64, requires_grad=True),)
    else:
        args = (torch.tensor([[0.5], [5.0], [1.0], [2.0]], dtype=f64, requires_grad=True),)
    # gradcheck perturbs by 1e-6: the random point is at least that far from every kink.
    assert torch.autograd.gradcheck(fn, (z, *args), eps=1e-6, atol=1e-8)


def test_simplex_jacobian_is_the_active_set_one() -> None:
    z = torch.tensor([0.9, 0.5, -0.3, 0.2], dtype=f64)
    jac = torch.autograd.functional.jacobian(projections.simplex, z)
    x = projections.simplex(z)
    support = (x > 0).to(f64)
    k = support.sum()
    ref = torch.diag(support) - torch.outer(support, support) / k
    assert torch.allclose(jac, ref, atol=1e-14)


def test_l2_ball_gradient_at_zero_is_identity() -> None:
    z = torch.zeros(3, dtype=f64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(projections.l2_ball, z)
    assert torch.equal(jac, torch.eye(3, dtype=f64))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: projections.box(torch.zeros(3), 1.0, 0.0), ValueError, "lower must not exceed upper"),
        (lambda: projections.box(torch.zeros(3), torch.zeros(4)), ValueError, r"lower has shape \(4,\)"),
        (lambda: projections.box({"a": torch.zeros(2)}, {"b": 0.0}), ValueError, "expected the keys of z"),
        (lambda: projections.box((torch.zeros(2),), (0.0, 1.0)), ValueError, "expected one per variable"),
        (lambda: projections.box(torch.zeros(2), {"a": 0.0}), TypeError, "z is a single tensor"),
        (lambda: projections.box(torch.zeros(2), "0"), TypeError, "lower must be a number"),
        (lambda: projections.simplex(torch.zeros(3), total=0.0), ValueError, "total must be a positive number"),
        (lambda: projections.simplex(torch.tensor(1.0)), ValueError, "over the last dimension"),
        (lambda: projections.l2_ball({"h": torch.zeros(2)}, radius={"h": -1.0}), ValueError, r"radius.*z\['h'\]"),
        (lambda: projections.l2_ball([1.0, 2.0]), TypeError, r"z\[0\] must be a tensor"),
        (lambda: projections.nonnegative(3.0), TypeError, "z must be a tensor"),
    ],
)
def test_bad_input(call, error, message) -> None:  # noqa: ANN001
    with pytest.raises(error, match=message):
        call()
