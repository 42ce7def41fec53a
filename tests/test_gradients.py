"""Gradients through solutions against dense float64 implicit-function-theorem references."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_ADJOINTS, SOLVERS
from hypothesis import given
from hypothesis import strategies as st
from problems import f64, two_variable_map, two_variable_params, two_variable_z0
from reference import ift_grads, picard

import implicit

TIGHT = {"tol": 1e-12, "max_iter": 500}


def _loss(z: dict[str, torch.Tensor]) -> torch.Tensor:
    return (z["x"] ** 2).sum() + (z["y"].sin() * torch.arange(1.0, 6.0, dtype=f64)).sum()


def _reference(params: list[torch.Tensor]) -> list[torch.Tensor]:
    z_star = picard(lambda z: two_variable_map(z, params), two_variable_z0())
    zs = {k: v.clone().requires_grad_() for k, v in z_star.items()}
    dz = torch.autograd.grad(_loss(zs), list(zs.values()))
    return ift_grads(two_variable_map, z_star, params, dict(zip(zs, dz)))


def _relerr(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g - w).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    return num / sum(float(w.norm() ** 2) for w in want) ** 0.5


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_variable_every_solver_exact_adjoint(solver: str) -> None:
    params = [p.requires_grad_() for p in two_variable_params()]
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)
    sol = implicit.solve(problem, two_variable_z0(), solver=solver, adjoint="exact", **TIGHT)
    assert sol.converged
    grads = torch.autograd.grad(_loss(sol.z), params)
    assert _relerr(list(grads), _reference(params)) < 1e-8


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
def test_two_variable_every_adjoint(adjoint: str) -> None:
    params = [p.requires_grad_() for p in two_variable_params()]
    problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)
    sol = implicit.solve(
        problem, two_variable_z0(), solver="fixed_point", adjoint=adjoint, adjoint_options={"tol": 1e-12}, **TIGHT
    )
    assert sol.adjoint_stats is None
    grads = torch.autograd.grad(_loss(sol.z), params)
    assert sol.adjoint_stats is not None and sol.adjoint_stats.all_converged
    assert sol.adjoint_stats.residual.shape == (4,)
    assert _relerr(list(grads), _reference(params)) < 1e-8


def test_jfb_is_the_jacobian_free_gradient() -> None:
    params = [p.requires_grad_() for p in two_variable_params()]
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True),
        two_variable_z0(),
        solver="fixed_point",
        adjoint="jfb",
        **TIGHT,
    )
    assert implicit.get_adjoint("jfb").approximate
    grads = torch.autograd.grad(_loss(sol.z), params)
    # Reference: gᵀ ∂f/∂θ at z*, with the state held constant.
    z_star = {k: v.detach().requires_grad_() for k, v in sol.z.items()}
    dz = torch.autograd.grad(_loss(z_star), list(z_star.values()))
    out = two_variable_map({k: v.detach() for k, v in z_star.items()}, params)
    want = torch.autograd.grad(list(out.values()), params, dz)
    assert _relerr(list(grads), list(want)) < 1e-12
    assert _relerr(list(grads), _reference(params)) > 1e-3  # and it is not the implicit gradient


def test_closed_over_module_parameters_receive_grad() -> None:
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    z = implicit.fixed_point(
        lambda z: torch.tanh(lin(z) + x), torch.zeros(3, 4, dtype=f64), batched=True,
        solver="fixed_point", adjoint="exact", **TIGHT,
    )
    z.pow(2).sum().backward()
    # Reference by hand: per sample, (I - J)ᵀ u = 2 z, J = diag(1 - z²) W.
    W = lin.weight.detach()
    zs = z.detach()
    gx, gw = torch.zeros_like(x), torch.zeros_like(W)
    for b in range(3):
        d = 1 - zs[b] ** 2
        J = d[:, None] * W
        u = torch.linalg.solve((torch.eye(4, dtype=f64) - J).T, 2 * zs[b])
        gx[b] = d * u
        gw += torch.outer(d * u, zs[b])
    assert torch.allclose(x.grad, gx, rtol=1e-9, atol=1e-12)
    assert torch.allclose(lin.weight.grad, gw, rtol=1e-9, atol=1e-12)


def test_three_variables_unbatched() -> None:
    g = torch.Generator().manual_seed(3)
    n = 1 + 3 + 8
    W = torch.randn(n, n, dtype=f64, generator=g)
    W = (0.5 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()
    c = torch.randn(n, dtype=f64, generator=g, requires_grad=True)

    def G(z: dict[str, torch.Tensor], p: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        v = torch.cat([z["s"].reshape(1), z["v"], z["m"].reshape(-1)])
        out = torch.tanh(p[0] @ v + p[1])
        return {"s": out[0], "v": out[1:4], "m": out[4:].reshape(2, 4)}

    z0 = {"s": torch.zeros((), dtype=f64), "v": torch.zeros(3, dtype=f64), "m": torch.zeros(2, 4, dtype=f64)}
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(lambda z: G(z, [W, c])), z0, solver="fixed_point", adjoint="exact", **TIGHT
    )
    assert sol.z["s"].shape == () and sol.z["m"].shape == (2, 4)
    assert sol.stats.residual.shape == () and sol.stats.converged.shape == ()
    loss = sol.z["s"] * 3 + sol.z["v"].sum() + (sol.z["m"] ** 2).sum()
    grads = torch.autograd.grad(loss, [W, c])
    z_star = {k: v.detach() for k, v in sol.z.items()}
    zs = {k: v.clone().requires_grad_() for k, v in z_star.items()}
    lz = zs["s"] * 3 + zs["v"].sum() + (zs["m"] ** 2).sum()
    dz = dict(zip(zs, torch.autograd.grad(lz, list(zs.values()))))
    assert _relerr(list(grads), ift_grads(G, z_star, [W, c], dz)) < 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
def test_ridge_root_closed_form(solver: str) -> None:
    """Ridge regression's stationarity ``Xᵀ(Xw - y) + λw = 0``: a root problem, not a fixed point."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 5, dtype=f64, generator=g)
    y = torch.randn(20, dtype=f64, generator=g, requires_grad=True)
    lam = torch.tensor(2.0, dtype=f64, requires_grad=True)
    H = X.T @ X + lam.detach() * torch.eye(5, dtype=f64)
    scale = float(torch.linalg.matrix_norm(H, ord=2)) * 1.1  # makes z - F(z) a contraction for Picard

    def F(w: torch.Tensor) -> torch.Tensor:
        return (X.T @ (X @ w - y) + lam * w) / scale

    w = implicit.root(F, torch.zeros(5, dtype=f64), solver=solver, adjoint="exact", tol=1e-12, max_iter=2000)
    w_ref = torch.linalg.solve(H, X.T @ y.detach())
    assert torch.allclose(w.detach(), w_ref, rtol=1e-9, atol=1e-11)
    a = torch.arange(1.0, 6.0, dtype=f64)
    glam, gy = torch.autograd.grad(a @ w, [lam, y])
    Hinv_a = torch.linalg.solve(H, a)
    assert torch.allclose(glam, -(Hinv_a @ w_ref), rtol=1e-8)  # dw/dλ = -H⁻¹ w
    assert torch.allclose(gy, X @ Hinv_a, rtol=1e-8)  # dw/dy = H⁻¹ Xᵀ


