"""Forward-mode derivatives through solutions: ``torch.func.jvp`` and ``torch.autograd.forward_ad``.

Tangents ``(dz*/dθ) v`` are compared with the dense implicit-function-theorem
Jacobian of tests/dense_reference.py, and with reverse mode through the
dot-product identity ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩``. With an iterative adjoint the
tangent solve is matrix-free: it evaluates the problem far fewer times than
the size of the state.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import EXACT_ADJOINTS
from coupled_problems import FORMS, setup, split
from dense_reference import newton, relerr, solution_jacobian
from hypothesis import given
from hypothesis import strategies as st
from problems import contraction, f64
from reference import flat

import implicit

TIGHT = {"tol": 1e-13, "max_iter": 500}
ADJOINT_TIGHT = {"tol": 1e-13, "max_iter": 500}
MATRIX_FREE = [a for a in ("neumann", "gmres") if a in EXACT_ADJOINTS]


def solve_flat(form: str, batched: bool, adjoint: str, params: list[torch.Tensor], z0: dict) -> torch.Tensor:
    problem = FORMS[form][1](params, batched)
    sol = implicit.solve(problem, z0, solver="fixed_point", adjoint=adjoint, adjoint_options=ADJOINT_TIGHT, **TIGHT)
    return flat(sol.z, list(z0))


def reference(form: str, params: list[torch.Tensor], z0: dict) -> torch.Tensor:
    G = FORMS[form][0]
    return solution_jacobian(G, params, newton(G, params, z0))


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("form", list(FORMS))
def test_func_jvp_against_dense_reference(form: str, batched: bool, adjoint: str) -> None:
    params, z0 = setup(batched)
    theta = torch.cat([p.reshape(-1) for p in params])
    v = torch.randn(theta.numel(), dtype=f64, generator=torch.Generator().manual_seed(7))
    z, tangent = torch.func.jvp(lambda t: solve_flat(form, batched, adjoint, split(t, params), z0), (theta,), (v,))
    jac = reference(form, params, z0)
    assert relerr(tangent, jac @ v) < 1e-6
    # The primal is the solution itself, not something re-derived from it.
    assert relerr(z, flat(newton(FORMS[form][0], params, z0), list(z0))) < 1e-12


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("form", list(FORMS))
def test_forward_ad_against_dense_reference_and_reverse_mode(form: str, adjoint: str) -> None:
    params, z0 = setup(batched=True)
    theta = torch.cat([p.reshape(-1) for p in params])
    g = torch.Generator().manual_seed(11)
    v = torch.randn(theta.numel(), dtype=f64, generator=g)
    u = torch.randn(32, dtype=f64, generator=g)
    with fwAD.dual_level():
        dual = fwAD.make_dual(theta, v)
        z = solve_flat(form, True, adjoint, split(dual, params), z0)
        tangent = fwAD.unpack_dual(z).tangent
    assert tangent is not None
    jac = reference(form, params, z0)
    assert relerr(tangent, jac @ v) < 1e-6
    # ⟨u, J v⟩ = ⟨Jᵀ u, v⟩, with Jᵀ u from the library's reverse mode.
    leaf = theta.clone().requires_grad_()
    (jtu,) = torch.autograd.grad(solve_flat(form, True, adjoint, split(leaf, params), z0), leaf, u)
    assert relerr(jtu, jac.T @ u) < 1e-6
    lhs, rhs = float(u @ tangent), float(jtu @ v)
    assert abs(lhs - rhs) < 1e-9 * (abs(lhs) + abs(rhs))


@pytest.mark.parametrize("adjoint", MATRIX_FREE)
def test_tangent_solve_is_matrix_free(adjoint: str) -> None:
    n = 240
    g = torch.Generator().manual_seed(2)
    W = contraction(n, n, 0.5, g)
    b = torch.randn(n, dtype=f64, generator=g)
    v = torch.randn(n, dtype=f64, generator=g)
    z0 = {"h": torch.zeros(80, dtype=f64), "c": torch.zeros(n - 80, dtype=f64)}
    calls = [0]

    def solve(b_: torch.Tensor, adjoint: str) -> torch.Tensor:
        def f(z: dict) -> dict:
            calls[0] += 1
            h = torch.tanh(torch.cat([z["h"], z["c"]]) @ W.T + b_)
            return {"h": h[:80], "c": h[80:]}

        sol = implicit.solve(
            implicit.ImplicitProblem.fixed_point(f), z0, solver="fixed_point", adjoint=adjoint,
            adjoint_options={"tol": 1e-12, "max_iter": 500}, tol=1e-12, max_iter=500,
        )
        return torch.cat([sol.z["h"], sol.z["c"]])

    z, want = torch.func.jvp(lambda b_: solve(b_, "exact"), (b,), (v,))
    exact_calls, calls[0] = calls[0], 0
    with fwAD.dual_level():
        got = fwAD.unpack_dual(solve(fwAD.make_dual(b, v), adjoint)).tangent
    # Dense reference: dz/db = (I - D W)^{-1} D with D = diag(1 - z²).
    d = 1 - z**2
    ref = torch.linalg.solve(torch.eye(n, dtype=f64) - d[:, None] * W, d * v)
    assert relerr(want, ref) < 1e-9
    assert relerr(got, ref) < 1e-9
    # The exact adjoint materialised J (n products); the iterative one used far fewer.
    assert exact_calls > n
    assert calls[0] < n // 2


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.one_of(st.none(), st.integers(1, 3)),
    adjoint=st.sampled_from(["exact", *MATRIX_FREE]),
)
def test_property_dot_product_identity(sizes: list[int], batch: int | None, adjoint: str) -> None:
    """``⟨u, (dz*/dθ) v⟩ = ⟨(dz*/dθ)ᵀ u, v⟩`` for random variable counts, sizes and batches."""
    g = torch.Generator().manual_seed(sum(sizes) * 7 + (batch or 0))
    n = sum(sizes)
    W = contraction(n, n, 0.6, g)
    lead = () if batch is None else (batch,)
    x = torch.randn(*lead, n, dtype=f64, generator=g)
    keys = [f"v{i}" for i in range(len(sizes))]
    z0 = {k: torch.zeros(*lead, s, dtype=f64) for k, s in zip(keys, sizes)}

    def solve(W_: torch.Tensor, x_: torch.Tensor) -> torch.Tensor:
        def f(z: dict) -> dict:
            h = torch.tanh(torch.cat([z[k] for k in keys], dim=-1) @ W_.T + x_)
            return dict(zip(keys, h.split(sizes, dim=-1)))

        sol = implicit.solve(
            implicit.ImplicitProblem.fixed_point(f, batched=batch is not None), z0, solver="fixed_point",
            adjoint=adjoint, adjoint_options={"tol": 1e-13, "max_iter": 500}, tol=1e-13, max_iter=500,
        )
        return torch.cat([sol.z[k].reshape(-1) for k in keys])

    vW, vx = torch.randn(n, n, dtype=f64, generator=g), torch.randn(*lead, n, dtype=f64, generator=g)
    _, tangent = torch.func.jvp(solve, (W, x), (vW, vx))
    u = torch.randn_like(tangent)
    Wl, xl = W.clone().requires_grad_(), x.clone().requires_grad_()
    gW, gx = torch.autograd.grad(solve(Wl, xl), (Wl, xl), u)
    lhs = float(u @ tangent)
    rhs = float((gW * vW).sum() + (gx * vx).sum())
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + abs(rhs)) + 1e-14
