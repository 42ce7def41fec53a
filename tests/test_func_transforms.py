"""``torch.func`` transforms over functions that call ``implicit.solve``.

``grad``, ``vjp``, ``jvp``, ``jacrev`` and ``jacfwd``, and the second-order
compositions ``jacrev∘jacrev``, ``jacrev∘jacfwd`` and ``jacrev∘jvp``, must
agree with the dense references of tests/dense_reference.py. ``vmap`` over
the inputs of a solve, and forward mode over another transform, are refused
with an error that says what to use instead; they never return an answer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_ADJOINTS, SOLVERS
from coupled_problems import FORMS, loss, setup, split
from dense_reference import hessian_vector, loss_gradient, newton, relerr, solution_jacobian
from problems import f64
from reference import flat

import implicit

SETTINGS = {"solver": "fixed_point", "tol": 1e-13, "max_iter": 500, "adjoint_options": {"tol": 1e-13, "max_iter": 500}}
SECOND_ORDER = [a for a in ("exact", "neumann", "gmres") if a in EXACT_ADJOINTS]


def solution_of(form: str, batched: bool, adjoint: str, params: list[torch.Tensor], z0: dict):
    """``θ ↦ z*(θ)`` flattened, ``θ`` all parameters concatenated."""

    def fn(theta: torch.Tensor) -> torch.Tensor:
        problem = FORMS[form][1](split(theta, params), batched)
        return flat(implicit.solve(problem, z0, adjoint=adjoint, **SETTINGS).z, list(z0))

    return fn


def loss_of(form: str, batched: bool, adjoint: str, params: list[torch.Tensor], z0: dict):
    def fn(theta: torch.Tensor) -> torch.Tensor:
        problem = FORMS[form][1](split(theta, params), batched)
        return loss(implicit.solve(problem, z0, adjoint=adjoint, **SETTINGS).z)

    return fn


def theta_of(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("form", list(FORMS))
def test_grad_and_vjp(form: str, adjoint: str) -> None:
    params, z0 = setup(batched=True)
    theta = theta_of(params)
    want = loss_gradient(FORMS[form][0], loss, params, z0)
    got = torch.func.grad(loss_of(form, True, adjoint, params, z0))(theta)
    assert relerr(got, want) < 1e-9
    value, vjp_fn = torch.func.vjp(loss_of(form, True, adjoint, params, z0), theta)
    (got_vjp,) = vjp_fn(torch.tensor(2.0, dtype=f64))
    assert relerr(got_vjp, 2 * want) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_grad_and_jvp_with_every_solver(solver: str) -> None:
    params, z0 = setup(batched=True)
    theta = theta_of(params)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        problem = FORMS["fixed_point"][1](split(theta, params), True)
        sol = implicit.solve(problem, z0, solver=solver, adjoint="exact", tol=1e-12, max_iter=500)
        return loss(sol.z)

    want = loss_gradient(FORMS["fixed_point"][0], loss, params, z0)
    assert relerr(torch.func.grad(fn)(theta), want) < 1e-8
    v = torch.randn(theta.numel(), dtype=f64, generator=torch.Generator().manual_seed(1))
    assert abs(float(torch.func.jvp(fn, (theta,), (v,))[1] - want @ v)) < 1e-8 * float(want.norm() * v.norm())


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_jacrev_and_jacfwd(batched: bool, adjoint: str) -> None:
    params, z0 = setup(batched)
    theta = theta_of(params)
    G = FORMS["root"][0]
    want = solution_jacobian(G, params, newton(G, params, z0))
    fn = solution_of("root", batched, adjoint, params, z0)
    assert relerr(torch.func.jacrev(fn)(theta), want) < 1e-9
    assert relerr(torch.func.jacfwd(fn)(theta), want) < 1e-9


def _hessian_reference(form: str, params: list[torch.Tensor], z0: dict, index: list[int]) -> torch.Tensor:
    """Rows ``index`` of the loss Hessian, by differences of the dense gradient."""
    n = sum(p.numel() for p in params)
    cols = []
    for i in index:
        e = torch.zeros(n, dtype=f64)
        e[i] = 1.0
        cols.append(hessian_vector(FORMS[form][0], loss, params, z0, e))
    return torch.stack(cols)


@pytest.mark.parametrize("adjoint", SECOND_ORDER)
@pytest.mark.parametrize("form", list(FORMS))
def test_second_order_compositions(form: str, adjoint: str) -> None:
    """The Hessian in the input ``u`` (the last parameter) by three compositions of transforms."""
    params, z0 = setup(batched=False)
    n = sum(p.numel() for p in params)
    index = list(range(n - 3, n))
    want = _hessian_reference(form, params, z0, index)[:, index]
    head = theta_of(params[:-1])

    def loss_u(u: torch.Tensor) -> torch.Tensor:
        return loss_of(form, False, adjoint, params, z0)(torch.cat([head, u]))

    u = params[-1].clone()
    assert relerr(torch.func.jacrev(torch.func.jacrev(loss_u))(u), want) < 1e-6
    assert relerr(torch.func.jacrev(torch.func.jacfwd(loss_u))(u), want) < 1e-6

    # Reverse over forward: d/du of the directional derivative along v.
    v = torch.tensor([0.3, -1.0, 0.5], dtype=f64)
    got = torch.func.jacrev(lambda u: torch.func.jvp(loss_u, (u,), (v,))[1])(u)
    assert relerr(got, want @ v) < 1e-6


def test_reverse_over_forward_in_plain_autograd() -> None:
    """``torch.autograd.forward_ad`` tangents are differentiable by ``torch.autograd.grad``."""
    import torch.autograd.forward_ad as fwAD

    params, z0 = setup(batched=False)
    n = sum(p.numel() for p in params)
    index = list(range(n - 3, n))
    want = _hessian_reference("root", params, z0, index)[:, index]
    head = theta_of(params[:-1])
    u = params[-1].clone().requires_grad_()
    v = torch.tensor([0.3, -1.0, 0.5], dtype=f64)
    with fwAD.dual_level():
        value = loss_of("root", False, "neumann", params, z0)(torch.cat([head, fwAD.make_dual(u, v)]))
        tangent = fwAD.unpack_dual(value).tangent
    (got,) = torch.autograd.grad(tangent, u)
    assert relerr(got, want @ v) < 1e-6


def test_map_that_uses_torch_func_itself() -> None:
    """A map may call torch.func.grad inside; neither the solve nor the transforms around it may break that."""
    g = torch.Generator().manual_seed(6)
    W = 0.2 * torch.randn(3, 3, dtype=f64, generator=g)

    def solve(W_: torch.Tensor) -> torch.Tensor:
        def f(z: torch.Tensor) -> torch.Tensor:  # 0.01 ∇‖z‖² = 0.02 z
            return torch.tanh(W_ @ z) + 0.01 * torch.func.grad(lambda x: (x**2).sum())(z) + 1

        return implicit.fixed_point(f, torch.zeros(3, dtype=f64), solver="fixed_point", adjoint="neumann",
                                    tol=1e-13, max_iter=500, adjoint_options={"tol": 1e-13}).sum()

    def G(z: dict, p: list[torch.Tensor]) -> dict:
        return {"z": torch.tanh(p[0] @ z["z"]) + 0.02 * z["z"] + 1}

    want = loss_gradient(G, lambda z: z["z"].sum(), [W], {"z": torch.zeros(3, dtype=f64)})
    W_leaf = W.clone().requires_grad_()
    (got,) = torch.autograd.grad(solve(W_leaf), W_leaf)
    assert relerr(got.reshape(-1), want) < 1e-9
    assert relerr(torch.func.grad(solve)(W).reshape(-1), want) < 1e-9
    v = torch.randn(3, 3, dtype=f64, generator=g)
    assert abs(float(torch.func.jvp(solve, (W,), (v,))[1] - want @ v.reshape(-1))) < 1e-9 * float(want.norm() * v.norm())


# Refusals: what cannot be supported must say so, and say what to use instead.


def _map(W: torch.Tensor, x: torch.Tensor):
    return lambda z: torch.tanh(z @ W.T + x)


def test_vmap_over_closed_over_input_is_refused() -> None:
    W = 0.4 * torch.eye(3, dtype=f64)
    xs = torch.randn(5, 3, dtype=f64)

    def one(x: torch.Tensor) -> torch.Tensor:
        return implicit.fixed_point(_map(W, x), torch.zeros(3, dtype=f64), solver="fixed_point", tol=1e-12)

    with pytest.raises(NotImplementedError, match=r"torch\.func\.vmap.*batched=True"):
        torch.func.vmap(one)(xs)
    with pytest.raises(NotImplementedError, match="batched=True"):
        torch.func.vmap(torch.func.grad(lambda x: one(x).sum()))(xs)  # per-sample gradients


def test_vmap_over_initial_state_is_refused() -> None:
    W = 0.4 * torch.eye(3, dtype=f64)
    x = torch.randn(3, dtype=f64)

    def one(z0: torch.Tensor) -> torch.Tensor:
        return implicit.fixed_point(_map(W, x), {"z": z0}, solver="fixed_point", tol=1e-12)["z"]

    with pytest.raises(NotImplementedError, match=r"z0 \(z\['z'\]\).*batched=True"):
        torch.func.vmap(one)(torch.zeros(4, 3, dtype=f64))


def test_the_suggested_batched_solve_gives_per_sample_results_and_gradients() -> None:
    """What the vmap refusal recommends: ``batched=True`` equals one solve per sample."""
    g = torch.Generator().manual_seed(8)
    W = 0.5 * torch.randn(3, 3, dtype=f64, generator=g) / 3**0.5
    xs = torch.randn(5, 3, dtype=f64, generator=g).requires_grad_()
    batched = implicit.fixed_point(_map(W, xs), torch.zeros(5, 3, dtype=f64), batched=True, solver="fixed_point",
                                   adjoint="exact", tol=1e-13, max_iter=500)
    (g_batched,) = torch.autograd.grad((batched**2).sum(), xs)
    for i in range(5):
        xi = xs[i].detach().clone().requires_grad_()
        zi = implicit.fixed_point(_map(W, xi), torch.zeros(3, dtype=f64), solver="fixed_point", adjoint="exact",
                                  tol=1e-13, max_iter=500)
        (gi,) = torch.autograd.grad((zi**2).sum(), xi)
        assert relerr(batched[i].detach(), zi.detach()) < 1e-12
        assert relerr(g_batched[i], gi) < 1e-10


def test_vmap_over_a_function_of_a_solution_is_fine() -> None:
    W = 0.4 * torch.eye(3, dtype=f64)
    z = implicit.fixed_point(_map(W, torch.ones(3, dtype=f64)), torch.zeros(3, dtype=f64), solver="fixed_point",
                             tol=1e-13, max_iter=500)
    vs = torch.randn(4, 3, dtype=f64)
    assert torch.allclose(torch.func.vmap(lambda v: z @ v)(vs), vs @ z)


@pytest.mark.parametrize(
    "compose",
    [
        pytest.param(lambda f: torch.func.hessian(f), id="hessian"),
        pytest.param(lambda f: torch.func.jacfwd(torch.func.jacfwd(f)), id="jacfwd-jacfwd"),
        pytest.param(lambda f: torch.func.jacfwd(torch.func.grad(f)), id="jacfwd-grad"),
    ],
)
def test_forward_mode_over_another_transform_is_refused(compose) -> None:
    params, z0 = setup(batched=False)
    head = theta_of(params[:-1])

    def loss_u(u: torch.Tensor) -> torch.Tensor:
        return loss_of("fixed_point", False, "exact", params, z0)(torch.cat([head, u]))

    with pytest.raises(NotImplementedError, match=r"jacrev\(torch\.func\.jacrev"):
        compose(loss_u)(params[-1].clone())