def test_gradcheck_small_problem() -> None:
    g = torch.Generator().manual_seed(5)
    W = 0.4 * torch.randn(3, 3, dtype=f64, generator=g) / 3
    theta = torch.randn(2, 3, dtype=f64, generator=g, requires_grad=True)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        return implicit.fixed_point(
            lambda z: torch.tanh(z @ W.T + theta), torch.zeros(2, 3, dtype=f64), batched=True,
            solver="fixed_point", adjoint="exact", tol=1e-14, max_iter=1000,
        )

    assert torch.autograd.gradcheck(fn, (theta,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_per_variable_hooks_give_wrong_gradient() -> None:
    """The approach of one backward hook per variable, each solving its own adjoint, is wrong."""
    params = [p.requires_grad_() for p in two_variable_params(scale=0.45)]
    f = lambda z: two_variable_map(z, params)  # noqa: E731
    with torch.no_grad():
        z_star = picard(f, two_variable_z0())
    x0 = z_star["x"].clone().requires_grad_()
    y0 = z_star["y"].clone().requires_grad_()
    out0 = f({"x": x0, "y": y0})
    out = f({"x": z_star["x"], "y": z_star["y"]})

    def hook_for(fz: torch.Tensor, z0: torch.Tensor):  # g = J_zzᵀ g + grad, this variable alone
        def hook(grad: torch.Tensor) -> torch.Tensor:
            g = grad
            for _ in range(500):
                g = torch.autograd.grad(fz, z0, g, retain_graph=True)[0] + grad
            return g

        return hook

    out["x"].register_hook(hook_for(out0["x"], x0))
    out["y"].register_hook(hook_for(out0["y"], y0))
    hooked = torch.autograd.grad(_loss(out), params)
    reference = _reference(params)
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(f, batched=True), two_variable_z0(),
        solver="fixed_point", adjoint="exact", **TIGHT,
    )
    joint = torch.autograd.grad(_loss(sol.z), params)
    assert _relerr(list(joint), reference) < 1e-8
    assert _relerr(list(hooked), reference) > 1e-2


@st.composite
def _problems(draw: st.DrawFn) -> tuple[list[tuple[int, ...]], int | None]:
    nvars = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))) for _ in range(nvars)]
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    return shapes, batch


