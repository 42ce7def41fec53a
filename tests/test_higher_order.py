"""Second derivatives through solutions: double backward against dense float64 references.

Hessian-vector products of a loss of the solution, with respect to the
parameters and the inputs the map closes over, are compared with fourth-order
central differences of an independent dense implicit-function-theorem
gradient (tests/dense_reference.py), and ``gradgradcheck`` checks the
derivative of the backward pass itself, for every adjoint that solves the
adjoint equation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_ADJOINTS
from coupled_problems import FORMS, State, loss, setup
from dense_reference import hessian_vector, loss_gradient, relerr
from problems import f64, two_variable_map

import implicit

TIGHT = {"tol": 1e-13, "max_iter": 500}
ADJOINT_TIGHT = {"tol": 1e-13, "max_iter": 500}


def library_hvp(
    form: str, batched: bool, adjoint: str, params: list[torch.Tensor], z0: State, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, implicit.Solution]:
    """Gradient and Hessian-vector product by double backward through ``implicit.solve``."""
    ps = [p.detach().clone().requires_grad_() for p in params]
    problem = FORMS[form][1](ps, batched)
    sol = implicit.solve(
        problem, z0, solver="fixed_point", adjoint=adjoint, adjoint_options=ADJOINT_TIGHT, **TIGHT
    )
    assert sol.converged
    grads = torch.autograd.grad(loss(sol.z), ps, create_graph=True)
    g = torch.cat([gi.reshape(-1) for gi in grads])
    hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g @ v, ps)])
    return g.detach(), hv, sol


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("form", list(FORMS))
def test_hessian_vector_product_against_dense_reference(form: str, batched: bool, adjoint: str) -> None:
    params, z0 = setup(batched)
    n_theta = sum(p.numel() for p in params)
    v = torch.randn(n_theta, dtype=f64, generator=torch.Generator().manual_seed(3))
    g, hv, sol = library_hvp(form, batched, adjoint, params, z0, v)
    G = FORMS[form][0]
    g_ref = loss_gradient(G, loss, params, z0)
    hv_ref = hessian_vector(G, loss, params, z0, v)
    assert relerr(g, g_ref) < 1e-9
    assert relerr(hv, hv_ref) < 1e-6
    # The second backward solved an adjoint system of its own, and it converged.
    assert sol.adjoint_stats is not None and sol.adjoint_stats.all_converged


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
def test_hessian_wrt_input_only(adjoint: str) -> None:
    """The curvature in the closed-over input ``u`` alone (parameters held fixed), column by column."""
    params, z0 = setup(batched=True)
    n_before = sum(p.numel() for p in params[:-1])
    u = params[-1].detach().clone().requires_grad_()
    fixed = [p.detach() for p in params[:-1]]
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, [*fixed, u]), batched=True)
    sol = implicit.solve(problem, z0, solver="fixed_point", adjoint=adjoint, adjoint_options=ADJOINT_TIGHT, **TIGHT)
    (g,) = torch.autograd.grad(loss(sol.z), u, create_graph=True)
    picked = (0, 5, 11)
    cols = {}
    for i in picked:
        e = torch.zeros(u.numel(), dtype=f64)
        e[i] = 1.0
        (col,) = torch.autograd.grad(g.reshape(-1) @ e, u, retain_graph=True)
        cols[i] = col.reshape(-1)
        # Reference: finite differences of the dense gradient along the same unit vector of u.
        e_all = torch.cat([torch.zeros(n_before, dtype=f64), e])
        want = hessian_vector(two_variable_map, loss, params, z0, e_all)[n_before:]
        assert relerr(cols[i], want) < 1e-6
    # A Hessian is symmetric, though its two backward passes solve transposed systems.
    for i in picked:
        for j in picked:
            assert abs(float(cols[i][j] - cols[j][i])) < 1e-10 * float(cols[i].abs().max())


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("form", list(FORMS))
def test_gradgradcheck_small_problem(form: str, adjoint: str) -> None:
    g = torch.Generator().manual_seed(5)
    A = (0.3 * torch.randn(2, 2, dtype=f64, generator=g)).requires_grad_()
    Bm = 0.3 * torch.randn(2, 3, dtype=f64, generator=g)
    C = 0.3 * torch.randn(3, 2, dtype=f64, generator=g)
    D = 0.3 * torch.randn(3, 3, dtype=f64, generator=g)
    bx, by = torch.randn(2, dtype=f64, generator=g), torch.randn(3, dtype=f64, generator=g)
    u = torch.randn(2, dtype=f64, generator=g).requires_grad_()
    z0 = {"x": torch.zeros(2, dtype=f64), "y": torch.zeros(3, dtype=f64)}

    def fn(A: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        problem = FORMS[form][1]([A, Bm, C, D, bx, by, u], False)
        z = implicit.solve(
            problem, z0, solver="fixed_point", adjoint=adjoint, tol=1e-14, max_iter=1000,
            adjoint_options={"tol": 1e-14, "max_iter": 1000},
        ).z
        return z["x"], z["y"]

    assert torch.autograd.gradcheck(fn, (A, u), atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (A, u), atol=1e-7, rtol=1e-6)


def test_second_derivative_of_scalar_closed_form() -> None:
    """``z* = θ^{1/3}`` as the root of ``z³ - θ``: first and second derivatives in closed form."""
    theta = torch.tensor(8.0, dtype=f64, requires_grad=True)
    z = implicit.root(
        lambda z: z**3 - theta, torch.tensor(1.5, dtype=f64), solver="fixed_point",
        solver_options={"damping": 0.1}, adjoint="exact", tol=1e-14, max_iter=2000,
    )
    (d1,) = torch.autograd.grad(z, theta, create_graph=True)
    (d2,) = torch.autograd.grad(d1, theta)
    assert abs(float(z.detach()) - 2.0) < 1e-13
    assert abs(float(d1.detach()) - (1 / 3) * 8.0 ** (-2 / 3)) < 1e-13
    assert abs(float(d2) - (-2 / 9) * 8.0 ** (-5 / 3)) < 1e-12


def test_a_hand_written_hook_gets_second_derivatives_wrong() -> None:
    """The question's backward hook differentiates once only: its Hessian-vector product is wrong.

    Both are compared with central differences of the exact first-order
    gradient; the hook runs the question's loop (products with ``Jᵀ`` from a
    graph built without ``create_graph``), so the dependence of the adjoint on
    the parameters is lost, while implicit's double backward keeps it.
    """
    gen = torch.Generator().manual_seed(0)
    w0 = 0.3 * torch.randn(4, 4, dtype=f64, generator=gen)
    x = torch.randn(4, dtype=f64, generator=gen)
    direction = torch.randn(4, 4, dtype=f64, generator=gen)

    def f(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ z + x)

    def with_hook(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = torch.zeros(4, dtype=f64)
            for _ in range(300):
                z = f(z, w)
        z = f(z, w)
        z0 = z.detach().requires_grad_()
        f0 = f(z0, w)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            g = grad
            for _ in range(300):
                g = torch.autograd.grad(f0, z0, g, retain_graph=True)[0] + grad
            return g

        z.register_hook(hook)
        return z

    def with_implicit(w: torch.Tensor) -> torch.Tensor:
        return implicit.fixed_point(lambda z: f(z, w), torch.zeros(4, dtype=f64), tol=1e-14, max_iter=500,
                                    adjoint_options={"tol": 1e-14})

    def gradient(method, w: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(method(w).pow(3).sum(), w, create_graph=create_graph)
        return w, g

    def hvp(method) -> torch.Tensor:
        w, g = gradient(method, w0, True)
        (h,) = torch.autograd.grad((g * direction).sum(), w)
        return h

    eps = 1e-5
    plus = gradient(with_implicit, w0 + eps * direction, False)[1]
    minus = gradient(with_implicit, w0 - eps * direction, False)[1]
    reference = (plus - minus) / (2 * eps)
    assert relerr(hvp(with_implicit), reference) < 1e-6
    assert relerr(hvp(with_hook), reference) > 0.1