@given(_problems(), st.sampled_from(EXACT_ADJOINTS))
def test_property_random_states(spec: tuple[list[tuple[int, ...]], int | None], adjoint: str) -> None:
    """Random variable counts, shapes, batch sizes, batched or not: gradient = dense IFT."""
    shapes, batch = spec
    batched = batch is not None
    lead = (batch,) if batched else ()
    sizes = [int(torch.tensor(s).prod()) if s else 1 for s in shapes]
    n = sum(sizes)
    g = torch.Generator().manual_seed(len(shapes) * 100 + n)
    W = torch.randn(n, n, dtype=f64, generator=g)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    c = torch.randn(lead + (n,), dtype=f64, generator=g)
    params = [W.requires_grad_(), c.requires_grad_()]
    keys = [f"v{i}" for i in range(len(shapes))]

    def G(z: dict[str, torch.Tensor], p: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        v = torch.cat([z[k].reshape(*lead, -1) for k in keys], dim=-1)
        out = torch.tanh(v @ p[0].T + p[1])
        parts = out.split(sizes, dim=-1)
        return {k: part.reshape(lead + s) for k, part, s in zip(keys, parts, shapes)}

    z0 = {k: torch.zeros(lead + s, dtype=f64) for k, s in zip(keys, shapes)}
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(lambda z: G(z, params), batched=batched), z0,
        solver="fixed_point", adjoint=adjoint, adjoint_options={"tol": 1e-12}, **TIGHT,
    )
    loss = sum((torch.cos(sol.z[k]) * (i + 1)).sum() for i, k in enumerate(keys))
    grads = torch.autograd.grad(loss, params)
    z_star = {k: v.detach() for k, v in sol.z.items()}
    zs = {k: v.clone().requires_grad_() for k, v in z_star.items()}
    lz = sum((torch.cos(zs[k]) * (i + 1)).sum() for i, k in enumerate(keys))
    dz = dict(zip(keys, torch.autograd.grad(lz, [zs[k] for k in keys])))
    assert _relerr(list(grads), ift_grads(G, z_star, params, dz)) < 1e-8
